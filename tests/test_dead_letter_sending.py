"""Sending dead letters: a letter too big for the producer is cut to fit and says so, a letter the
real broker takes is acknowledged before the send returns, and one a broker refuses raises (a broker
of the test's own, behind a front that refuses connections: the session's cannot be made to refuse)."""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaError

from alerting_app.contracts import Alert, DeadLetter
from alerting_app.dead_letters import UndecodableMessage, bounded, dead_letter_for, decode, send_dead_letters
from alerting_app.sending import max_record_bytes
from broker_front import OutageFront
from private_brokers import app_sending_behind
from test_agent_support import AGENT_LOOP, pipeline, sent_to  # noqa: F401  (fixtures)


def consumed(key: bytes | None, value: bytes) -> SimpleNamespace:
    return SimpleNamespace(topic="alerts.new", partition=3, offset=42, key=key, value=value)


def record_bytes(letter: DeadLetter) -> int:
    return len(letter.encode()) + len((letter.key or "").encode())


def test_a_small_letter_is_kept_whole():
    message = consumed(b"k", b'{"alert_id": 1}')
    letter = dead_letter_for(message, "alert_id: Input should be a valid string")
    assert (letter.key, letter.payload, letter.reason) == ("k", '{"alert_id": 1}',
                                                          "alert_id: Input should be a valid string")


# NULs are escaped as \u0000 (6 bytes each): the worst case for JSON escaping.
@pytest.mark.parametrize("value", [b"x" * 3_000_000, b"\x00" * 400_000, "\u00e9".encode() * 700_000])
def test_a_huge_payload_is_cut_to_fit_and_the_reason_says_what_it_was(value):
    letter = dead_letter_for(consumed(b"k", value), "Invalid JSON")

    assert record_bytes(letter) <= max_record_bytes()
    assert value.decode().startswith(letter.payload) and len(letter.payload) < len(value.decode())
    assert letter.reason == (f"Invalid JSON [payload truncated: the original was {len(value)} bytes,"
                             f" sha256 {hashlib.sha256(value).hexdigest()}]")
    assert (letter.topic, letter.partition, letter.offset, letter.key) == ("alerts.new", 3, 42, "k")



def test_a_letter_of_exactly_the_limit_is_kept_whole_and_one_byte_more_is_cut():
    letter = DeadLetter(topic="alerts.new", key="k", reason="bad", payload="p" * 5000, failed_at=1.0)

    assert bounded(letter, limit=record_bytes(letter)) == letter
    cut = bounded(letter, limit=record_bytes(letter) - 1)
    assert record_bytes(cut) < record_bytes(letter)
    assert cut.payload.startswith("p") and len(cut.payload) < 5000 and "[payload truncated" in cut.reason

def test_a_huge_key_is_cut_too():
    key = b"k" * 2_000_000
    letter = dead_letter_for(consumed(key, b"{}"), "key too long")

    assert record_bytes(letter) <= max_record_bytes()
    assert letter.key == "k" * 1000 and letter.payload == "{}"
    assert letter.reason == (f"key too long [key truncated: the original was {len(key)} bytes,"
                             f" sha256 {hashlib.sha256(key).hexdigest()}]")


def test_the_payload_kept_is_the_longest_that_fits():
    letter = DeadLetter(topic="alerts.new", reason="bad", payload="p" * 5000, failed_at=1.0)
    cut = bounded(letter, limit=2000)
    assert record_bytes(cut) <= 2000
    assert record_bytes(cut.model_copy(update={"payload": "p" * (len(cut.payload) + 1)})) > 2000


@AGENT_LOOP
async def test_a_letter_too_big_for_the_producer_is_acknowledged_by_the_broker_cut(pipeline):
    key = f"huge-{uuid.uuid4()}"
    value = b'{"alert_id": "' + b"\x01" * 2_000_000 + b'"}'

    await send_dead_letters([dead_letter_for(consumed(key.encode(), value), "Invalid JSON")])

    [on_broker] = await sent_to("alerts.new.dlq", key)
    assert "payload truncated: the original was 2000016 bytes" in on_broker["reason"]
    assert len(json.dumps(on_broker)) <= max_record_bytes()



