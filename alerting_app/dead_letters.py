"""Decoding of incoming messages, and the dead-letter path for those that fail.

A message that cannot be decoded or validated must not stop the worker, and must not vanish:
it goes to `<topic>.dlq` with the reason and is counted. Sending waits for the broker's
acknowledgement, so a letter the broker refuses raises before the source message is acknowledged;
and a letter is cut to what the producer accepts, or it would be refused on every redelivery.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from faust.types import TopicT
from pydantic import ValidationError

from alerting_app import metrics
from alerting_app.app import DEAD_LETTER_TOPICS
from alerting_app.contracts import Contract, DeadLetter
from alerting_app.json_logs import one_line_for_log
from alerting_app.sending import max_record_bytes

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Contract)


class UndecodableMessage(ValueError):
    """The message is not valid JSON for its contract; `str(self)` is the reason."""


def decode(contract: type[C], raw: bytes | None) -> C:
    if raw is None:
        raise UndecodableMessage("empty message (no value)")
    try:
        return contract.model_validate_json(raw)
    except ValidationError as exc:
        raise UndecodableMessage(describe_validation_error(exc)) from None


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def require_uuids(**fields: list[str]) -> None:
    """Refuse ids our tables cannot hold: the reason names the first field that is not a UUID.

    Only the canonical form (lowercase, hyphenated: what Postgres and our producers write) passes.
    Python's UUID also reads `{...}`, `urn:uuid:...` and unhyphenated forms, which asyncpg refuses
    later, inside a batch's statement; and an id in another form than the stored one would not be
    found by the comparisons that join rows by their text.
    """
    for name, values in fields.items():
        for value in values:
            if not CANONICAL_UUID.fullmatch(value):
                raise UndecodableMessage(f"{name}: not a UUID in canonical form (lowercase, hyphenated): {value!r}")


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def dead_letter_for(message: Any, reason: str) -> DeadLetter:
    """The dead letter for a consumed message: a Faust `Message` or an aiokafka `ConsumerRecord`
    (both carry topic, partition, offset, key and value), cut to what the producer accepts."""
    letter = DeadLetter(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key.decode("utf-8", "replace") if message.key is not None else None,
        reason=reason,
        payload=(message.value or b"").decode("utf-8", "replace"),
    )
    return bounded(letter, original_key=message.key, original_value=message.value or b"")


# A letter too big for the producer would be refused on every retry: cut to sending.max_record_bytes.
MAX_KEY_CHARS = 1000
MAX_REASON_CHARS = 10_000  # a reason may quote the bad value (require_uuids does)


def bounded(letter: DeadLetter, *, limit: int | None = None, original_key: bytes | None = None,
            original_value: bytes | None = None) -> DeadLetter:
    """`letter`, or, when its key and encoded value exceed `limit` bytes, the letter with its
    payload (and a long key or reason) cut, the reason saying so with the original's length in
    bytes and its sha256. The topic, partition and offset still point to the original.

    `original_key` and `original_value` are the consumed bytes, when there are any: the letter's
    strings were decoded from them with replacement.
    """
    limit = max_record_bytes() if limit is None else limit
    if _record_bytes(letter) <= limit:
        return letter
    key, reason, notes = letter.key, letter.reason, []
    if key is not None and len(key) > MAX_KEY_CHARS:
        notes.append(_cut_note("key", original_key if original_key is not None else key.encode()))
        key = key[:MAX_KEY_CHARS]
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."

    def with_notes(*more: str) -> str:
        return f"{reason} [{'; '.join([*notes, *more])}]" if notes or more else reason

    payload_note = _cut_note("payload", original_value if original_value is not None else letter.payload.encode())
    cut = letter.model_copy(update={"key": key, "reason": with_notes(payload_note), "payload": ""})
    # The longest prefix of the payload that fits: JSON escaping makes a character 1 to 6 bytes,
    # so search rather than guess. At least one byte a character bounds the search by `limit`.
    fits, too_long = 0, min(len(letter.payload), limit) + 1
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if _record_bytes(cut.model_copy(update={"payload": letter.payload[:middle]})) <= limit:
            fits = middle
        else:
            too_long = middle
    if fits == len(letter.payload):  # the key or the reason was what did not fit
        return letter.model_copy(update={"key": key, "reason": with_notes()})
    return cut.model_copy(update={"payload": letter.payload[:fits]})


def _cut_note(what: str, original: bytes) -> str:
    return f"{what} truncated: the original was {len(original)} bytes, sha256 {hashlib.sha256(original).hexdigest()}"


def _record_bytes(letter: DeadLetter) -> int:
    return len(letter.encode()) + (len(letter.key.encode()) if letter.key is not None else 0)


async def send_dead_letters(letters: Iterable[DeadLetter],
                            dead_letter_topics: Mapping[str, TopicT] = DEAD_LETTER_TOPICS) -> None:
    """Send each letter to its topic's `.dlq`; return once the broker acknowledged them all.

    Raises when the broker refuses one or cannot be reached in time: the caller must then not
    acknowledge the message the letter stands for (an agent's sink raising leaves its batch
    unacknowledged; the delivery recorder keeps the letter and tries again).

    `dead_letter_topics`, by the topic the letters come from: the app's, unless a test passes topics
    of an app of its own (a topic sends with its app's producer), to a broker it can make fail.
    """
    letters = [bounded(letter) for letter in letters]
    acks = []
    for letter in letters:
        if letter.partition is None:
            # A delivery's FAILED letter (delivery/attempts.py) stands for no one consumed message: the
            # line read `notifications.ready[None]@None`.
            log.warning("dead letter from %s (a delivery, not a consumed message): %s", letter.topic,
                        one_line_for_log(letter.reason))
        else:
            # The reason may quote the message (a context key the contract refused): its line breaks
            # are escaped in the log, which one line per record keeps readable and unforgeable.
            log.warning("dead letter from %s[%s]@%s: %s", letter.topic, letter.partition, letter.offset,
                        one_line_for_log(letter.reason))
        # force: never attached to the event being processed (Faust's stream_publish_on_commit),
        # whose future would resolve only when the event is committed, after this returns.
        acks.append(await dead_letter_topics[letter.topic].send(
            key=letter.key.encode() if letter.key is not None else None, value=letter.encode(), force=True))
    results = await asyncio.gather(*acks, return_exceptions=True)  # every outcome retrieved, none left unseen
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        raise failures[0]
    for letter in letters:
        metrics.dead_letters.labels(topic=letter.topic, from_history=str(letter.from_history).lower()).inc()
