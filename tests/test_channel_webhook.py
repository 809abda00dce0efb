"""The webhook channel against a real local receiver: payload, signature, idempotency key,
timeout, and which failures are worth retrying."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from email.utils import formatdate

import aiohttp
import pytest

from alerting_app.channels.errors import PermanentDeliveryError, RetryableDeliveryError
from alerting_app.channels.http import error_text, raise_for_status, retry_after_seconds
from alerting_app.channels.webhook import send_webhook, webhook_body
from alerting_app.contracts import Alert, NotificationReady
from delivery_receivers import Answer, Receiver

SECRET = "s3cret-of-the-endpoint"
ENDPOINT_ID = "7a1b4c9e-0000-4000-8000-000000000001"


def notification() -> NotificationReady:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000.5, severity="HIGH", source="payments",
                  name="CheckoutLatency", context={"region": "eu-west-1"})
    return NotificationReady(notification_id="6f1c2a34-0000-4000-8000-000000000002",
                             client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=[alert],
                             rule_ids=["1d2e3f40-0000-4000-8000-000000000004"], created_at=1_700_000_001.25)


async def send(url: str, timeout_s: float = 5.0) -> None:
    async with aiohttp.ClientSession() as session:
        await send_webhook(session, url, SECRET, ENDPOINT_ID, notification(), timeout_s)


async def test_webhook_posts_the_versioned_payload_signed_with_the_endpoints_secret():
    async with Receiver() as receiver:
        await send(receiver.url())

        [post] = receiver.posts
        assert post.body == {
            "version": 1,
            "notification_id": "6f1c2a34-0000-4000-8000-000000000002",
            "client_id": "0c3f5d6e-0000-4000-8000-000000000003",
            "rule_ids": ["1d2e3f40-0000-4000-8000-000000000004"],
            "alerts": [{"alert_id": "a-1", "schema_version": 1, "event_ts": 1_700_000_000.5, "severity": "HIGH",
                        "source": "payments", "name": "CheckoutLatency", "context": {"region": "eu-west-1"}}],
            "created_at": 1_700_000_001.25,
        }
        assert post.headers["Content-Type"] == "application/json"
        # What a receiver does to verify: HMAC-SHA256 of the raw body with the endpoint's secret.
        expected = hmac.new(SECRET.encode(), post.raw, hashlib.sha256).hexdigest()
        assert post.headers["X-Alerting-Signature"] == f"sha256={expected}"
        assert post.headers["Idempotency-Key"] == f"6f1c2a34-0000-4000-8000-000000000002:{ENDPOINT_ID}"


async def test_a_tampered_body_does_not_match_the_signature():
    async with Receiver() as receiver:
        await send(receiver.url())
        [post] = receiver.posts
    received = post.headers["X-Alerting-Signature"]

    def verifies(body: bytes) -> bool:
        # What a receiver does: HMAC-SHA256 of the raw body with the secret, compared in constant time.
        return hmac.compare_digest(received, "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest())

    # The header sent verifies the body sent, and only it: one changed field no longer verifies.
    assert verifies(post.raw)
    assert not verifies(json.dumps({**post.body, "client_id": "someone-else"}).encode())


async def test_the_timestamped_signature_covers_the_time_of_sending_so_a_replay_can_be_refused():
    sent_from = int(time.time())
    async with Receiver() as receiver:
        await send(receiver.url())
        [post] = receiver.posts
    sent_until = int(time.time())
    timestamp = post.headers["X-Alerting-Timestamp"]
    received = post.headers["X-Alerting-Signature-Timestamped"]

    def verifies(stamp: str, body: bytes) -> bool:
        # What a receiver does: HMAC-SHA256 of "<timestamp>.<raw body>" with the secret, compared in
        # constant time, then refuses a timestamp older than its tolerance (docs/delivery.md).
        expected = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(received, f"sha256={expected}")

    # The timestamp is the time of sending, in whole seconds since the epoch.
    assert sent_from <= int(timestamp) <= sent_until
    assert verifies(timestamp, post.raw)
    # A replayer cannot make a captured request look recent: a newer timestamp no longer verifies.
    assert not verifies(str(int(timestamp) + 600), post.raw)
    assert not verifies(timestamp, json.dumps({**post.body, "client_id": "someone-else"}).encode())


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_a_delivery(status):
    async with Receiver() as receiver:
        receiver.answer("hook", status)
        await send(receiver.url())
        assert len(receiver.posts) == 1


@pytest.mark.parametrize("status", [200, 299])
def test_a_2xx_at_either_end_of_the_range_is_a_delivery(status):
    raise_for_status(status)  # returns: no DeliveryError

@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_is_retryable(status):
    async with Receiver() as receiver:
        receiver.answer("hook", status)
        with pytest.raises(RetryableDeliveryError, match=f"HTTP {status}"):
            await send(receiver.url())


@pytest.mark.parametrize("status", [408, 409, 425])
async def test_a_4xx_that_says_not_now_is_retryable(status):
    # 408 request timeout, 409 a retry meeting its first request still in progress (Idempotency-Key
    # draft), 425 too early: the same request may succeed later.
    async with Receiver() as receiver:
        receiver.answer("hook", status)
        with pytest.raises(RetryableDeliveryError, match=f"HTTP {status}"):
            await send(receiver.url())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
async def test_a_4xx_other_than_429_is_permanent(status):
    async with Receiver() as receiver:
        receiver.answer("hook", status)
        with pytest.raises(PermanentDeliveryError, match=f"HTTP {status}"):
            await send(receiver.url())


async def test_a_redirect_is_not_followed_and_is_permanent():
    async with Receiver() as receiver:
        receiver.answer("hook", Answer(301, {"Location": receiver.url("elsewhere")}))
        with pytest.raises(PermanentDeliveryError, match="HTTP 301"):
            await send(receiver.url())
        assert [post.path for post in receiver.posts] == ["hook"]


@pytest.mark.parametrize("status", [300, 304, 399])
def test_a_3xx_at_either_end_of_the_range_is_no_delivery(status):
    # 300 Multiple Choices sits on the 2xx range's upper bound: it is not delivered, and not retried.
    with pytest.raises(PermanentDeliveryError, match=f"HTTP {status} \\(redirects are not followed\\)"):
        raise_for_status(status)


@pytest.mark.parametrize("status", [429, 503])
async def test_a_429_or_503_is_retryable_after_the_delay_it_asks_for(status):
    async with Receiver() as receiver:
        receiver.answer("hook", Answer(status, {"Retry-After": "7"}))
        with pytest.raises(RetryableDeliveryError, match=f"HTTP {status}") as raised:
            await send(receiver.url())
        assert raised.value.retry_after == 7.0


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = 1_700_000_000.0
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


@pytest.mark.parametrize("value", [
    "²", "١٢",  # digits to str.isdigit, not to float()
    "Sun, 06 Nov 99999999999999999999 08:49:37 GMT",  # a year too large for a C long
    "12.5", "-3",
])
def test_a_retry_after_that_is_no_delay_is_ignored_not_raised(value):
    assert retry_after_seconds(value, 1_700_000_000.0) is None
    with pytest.raises(RetryableDeliveryError) as raised:
        raise_for_status(429, value)
    assert raised.value.retry_after is None


def test_a_huge_retry_after_is_infinite_for_the_retry_to_cap():
    assert retry_after_seconds("9" * 400) == float("inf")


async def test_an_endpoint_that_does_not_answer_in_time_is_a_retryable_timeout():
    async with Receiver() as receiver:
        release = receiver.hold("hook")
        with pytest.raises(RetryableDeliveryError, match="timed out after 0.3s"):
            await send(receiver.url(), timeout_s=0.3)
        release.set()


async def test_a_refused_connection_is_retryable():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RetryableDeliveryError, match="ClientConnectorError"):
        await send(f"http://127.0.0.1:{port}/hook")


def test_the_body_keeps_the_documented_field_order_and_sends_text_as_utf8():
    alert = notification().alerts[0].model_copy(update={"context": {"site": "Zürich ☃"}})
    ungrouped = notification().model_copy(update={"alerts": [alert]})
    body = webhook_body(ungrouped)
    assert list(json.loads(body)) == ["version", "notification_id", "client_id", "rule_ids", "alerts", "created_at"]
    assert "Zürich ☃".encode() in body
    assert json.loads(body)["alerts"][0]["context"] == {"site": "Zürich ☃"}

    grouped = ungrouped.model_copy(update={"group_rule_id": "1d2e3f40-0000-4000-8000-000000000004",
                                           "truncated_alerts": 0})
    assert list(json.loads(webhook_body(grouped)))[-2:] == ["group_rule_id", "truncated_alerts"]
    assert json.loads(webhook_body(grouped))["truncated_alerts"] == 0



def test_a_grouped_notifications_body_names_its_rule_and_counts_the_alerts_it_does_not_list():
    grouped = notification().model_copy(update={"group_rule_id": "1d2e3f40-0000-4000-8000-000000000004",
                                                "truncated_alerts": 7})
    body = json.loads(webhook_body(grouped))
    assert (body["group_rule_id"], body["truncated_alerts"]) == ("1d2e3f40-0000-4000-8000-000000000004", 7)


class RawReceiver:
    """A receiver that writes `answer` (raw bytes, in parts 0.1 s apart) once it has the request,
    then keeps the connection open without a word more: the body a status line promised may never come."""

    def __init__(self, *answer: bytes) -> None:
        self.answer = answer
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "RawReceiver":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        for part in self.answer:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("answer", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",),  # the body never comes: the read times out
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\n"),  # a broken chunked body
], ids=["stalled body", "broken body"])
async def test_a_2xx_is_a_delivery_whatever_its_body_does_after_it(answer):
    async with RawReceiver(*answer) as receiver:
        await send(receiver.url("hook"), timeout_s=0.5)


async def test_a_5xx_whose_body_stalls_is_reported_by_its_status():
    async with RawReceiver(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n") as receiver:
        with pytest.raises(RetryableDeliveryError, match="HTTP 503"):
            await send(receiver.url("hook"), timeout_s=0.5)


async def test_a_failure_reason_does_not_carry_the_urls_path():
    # A Slack webhook's path is its credential; reasons go to the API and the dead-letter topic.
    async with RawReceiver(b"NOT HTTP AT ALL\r\n\r\n") as receiver:
        url = receiver.url("services/T000/B000/XXXXSECRETXXXX")
        with pytest.raises(RetryableDeliveryError) as raised:
            await send(url, timeout_s=0.5)
    reason = str(raised.value)
    assert "ClientResponseError" in reason and "SECRET" not in reason, reason


def test_the_text_of_an_error_that_is_no_answer_keeps_only_the_urls_origin():
    # aiohttp names the URL in some errors of their own (InvalidURL's text is the URL itself).
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX?token=XXXXSECRETXXXX"
    assert error_text(aiohttp.InvalidURL(url), url) == "https://hooks.slack.com"


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Los_Angeles"])
def test_an_http_date_without_a_zone_is_utc_whatever_the_workers_time_zone(zone, monkeypatch):
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        now = 1_700_000_000.0
        asctime = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(now + 30))  # RFC 9110's third form
        assert retry_after_seconds(asctime, now) == 30.0
        assert retry_after_seconds(formatdate(now + 30), now) == 30.0  # "-0000": UTC, zone unknown
    finally:
        monkeypatch.undo()
        time.tzset()
