"""Every worker's own full copy of the rules: the GlobalKTable pattern, without Faust's GlobalTable.

Alerts are partitioned by alert_id, so every worker must hold every rule. Faust's `GlobalTable`
is reported to diverge across workers (faust-streaming issue 283), and in our multi-worker test it
crashed on rebalance ("persisted offset ... higher than the last offset"). So each worker reads
*all* partitions of `rule.changed` itself, outside the consumer group (no rebalance can take a
partition away; tables/changelog_replica.py does the reading, shared with the silences), and keeps
what it read in a local RocksDB store:

- `rule.changed` is the changelog: each event holds the whole rule (or a delete tombstone) and its
  version, so applying one is idempotent and a stale one is ignored;
- the store holds the newest event per rule and the next offset per partition, written together
  in one batch, so a restarted worker loads its rules from disk and reads only what it missed;
- if the topic is not the one the store read (recreated, e.g. an in-memory dev broker restarted):
  a partition holds fewer messages than the store has read, or the last message the store read of
  a partition is no longer at its offset (another record there, or the same content written at
  another time); or if the store holds an entry the current contract refuses (it would fail every
  start alike), or RocksDB finds the store corrupted (`StoreCorrupted`), the store is discarded and
  rebuilt from the topic. Compaction can also remove that
  last message (once a newer one of the same rule is written after it): the store is then rebuilt
  without need, which costs one read of the compacted topic and nothing else;
- nor is a store used that had read the topic only up to before a delete that retention has
  since forgotten was relayed (a store of an older release, which did not record how far it had
  read, neither): that delete was followed by a null record for the rule (agents/retention.py), and
  compaction may have removed both by now; a worker resuming from such a store would never hear of
  the deletion and would match the rule for ever. It is discarded and rebuilt from the topic, as
  above (`outdated`). The store records that time (`read_up_to`) when the replica reaches the end
  offsets it saw at start, and every FORGET_INTERVAL_S after, while it keeps up.

Matching must not start before the replica has read up to the end offsets it saw at start-up
(`wait_until_caught_up`), or alerts would be matched against a partial rule set. Nor may a
restart inside a running worker (`keep_running`, after any failure) hand matching a partial set:
each run loads the store into a fresh index and reads on into it, and only once it has reached the
end offsets does it take the place of the served one (`RuleIndex.take_over`, in one step). Until
then matching goes on with the rules it had. The cost: two indexes in memory during that catch-up.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from rocksdict import Rdict, WriteBatch

from alerting_app.contracts import RuleChanged
from alerting_app.dead_letters import UndecodableMessage, decode
from alerting_app.kafka_connection import Broker
from alerting_app.matching import RuleIndex
from tables.changelog_replica import Batches, ChangelogReplica, record_mark, records_at

log = logging.getLogger(__name__)

_RULE = "rule:"
_DELETED_AT = "deleted-at:"  # when a rule whose stored event is its delete was deleted, unix seconds
_OFFSET = "offset:"
_LAST_READ = "last-read:"  # record_mark of the last record read, per partition
_READ_UP_TO = "read-up-to"  # a time (unix seconds) before which the store holds every record of the topic


class StoreCorrupted(Exception):
    """RocksDB found the local store corrupted (a checksum that fails, a damaged file): it is rebuilt
    from the topic, of which it is only a copy."""


def _is_corruption(exc: Exception) -> bool:
    # rocksdict raises a plain Exception carrying RocksDB's status, "Corruption: ..." for this one
    # (and e.g. "IO error: ..." for a lock another process holds, which must not discard anything).
    return str(exc).startswith("Corruption")


class RuleStore:
    """The local RocksDB copy: newest event per rule (a delete with its time), and the next offset to
    read per partition."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = Rdict(str(path))
        except Exception as exc:
            if not _is_corruption(exc):
                raise
            # Failing here on every start, the replica never caught up and the worker never matched.
            log.error("the local rule store %s is corrupted, RocksDB cannot open it (%s); discarding it and "
                      "rebuilding it from the topic", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            self._db = Rdict(str(path))

    def load(self) -> tuple[Iterator[RuleChanged], dict[int, int]]:
        """(the stored events, the next offset per partition).

        The events are decoded one at a time as they are iterated: at 450,000 rules a list of them
        would hold every decoded event at once, doubling the worker's memory at start-up. Iterating
        raises UndecodableMessage, naming the entry, at one the rule contract refuses.
        """
        return (_stored_change(key, value) for key, value in self._prefixed(_RULE)), self.offsets()

    def offsets(self) -> dict[int, int]:
        """The next offset to read, per partition read."""
        return {int(key[len(_OFFSET):]): value for key, value in self._prefixed(_OFFSET)}

    def read_up_to(self) -> float | None:
        """A time (unix seconds) before which every record of the topic is in the store, if one was
        recorded (`mark_read_up_to`; a store of an older release has none)."""
        try:
            return self._db.get(_READ_UP_TO)
        except Exception as exc:
            if _is_corruption(exc):
                raise StoreCorrupted(f"the store is corrupted: {exc}") from None
            raise

    def mark_read_up_to(self, at: float) -> None:
        self._db[_READ_UP_TO] = at

    def deleted_at(self) -> dict[str, float]:
        """rule_id -> when it was deleted, for the stored deletes (a store written before these times
        were kept has none)."""
        return {key[len(_DELETED_AT):]: value for key, value in self._prefixed(_DELETED_AT)}

    def _prefixed(self, prefix: str) -> Iterator[tuple[str, object]]:
        """The entries whose key starts with `prefix`; raises StoreCorrupted where RocksDB finds the
        store corrupted."""
        # Keys are kept sorted: the entries of one prefix are contiguous from the prefix itself.
        last = None
        for key, value in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                return
            last = key
            yield key, value
        # The items ran out: at the end of the store, or at a block RocksDB found corrupted, where
        # `Rdict.items` ends too, as if nothing followed (a worker loaded part of its rules, and read
        # on from offsets past the others). An iterator of our own, stepped there again, says which.
        entries = self._db.iter()
        entries.seek(prefix if last is None else last)
        if last is not None and entries.valid():
            entries.next()
        try:
            entries.status()  # raises what stopped the iteration, if anything did
        except Exception as exc:
            if _is_corruption(exc):
                raise StoreCorrupted(f"the store is corrupted: {exc}") from None
            raise

    def last_read(self) -> dict[int, str]:
        """The mark (changelog_replica.record_mark) of the last record read, per partition; a store
        written before marks were kept has none."""
        return {int(key[len(_LAST_READ):]): value for key, value in self._prefixed(_LAST_READ)}

    def save(self, changes: dict[str, bytes | None], last_read: dict[int, Any],
             deleted_at: dict[str, float] | None = None) -> None:
        """Store the changes (and when those that are deletes were made; a rule whose change is None
        is removed), and each partition's last record read: its next offset and its mark."""
        batch = WriteBatch()
        for rule_id, raw in changes.items():
            if raw is None:  # forgotten on a null record (changelog_replica.apply_records)
                batch.delete(_RULE + rule_id)
                batch.delete(_DELETED_AT + rule_id)
                continue
            batch.put(_RULE + rule_id, raw)
            if deleted_at and rule_id in deleted_at:
                batch.put(_DELETED_AT + rule_id, deleted_at[rule_id])
        for partition, record in last_read.items():
            batch.put(_OFFSET + str(partition), record.offset + 1)
            batch.put(_LAST_READ + str(partition), record_mark(record))
        self._db.write(batch)

    def forget(self, rule_ids: list[str]) -> None:
        """Remove these rules' entries (the deletions the index forgot)."""
        batch = WriteBatch()
        for rule_id in rule_ids:
            batch.delete(_RULE + rule_id)
            batch.delete(_DELETED_AT + rule_id)
        self._db.write(batch)

    def date_deletions(self, deleted_at: dict[str, float]) -> None:
        """Store when these rules were deleted."""
        batch = WriteBatch()
        for rule_id, at in deleted_at.items():
            batch.put(_DELETED_AT + rule_id, at)
        self._db.write(batch)

    def discard(self) -> None:
        self._db.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._db = Rdict(str(self.path))

    def close(self) -> None:
        self._db.close()


# How long a run waits for Postgres to say how far back deletes have been forgotten
# (`forgotten_relayed_before`); past that, a store is not trusted, and is rebuilt from the topic, which
# needs only the broker. Waiting on, a replica restarted during a Postgres outage read no rule change
# until Postgres was back, and a starting worker did not match, where nothing else of it needs Postgres.
FORGOTTEN_LOOKUP_TIMEOUT_S = 10.0


def _days_ago(at: float) -> str:
    return f"{(time.time() - at) / 86_400:.1f}"


def _stored_change(key: str, raw: object) -> RuleChanged:
    try:
        return RuleReplica.checked(decode(RuleChanged, raw))
    except UndecodableMessage as exc:
        raise UndecodableMessage(f"stored entry {key!r}: {exc}") from None


async def _none_forgotten() -> float | None:
    return None


class RuleReplica(ChangelogReplica):
    contract = RuleChanged
    key_field = "rule_id"
    id_fields = ("rule_id", "client_id")
    name = "rule replica"
    index: RuleIndex
    filling: RuleIndex

    def __init__(self, index: RuleIndex, *,
                 forgotten_relayed_before: Callable[[], Awaitable[float | None]] = _none_forgotten,
                 **kwargs: Any) -> None:
        """`forgotten_relayed_before()`: a time (unix seconds) before which every delete that
        retention has forgotten was relayed, None if it forgot none (Postgres's
        `forgotten_deletions`, tables/rules.py); asked at each run's start (`outdated_now`)."""
        super().__init__(index, **kwargs)
        self.forgotten_relayed_before = forgotten_relayed_before

    def load(self, store: RuleStore) -> tuple[RuleIndex, dict[int, int]]:
        """(a fresh index of the stored rules, the next offset per partition), or, when the store holds
        an entry the contract refuses or RocksDB finds it corrupted, (an empty index, no offsets) and
        the store emptied."""
        changes = None
        loaded_at = time.time()
        undated: dict[str, float] = {}  # stored deletes without a time (an older release's store)
        loaded = RuleIndex()
        try:
            changes, offsets = store.load()
            deleted_at = store.deleted_at()
            for change in changes:
                at = deleted_at.get(change.rule_id)
                if at is None and change.action == "delete":
                    at = undated[change.rule_id] = loaded_at
                loaded.apply(change, at)
        except (UndecodableMessage, StoreCorrupted) as exc:
            refused = str(exc)
        else:
            # Dated now, once: a worker restarted more often than the retention still forgets them.
            store.date_deletions(undated)
            log.info("rule replica loaded %d rules from %s", len(loaded), store.path)
            return loaded, offsets
        # Discarded out of the except block: its traceback holds the store's open iterator, and
        # RocksDB keeps its lock while an iterator lives.
        del changes
        log.error("the local rule store %s holds an entry the rule contract refuses, or is corrupted (%s); "
                  "discarding the store and rebuilding it from the topic", store.path, refused)
        store.discard()
        return RuleIndex(), {}

    def outdated(self, store: RuleStore, forgotten_relayed_before: float | None) -> str | None:
        """Why the store must not be used, for the deletions it may have missed; None if it may.

        A rule deleted while this worker was stopped is followed on the topic, once Postgres forgets
        the deletion (DELETED_RULE_RETENTION_DAYS after its delete was relayed, by the setting of the
        worker that runs the retention), by a null record; compaction then removes the delete, and
        the null after the topic's delete.retention.ms. A store that had read the topic up to a time
        after every delete retention has forgotten was relayed (`forgotten_relayed_before`, which
        that retention records in Postgres) reads on from before any delete it missed, and that
        delete is still there, as no null follows it yet: whatever DELETED_RULE_RETENTION_DAYS this
        worker has. Its own (`forget_deletions_after_s`) covers a retention of an older release,
        which records nothing, when the settings are equal: a store that had read the topic only up
        to longer ago is not used either. With deletions kept for ever everywhere, every store may be used."""
        kept_since = time.time() - self.forget_deletions_after_s if self.forget_deletions_after_s else None
        if (forgotten_relayed_before is None and kept_since is None) or not store.offsets():
            return None
        read_up_to = store.read_up_to()
        if read_up_to is None:
            return "it does not record how far it had read (an older release wrote it)"
        if forgotten_relayed_before is not None and read_up_to < forgotten_relayed_before:
            return (f"it had read the topic only up to {_days_ago(read_up_to)} days ago, and a delete relayed "
                    f"up to {_days_ago(forgotten_relayed_before)} days ago has been forgotten since "
                    "(forgotten_deletions in Postgres): it may have missed that deletion and the null record after "
                    "it, both compacted away")
        if kept_since is not None and read_up_to < kept_since:
            return (f"it had read the topic only up to {_days_ago(read_up_to)} days ago, longer ago than deletions "
                    f"are kept ({self.forget_deletions_after_s / 86_400:g} days): it may have missed a deletion "
                    "and the null record after it, both compacted away since")
        return None

    async def outdated_now(self, store: RuleStore) -> str | None:
        """`outdated`, with what Postgres says of forgotten deletes; a reason too when it does not
        say within FORGOTTEN_LOOKUP_TIMEOUT_S."""
        try:
            async with asyncio.timeout(FORGOTTEN_LOOKUP_TIMEOUT_S):
                forgotten_relayed_before = await self.forgotten_relayed_before()
        except TimeoutError:
            if not store.offsets():
                return None
            return (f"Postgres did not say within {FORGOTTEN_LOOKUP_TIMEOUT_S:g}s how far back deletes have been "
                    "forgotten (forgotten_deletions): it may have missed one and the null record after it")
        return self.outdated(store, forgotten_relayed_before)

    def reached_end_offsets(self) -> None:
        if self.filling is not self.index and self.is_caught_up:
            log.info("rule replica caught up again: %d rules now matched (were %d)", len(self.filling), len(self.index))
        super().reached_end_offsets()

    async def run(self, broker: Broker, topic: str, store: RuleStore, *, poll_ms: int = 100) -> None:
        """Read every partition of `topic` for ever, keeping the index and the store current."""
        try:
            outdated = await self.outdated_now(store)
        except StoreCorrupted as exc:
            outdated = str(exc)
        if outdated is not None:
            log.warning("discarding the local rule store %s and rebuilding it from the topic: %s", store.path, outdated)
            store.discard()
        self.filling, offsets = self.load(store)

        def rebuild(reason: str) -> dict[int, int]:
            log.warning("%s; rebuilding the local rule store from the topic", reason)
            store.discard()
            self.filling = RuleIndex()
            return {}

        async def start_at(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> dict[int, int]:
            if any(offsets.get(tp.partition, 0) > end for tp, end in ends.items()):
                return rebuild(f"{topic} holds fewer messages than the local rule store has read: "
                               "the topic was recreated")
            try:
                marks = store.last_read()
            except StoreCorrupted as exc:
                corrupted: str | None = str(exc)
            else:
                corrupted = None
            if corrupted is not None:
                # Rebuilt out of the except block: its traceback holds the store's open iterator, and
                # RocksDB keeps its lock while an iterator lives, so reopening the store there failed.
                return rebuild(f"the local rule store {store.path}: {corrupted}")
            last = {tp: offsets[tp.partition] - 1 for tp in ends if offsets.get(tp.partition, 0) > 0
                    and tp.partition in marks}
            # A broker too slow to answer raises (the replica is run again), rather than counting as
            # a recreated topic and throwing a good store away.
            found = await records_at(consumer, last)
            moved = sorted(tp.partition for tp in last
                           if tp not in found or record_mark(found[tp]) != marks[tp.partition])
            if moved:
                return rebuild(f"the last message the local rule store read of {topic} is not at its offset any "
                               f"more (partitions {', '.join(map(str, moved))}): the topic was recreated")
            return offsets

        async def on_batches(batches: Batches) -> None:
            # Saved only once the batch's dead letters are acknowledged: offsets past a record whose
            # letter was lost would never read it again.
            to_store = await self.apply_batches(batches)
            store.save(to_store, {tp.partition: tp_records[-1] for tp, tp_records in batches.items() if tp_records},
                       {rule_id: at for rule_id in to_store if (at := self.filling.deleted_at(rule_id)) is not None})

        await self.follow(broker, topic, start_at=start_at, on_batches=on_batches, poll_ms=poll_ms,
                          on_forgotten=store.forget, on_read_up_to=store.mark_read_up_to)
