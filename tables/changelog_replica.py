"""A worker's own full copy of a compacted changelog topic, read from every partition outside the group.

Rules (tables/rule_replica.py, which says why this is not a Faust GlobalTable) and silences
(tables/silences.py) must both be known to every worker, whatever partitions of `alerts.new` it
consumes. `ChangelogReplica` holds what the two share: connecting, finding every partition and its
end offset, reading for ever, applying each event to an index that ignores stale versions, and
saying when it has read up to the end offsets it saw at start (`wait_until_caught_up`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from alerting_app.contracts import Contract, DeadLetter
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, send_dead_letter

log = logging.getLogger(__name__)

# What a batch of records from getmany looks like: partition -> its records, in offset order.
Batches = dict[TopicPartition, list[Any]]


class ChangeIndex(Protocol):
    def apply(self, change: Any) -> bool: ...

    def __len__(self) -> int: ...


class ChangelogReplica:
    """Follows one changelog topic into `index`; subclasses name the event contract and its key field."""

    contract: type[Contract]
    key_field: str
    # In the log: bench/stack.py waits for "rule replica caught up".
    name: str

    def __init__(self, index: ChangeIndex,
                 on_dead_letter: Callable[[DeadLetter], Awaitable[None]] = send_dead_letter) -> None:
        self.index = index
        self._on_dead_letter = on_dead_letter
        self._caught_up = asyncio.Event()
        self.caught_up_at_offsets: dict[int, int] = {}

    @property
    def is_caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_until_caught_up(self) -> None:
        await self._caught_up.wait()

    def apply_records(self, records) -> tuple[dict[str, bytes], list[DeadLetter]]:
        """Apply records to the index; return (key -> raw event that changed the index, dead letters)."""
        changed: dict[str, bytes] = {}
        dead = []
        for record in records:
            try:
                change = decode(self.contract, record.value)
            except UndecodableMessage as exc:
                dead.append(dead_letter_for(record, str(exc)))
                continue
            if self.index.apply(change):
                changed[getattr(change, self.key_field)] = record.value
        return changed, dead

    async def follow(self, bootstrap: str, topic: str, *,
                     start_at: Callable[[dict[TopicPartition, int]], dict[int, int]],
                     on_batches: Callable[[Batches], list[DeadLetter]], poll_ms: int = 100) -> None:
        """Read every partition of `topic` for ever.

        `start_at(end offsets)` gives the offset to start each partition from (absent: its
        beginning); `on_batches` handles each batch read and returns its dead letters.
        """
        consumer = await _connected_consumer(bootstrap, poll_ms)
        try:
            tps = await _all_partitions(consumer, topic)
            consumer.assign(tps)
            ends = await _end_offsets(bootstrap, tps)
            offsets = start_at(ends)
            for tp in tps:
                if tp.partition in offsets:
                    consumer.seek(tp, offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.caught_up_at_offsets = {tp.partition: ends[tp] for tp in tps}
            while True:
                if not self.is_caught_up and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    log.info("%s caught up: %d held", self.name, len(self.index))
                    self._caught_up.set()
                batches = await consumer.getmany(timeout_ms=poll_ms, max_records=5000)
                if not batches:
                    continue
                for letter in on_batches(batches):
                    await self._on_dead_letter(letter)
        finally:
            await consumer.stop()


def records_of(batches: Batches) -> list[Any]:
    return [record for tp_records in batches.values() for record in tp_records]


async def _connected_consumer(bootstrap: str, poll_ms: int) -> AIOKafkaConsumer:
    """A consumer outside any group, started once the broker answers (start-up order must not matter)."""
    delay = 0.5
    while True:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=poll_ms)
        try:
            await consumer.start()
            return consumer
        except KafkaError as exc:
            await consumer.stop()
            log.warning("changelog replica waiting for the broker (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _end_offsets(bootstrap: str, tps: list[TopicPartition],
                       timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """The offset after the last message of each partition.

    Asked with ListOffsets, and raised to the high watermark of a fetch from there: the Tansu broker
    answers ListOffsets with the first offset of the partition's last record batch + 1, which is
    below the true end whenever that batch holds several messages. Taken as the end, it made a
    restarted worker think the topic was recreated and throw its store away, and could let
    matching start before the last rules were read.
    """
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
    await probe.start()
    try:
        probe.assign(tps)
        ends = await probe.end_offsets(tps)
        for tp in tps:
            probe.seek(tp, ends[tp])
        deadline = time.monotonic() + timeout_s
        # Every fetch response carries the partition's high watermark, records or not.
        while any(probe.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            await probe.getmany(*tps, timeout_ms=50)
        return {tp: max(ends[tp], probe.highwater(tp) or 0) for tp in tps}
    finally:
        await probe.stop()


async def _all_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    delay = 0.5
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        log.warning("changelog replica waiting for topic %s to exist (run `alerting-app create-topics`)", topic)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
        await consumer._client.force_metadata_update()


async def keep_running(name: str, run_once: Callable[[], Awaitable[None]], should_stop: Callable[[], bool]) -> None:
    """Run a replica until the worker stops, restarting it after a failure with a growing pause.

    A replica must not die quietly: matching would go on with rules or silences that no longer change.
    """
    delay = 1.0
    while not should_stop():
        try:
            await run_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; restarting in %.0fs", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