@AGENT_LOOP
async def test_a_letter_built_without_dead_letter_for_is_cut_when_sent(pipeline):
    # Letters of what a table held (tables/groups.py malformed_letter) or of a group Postgres refused
    # are built directly, of any size: sending is what cuts them to fit.
    key = f"built-{uuid.uuid4()}"
    payload = "\x01" * 2_000_000
    letter = DeadLetter(topic="alerts.matched", partition=0, key=key, reason="not a group", payload=payload)

    await send_dead_letters([letter])

    [on_broker] = await sent_to("alerts.matched.dlq", key)
    assert on_broker["reason"].startswith("not a group [payload truncated: the original was 2000000 bytes")
    assert payload.startswith(on_broker["payload"]) and len(json.dumps(on_broker)) <= max_record_bytes()

@AGENT_LOOP
async def test_a_failed_deliverys_letter_is_logged_without_a_partition_or_offset(pipeline, caplog):
    # A delivery's letter comes from no consumed message: the warning read `notifications.ready[None]@None`.
    reason = f"endpoint {uuid.uuid4()} (webhook): HTTP 500; FAILED after 8 attempt(s)"
    letter = DeadLetter(topic="notifications.ready", key=str(uuid.uuid4()), reason=reason, payload="{}")

    with caplog.at_level(logging.WARNING, logger="alerting_app.dead_letters"):
        await send_dead_letters([letter])

    assert [record.getMessage() for record in caplog.records if record.name == "alerting_app.dead_letters"] == [
        f"dead letter from notifications.ready (a delivery, not a consumed message): {reason}"]


@AGENT_LOOP
async def test_a_letter_the_broker_refuses_raises(tmp_path):
    """Refused, the producer gives the send up once its request timeout is over (20 minutes in a
    worker, a second here): the caller sees the failure, and must not acknowledge the message."""
    from alerting_app import metrics

    async with app_sending_behind(OutageFront, tmp_path, "dead-letter-refused", "alerts.new.dlq",
                                  producer_request_timeout=1.0) as (front, topic):
        try:
            counted = metrics.dead_letters.labels(topic="alerts.new", from_history="false")._value.get()
            front.refuse()

            with pytest.raises(KafkaError):
                await send_dead_letters([dead_letter_for(consumed(b"k", b"{"), "Invalid JSON")],
                                        {"alerts.new": topic})
            assert metrics.dead_letters.labels(topic="alerts.new", from_history="false")._value.get() == counted
        finally:
            front.let_through()


@AGENT_LOOP
async def test_a_line_break_an_alert_brings_into_the_reason_is_logged_escaped(pipeline, caplog):
    # An alert's context key is quoted by the reason it is refused with: its line break began a log
    # line of its own, which read as the worker's (a forged ERROR), whoever produced to alerts.new.
    key = f"forged-{uuid.uuid4()}"
    forged = "[2026-11-29 07:00:00,000] [1] [ERROR] the database password is hunter2"
    value = json.dumps({"alert_id": key, "event_ts": 1, "severity": "LOW", "source": "s", "name": "n",
                        "context": {f"k\n{forged}": 5}}).encode()
    with pytest.raises(UndecodableMessage) as refused:
        decode(Alert, value)

    with caplog.at_level(logging.WARNING, logger="alerting_app.dead_letters"):
        await send_dead_letters([dead_letter_for(consumed(key.encode(), value), str(refused.value))])

    [logged] = [record.getMessage() for record in caplog.records if record.name == "alerting_app.dead_letters"]
    assert logged.splitlines() == [logged]
    assert f"context.k\\n{forged}: Input should be a valid string" in logged
    [on_broker] = await sent_to("alerts.new.dlq", key)
    assert f"context.k\n{forged}" in on_broker["reason"]  # the letter itself keeps the reason as it was


def test_a_payload_that_is_not_utf8_is_described_by_its_own_bytes():
    # The note's length and sha256 find the original message: those of the text decoded with
    # replacement characters (three bytes each for one byte here) would match no message.
    value = b"\xff" * 3_000_000
    letter = dead_letter_for(consumed(b"k", value), "Invalid JSON")

    assert record_bytes(letter) <= max_record_bytes()
    assert letter.reason == (f"Invalid JSON [payload truncated: the original was {len(value)} bytes,"
                             f" sha256 {hashlib.sha256(value).hexdigest()}]")


def test_a_reason_too_long_for_the_producer_is_cut_too():
    # A reason may quote the bad value: whole, the letter was refused on every redelivery.
    letter = dead_letter_for(consumed(b"k", b"{}"), "alert_id: not a UUID: " + "x" * 3_000_000)

    assert record_bytes(letter) <= max_record_bytes()
    assert letter.reason == "alert_id: not a UUID: " + "x" * (10_000 - 22) + "..."
    assert letter.payload == "{}"
