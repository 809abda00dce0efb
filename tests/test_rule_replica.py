"""The rule replica against the real broker: it reads every partition of a rule.changed topic, keeps
the newest version of each rule, persists what it read, and a restart continues from disk (or, when
the topic was recreated, starts over from it).

Each test uses a topic of its own, so the offsets it checks are its own.
"""
from __future__ import annotations

import asyncio
import logging
import contextlib
import json
import random
import secrets
import time
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord
from rocksdict import Rdict

from agents.retention import forget_rule_deletions
from alerting_app import db
from alerting_app.contracts import DeadLetter, Rule, RuleChanged
from alerting_app.db import init_connection
from alerting_app.matching import RuleIndex
from alerting_app.sending import partition_for
from alerting_app.embedded import free_port
from kafka_probe import caught_up, create_topics, produce, read_topic
from operations_support import start_tansu
from tables.changelog_replica import BrokerTooSlow, keep_running, records_at
from tables import rule_replica
from tables.rule_replica import RuleReplica, RuleStore
from tables.rules import forgotten_rule_deletions_relayed_before
from web.worker_state import rules_digest

PARTITIONS = 3
CLIENT = "5f0c5a4e-3b1f-4f7e-9a57-2a3c1d0e9b11"


def rid(name: str) -> str:
    """The rule_id a test names `name`: a canonical UUID, as the replica requires."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


@pytest.fixture
async def topic(services):
    name = f"rule.changed.test-{secrets.token_hex(4)}"
    await create_topics(services.kafka_bootstrap_servers, {name: PARTITIONS, f"{name}.dlq": 1})
    return name


def upsert(rule_id: str, version: int, *, enabled: bool = True, source: str = "payments") -> RuleChanged:
    rule = Rule(rule_id=rule_id, client_id=CLIENT, version=version, severity="HIGH", source=source, name="*",
                enabled=enabled)
    return RuleChanged(rule_id=rule_id, client_id=CLIENT, version=version, action="upsert", rule=rule)


def delete(rule_id: str, version: int) -> RuleChanged:
    return RuleChanged(rule_id=rule_id, client_id=CLIENT, version=version, action="delete")


class RecordingReplica(RuleReplica):
    """A rule replica that notes (partition, offset) of every record it reads from the topic, and
    keeps its dead letters (the app's producer is not running in these tests)."""

    def __init__(self, index: RuleIndex, forget_deletions_after_s: float = 0, **kwargs) -> None:
        super().__init__(index, on_dead_letters=self.collect, forget_deletions_after_s=forget_deletions_after_s,
                         **kwargs)
        self.read: list[tuple[int, int]] = []
        self.letters: list[DeadLetter] = []

    def apply_records(self, records):
        self.read.extend((record.partition, record.offset) for record in records)
        return super().apply_records(records)

    async def collect(self, letters: list[DeadLetter]) -> None:
        self.letters.extend(letters)


class RunningReplica:
    """`replica.run` in a task; a replica and an index may be passed in to run again what ran before."""

    def __init__(self, services, topic: str, store_path, replica: RecordingReplica | None = None) -> None:
        self.replica = replica or RecordingReplica(RuleIndex())
        self.index = self.replica.index
        self.store = RuleStore(store_path)
        self._task = asyncio.ensure_future(
            self.replica.run(services.kafka_bootstrap_servers, topic, self.store, poll_ms=50))

    async def __aenter__(self) -> "RunningReplica":
        try:
            await self.caught_up()
        except BaseException:
            await self.stop()
            raise
        return self

    async def caught_up(self) -> None:
        """Return once the replica is caught up; raise what it failed with if it stops first."""
        await caught_up(self.replica, self._task, timeout=30)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.store.close()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def wait_for_versions(self, versions: dict[str, int]) -> None:
        deadline = time.monotonic() + 30
        while any(self.index.held_version(r) != v for r, v in versions.items()):
            assert time.monotonic() < deadline, f"replica holds {self.index._versions}, want {versions}"
            await asyncio.sleep(0.02)


async def publish(services, topic: str, *changes: RuleChanged) -> None:
    await produce(services.kafka_bootstrap_servers, topic,
                  [(c.rule_id.encode(), c.encode()) for c in changes])


async def publish_dated(services, topic: str, *changes: tuple[RuleChanged, float]) -> None:
    """Publish each change with the record timestamp given (unix seconds), as if relayed then."""
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for change, at in changes:
            await producer.send_and_wait(topic, value=change.encode(), key=change.rule_id.encode(),
                                         timestamp_ms=int(at * 1000))
    finally:
        await producer.stop()


def enabled_versions(index: RuleIndex) -> dict[str, int]:
    return {rule_id: rule.version for rule_id, rule in index.rules().items() if rule.enabled}


async def test_replica_reads_every_partition_and_keeps_the_newest_version(services, topic, tmp_path):
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        changes = [upsert(rid(f"rule-{n}"), 1) for n in range(30)]
        changes += [upsert(rid("rule-0"), 3), upsert(rid("rule-0"), 2), delete(rid("rule-1"), 2),
                    upsert(rid("rule-1"), 1), upsert(rid("rule-2"), 2, enabled=False)]
        await publish(services, topic, *changes)
        await running.wait_for_versions(
            {rid("rule-0"): 3, rid("rule-1"): 2, rid("rule-2"): 2, rid("rule-29"): 1})

        held = enabled_versions(running.index)
        assert held[rid("rule-0")] == 3
        assert rid("rule-1") not in held and rid("rule-2") not in held
        assert len(held) == 28
        assert {record[0] for record in await read_topic(services.kafka_bootstrap_servers, topic)} >= {
            rid(f"rule-{n}").encode() for n in range(30)}


def stored(store_path) -> tuple[dict[str, int], dict[int, int]]:
    """(rule_id -> version, next offset per partition) as the RocksDB store holds them."""
    store = RuleStore(store_path)
    try:
        changes, offsets = store.load()
        return {change.rule_id: change.version for change in changes}, offsets
    finally:
        store.close()


async def recreate(services, topic: str) -> None:
    """Delete the topic and create it again, empty (what an in-memory dev broker's restart does)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        deadline = time.monotonic() + 30
        while True:
            try:
                await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
                return
            except TopicAlreadyExistsError:  # the delete is not finished yet
                assert time.monotonic() < deadline, f"{topic} was not deleted"
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def test_restarted_replica_loads_its_rules_from_disk_and_reads_only_what_it_missed(
        services, topic, tmp_path):
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await publish(services, topic, *[upsert(rid(f"rule-{n}"), 1) for n in range(10)])
        await running.wait_for_versions({rid(f"rule-{n}"): 1 for n in range(10)})
    rules_on_disk, offsets_on_disk = stored(tmp_path / "store")
    assert rules_on_disk == {rid(f"rule-{n}"): 1 for n in range(10)}
    first_read = running.replica.read
    assert len(first_read) == 10
    assert offsets_on_disk == {partition: max(o for p, o in first_read if p == partition) + 1
                               for partition, _ in first_read}, "the next offset of each partition read"

    missed = [upsert(rid("rule-0"), 2, source="search"), upsert(rid("rule-10"), 1)]
    await publish(services, topic, *missed)

    restarted = RunningReplica(services, topic, tmp_path / "store")
    async with restarted:
        await restarted.wait_for_versions({rid("rule-0"): 2, rid("rule-10"): 1})
        read = list(restarted.replica.read)
        assert restarted.index.rules()[rid("rule-0")].source == "search"
        assert enabled_versions(restarted.index) == {
            **{rid(f"rule-{n}"): 1 for n in range(1, 11)}, rid("rule-0"): 2}

    # Two records read, eleven rules held: the other nine came from the store.
    assert len(read) == len(missed), f"read {read}: only what was published after the stop"
    assert all(offset >= offsets_on_disk.get(partition, 0) for partition, offset in read)
    assert stored(tmp_path / "store")[0] == {**rules_on_disk, rid("rule-0"): 2, rid("rule-10"): 1}


async def test_store_ahead_of_a_recreated_topic_is_discarded_and_rebuilt_from_the_topic(
        services, topic, tmp_path):
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await publish(services, topic, *[upsert(rid(f"old-{n}"), 1) for n in range(10)])
        await running.wait_for_versions({rid(f"old-{n}"): 1 for n in range(10)})
    await recreate(services, topic)
    await publish(services, topic, upsert(rid("real"), 1))

    async with RunningReplica(services, topic, tmp_path / "store") as rebuilt:
        await rebuilt.wait_for_versions({rid("real"): 1})
        assert set(rebuilt.index.rules()) == {rid("real")}, "nothing of the discarded store is matched"
        assert rebuilt.replica.read == [(rebuilt.replica.read[0][0], 0)], "the new topic read from its start"

    rules_on_disk, offsets_on_disk = stored(tmp_path / "store")
    assert rules_on_disk == {rid("real"): 1}
    assert sum(offsets_on_disk.values()) == 1


async def test_store_behind_a_recreated_topic_that_holds_as_many_messages_or_more_is_rebuilt_too(
        services, topic, tmp_path):
    old = [upsert(rid(f"old-{n}"), 1) for n in range(3)]
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await publish(services, topic, *old)
        await running.wait_for_versions({rid(f"old-{n}"): 1 for n in range(3)})
    await recreate(services, topic)
    # More messages than before in every partition the store had read: its offsets are all within
    # the new topic, and only what it last read there tells that these are other messages.
    partitions = tuple(range(PARTITIONS))
    read_before = {partition_for(change.rule_id.encode(), partitions) for change in old}
    new = [upsert(rid(f"new-{n}"), 1) for n in range(200)]
    per_partition = {p: sum(partition_for(c.rule_id.encode(), partitions) == p for c in new) for p in read_before}
    assert all(count >= 2 for count in per_partition.values()), per_partition
    await publish(services, topic, *new)

    async with RunningReplica(services, topic, tmp_path / "store") as rebuilt:
        await rebuilt.wait_for_versions({change.rule_id: 1 for change in new})
        assert set(rebuilt.index.rules()) == {change.rule_id for change in new}, "no rule of the old topic is left"

    assert stored(tmp_path / "store")[0] == {change.rule_id: 1 for change in new}


async def test_undecodable_rule_change_becomes_a_dead_letter_and_later_changes_apply(
        services, topic, tmp_path):
    running = RunningReplica(services, topic, tmp_path / "store")
    letters = running.replica.letters
    async with running:
        await produce(services.kafka_bootstrap_servers, topic, [
            (b"bad-1", b"not json"),
            (b"bad-2", b'{"rule_id": "r", "client_id": "c", "action": "upsert"}'),
            # Compaction of "other-key" would remove this rule from replicas that start later.
            (b"other-key", upsert(rid("keyed-wrong"), 1).encode()),
            (b"not-a-uuid", upsert("not-a-uuid", 1).encode()),
        ])
        await publish(services, topic, upsert(rid("after-bad"), 1))
        await running.wait_for_versions({rid("after-bad"): 1})
        deadline = time.monotonic() + 30
        while len(letters) < 4:
            assert time.monotonic() < deadline, f"letters: {letters}"
            await asyncio.sleep(0.02)

    assert {letter.key: letter.reason.split(":")[0] for letter in letters} == {
        "bad-1": "message", "bad-2": "version", "other-key": "key", "not-a-uuid": "rule_id"}
    [wrong_key] = [letter for letter in letters if letter.key == "other-key"]
    assert "'other-key'" in wrong_key.reason and rid("keyed-wrong") in wrong_key.reason
    assert {letter.topic for letter in letters} == {topic}
    assert not any(letter.from_history for letter in letters), "produced while the replica ran: new letters"
    assert set(enabled_versions(running.index)) == {rid("after-bad")}
    assert stored(tmp_path / "store")[0] == {rid("after-bad"): 1}, "nor stored"


class RefusedLetter(Exception):
    pass


class RefusingFirstLetters(RecordingReplica):
    """Its first dead letters are refused, as by a broker that cannot take them."""

    refused = False

    async def collect(self, letters: list[DeadLetter]) -> None:
        if not self.refused:
            self.refused = True
            raise RefusedLetter()
        await super().collect(letters)


async def test_a_dead_letter_the_broker_refuses_is_sent_again_after_the_restart(services, topic, tmp_path):
    await produce(services.kafka_bootstrap_servers, topic, [(b"bad", b"not json")])
    replica = RefusingFirstLetters(RuleIndex())

    with pytest.raises(RefusedLetter):
        async with RunningReplica(services, topic, tmp_path / "store", replica):
            pass
    assert stored(tmp_path / "store") == ({}, {}), "nothing recorded as read past the refused letter"

    await publish(services, topic, upsert(rid("good"), 1))
    async with RunningReplica(services, topic, tmp_path / "store", replica) as restarted:
        await restarted.wait_for_versions({rid("good"): 1})
    assert [letter.key for letter in replica.letters] == ["bad"]
    # On the topic before the replica started: every start (and every worker) reads it again, so
    # its letter is marked, and counted apart (alerting_dead_letters_total{from_history="true"}).
    assert [letter.from_history for letter in replica.letters] == [True]
    assert stored(tmp_path / "store")[0] == {rid("good"): 1}


class SwallowingACancellation(RecordingReplica):
    """Consumes a cancellation of its own task while applying a batch, as a library call the replica
    awaited was seen to: the task stays marked as cancelling, but the CancelledError never reaches it."""

    async def apply_batches(self, batches):
        asyncio.current_task().cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
        return await super().apply_batches(batches)


async def test_a_replica_whose_cancellation_something_swallowed_still_stops(services, topic, tmp_path):
    async with RunningReplica(services, topic, tmp_path / "store", SwallowingACancellation(RuleIndex())) as running:
        await publish(services, topic, upsert(rid("a"), 1))
        # A bound only (the replica fetches the record from the broker first, slower under load):
        # before, it read on for ever, and a worker stopping waited for it.
        await asyncio.wait([running._task], timeout=60)
        assert running._task.cancelled()
        assert running.index.held_version(rid("a")) == 1, "the batch it was applying is applied"


async def test_a_cancellation_that_surfaced_as_another_error_stops_keep_running_instead_of_a_restart():
    runs = 0

    async def run_once() -> None:
        nonlocal runs
        runs += 1
        asyncio.current_task().cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # taken for a request's timeout, say, by the library awaited
        raise KafkaError("request timed out")

    kept = asyncio.ensure_future(keep_running("test replica", run_once, lambda: False))
    try:
        await asyncio.wait([kept], timeout=5)
        assert kept.cancelled() and runs == 1
    finally:
        kept.cancel()  # a second cancellation, delivered this time (before, it restarted for ever)



async def test_keep_running_pauses_from_the_first_pause_again_after_a_run_that_went_well(monkeypatch, caplog):
    # Before, the pause only grew: after five failures in a worker's life, every later failure,
    # however far apart, left the replica (and the rules or silences it keeps current) stopped for 30 s.
    from tables import changelog_replica

    monkeypatch.setattr(changelog_replica, "RESTART_FIRST_PAUSE_S", 0.01)
    monkeypatch.setattr(changelog_replica, "RESTART_LONGEST_PAUSE_S", 0.08)
    monkeypatch.setattr(changelog_replica, "RESTART_PAUSE_RESET_AFTER_S", 0.2)
    runs = 0

    async def run_once() -> None:
        nonlocal runs
        runs += 1
        if runs == 7:
            await asyncio.sleep(0.3)  # a run that went well for longer than the reset, then failed
        raise KafkaError(f"failure {runs}")

    from alerting_app import metrics

    failures = metrics.replica_failures.labels(replica="test replica")
    failed_before = failures._value.get()
    with caplog.at_level(logging.ERROR, logger=changelog_replica.__name__):
        await keep_running("test replica", run_once, lambda: runs >= 8)
    assert failures._value.get() - failed_before == 8  # each failure counted, for operators to alert on
    pauses = [float(record.getMessage().rsplit(" ", 1)[1].rstrip("s")) for record in caplog.records
              if "restarting in" in record.getMessage()]
    assert pauses == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.01, 0.02]


@pytest.mark.parametrize("broker_is_down", [True, False])
async def test_a_replica_whose_start_swallowed_its_cancellation_stops_while_it_waits(services, tmp_path, monkeypatch,
                                                                                      broker_is_down):
    # The worker stopping while the replica still starts its consumer: a start that swallowed the
    # cancellation must not leave it waiting for ever for a broker that is down, or for a topic
    # that does not exist yet.
    real_start, starts = AIOKafkaConsumer.start, []

    async def start_swallowing_the_first_cancellation(consumer):
        starts.append(None)
        if len(starts) == 1:
            asyncio.current_task().cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        await real_start(consumer)
    monkeypatch.setattr(AIOKafkaConsumer, "start", start_swallowing_the_first_cancellation)

    replica = RecordingReplica(RuleIndex())
    bootstrap = f"127.0.0.1:{free_port()}" if broker_is_down else services.kafka_bootstrap_servers
    topic = f"absent-{secrets.token_hex(4)}"
    task = asyncio.ensure_future(replica.run(bootstrap, topic, RuleStore(tmp_path / "store"), poll_ms=50))
    try:
        # A bound only: with the broker up, the stop comes once the consumer's start has its answer
        # (a loaded broker's can take seconds); before, it went on waiting for ever.
        await asyncio.wait([task], timeout=60)
        assert task.cancelled() and len(starts) == 1, f"still retrying after {len(starts)} starts"
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=5)


class ServedSizes(RecordingReplica):
    """Notes how many rules the served index holds each time a batch is applied."""

    def __init__(self, index: RuleIndex) -> None:
        super().__init__(index)
        self.served_sizes: list[int] = []

    def apply_records(self, records):
        self.served_sizes.append(len(self.index))
        return super().apply_records(records)


async def test_a_restart_that_finds_the_topic_recreated_matches_the_old_rules_until_the_new_ones_are_read(
        services, topic, tmp_path):
    # More rules before than after: the stored offsets are past the new topic's ends, which is how
    # the replica sees that the topic was recreated.
    old = {rid(f"old-{n}"): 1 for n in range(300)}
    new = {rid(f"new-{n}"): 1 for n in range(10)}
    replica = ServedSizes(RuleIndex())
    async with RunningReplica(services, topic, tmp_path / "store", replica) as running:
        await publish(services, topic, *[upsert(rule_id, 1) for rule_id in old])
        await running.wait_for_versions(old)
    await recreate(services, topic)
    await publish(services, topic, *[upsert(rule_id, 1) for rule_id in new])
    replica.served_sizes.clear()

    # The same replica runs again, as `keep_running` restarts it after a failure: it was caught up,
    # so matching goes on meanwhile, and must never see a partial rule set.
    async with RunningReplica(services, topic, tmp_path / "store", replica) as restarted:
        await restarted.wait_for_versions(new)
        assert set(restarted.index.rules()) == set(new)

    assert replica.served_sizes and set(replica.served_sizes) == {len(old)}, (
        "while the new topic was read, matching saw the old rules, not an empty or partial set")
    assert replica.is_caught_up
    assert stored(tmp_path / "store")[0] == new


async def test_a_stored_rule_the_contract_refuses_makes_the_store_be_rebuilt_from_the_topic(
        services, topic, tmp_path):
    refused = upsert(rid("refused"), 1).model_dump(mode="json")
    refused["version"] = refused["rule"]["version"] = 0  # what an older contract may have let through
    store = RuleStore(tmp_path / "store")
    store.save({rid("stored"): upsert(rid("stored"), 1).encode(), rid("refused"): json.dumps(refused).encode()}, {})
    store.close()
    await publish(services, topic, upsert(rid("on-topic"), 1))

    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await running.wait_for_versions({rid("on-topic"): 1})
        assert set(running.index.rules()) == {rid("on-topic")}

    assert stored(tmp_path / "store")[0] == {rid("on-topic"): 1}, "the store was rebuilt from the topic"


def test_a_stored_rule_with_an_id_that_is_not_a_uuid_is_refused_too(tmp_path):
    store = RuleStore(tmp_path / "store")
    last_read = ConsumerRecord(topic="rule.changed", partition=0, offset=6, timestamp=1, timestamp_type=0,
                               key=b"r-1", value=b"", checksum=None, serialized_key_size=3, serialized_value_size=0,
                               headers=())
    store.save({rid("stored"): upsert(rid("stored"), 1).encode(), "r-1": upsert("r-1", 1).encode()}, {0: last_read})
    try:
        loaded, offsets = RuleReplica(RuleIndex()).load(store)
        assert (len(loaded), offsets) == (0, {})
        assert store.load()[1] == {} and list(store.load()[0]) == [], "the store was emptied"
    finally:
        store.close()


DAY_S = 86_400.0


async def test_deletions_published_longer_ago_than_the_retention_are_forgotten_in_memory_and_on_disk(
        services, topic, tmp_path):
    now = time.time()
    await publish_dated(services, topic,
                        (upsert(rid("old"), 1), now - 45 * DAY_S), (delete(rid("old"), 2), now - 40 * DAY_S),
                        (upsert(rid("young"), 1), now - 2 * DAY_S), (delete(rid("young"), 2), now - DAY_S),
                        (upsert(rid("live"), 1), now - 45 * DAY_S))

    async with RunningReplica(services, topic, tmp_path / "store",
                              RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S)) as running:
        assert running.index.deleted_versions() == {rid("young"): 2}
        assert running.index.held_version(rid("old")) is None, "forgotten, as if never seen"
        assert running.index.deleted_at(rid("young")) == pytest.approx(now - DAY_S, abs=0.01), "the record's time"
        assert enabled_versions(running.index) == {rid("live"): 1}

    assert stored(tmp_path / "store")[0] == {rid("young"): 2, rid("live"): 1}, "the old deletion left the disk too"
    restarted = RunningReplica(services, topic, tmp_path / "store",
                               RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S))
    async with restarted:
        assert restarted.index.deleted_versions() == {rid("young"): 2}
        assert restarted.index.deleted_at(rid("young")) == pytest.approx(now - DAY_S, abs=0.01), (
            "the deletion's time came back from the disk")


async def test_an_older_version_of_a_rule_deleted_within_the_retention_cannot_bring_it_back(
        services, topic, tmp_path):
    """What the tombstone is for: a relay that lost its lock may land an older upsert after the delete."""
    now = time.time()
    await publish_dated(services, topic, (upsert(rid("deleted"), 1), now - 2 * DAY_S),
                        (delete(rid("deleted"), 2), now - DAY_S))
    replica = RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S)
    async with RunningReplica(services, topic, tmp_path / "store", replica) as running:
        await publish_dated(services, topic, (upsert(rid("deleted"), 1), now), (upsert(rid("marker"), 1), now))
        await running.wait_for_versions({rid("marker"): 1})
        assert running.index.held_version(rid("deleted")) == 2 and rid("deleted") not in running.index.rules()

    async with RunningReplica(services, topic, tmp_path / "store", RecordingReplica(
            RuleIndex(), forget_deletions_after_s=30 * DAY_S)) as restarted:
        assert restarted.index.deleted_versions() == {rid("deleted"): 2}
    # Read from scratch (a new worker), the topic ends the same.
    async with RunningReplica(services, topic, tmp_path / "fresh", RecordingReplica(
            RuleIndex(), forget_deletions_after_s=30 * DAY_S)) as fresh:
        assert fresh.index.deleted_versions() == {rid("deleted"): 2}
        assert set(fresh.index.rules()) == {rid("marker")}


def test_a_stored_deletion_without_a_time_is_dated_when_first_loaded(tmp_path):
    """A store an older release wrote keeps its deletions without a time: they are dated at the
    first load and keep that date, so a worker restarted more often than the retention still forgets them."""
    store = RuleStore(tmp_path / "store")
    store.save({rid("deleted"): delete(rid("deleted"), 2).encode(), rid("live"): upsert(rid("live"), 1).encode()}, {})
    try:
        before = time.time()
        first, _ = RuleReplica(RuleIndex()).load(store)
        assert before <= first.deleted_at(rid("deleted")) <= time.time()
        again, _ = RuleReplica(RuleIndex()).load(store)
        assert again.deleted_at(rid("deleted")) == first.deleted_at(rid("deleted"))
        assert store.deleted_at() == {rid("deleted"): first.deleted_at(rid("deleted"))}
    finally:
        store.close()


def relayed_history(seed: int, rules: int = 40) -> list[RuleChanged]:
    """Every version of `rules` rules, published the way our outbox relays can publish them.

    Each rule lives through versions 1..n (criteria changes, disables and re-enables, and for some
    a final delete). Two relays may publish one rule's versions out of order and a relay that
    crashes before deleting its outbox rows publishes them again, so stale versions and exact
    duplicates are mixed in.
    """
    rng = random.Random(seed)
    published: list[RuleChanged] = []
    for n in range(rules):
        rule_id = rid(f"rule-{n}")
        versions = [upsert(rule_id, v, enabled=rng.random() < 0.7, source=rng.choice(["payments", "search", "auth"]))
                    for v in range(1, rng.randint(1, 6) + 1)]
        if rng.random() < 0.3:
            versions.append(delete(rule_id, len(versions) + 1))
        for position, change in enumerate(versions):
            published.append(change)
            roll = rng.random()
            if roll < 0.2:
                published.append(change)  # duplicate
            elif roll < 0.4 and position > 0:
                published.append(versions[rng.randrange(position)])  # stale
    # Rules interleave on the topic; one rule's events keep their (already disordered) order.
    by_rule: dict[str, list[RuleChanged]] = {}
    for change in published:
        by_rule.setdefault(change.rule_id, []).append(change)
    interleaved = []
    while by_rule:
        rule_id = rng.choice(sorted(by_rule))
        interleaved.append(by_rule[rule_id].pop(0))
        if not by_rule[rule_id]:
            del by_rule[rule_id]
    return interleaved


def newest_versions(changes: list[RuleChanged]) -> dict[str, int]:
    newest: dict[str, int] = {}
    for change in changes:
        newest[change.rule_id] = max(change.version, newest.get(change.rule_id, 0))
    return newest


def held_versions(index: RuleIndex, rule_ids) -> dict[str, int | None]:
    """The version held for each rule, deletes (tombstones) included."""
    return {rule_id: index.held_version(rule_id) for rule_id in rule_ids}


async def test_replaying_the_whole_topic_builds_the_index_the_live_replica_holds(services, topic, tmp_path):
    history = relayed_history(seed=3)
    newest = newest_versions(history)
    expected_enabled = {change.rule_id: change.version for change in history
                        if change.version == newest[change.rule_id] and change.action == "upsert"
                        and change.rule.enabled}
    assert len(history) > len(newest), "the history must hold stale or duplicate events"
    assert len(expected_enabled) < len(newest), "the history must end with deleted or disabled rules"

    async with RunningReplica(services, topic, tmp_path / "live") as live:
        # Published in rounds, so the live replica applies the history in many small steps.
        rounds = [history[start:start + 25] for start in range(0, len(history), 25)]
        for number, changes in enumerate(rounds, 1):
            await publish(services, topic, *changes)
            await live.wait_for_versions(newest_versions([c for r in rounds[:number] for c in r]))
        live_rules, live_versions = live.index.rules(), held_versions(live.index, newest)

    async with RunningReplica(services, topic, tmp_path / "replay") as replay:
        # Caught up means it has read the whole topic, every stale and duplicate event included.
        replay_rules, replay_versions = replay.index.rules(), held_versions(replay.index, newest)

    from_disk = RuleIndex()
    store = RuleStore(tmp_path / "live")
    from_disk.rebuild(store.load()[0])
    store.close()

    assert live_versions == newest, "the live replica holds the newest version of every rule"
    assert enabled_versions(live.index) == expected_enabled
    assert rules_digest(enabled_versions(replay.index)) == rules_digest(enabled_versions(live.index))
    assert replay_versions == live_versions
    assert replay_rules == live_rules
    assert held_versions(from_disk, newest) == live_versions, "the store keeps tombstones too"
    assert from_disk.rules() == live_rules


async def test_a_broker_that_does_not_answer_is_not_taken_for_a_recreated_topic(tmp_path):
    port = free_port()
    broker = await asyncio.to_thread(start_tansu, port, tmp_path / "kafka")  # it waits with its own loop
    address = f"127.0.0.1:{port}"
    tp = TopicPartition("rule.changed", 0)
    consumers = [AIOKafkaConsumer(bootstrap_servers=address, enable_auto_commit=False) for _ in range(2)]
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=address)
        await admin.start()
        await admin.create_topics([NewTopic(tp.topic, 1, 1)])
        await admin.close()
        await produce(address, tp.topic, [(b"k", b"v")])
        answered, unanswered = consumers
        for consumer in consumers:
            await consumer.start()
        answered.assign([tp])
        [record] = (await records_at(answered, {tp: 0})).values()
        assert (record.key, record.value) == (b"k", b"v")
        # Answered, with nothing from there on (as when compaction removed it): left out, no waiting.
        assert await records_at(answered, {tp: 1}, timeout_s=30) == {}

        broker.stop()
        unanswered.assign([tp])  # its fetches go to a broker that is gone
        # Neither a consumer the broker never answered, nor one it answered before it stopped.
        for consumer in (unanswered, answered):
            with pytest.raises(BrokerTooSlow, match=r"rule.changed\[0\]@0"):
                await records_at(consumer, {tp: 0}, timeout_s=2)
    finally:
        for consumer in consumers:
            # With its broker gone, aiokafka's fetcher lets its own fetch task's cancellation out of stop().
            with contextlib.suppress(KafkaError, asyncio.CancelledError):
                await consumer.stop()
        broker.stop()


async def publish_null(services, topic: str, rule_id: str) -> None:
    """A null record (Kafka tombstone) for the rule, as the relay sends once retention forgets its deletion."""
    await produce(services.kafka_bootstrap_servers, topic, [(rule_id.encode(), None)])


def retention_replica() -> RecordingReplica:
    return RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S)


async def test_a_null_record_after_a_delete_leaves_nothing_of_the_rule_in_memory_or_on_disk(
        services, topic, tmp_path):
    replica = retention_replica()
    async with RunningReplica(services, topic, tmp_path / "store", replica) as running:
        await publish(services, topic, upsert(rid("deleted"), 1), delete(rid("deleted"), 2), upsert(rid("kept"), 1))
        await running.wait_for_versions({rid("deleted"): 2, rid("kept"): 1})
        await publish_null(services, topic, rid("deleted"))
        await publish(services, topic, upsert(rid("marker"), 1))
        await running.wait_for_versions({rid("marker"): 1, rid("deleted"): None})
        assert running.index.deleted_versions() == {}

    assert replica.letters == [], "a null record is no dead letter"
    assert stored(tmp_path / "store")[0] == {rid("kept"): 1, rid("marker"): 1}
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as restarted:
        assert restarted.index.held_version(rid("deleted")) is None
    async with RunningReplica(services, topic, tmp_path / "fresh", retention_replica()) as fresh:
        assert fresh.index.held_version(rid("deleted")) is None and fresh.replica.letters == []
        assert set(fresh.index.rules()) == {rid("kept"), rid("marker")}


async def test_a_restarted_replica_that_missed_the_delete_drops_the_rule_on_the_null_record(
        services, topic, tmp_path):
    """Compaction removes the delete once the null is behind it: a worker that was stopped before
    the delete reads only the null (the broker here does not compact: the delete is left out)."""
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        await publish(services, topic, upsert(rid("deleted"), 1), upsert(rid("kept"), 1))
        await running.wait_for_versions({rid("deleted"): 1, rid("kept"): 1})
    await publish_null(services, topic, rid("deleted"))

    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as restarted:
        assert set(restarted.index.rules()) == {rid("kept")}
        assert restarted.replica.letters == []
    assert stored(tmp_path / "store")[0] == {rid("kept"): 1}


def stored_read_up_to(store_path) -> float | None:
    store = RuleStore(store_path)
    try:
        return store.read_up_to()
    finally:
        store.close()


async def test_a_store_records_up_to_when_it_has_read_the_topic_at_catch_up_and_while_it_keeps_up(
        services, topic, tmp_path, monkeypatch):
    monkeypatch.setattr("tables.changelog_replica.FORGET_INTERVAL_S", 0.05)
    before = time.time()
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        deadline = time.monotonic() + 30
        while (at_start := running.store.read_up_to()) is None:
            assert time.monotonic() < deadline, "nothing recorded at catch-up"
            await asyncio.sleep(0.02)
        assert before <= at_start <= time.time()
        await publish(services, topic, upsert(rid("later"), 1))
        published = time.time()
        await running.wait_for_versions({rid("later"): 1})
        while running.store.read_up_to() < published:
            assert time.monotonic() < deadline, "not recorded again while it keeps up"
            await asyncio.sleep(0.02)


def store_dated(store_path, read_up_to: float | None, *, ghost: str) -> None:
    """Put in the store a rule the topic no longer holds anything of (its upsert, delete and null
    compacted away while the worker was stopped), and date how far the store had read."""
    store = RuleStore(store_path)
    try:
        store.save({ghost: upsert(ghost, 1).encode()}, {})
        store._db.delete("read-up-to")
        if read_up_to is not None:
            store.mark_read_up_to(read_up_to)
    finally:
        store.close()


@pytest.mark.parametrize("read_days_ago", [31, None])
async def test_a_store_that_read_the_topic_longer_ago_than_deletions_are_kept_is_rebuilt_from_the_topic(
        services, topic, tmp_path, read_days_ago):
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        await publish(services, topic, *[upsert(rid(f"rule-{n}"), 1) for n in range(5)])
        await running.wait_for_versions({rid(f"rule-{n}"): 1 for n in range(5)})
    # None: a store of an older release, which did not record it.
    store_dated(tmp_path / "store", None if read_days_ago is None else time.time() - read_days_ago * DAY_S,
                ghost=rid("ghost"))

    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as rebuilt:
        assert set(rebuilt.index.rules()) == {rid(f"rule-{n}") for n in range(5)}, "the ghost is not matched"
        assert len(rebuilt.replica.read) == 5, "the topic read again from its start"
    assert stored(tmp_path / "store")[0] == {rid(f"rule-{n}"): 1 for n in range(5)}
    assert stored_read_up_to(tmp_path / "store") > time.time() - 60


@pytest.mark.parametrize("read_days_ago, retention_days", [(29, 30), (400, 0)])
async def test_a_store_that_read_the_topic_within_the_retention_or_with_deletions_kept_for_ever_is_used(
        services, topic, tmp_path, read_days_ago, retention_days):
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        await publish(services, topic, *[upsert(rid(f"rule-{n}"), 1) for n in range(5)])
        await running.wait_for_versions({rid(f"rule-{n}"): 1 for n in range(5)})
    store_dated(tmp_path / "store", time.time() - read_days_ago * DAY_S, ghost=rid("ghost"))

    replica = RecordingReplica(RuleIndex(), forget_deletions_after_s=retention_days * DAY_S)
    async with RunningReplica(services, topic, tmp_path / "store", replica) as restarted:
        assert rid("ghost") in restarted.index.rules(), "loaded from the store, which was kept"
        assert restarted.replica.read == [], "nothing read again"


@pytest.mark.parametrize("read_days_ago, found_relayed, rebuilt", [
    (3, "now() - interval '2 days'", True),
    (1, "now() - interval '2 days'", False),
    # Dated 2 days ago, and found relayed by no round since: it may have been relayed after the store read.
    (1, "NULL", True),
], ids=["read-before-its-relay", "read-after-its-relay", "read-before-a-round-found-it-relayed"])
async def test_a_store_is_rebuilt_when_another_workers_retention_forgot_a_delete_it_may_have_missed(
        services, topic, tmp_path, clean_db, read_days_ago, found_relayed, rebuilt):
    """The retention runs on a worker with DELETED_RULE_RETENTION_DAYS=1, this worker has 30: it must
    go by the deletions Postgres forgot (migrations/012), not by its own setting. Its store read the
    topic 3 days ago, before the delete (relayed 2 days ago) that was forgotten since; the delete and
    its null may be compacted away (here: nothing of the ghost is on the topic)."""
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        await publish(services, topic, *[upsert(rid(f"rule-{n}"), 1) for n in range(5)])
        await running.wait_for_versions({rid(f"rule-{n}"): 1 for n in range(5)})
    store_dated(tmp_path / "store", time.time() - read_days_ago * DAY_S, ghost=rid("ghost"))
    pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2, init=init_connection)
    try:
        await pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version, deleted_at, relayed_by)"
                           f" VALUES ($1, $2, 2, now() - interval '2 days', {found_relayed})", rid("ghost"), CLIENT)
        assert await forget_rule_deletions(pool, 1 * DAY_S) == 1

        replica = RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S,
                                   forgotten_relayed_before=lambda: forgotten_rule_deletions_relayed_before(pool))
        async with RunningReplica(services, topic, tmp_path / "store", replica) as restarted:
            if rebuilt:
                assert set(restarted.index.rules()) == {rid(f"rule-{n}") for n in range(5)}, "the ghost is not matched"
                assert len(restarted.replica.read) == 5, "the topic read again from its start"
            else:  # it read the topic after that delete was relayed: it has seen it
                assert rid("ghost") in restarted.index.rules(), "loaded from the store, which was kept"
                assert restarted.replica.read == [], "nothing read again"
    finally:
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", rid("ghost"))  # the null queued
        await pool.close()


async def test_a_store_is_rebuilt_rather_than_waited_on_when_postgres_does_not_say_what_was_forgotten(
        services, topic, tmp_path, monkeypatch):
    """A replica (re)started while Postgres is away (here: nothing listens on its port) cannot know
    whether a delete its store missed has been forgotten. Waiting for Postgres, it would read no rule
    change until Postgres came back (and a starting worker would not match), where nothing else of
    it needs Postgres: it rebuilds the store from the topic instead, which needs only the broker."""
    async with RunningReplica(services, topic, tmp_path / "store", retention_replica()) as running:
        await publish(services, topic, *[upsert(rid(f"rule-{n}"), 1) for n in range(3)])
        await running.wait_for_versions({rid(f"rule-{n}"): 1 for n in range(3)})
    monkeypatch.setattr(rule_replica, "FORGOTTEN_LOOKUP_TIMEOUT_S", 1.0)
    postgres_away = f"postgresql://alerting@127.0.0.1:{free_port()}/alerting"

    async def away_pool() -> asyncpg.Pool:
        return await asyncpg.create_pool(postgres_away, min_size=0, max_size=1)

    replica = RecordingReplica(RuleIndex(), forget_deletions_after_s=30 * DAY_S,
                               forgotten_relayed_before=lambda: db.retry_transient(
                                   forgotten_rule_deletions_relayed_before, "reading forgotten deletions",
                                   get_pool=away_pool))
    async with RunningReplica(services, topic, tmp_path / "store", replica) as restarted:
        assert set(restarted.index.rules()) == {rid(f"rule-{n}") for n in range(3)}
        assert len(restarted.replica.read) == 3, "the topic read again from its start"


def corrupt_the_middle_of_the_largest_table_file(store_path) -> None:
    """Flip bytes in the middle of the store's largest SST file: a data block RocksDB finds corrupted
    only when an iteration reads it (what a disk or a crash may leave behind)."""
    db = Rdict(str(store_path))
    try:
        db.flush()
    finally:
        db.close()
    tables = sorted(store_path.glob("*.sst"), key=lambda path: path.stat().st_size)
    assert tables, "the store's rules are in a table file"
    content = bytearray(tables[-1].read_bytes())
    middle = len(content) // 3
    for position in range(middle, middle + 64):
        content[position] ^= 0xFF
    tables[-1].write_bytes(bytes(content))


async def test_a_store_with_a_corrupted_block_is_rebuilt_from_the_topic_not_loaded_in_part(services, topic, tmp_path):
    # RocksDB's iterator stops at a block that fails its checksum, and iterating a store's items
    # ended there as if that were all: a worker resumed with part of its rules, from offsets past the
    # rest, and never matched those again.
    rules = [upsert(rid(f"many-{n}"), 1, source=f"payments-{n}") for n in range(2000)]
    await publish(services, topic, *rules)
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await running.wait_for_versions({rule.rule_id: 1 for rule in rules})
    corrupt_the_middle_of_the_largest_table_file(tmp_path / "store")

    async with RunningReplica(services, topic, tmp_path / "store") as running:
        assert enabled_versions(running.index) == {rule.rule_id: 1 for rule in rules}


async def test_a_store_rocksdb_cannot_open_as_corrupted_is_rebuilt_from_the_topic(services, topic, tmp_path):
    await publish(services, topic, upsert(rid("kept"), 1))
    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await running.wait_for_versions({rid("kept"): 1})
    (tmp_path / "store" / "CURRENT").write_text("garbage\n")  # RocksDB: "Corruption: CURRENT file corrupted"

    async with RunningReplica(services, topic, tmp_path / "store") as running:
        assert enabled_versions(running.index) == {rid("kept"): 1}


def mark_of_a_partition_elsewhere(partition: int) -> ConsumerRecord:
    """A record of a partition the test topic does not have: its last-read mark is stored, but no
    offset of the topic's own partitions is, so the run goes on to read the marks."""
    return ConsumerRecord(topic="rule.changed", partition=partition, offset=7, timestamp=1, timestamp_type=0,
                          key=f"r-{partition}".encode(), value=b"", checksum=None, serialized_key_size=6,
                          serialized_value_size=0, headers=())


async def test_a_store_corrupted_where_the_last_read_marks_are_is_rebuilt_in_the_same_run(services, topic, tmp_path):
    # The rules, offsets and deletion times load; the read of the last-read marks, after the
    # replica connected, finds a block corrupted. The store was then discarded inside the except
    # block, whose traceback still held RocksDB's iterator, so RocksDB kept its lock and reopening
    # the store failed ("lock hold by current process"): the run died, to be tried again a pause later.
    store = RuleStore(tmp_path / "store")
    # Thousands of marks fill the middle of the table file (keys sort "last-read:" < "offset:" < "rule:").
    store.save({}, {partition: mark_of_a_partition_elsewhere(partition) for partition in range(1000, 4000)})
    store.close()
    corrupt_the_middle_of_the_largest_table_file(tmp_path / "store")
    await publish(services, topic, upsert(rid("on-topic-after-corruption"), 1))

    async with RunningReplica(services, topic, tmp_path / "store") as running:
        await running.wait_for_versions({rid("on-topic-after-corruption"): 1})

    rules_on_disk, offsets_on_disk = stored(tmp_path / "store")
    assert rules_on_disk == {rid("on-topic-after-corruption"): 1}
    assert set(offsets_on_disk) <= set(range(PARTITIONS)), "the store was rebuilt from the topic"
