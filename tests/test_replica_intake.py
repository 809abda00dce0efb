"""What the rule and silence replicas take from their changelog topics, as plain functions: a record
is applied only if it is keyed by the id it carries and its ids are canonical UUIDs; otherwise it
is a dead letter naming why. A null record (a Kafka tombstone) makes the replica forget its key.
No broker: the records are built by hand."""
from __future__ import annotations

import time
import uuid

import pytest
from aiokafka.structs import ConsumerRecord

from alerting_app.contracts import Alert, DeadLetter, Rule, RuleChanged, Silence, SilenceChanged
from alerting_app.matching import RuleIndex
from alerting_app.silencing import SilenceIndex
from tables.rule_replica import RuleReplica
from tables.silences import SilenceReplica


def new_id() -> str:
    return str(uuid.uuid4())


def record(key: bytes | None, value: bytes | None, topic: str = "rule.changed", offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=0, timestamp_type=0, key=key,
                          value=value, checksum=None, serialized_key_size=len(key or b""),
                          serialized_value_size=len(value or b""), headers=[])


def rule_upsert(rule_id: str, client_id: str) -> RuleChanged:
    return RuleChanged.upsert(Rule(rule_id=rule_id, client_id=client_id, version=1, severity="HIGH",
                                   source="payments", name="*"))


def silence_upsert(silence_id: str, client_id: str) -> SilenceChanged:
    return SilenceChanged.upsert(Silence(
        silence_id=silence_id, client_id=client_id, version=1, severity="*", source="payments", name="*",
        starts_at=time.time() - 1, ends_at=time.time() + 3600, comment="test", created_by="tests"))


async def no_sending(letters: list[DeadLetter]) -> None:
    raise AssertionError("apply_records returns the letters; nothing is sent here")


def test_a_rule_keyed_by_its_own_id_is_applied():
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)
    change = rule_upsert(new_id(), new_id())

    changed, dead = replica.apply_records([record(change.rule_id.encode(), change.encode())])

    assert (changed, dead) == ({change.rule_id: change.encode()}, [])
    assert replica.index.held_version(change.rule_id) == 1


@pytest.mark.parametrize("key", [b"another-key", None])
def test_a_rule_under_another_key_is_a_dead_letter_naming_the_key_and_is_not_applied(key):
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)
    change = rule_upsert(new_id(), new_id())

    changed, [letter] = replica.apply_records([record(key, change.encode(), offset=7)])

    assert changed == {} and len(replica.index) == 0
    assert letter.reason.startswith("key: ") and repr(key.decode() if key else None) in letter.reason
    assert change.rule_id in letter.reason
    assert (letter.topic, letter.offset, letter.payload) == ("rule.changed", 7, change.encode().decode())


@pytest.mark.parametrize("field", ["rule_id", "client_id"])
def test_a_rule_whose_ids_are_not_canonical_uuids_is_a_dead_letter(field):
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)
    ids = {"rule_id": new_id(), "client_id": new_id()}
    ids[field] = ids[field].upper()
    change = rule_upsert(**ids)

    changed, [letter] = replica.apply_records([record(change.rule_id.encode(), change.encode())])

    assert changed == {} and len(replica.index) == 0
    assert letter.reason.startswith(f"{field}: not a UUID")


def test_a_silence_under_another_key_or_with_a_non_uuid_id_is_a_dead_letter_and_others_apply():
    replica = SilenceReplica(SilenceIndex(), on_dead_letters=no_sending)
    good, wrong_key, not_uuid = (silence_upsert(new_id(), new_id()), silence_upsert(new_id(), new_id()),
                                 silence_upsert("s-1", new_id()))

    changed, dead = replica.apply_records([
        record(wrong_key.silence_id.encode() + b"x", wrong_key.encode(), "silence.changed", 0),
        record(b"s-1", not_uuid.encode(), "silence.changed", 1),
        record(good.silence_id.encode(), good.encode(), "silence.changed", 2),
    ])

    assert set(changed) == {good.silence_id}
    assert replica.index.versions() == {good.silence_id: 1}
    assert [(letter.offset, letter.reason.split(":")[0]) for letter in dead] == [(0, "key"), (1, "silence_id")]



def test_a_null_record_after_a_rules_delete_leaves_nothing_of_it_and_is_no_dead_letter():
    """Retention queues the null once Postgres forgets the deletion (agents/retention.py)."""
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)
    rule, kept = rule_upsert(new_id(), new_id()), rule_upsert(new_id(), new_id())
    deleted = RuleChanged(rule_id=rule.rule_id, client_id=rule.client_id, version=2, action="delete")
    key = rule.rule_id.encode()

    changed, dead = replica.apply_records([record(key, rule.encode(), offset=0), record(key, deleted.encode(), offset=1),
                                           record(kept.rule_id.encode(), kept.encode(), offset=2),
                                           record(key, None, offset=3)])

    assert (changed, dead) == ({rule.rule_id: None, kept.rule_id: kept.encode()}, [])
    assert replica.index.held_version(rule.rule_id) is None and replica.index.deleted_versions() == {}
    assert set(replica.index.rules()) == {kept.rule_id}


def test_a_null_record_drops_a_rule_whose_delete_the_replica_missed():
    """A replica that resumed after compaction removed the delete reads only the null behind it."""
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)
    rule = rule_upsert(new_id(), new_id())
    replica.apply_records([record(rule.rule_id.encode(), rule.encode())])

    changed, dead = replica.apply_records([record(rule.rule_id.encode(), None, offset=1)])

    assert (changed, dead) == ({rule.rule_id: None}, [])
    assert replica.index.held_version(rule.rule_id) is None
    assert len(replica.index) == 0 and replica.index.enabled_versions() == {}


# Fixed values: pytest-xdist's processes must collect the same test ids.
@pytest.mark.parametrize("key", [b"5a0d0bde-6f0e-4a43-9d6b-3f1c2a9e8b71", b"a bad record's key", b"\xff", None])
def test_a_null_record_for_a_key_never_seen_changes_nothing_and_is_no_dead_letter(key):
    replica = RuleReplica(RuleIndex(), on_dead_letters=no_sending)

    assert replica.apply_records([record(key, None)]) == ({}, [])
    assert replica.index.held_version(key.decode("utf-8", "replace") if key else "") is None


def test_a_null_record_makes_the_silence_replica_forget_the_silence_and_its_tombstone():
    replica = SilenceReplica(SilenceIndex(), on_dead_letters=no_sending)
    missed, deleted, kept = (silence_upsert(new_id(), new_id()) for _ in range(3))
    deletion = SilenceChanged(silence_id=deleted.silence_id, client_id=deleted.client_id, version=2, action="delete")
    replica.apply_records([record(change.silence_id.encode(), change.encode(), "silence.changed", offset)
                           for offset, change in enumerate([missed, deleted, deletion, kept])])
    assert replica.index.deleted_versions() == {deleted.silence_id: 2}

    changed, dead = replica.apply_records([record(missed.silence_id.encode(), None, "silence.changed", 4),
                                           record(deleted.silence_id.encode(), None, "silence.changed", 5)])

    assert (set(changed), dead) == ({missed.silence_id, deleted.silence_id}, [])
    assert replica.index.versions() == {kept.silence_id: 1} and replica.index.deleted_versions() == {}
    assert replica.index.silencing(missed.client_id, alert()) is None
    assert replica.index.silencing(kept.client_id, alert()) == kept.silence_id


def alert() -> Alert:
    return Alert(alert_id="a-1", event_ts=time.time(), severity="HIGH", source="payments", name="Latency")
