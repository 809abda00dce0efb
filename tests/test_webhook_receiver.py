"""`alerting-app receive`: the local webhook receiver of the "Try it" lines, fed by our own webhook
channel over real HTTP."""
from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
import uuid

import aiohttp
from aiohttp.test_utils import TestServer

from alerting_app.channels.slack import send_slack
from alerting_app.channels.webhook import (TIMESTAMP_HEADER, TIMESTAMPED_SIGNATURE_HEADER, send_webhook,
                                            timestamped_signature)
from alerting_app.contracts import Alert, NotificationReady
from alerting_app.embedded import free_port
from alerting_app.up import alerting_app_executable
from alerting_app.webhook_receiver import receiver_app
from pipe_lines import read_lines_until


def a_notification() -> NotificationReady:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    return NotificationReady(client_id=str(uuid.uuid4()), alerts=[alert], rule_ids=[str(uuid.uuid4())])


async def received_by_a_receiver_of(secrets: tuple[str, ...], sent_with: str) -> dict:
    """What a receiver knowing `secrets` shows of one notification our webhook channel signed with `sent_with`."""
    shown: list[dict] = []
    notification = a_notification()
    async with TestServer(receiver_app(secrets, shown.append)) as server, aiohttp.ClientSession() as session:
        await send_webhook(session, str(server.make_url("/hook")), sent_with, "e-1", notification, timeout_s=10)
    [received] = shown
    assert received["path"] == "/hook"
    assert received["idempotency_key"] == f"{notification.notification_id}:e-1"
    assert received["notification"]["notification_id"] == notification.notification_id
    assert received["notification"]["alerts"][0]["alert_id"] == "a-1"
    return received


async def test_a_notification_signed_with_the_secret_given_is_shown_with_a_valid_signature():
    assert (await received_by_a_receiver_of(("s3cret",), sent_with="s3cret"))["signature"] == "valid"


async def test_a_notification_signed_with_another_secret_is_shown_as_invalid():
    assert (await received_by_a_receiver_of(("s3cret",), sent_with="another"))["signature"] == "INVALID"


async def test_without_a_secret_the_signature_is_shown_as_not_checked():
    assert (await received_by_a_receiver_of((), sent_with="s3cret"))["signature"].startswith("not checked")


async def test_with_several_secrets_a_notification_is_valid_by_the_one_that_signed_it_named_by_position():
    # Several endpoints pointed at one receiver each sign with their own secret: with one --secret,
    # every other endpoint's notifications were shown INVALID.
    secrets = ("first-endpoints-secret", "second-endpoints-secret", "third-endpoints-secret")
    shown = [(await received_by_a_receiver_of(secrets, sent_with=secret))["signature"] for secret in secrets]
    assert shown == ["valid (--secret #1)", "valid (--secret #2)", "valid (--secret #3)"]

    refused = await received_by_a_receiver_of(secrets[:2], sent_with="another")
    assert refused["signature"] == "INVALID (none of the 2 secrets given)"
    assert not any(secret in json.dumps(refused) for secret in secrets)


async def test_a_slack_message_to_a_receiver_with_a_secret_is_shown_as_not_signed_not_invalid():
    # A Slack endpoint pointed at `receive` (as a user trying the channels does) posts no signature:
    # "INVALID" read as a wrong secret.
    shown: list[dict] = []
    async with TestServer(receiver_app(("s3cret",), shown.append)) as server, aiohttp.ClientSession() as session:
        await send_slack(session, str(server.make_url("/slack")), a_notification(), timeout_s=10)
    [received] = shown
    assert received["signature"].startswith("none (not signed")
    assert received["notification"]["text"].startswith("[HIGH] payments")


def test_the_receive_command_prints_each_post_as_a_json_line_and_stops_on_ctrl_c():
    port = free_port()
    receiver = subprocess.Popen([alerting_app_executable(), "receive", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(receiver.stderr, lambda line: "receiving webhooks on" in line, "the receiver listening", 60)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/hook", data=b'{"version": 1}', method="POST",
                                         headers={"Idempotency-Key": "n-1:e-1"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        received = json.loads(receiver.stdout.readline())
        assert (received["path"], received["idempotency_key"], received["notification"]) == (
            "/hook", "n-1:e-1", {"version": 1})
        receiver.send_signal(signal.SIGINT)
        assert receiver.wait(timeout=30) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def test_the_receive_command_takes_several_secrets_and_names_the_one_that_verified_a_post():
    port = free_port()
    receiver = subprocess.Popen([alerting_app_executable(), "receive", "--port", str(port),
                                 "--secret", "first-endpoints-secret", "--secret", "second-endpoints-secret"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(receiver.stderr, lambda line: "receiving webhooks on" in line, "the receiver listening", 60)
        body, timestamp = b'{"version": 1}', "1700000000"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/hook", data=body, method="POST",
            headers={TIMESTAMP_HEADER: timestamp,
                     TIMESTAMPED_SIGNATURE_HEADER: timestamped_signature("second-endpoints-secret", timestamp, body)})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        received = json.loads(receiver.stdout.readline())
        assert received["signature"] == "valid (--secret #2)"
        receiver.send_signal(signal.SIGINT)
        assert receiver.wait(timeout=30) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
