"""Every worker forgets old deletions, and only those, with several worker processes.

A deleted rule or silence leaves a tombstone (its id and version) in every worker's replica, so
that an older version arriving late cannot bring it back. The tombstone is kept
DELETED_RULE_RETENTION_DAYS (SILENCE_RETENTION_DAYS for silences) after the delete was published,
by the record's time, then forgotten: here deletions published long ago and recently are put on the
real topics, and each worker is asked what it still holds, after a start from scratch and after a
restart from its rule store; then a null record (what retention sends once Postgres forgets a
deletion) makes each forget the deletion at once.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from agents.retention import forget_rule_deletions
from alerting_app.contracts import RuleChanged, SilenceChanged
from alerting_app.db import init_connection
from test_rule_replica import CLIENT, store_dated, upsert

pytestmark = pytest.mark.e2e

DAY_S = 86_400.0


async def publish_dated(bootstrap: str, topic: str, changes: list[tuple[RuleChanged | SilenceChanged, float]]) -> None:
    """Publish each change keyed by its id, with the record timestamp given (unix seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for change, at in changes:
            key = change.rule_id if isinstance(change, RuleChanged) else change.silence_id
            await producer.send_and_wait(topic, value=change.encode(), key=key.encode(), timestamp_ms=int(at * 1000))
    finally:
        await producer.stop()


async def held_deletions(http: aiohttp.ClientSession, token: str, worker, what: str) -> dict[str, int]:
    async with http.get(f"{worker.url}/api/v1/worker/{what}", headers={"Authorization": f"Bearer {token}"}) as response:
        body = json.loads(await response.text())
        assert response.status == 200, body
        return body["deleted_versions"]


async def test_every_worker_forgets_the_deletions_older_than_the_retention_and_keeps_the_others(
        services, clean_db, start_worker, tmp_path):
    now, client = time.time(), str(uuid.uuid4())
    rules = {age: str(uuid.uuid4()) for age in ("old", "young")}
    silences = {age: str(uuid.uuid4()) for age in ("old", "young")}
    await publish_dated(services.kafka_bootstrap_servers, "rule.changed", [
        (RuleChanged(rule_id=rules["old"], client_id=client, version=2, action="delete"), now - 31 * DAY_S),
        (RuleChanged(rule_id=rules["young"], client_id=client, version=2, action="delete"), now - 29 * DAY_S)])
    await publish_dated(services.kafka_bootstrap_servers, "silence.changed", [
        (SilenceChanged(silence_id=silences["old"], client_id=client, version=2, action="delete"), now - 6 * DAY_S),
        (SilenceChanged(silence_id=silences["young"], client_id=client, version=2, action="delete"), now - 4 * DAY_S)])
    admin = services.admin_token
    group = f"deletions-forgotten-{secrets.token_hex(4)}"
    kept_dir = str(tmp_path / "kept-data")
    env = {"APP_ID": group, "DELETED_RULE_RETENTION_DAYS": "30", "SILENCE_RETENTION_DAYS": "5"}
    first, second = start_worker(**env), start_worker(**env, DATA_DIR=kept_dir)

    async with aiohttp.ClientSession() as http:
        async def assert_held_everywhere(workers, extra_rules: dict[str, int] = {}) -> None:
            for worker in workers:
                held_rules = await held_deletions(http, admin, worker, "rules")
                held_silences = await held_deletions(http, admin, worker, "silences")
                assert {rule_id: held_rules.get(rule_id) for rule_id in [*rules.values(), *extra_rules]} == {
                    rules["old"]: None, rules["young"]: 2, **extra_rules}, worker.url
                assert {silence_id: held_silences.get(silence_id) for silence_id in silences.values()} == {
                    silences["old"]: None, silences["young"]: 2}, worker.url

        await assert_held_everywhere([first, second])

        # A rule deleted through the API now: its tombstone is young, on every worker.
        headers = {"Authorization": f"Bearer {admin}"}
        async with http.post(f"{first.url}/api/v1/clients", json={"name": "Forgetful"}, headers=headers) as response:
            key = (await response.json())["api_key"]
        async with http.post(f"{first.url}/api/v1/rules", json={"severity": "HIGH", "source": "payments", "name": "Latency"},
                             headers={"Authorization": f"Bearer {key}"}) as response:
            rule = await response.json()
            assert response.status == 201, rule
        async with http.delete(f"{second.url}/api/v1/rules/{rule['rule_id']}",
                               headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 204
        deleted_now = {rule["rule_id"]: rule["version"] + 1}
        deadline = time.monotonic() + 30
        for worker in (first, second):
            while (await held_deletions(http, admin, worker, "rules")).get(rule["rule_id"]) is None:
                assert time.monotonic() < deadline, f"{worker.url} never heard of the deletion"
                await asyncio.sleep(0.1)
        await assert_held_everywhere([first, second], deleted_now)

        # Restarted on its rule store: what it forgot stays forgotten, what it kept is kept.
        second.stop()
        restarted = start_worker(**env, DATA_DIR=kept_dir)
        await assert_held_everywhere([first, restarted], deleted_now)

        # The null record retention sends once Postgres forgets a deletion: every worker forgets the key.
        await send_null(services.kafka_bootstrap_servers, "rule.changed", rules["young"])
        await send_null(services.kafka_bootstrap_servers, "silence.changed", silences["young"])
        deadline = time.monotonic() + 30
        for worker in (first, restarted):
            while (rules["young"] in await held_deletions(http, admin, worker, "rules")
                   or silences["young"] in await held_deletions(http, admin, worker, "silences")):
                assert time.monotonic() < deadline, f"{worker.url} still holds the deletions a null record followed"
                await asyncio.sleep(0.1)


async def send_null(bootstrap: str, topic: str, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=None, key=key.encode())
    finally:
        await producer.stop()


async def test_a_worker_keeping_deletions_longer_than_the_retention_rebuilds_a_store_that_may_have_missed_one(
        services, clean_db, start_worker, tmp_path):
    """The retention runs on a worker with DELETED_RULE_RETENTION_DAYS=1; this one keeps deletions 30
    days, and its rule store had read `rule.changed` up to 3 days ago, before a delete relayed 2 days
    ago that the retention has forgotten since: the delete and the null behind it may be compacted
    away (here: neither is on the topic). Its own setting would trust the store for 30 days; what
    Postgres recorded of the forgotten deletions makes it rebuild."""
    group, ghost = f"deletions-forgotten-{secrets.token_hex(4)}", str(uuid.uuid4())
    env = {"APP_ID": group, "DELETED_RULE_RETENTION_DAYS": "30", "DATA_DIR": str(tmp_path / "kept-data"),
           "ROLES": "evaluate"}  # no relay of its own: the null below is never sent
    kept = str(uuid.uuid4())  # read by the worker: its store holds an offset of the topic
    await publish_dated(services.kafka_bootstrap_servers, "rule.changed", [(upsert(kept, 1), time.time())])
    start_worker(**env).stop()
    store_dated(tmp_path / "kept-data" / "rules" / group, time.time() - 3 * DAY_S, ghost=ghost)
    pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2, init=init_connection)
    try:
        await pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version, deleted_at, relayed_by)"
                           " VALUES ($1, $2, 2, now() - interval '2 days', now() - interval '2 days')", ghost, CLIENT)
        assert await forget_rule_deletions(pool, 1 * DAY_S) == 1
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", ghost)  # its null: compacted away

        restarted = start_worker(**env)
    finally:
        await pool.close()

    assert "discarding the local rule store" in restarted.log()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{restarted.url}/api/v1/worker/rules",
                            headers={"Authorization": f"Bearer {services.admin_token}"}) as response:
            held = (await response.json())["versions"]
    assert ghost not in held and held[kept] == 1
