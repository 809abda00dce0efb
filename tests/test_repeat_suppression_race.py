"""Repeat suppression across two workers that record the same client at once (a rebalance overlap:
the old owner of a partition still finishing a batch while the new owner starts on it).

`groups_lock` serialises the stateful batches of one worker only, so each worker here calls
`record_stateful` directly, on a pool of its own. The interleaving is forced with a Postgres lock,
not with timing: the test holds the fingerprints table, which lets reads through and stops writes,
until both workers wait on a lock.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from types import SimpleNamespace

import asyncpg
import pytest_asyncio

from agents.aggregate import Aggregation, emit_now
from agents.match_outcomes import client_lock_key, lock_clients, record_stateful
from alerting_app.contracts import Alert, AlertMatched
from alerting_app.db import init_connection
from postgres_waits import until_waiting_on_a_lock

WORKERS = ("race-worker-a", "race-worker-b")


@pytest_asyncio.fixture
async def observer(services):
    conn = await asyncpg.connect(services.database_url)
    await conn.execute("SET lock_timeout = '60s'")  # a broken test fails rather than hangs
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def worker_pools(services):
    """One pool per worker, named so the test can see which of them waits on a lock."""
    pools = [await asyncpg.create_pool(services.database_url, min_size=1, max_size=2, init=init_connection,
                                       server_settings={"application_name": name}) for name in WORKERS]
    yield pools
    for pool in pools:
        await pool.close()


async def insert_client(conn: asyncpg.Connection) -> str:
    client_id = str(uuid.uuid4())
    await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, $2, $3)",
                       client_id, f"client {client_id[:8]}", uuid.uuid4().hex)
    return client_id


def repeating(client_id: str, fingerprint: str) -> AlertMatched:
    """A non-grouped match suppressed for 60 s after its fingerprint was notified; a new alert_id each time."""
    alert = Alert(alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                  name="CheckoutLatency", context={"region": "eu-west-1"})
    return AlertMatched(alert=alert, client_id=client_id, rule_ids=[str(uuid.uuid4())], repeat_interval_s=60,
                        fingerprint=fingerprint)


def event(match: AlertMatched) -> SimpleNamespace:
    """What record_stateful reads of a Faust event: its message."""
    return SimpleNamespace(message=SimpleNamespace(
        topic="alerts.matched", partition=0, offset=0, key=match.client_id.encode(),
        value=match.model_dump_json().encode()))


async def test_two_workers_notify_a_repeated_fingerprint_once_and_suppress_the_other(observer, worker_pools):
    client = await insert_client(observer)
    fingerprint = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    first, second = repeating(client, fingerprint), repeating(client, fingerprint)
    aggregations = [Aggregation(), Aggregation()]

    # Reads go through an EXCLUSIVE table lock; the fingerprint each worker remembers waits for it.
    holder = observer.transaction()
    await holder.start()
    await observer.execute("LOCK TABLE fingerprints IN EXCLUSIVE MODE")
    recording = [asyncio.ensure_future(record_stateful(pool, [(event(match), match)], aggregation, emit_now))
                 for pool, match, aggregation in zip(worker_pools, (first, second), aggregations)]
    try:
        await until_waiting_on_a_lock(observer, application_names=list(WORKERS), sessions=len(WORKERS))
    finally:
        await holder.commit()
    await asyncio.gather(*recording)

    statuses = await observer.fetch("SELECT status, count(*) FROM notifications WHERE client_id = $1"
                                    " GROUP BY status ORDER BY status", client)
    assert [tuple(row) for row in statuses] == [("PENDING", 1), ("SUPPRESSED", 1)]
    assert sum(len(aggregation.ready) for aggregation in aggregations) == 1


async def test_two_workers_recording_the_same_clients_in_opposite_orders_do_not_deadlock(observer, worker_pools):
    clients = sorted([await insert_client(observer), await insert_client(observer)], key=client_lock_key)
    low, high = (repeating(client, hashlib.sha256(uuid.uuid4().bytes).hexdigest()) for client in clients)
    batches = {"race-worker-b": [low, high], "race-worker-a": [high, low]}
    pools = dict(zip(WORKERS, worker_pools))

    # B waits for the first client's lock, then A, which (taking its batch's order) would hold the
    # second client's lock meanwhile, and each would then wait for the other.
    holder = observer.transaction()
    await holder.start()
    await lock_clients(observer, [low.client_id])
    recording = []
    try:
        for worker in ("race-worker-b", "race-worker-a"):
            recording.append(asyncio.ensure_future(record_stateful(
                pools[worker], [(event(match), match) for match in batches[worker]], Aggregation(), emit_now)))
            await until_waiting_on_a_lock(observer, application_names=[worker])
    finally:
        await holder.commit()
    await asyncio.gather(*recording)  # a deadlock would raise DeadlockDetectedError in one of them

    assert await observer.fetchval("SELECT count(*) FROM notifications WHERE client_id = ANY($1::uuid[])",
                                   clients) == 2
