"""Decoding of incoming messages, and the dead-letter path for those that fail.

A message that cannot be decoded or validated must not stop the worker, and must not vanish:
it goes to `<topic>.dlq` with the reason and is counted.
"""
from __future__ import annotations

import logging
import re
import uuid
from typing import Any, TypeVar

from pydantic import ValidationError

from alerting_app import metrics
from alerting_app.app import DEAD_LETTER_TOPICS
from alerting_app.contracts import Contract, DeadLetter

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


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def require_uuids(**fields: list[str]) -> None:
    """Refuse ids our tables cannot hold: the reason names the first field that is not a UUID."""
    for name, values in fields.items():
        for value in values:
            if _CANONICAL_UUID.fullmatch(value):
                continue  # the usual form, checked without building a UUID (that showed in profiles)
            try:
                uuid.UUID(value)
            except ValueError:
                raise UndecodableMessage(f"{name}: not a UUID: {value!r}") from None


def describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "message"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def dead_letter_for(message: Any, reason: str) -> DeadLetter:
    """The dead letter for a consumed message: a Faust `Message` or an aiokafka `ConsumerRecord`
    (both carry topic, partition, offset, key and value)."""
    return DeadLetter(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key.decode("utf-8", "replace") if message.key is not None else None,
        reason=reason,
        payload=(message.value or b"").decode("utf-8", "replace"),
    )


async def send_dead_letter(letter: DeadLetter) -> None:
    log.warning("dead letter from %s[%s]@%s: %s", letter.topic, letter.partition, letter.offset, letter.reason)
    metrics.dead_letters.labels(topic=letter.topic).inc()
    await DEAD_LETTER_TOPICS[letter.topic].send(
        key=letter.key.encode() if letter.key is not None else None, value=letter.encode()
    )
