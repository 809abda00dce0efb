"""The silence replica against the real broker, restarted inside a running worker (`keep_running` runs
it again after any failure): matching goes on with what it held meanwhile, never with history it
reads again.

Each test uses a topic of its own.
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import pytest

from alerting_app.contracts import Alert, DeadLetter, Silence, SilenceChanged
from alerting_app.silencing import SilenceIndex
from kafka_probe import caught_up, create_topics, produce
from tables.silences import SilenceReplica


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def topic(services):
    name = f"silence.changed.test-{secrets.token_hex(4)}"
    await create_topics(services.kafka_bootstrap_servers, {name: 3})
    return name


def silence(silence_id: str, client_id: str, version: int, *, source: str, starts_at: float,
            ends_at: float) -> SilenceChanged:
    return SilenceChanged.upsert(Silence(
        silence_id=silence_id, client_id=client_id, version=version, severity="*", source=source, name="*",
        starts_at=starts_at, ends_at=ends_at, comment="maintenance", created_by="tests"))


def alert(source: str) -> Alert:
    return Alert(alert_id=new_id(), event_ts=time.time(), severity="HIGH", source=source, name="DiskFull")


class CollectingReplica(SilenceReplica):
    """Counts the records it reads, and keeps its dead letters (the app's producer is not running in
    these tests)."""

    def __init__(self) -> None:
        super().__init__(SilenceIndex(), on_dead_letters=self.collect)
        self.letters: list[DeadLetter] = []
        self.records_read = 0

    def apply_records(self, records):
        self.records_read += len(records)
        return super().apply_records(records)

    async def collect(self, letters: list[DeadLetter]) -> None:
        self.letters.extend(letters)


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_restart_never_mutes_with_an_older_version_of_a_silence_the_replica_had_forgotten(services, topic):
    # A month's maintenance silence, expired after an hour (an upsert ending it), deleted by retention
    # once ended and forgotten after (a null record behind the delete): nothing of it is held. A
    # topic not yet compacted still holds every one of those records. A restart read them again into
    # the index matching used, so from the first upsert to the expiry the silence muted again what
    # it had stopped muting: a tenant's alerts recorded SILENCED, never delivered.
    client, ended, in_force = new_id(), new_id(), new_id()
    now = time.time()
    changes = [
        silence(ended, client, 1, source="payments", starts_at=now - 3600, ends_at=now + 30 * 86_400),
        silence(ended, client, 2, source="payments", starts_at=now - 3600, ends_at=now - 60),
        SilenceChanged(silence_id=ended, client_id=client, version=3, action="delete"),
        silence(in_force, client, 1, source="billing", starts_at=now - 3600, ends_at=now + 86_400),
    ]
    await produce(services.kafka_bootstrap_servers, topic,
                  [(change.silence_id.encode(), change.encode()) for change in changes] + [(ended.encode(), None)])
    replica = CollectingReplica()
    first_run = asyncio.ensure_future(replica.run(services.kafka_bootstrap_servers, topic, poll_ms=50))
    try:
        await caught_up(replica, first_run, timeout=30)
        await wait_for(lambda: replica.records_read == 5, "the first run did not read every record")
        assert replica.index.versions() == {in_force: 1} and replica.index.deleted_versions() == {}
    finally:
        await stop(first_run)

    # Matching between any two records the restart reads: a broker may end a fetch anywhere.
    mutes: list[tuple[str | None, str | None]] = []
    read_again: list[bytes | None] = []
    apply_batches = replica.apply_batches

    async def one_record_at_a_time(batches):
        changed = {}
        for tp, records in batches.items():
            for record in records:
                changed.update(await apply_batches({tp: [record]}))
                read_again.append(record.key)
                mutes.append((replica.index.silencing(client, alert("payments")),
                               replica.index.silencing(client, alert("billing"))))
        return changed

    replica.apply_batches = one_record_at_a_time
    restart = asyncio.ensure_future(replica.run(services.kafka_bootstrap_servers, topic, poll_ms=50))
    try:
        await wait_for(lambda: len(read_again) == 5 and replica.filling is replica.index,
                       f"the restart read {len(read_again)} records of 5")
    finally:
        await stop(restart)

    assert mutes == [(None, in_force)] * 5
    assert replica.index.silencing(client, alert("payments")) is None
    assert ended not in replica.index.versions() and ended not in replica.index.deleted_versions()
    assert replica.index.versions() == {in_force: 1}
    assert replica.letters == []
