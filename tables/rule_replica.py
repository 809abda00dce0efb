"""Every worker's own full copy of the rules: the GlobalKTable pattern, without Faust's GlobalTable.

Alerts are partitioned by alert_id, so every worker must hold every rule. Faust's `GlobalTable`
is reported to diverge across workers (faust-streaming issue 283), and in our multi-worker test it
crashed on rebalance ("persisted offset ... higher than the last offset"). So each worker reads
*all* partitions of `rule.changed` itself, outside the consumer group (no rebalance can take a
partition away), and keeps what it read in a local RocksDB store:

- `rule.changed` is the changelog: each event holds the whole rule (or a delete tombstone) and its
  version, so applying one is idempotent and a stale one is ignored;
- the store holds the newest event per rule and the next offset per partition, written together
  in one batch, so a restarted worker loads its rules from disk and reads only what it missed;
- if the broker holds fewer messages than the store has read (the topic was recreated, e.g. an
  in-memory dev broker restarted), the store is discarded and rebuilt from the topic.

Matching must not start before the replica has read up to the end offsets it saw at start-up
(`wait_until_caught_up`), or alerts would be matched against a partial rule set.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from rocksdict import Rdict, WriteBatch

from alerting_app.contracts import DeadLetter, RuleChanged
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, send_dead_letter
from alerting_app.matching import RuleIndex

log = logging.getLogger(__name__)

_RULE = "rule:"
_OFFSET = "offset:"


class RuleStore:
    """The local RocksDB copy: newest event per rule, and the next offset to read per partition."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = Rdict(str(path))

    def load(self) -> tuple[Iterator[RuleChanged], dict[int, int]]:
        """(the stored events, the next offset per partition).

        The events are decoded one at a time as they are iterated: at 450,000 rules a list of them
        would hold every decoded event at once, doubling the worker's memory at start-up.
        """
        offsets = {int(key[len(_OFFSET):]): value for key, value in self._prefixed(_OFFSET)}
        return (RuleChanged.model_validate_json(value) for _, value in self._prefixed(_RULE)), offsets

    def _prefixed(self, prefix: str) -> Iterator[tuple[str, object]]:
        # Keys are kept sorted: the entries of one prefix are contiguous from the prefix itself.
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                return
            yield key, value

    def save(self, changes: dict[str, bytes], offsets: dict[int, int]) -> None:
        batch = WriteBatch()
        for rule_id, raw in changes.items():
            batch.put(_RULE + rule_id, raw)
        for partition, offset in offsets.items():
            batch.put(_OFFSET + str(partition), offset)
        self._db.write(batch)

    def discard(self) -> None:
        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._db = Rdict(str(self.path))

    def close(self) -> None:
        self._db.close()


class RuleReplica:
    def __init__(self, index: RuleIndex,
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

    def load(self, store: RuleStore) -> dict[int, int]:
        changes, offsets = store.load()
        self.index.rebuild(changes)
        log.info("rule replica loaded %d rules from %s", len(self.index), store.path)
        return offsets

    def apply_records(self, records) -> tuple[dict[str, bytes], list]:
        """Apply decoded records to the index; return (rule_id -> raw event to store, dead letters)."""
        to_store: dict[str, bytes] = {}
        dead = []
        for record in records:
            try:
                change = decode(RuleChanged, record.value)
            except UndecodableMessage as exc:
                dead.append(dead_letter_for(record, str(exc)))
                continue
            if self.index.apply(change):
                to_store[change.rule_id] = record.value
        return to_store, dead

    async def run(self, bootstrap: str, topic: str, store: RuleStore, *, poll_ms: int = 100) -> None:
        """Read every partition of `topic` for ever, keeping the index and the store current."""
        offsets = self.load(store)
        consumer = await _connected_consumer(bootstrap, poll_ms)
        try:
            tps = await _all_partitions(consumer, topic)
            consumer.assign(tps)
            ends = await _end_offsets(bootstrap, tps)
            if any(offsets.get(tp.partition, 0) > ends[tp] for tp in tps):
                log.warning("rule.changed holds fewer messages than the local rule store has read: "
                            "the topic was recreated; rebuilding the store from the topic")
                store.discard()
                self.index.rebuild([])
                offsets = {}
            for tp in tps:
                if tp.partition in offsets:
                    consumer.seek(tp, offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.caught_up_at_offsets = {tp.partition: ends[tp] for tp in tps}
            await self._consume(consumer, tps, ends, store, poll_ms)
        finally:
            await consumer.stop()

    async def _consume(self, consumer, tps, ends, store: RuleStore, poll_ms: int) -> None:
        while True:
            if not self.is_caught_up and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                log.info("rule replica caught up: %d rules", len(self.index))
                self._caught_up.set()
            batches = await consumer.getmany(timeout_ms=poll_ms, max_records=5000)
            if not batches:
                continue
            records = [record for tp_records in batches.values() for record in tp_records]
            to_store, dead = self.apply_records(records)
            store.save(to_store, {tp.partition: tp_records[-1].offset + 1 for tp, tp_records in batches.items()})
            for letter in dead:
                await self._on_dead_letter(letter)


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
            log.warning("rule replica waiting for the broker (%s); retrying in %.1fs", exc, delay)
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
        log.warning("rule replica waiting for topic %s to exist (run `alerting-app create-topics`)", topic)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
        await consumer._client.force_metadata_update()
