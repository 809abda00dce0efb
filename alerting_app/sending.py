"""Sending many keyed messages at once, as record batches (used by every stage that emits)."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from functools import lru_cache

from aiokafka.partitioner import DefaultPartitioner
from faust.types import TopicT

from alerting_app.app import app

_partitioner = DefaultPartitioner()

# The producer refuses a record bigger than its max_request_size (Faust's producer_max_request_size,
# 1,000,000 bytes by default) when sent alone; record batches (send_batched) are not checked, and the
# broker refuses one over its own limit (message.max.bytes, 1,048,588 by default) on every retry.
# A record's key and value stay this far under the producer's limit, for the record's own framing.
_RECORD_FRAMING_BYTES = 1024


def max_record_bytes() -> int:
    """The most bytes a record's key and value together may take."""
    return app.conf.producer_max_request_size - _RECORD_FRAMING_BYTES


@lru_cache(maxsize=100_000)
def partition_for(key: bytes, partitions: tuple[int, ...]) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key) picks, as Topic.send would.

    Cached: keys repeat (a few thousand client ids), and murmur2 in pure Python costs microseconds.
    """
    return _partitioner(key, list(partitions), list(partitions))


async def send_batched(topic: TopicT, messages: Iterable[tuple[bytes, bytes | None]]) -> list[asyncio.Future]:
    """Queue keyed messages (a None value: a tombstone) as one record batch per partition; return the broker
    acknowledgements.

    Faust's `Topic.send` costs about 40 us per message (a future, callbacks and sensor calls per
    message), which made it most of the evaluator's time at six or seven messages per alert.
    aiokafka's batch API appends each message in C (about 3 us) to the partition its key hashes
    to, so messages land where `Topic.send` would have put them, in the same order per key.
    """
    # The topic's own app: in a worker every topic is `app`'s; a test's topic may be of an app sending
    # to a broker of its own. Faust has no public accessor for the aiokafka producer.
    producer = (await topic.app.maybe_start_producer())._ensure_producer()
    name = topic.get_topic_name()
    partitions = tuple(sorted(await producer.partitions_for(name)))
    batches: dict[int, object] = {}
    acks: list[asyncio.Future] = []
    try:
        for key, value in messages:
            partition = partition_for(key, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                acks.append(await producer.send_batch(batch, name, partition=partition))
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            acks.append(await producer.send_batch(batch, name, partition=partition))
    except (Exception, asyncio.CancelledError):
        # The batches queued before the failure are still on their way: see all_acknowledged. A
        # cancellation (the worker stopping) waits for them too, as all_acknowledged does: the outbox
        # relay releases its ordering lock as soon as this returns, and what it queued must not land after.
        if acks:
            await asyncio.wait(acks)
            _failures(acks)  # read, so that asyncio does not log them as never retrieved
        raise
    return acks


async def all_acknowledged(acks: list[asyncio.Future]) -> None:
    """Wait for the broker's answer to every one of `acks`, then raise the first failure.

    Unlike `asyncio.gather`, which raises at the first failure, this returns or raises only once
    nothing of these sends is in flight any more. A caller holding a lock that orders its sends
    (the outbox relay) must not let the next holder send while its own may still land after.
    If the wait is cancelled (the worker stops), it still waits for the answers first.
    """
    if not acks:
        return
    try:
        await asyncio.wait(acks)  # never cancels the acks themselves, as gather would
    except asyncio.CancelledError:
        await asyncio.wait(acks)
        _failures(acks)
        raise
    failures = _failures(acks)
    if failures:
        raise failures[0]


class SendCancelled(Exception):
    """A send's acknowledgement was cancelled, by something other than its waiter: an ordinary
    failure for the caller, not the cancellation of the caller's own task."""


def _failures(acks: list[asyncio.Future]) -> list[BaseException]:
    """The failures of these settled acks, each read (asyncio logs an exception never retrieved)."""
    return [SendCancelled("a send was cancelled") if ack.cancelled() else ack.exception()
            for ack in acks if ack.cancelled() or ack.exception() is not None]
