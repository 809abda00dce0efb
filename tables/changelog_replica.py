"""A worker's own full copy of a compacted changelog topic, read from every partition outside the group.

Rules (tables/rule_replica.py, which says why this is not a Faust GlobalTable) and silences
(tables/silences.py) must both be known to every worker, whatever partitions of `alerts.new` it
consumes. `ChangelogReplica` holds what the two share: connecting, finding every partition and its
end offset, reading for ever, applying each event to an index that ignores stale versions, and
saying when it has read up to the end offsets it saw at start (`wait_until_caught_up`).

An event is applied only if it is keyed by the id it carries and its ids are canonical UUIDs:
compaction keeps the last record per *key*, so an event under another key would stay in the
replicas that read it and vanish from those that start later; and a non-UUID id would poison every
match it takes part in downstream. Such an event, like an undecodable one, goes to the topic's
dead-letter topic; the letters of a batch are acknowledged by the broker before the batch counts as
read (`apply_batches`), so a refused letter is sent again after the restart.

A delete leaves a tombstone in the index (its id and version), so that an older upsert of the same
id arriving after it is ignored. Ids are never reused, and once the delete is committed no upsert
of that id can be made any more, nor republished (agents/rule_outbox.py); an older upsert can reach
the topic after the delete only while a relay that lost its lock still has sends in flight (the
producer's request timeout, minutes). So a tombstone is kept, with the time the delete was
published (its record's timestamp), only `forget_deletions_after_s`: the index forgets the older
ones once caught up and every FORGET_INTERVAL_S after. Postgres forgets the deletion after the same
time, and then queues a null record (a Kafka tombstone) for the key behind its delete
(agents/retention.py): a replica that reads one forgets whatever it holds of the key, tombstone
or rule (only a replica that missed the delete can still hold the rule), and compaction removes
the delete, then the null itself after the topic's delete.retention.ms. Until then a replica that
reads the topic again still sees the delete come after every upsert of its id. A null for a key
the replica does not hold changes nothing (no dead letter: an operator's tombstone for a bad
record's key is one, docs/operations.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from alerting_app import metrics
from alerting_app.contracts import Contract, DeadLetter
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, require_uuids, send_dead_letters
from alerting_app.end_offsets import end_offsets
from alerting_app.kafka_connection import Broker, client_args

log = logging.getLogger(__name__)

# What a batch of records from getmany looks like: partition -> its records, in offset order.
Batches = dict[TopicPartition, list[Any]]

# How often a replica forgets the tombstones older than its `forget_deletions_after_s`.
FORGET_INTERVAL_S = 600.0


class ChangeIndex(Protocol):
    def apply(self, change: Any, at: float | None = None) -> bool: ...

    def forget_deletions(self, deleted_before: float) -> list[str]: ...

    def forget(self, key: str) -> bool: ...

    def take_over(self, other: Any) -> None: ...

    def __len__(self) -> int: ...


class ChangelogReplica:
    """Follows one changelog topic into `index`; subclasses name the event contract and its key field.

    `index` is what matching reads. Records are applied to `filling`: `index` itself, or a fresh
    index a run fills while `index` keeps serving, until it has caught up (`reached_end_offsets`).
    """

    contract: type[Contract]
    key_field: str
    # The event's id fields, which must be canonical UUIDs (the key field among them).
    id_fields: tuple[str, ...]
    # In the log: bench/stack.py waits for "rule replica caught up".
    name: str

    def __init__(self, index: ChangeIndex,
                 on_dead_letters: Callable[[list[DeadLetter]], Awaitable[None]] = send_dead_letters,
                 forget_deletions_after_s: float = 0) -> None:
        self.index = index
        self.filling = index
        self._on_dead_letters = on_dead_letters
        # 0: tombstones are kept for ever.
        self.forget_deletions_after_s = forget_deletions_after_s
        self._caught_up = asyncio.Event()
        self.caught_up_at_offsets: dict[int, int] = {}

    @property
    def is_caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_until_caught_up(self) -> None:
        await self._caught_up.wait()

    @classmethod
    def checked(cls, change: Contract) -> Contract:
        """`change`, if its ids are canonical UUIDs; raises UndecodableMessage naming the first that is not."""
        require_uuids(**{field: [getattr(change, field)] for field in cls.id_fields})
        return change

    def apply_records(self, records) -> tuple[dict[str, bytes | None], list[DeadLetter]]:
        """Apply records to `filling`; return (key -> raw event that changed it, None for a key a
        null record made it forget; dead letters)."""
        changed: dict[str, bytes | None] = {}
        dead = []
        for record in records:
            if record.value is None:
                # Held keys are canonical UUIDs: a key that is not UTF-8 cannot be one.
                key = record.key.decode("utf-8", "replace") if record.key is not None else None
                if key is not None and self.filling.forget(key):
                    changed[key] = None
                continue
            try:
                change = self.checked(decode(self.contract, record.value))
            except UndecodableMessage as exc:
                dead.append(dead_letter_for(record, str(exc)))
                continue
            change_id = getattr(change, self.key_field)
            if record.key != change_id.encode():
                key = record.key.decode("utf-8", "replace") if record.key is not None else None
                dead.append(dead_letter_for(
                    record, f"key: the record's key {key!r} is not the {self.key_field} it carries ({change_id!r})"))
                continue
            if self.filling.apply(change, published_at(record)):
                changed[change_id] = record.value
        return changed, dead

    async def apply_batches(self, batches: Batches) -> dict[str, bytes | None]:
        """Apply a batch read; return key -> raw event that changed `filling` (None: forgotten).

        Returns only once the broker acknowledged the batch's dead letters: the caller may then
        record the batch as read. Raises if one is refused, so the batch is read again after the
        restart and its letters sent again.
        """
        changed, dead = self.apply_records(records_of(batches))
        if dead:
            await self._on_dead_letters([self.marked_if_from_history(letter) for letter in dead])
        return changed

    def marked_if_from_history(self, letter: DeadLetter) -> DeadLetter:
        """The letter, `from_history` when its record was on the topic before this run began
        reading: every start reads those again, and every worker does."""
        if letter.offset < self.caught_up_at_offsets.get(letter.partition, 0):
            return letter.model_copy(update={"from_history": True})
        return letter

    def forget_old_deletions(self) -> list[str]:
        """Drop from `filling` the tombstones of deletes published more than `forget_deletions_after_s`
        ago; their ids."""
        if not self.forget_deletions_after_s:
            return []
        forgotten = self.filling.forget_deletions(time.time() - self.forget_deletions_after_s)
        if forgotten:
            log.info("%s forgot %d deletions published more than %gs ago", self.name, len(forgotten),
                     self.forget_deletions_after_s)
        return forgotten

    def reached_end_offsets(self) -> None:
        """Called once per run, when `filling` has read up to the end offsets seen at its start: a
        fresh `filling` then takes the place of `index`, in one step."""
        if self.filling is not self.index:
            self.index.take_over(self.filling)
            self.filling = self.index
        if not self.is_caught_up:
            log.info("%s caught up: %d held", self.name, len(self.index))
        self._caught_up.set()

    async def follow(self, broker: Broker, topic: str, *,
                     start_at: Callable[[AIOKafkaConsumer, dict[TopicPartition, int]], Awaitable[dict[int, int]]],
                     on_batches: Callable[[Batches], Awaitable[object]], poll_ms: int = 100,
                     on_forgotten: Callable[[list[str]], object] = lambda ids: None,
                     on_read_up_to: Callable[[float], object] = lambda at: None) -> None:
        """Read every partition of `topic` for ever.

        `start_at(consumer, end offsets)` gives the offset to start each partition from (absent:
        its beginning), and may read with the consumer, assigned every partition, first;
        `on_batches` handles each batch read (see `apply_batches`); `on_forgotten` gets the ids
        of the tombstones forgotten (`forget_old_deletions`), once caught up and every FORGET_INTERVAL_S;
        `on_read_up_to` gets, as often, a time (unix seconds) before which every record written to
        the topic has been read and handled (`read_up_to`), when there is one.
        """
        consumer = await _connected_consumer(broker, poll_ms)
        try:
            tps = await _all_partitions(consumer, topic)
            consumer.assign(tps)
            asked_ends_at = time.time()
            ends = await end_offsets(broker, tps)
            offsets = await start_at(consumer, ends)
            for tp in tps:
                if tp.partition in offsets:
                    consumer.seek(tp, offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.caught_up_at_offsets = {tp.partition: ends[tp] for tp in tps}
            # Per run: a restart inside a running worker must reach the end offsets again too.
            reached_end = False
            forgot_at = float("-inf")
            while True:
                stop_if_cancelled()
                if not reached_end and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                    reached_end = True
                    self.reached_end_offsets()
                    on_read_up_to(asked_ends_at)  # what was written before, is below the ends
                if reached_end and time.monotonic() - forgot_at >= FORGET_INTERVAL_S:
                    forgot_at = time.monotonic()
                    forgotten = self.forget_old_deletions()
                    if forgotten:
                        on_forgotten(forgotten)
                    if (read_to := await read_up_to(consumer, tps)) is not None:
                        on_read_up_to(read_to)
                batches = await consumer.getmany(timeout_ms=poll_ms, max_records=5000)
                if batches:
                    await on_batches(batches)
        finally:
            await consumer.stop()


async def read_up_to(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> float | None:
    """A time (unix seconds) before which every record written to these partitions has been read:
    the earliest of their last fetch answers, if each partition's position has reached the high
    watermark its answer gave; None otherwise (records fetched but not read yet, or no answer yet).
    Called between batches, so what was read has been handled too."""
    answered = []
    for tp in tps:
        highwater, polled_ms = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
        if highwater is None or polled_ms is None or await consumer.position(tp) < highwater:
            return None
        answered.append(polled_ms / 1000)
    return min(answered, default=None)


def records_of(batches: Batches) -> list[Any]:
    return [record for tp_records in batches.values() for record in tp_records]


async def from_the_beginning(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> dict[int, int]:
    return {}


def published_at(record: Any) -> float | None:
    """When the record was published (its timestamp, unix seconds), or None if it carries none."""
    return record.timestamp / 1000 if record.timestamp is not None and record.timestamp > 0 else None


def record_mark(record: Any) -> str:
    """What identifies one record of a partition: its offset, timestamp and content. The same
    offset of a recreated topic holds another record, or the same content written at another time."""
    digest = hashlib.blake2b(repr((record.key, record.value)).encode(), digest_size=16).hexdigest()
    return f"{record.offset}:{record.timestamp}:{digest}"


class BrokerTooSlow(KafkaError):
    """The broker did not answer a read in time (`keep_running` tries the replica again)."""


async def records_at(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int],
                     timeout_s: float = 30.0) -> dict[TopicPartition, Any]:
    """The first record at or after each position, read with `consumer` (positions below their
    partition's end, where there should be one). A partition the broker answered from there with
    no record (compaction removed what was there) is left out; one with neither within `timeout_s`
    (a broker slow to answer) raises BrokerTooSlow. The consumer is left wherever the reads took
    it: seek before reading on."""
    began_ms = time.time() * 1000
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    found: dict[TopicPartition, Any] = {}
    deadline = time.monotonic() + timeout_s

    def answered_empty(tp: TopicPartition) -> bool:
        # Each fetch answer stamps the partition and carries its high watermark, records or not;
        # answers to fetches before this call (the consumer fetches as soon as it is assigned) do not count.
        polled_ms, highwater = consumer.last_poll_timestamp(tp), consumer.highwater(tp)
        return polled_ms is not None and polled_ms >= began_ms and highwater is not None and positions[tp] >= highwater

    while len(found) + sum(answered_empty(tp) for tp in positions if tp not in found) < len(positions):
        if time.monotonic() >= deadline:
            unread = [tp for tp in positions if tp not in found and not answered_empty(tp)]
            raise BrokerTooSlow(f"nothing read within {timeout_s:g}s at " + ", ".join(
                f"{tp.topic}[{tp.partition}]@{positions[tp]}" for tp in unread))
        batches = await consumer.getmany(*(tp for tp in positions if tp not in found), timeout_ms=100)
        for tp, tp_records in batches.items():
            if tp_records and tp not in found:
                found[tp] = tp_records[0]
    return found


def stop_if_cancelled() -> None:
    """Raise the cancellation of this task that something it awaited swallowed.

    Cancelling a replica whose start was still in aiokafka's requests (a worker stopping just after
    it started) was seen to leave the task marked as cancelling but running: the CancelledError
    never reached the replica, which then read on for ever and held up the stop. A task whose
    cancellation was handled as meant (asyncio.timeout, TaskGroup) is no longer marked.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _connected_consumer(broker: Broker, poll_ms: int) -> AIOKafkaConsumer:
    """A consumer outside any group, started once the broker answers (start-up order must not matter)."""
    delay = 0.5
    while True:
        consumer = AIOKafkaConsumer(**client_args(broker), enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=poll_ms)
        try:
            await consumer.start()
            return consumer
        except KafkaError as exc:
            await consumer.stop()
            stop_if_cancelled()  # a start cancelled (the worker stopping) that failed instead: no retry
            log.warning("changelog replica waiting for the broker (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def _all_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    delay = 0.5
    while True:
        stop_if_cancelled()
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        log.warning("changelog replica waiting for topic %s to exist (run `alerting-app create-topics`)", topic)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
        await consumer._client.force_metadata_update()


# keep_running's pauses before a restart: doubled after each failure up to the longest, and back to
# the first once a run lasted this long.
RESTART_FIRST_PAUSE_S = 1.0
RESTART_LONGEST_PAUSE_S = 30.0
RESTART_PAUSE_RESET_AFTER_S = 60.0


async def keep_running(name: str, run_once: Callable[[], Awaitable[None]], should_stop: Callable[[], bool]) -> None:
    """Run a replica until the worker stops, restarting it after a failure with a growing pause.

    A replica must not die quietly: matching would go on with rules or silences that no longer change.
    """
    delay = RESTART_FIRST_PAUSE_S
    while not should_stop():
        started = time.monotonic()
        try:
            await run_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            stop_if_cancelled()  # a cancellation that surfaced as another error stops it, not restarts it
            if time.monotonic() - started >= RESTART_PAUSE_RESET_AFTER_S:
                # It ran well before this failure: a new trouble, not the same one again. Before,
                # the pause never shrank, and after five failures in a worker's life every later
                # one left its rules or silences unchanged for 30 s.
                delay = RESTART_FIRST_PAUSE_S
            metrics.replica_failures.labels(replica=name).inc()
            log.exception("%s failed; restarting in %gs", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_LONGEST_PAUSE_S)
