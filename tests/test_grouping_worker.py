"""Groups in a real worker: the changelog-backed table, the closer, and a SIGKILL in an open window.

`alerts.matched` messages are produced directly (no evaluator needed), keyed by client_id as the
evaluator keys them; what the stage did is read from Postgres and from `notifications.ready`.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from alerting_app.app import app, settings
from alerting_app.contracts import Alert, AlertMatched
from alerting_app.sending import partition_for
from kafka_probe import produce, read_json, wait_until_consumed
from operations_support import get_json

pytestmark = pytest.mark.e2e


async def new_client(database_url: str) -> str:
    client_id = str(uuid.uuid4())
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'grouping', $2)",
                           client_id, uuid.uuid4().hex)
    finally:
        await conn.close()
    return client_id


def grouped_matches(client_id: str, rule_id: str, count: int, window_s: int) -> list[AlertMatched]:
    return [AlertMatched(alert=Alert(alert_id=f"alert-{n}-{uuid.uuid4()}", event_ts=time.time(), severity="HIGH",
                                     source="payments", name="CheckoutLatency", context={"n": str(n)}),
                         client_id=client_id, rule_ids=[rule_id], group_rule_id=rule_id, group_window_s=window_s)
            for n in range(count)]


async def produce_matches(bootstrap: str, matches: list[AlertMatched]) -> None:
    await produce(bootstrap, "alerts.matched", [(m.client_id.encode(), m.encode()) for m in matches])


async def fetch(database_url: str, query: str, *args) -> list:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def wait_for_rows(database_url: str, query: str, *args, count: int, timeout: float = 90.0) -> list:
    """Wait until `query` returns `count` rows (a bound, not a measurement); return them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await fetch(database_url, query, *args)
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(rows)} rows, expected {count}: {query}")
        await asyncio.sleep(0.2)


NOTIFICATIONS = ("SELECT notification_id::text, alerts, truncated_alerts, group_rule_id::text, emitted "
                 "FROM notifications WHERE client_id = $1")
MEMBERS = "SELECT alert_id FROM notification_alerts WHERE client_id = $1"


async def ready_for(bootstrap: str, client_id: str) -> list[dict]:
    return [m for m in await read_json(bootstrap, "notifications.ready") if m.get("client_id") == client_id]


async def test_fifty_alerts_in_one_window_are_one_notification_of_twenty_and_thirty_truncated(
        services, clean_db, start_worker):
    group = f"grouping-{secrets.token_hex(4)}"
    start_worker(APP_ID=group, GROUP_MAX_ALERTS="20", ROLES="aggregate")
    client, rule = await new_client(services.database_url), str(uuid.uuid4())
    # The window opens when the worker takes the first match, so all fifty must reach it within the
    # window: 5 s was too short for a worker just started on a loaded machine (its first batches
    # took longer, and the group closed with five; once in a clean-clone run of the suite).
    matches = grouped_matches(client, rule, 50, window_s=15)

    await produce_matches(services.kafka_bootstrap_servers, matches)
    [row] = await wait_for_rows(services.database_url, NOTIFICATIONS, client, count=1)
    await wait_until_consumed(services.kafka_bootstrap_servers, group, ["alerts.matched"], timeout=120)
    await wait_for_rows(services.database_url, NOTIFICATIONS + " AND emitted", client, count=1)

    assert [a["alert_id"] for a in row["alerts"]] == [m.alert.alert_id for m in matches[:20]]
    assert (row["truncated_alerts"], row["group_rule_id"]) == (30, rule)
    [ready] = await ready_for(services.kafka_bootstrap_servers, client)
    assert (ready["notification_id"], len(ready["alerts"]), ready["truncated_alerts"]) == (
        row["notification_id"], 20, 30)
    assert len(await fetch(services.database_url, NOTIFICATIONS, client)) == 1


async def test_a_worker_killed_in_an_open_window_and_restarted_emits_the_group_once_complete(
        services, clean_db, start_worker):
    group = f"grouping-crash-{secrets.token_hex(4)}"
    bootstrap = services.kafka_bootstrap_servers
    worker = start_worker(APP_ID=group, ROLES="aggregate")
    client, rule = await new_client(services.database_url), str(uuid.uuid4())
    # Long enough that the window is still open at the kill, whatever the machine's load.
    matches = grouped_matches(client, rule, 40, window_s=40)

    # The first half is committed (so in the changelog: Faust flushes it before committing) ...
    await produce_matches(bootstrap, matches[:20])
    await wait_until_consumed(bootstrap, group, ["alerts.matched"], timeout=120)
    # ... the second half is recorded in Postgres, perhaps not yet in the changelog nor committed.
    await produce_matches(bootstrap, matches[20:])
    await wait_for_rows(services.database_url, MEMBERS, client, count=40)
    assert await fetch(services.database_url, NOTIFICATIONS, client) == []  # the window is still open
    worker.child.process.kill()
    worker.child.process.wait()

    start_worker(APP_ID=group, ROLES="aggregate")
    [row] = await wait_for_rows(services.database_url, NOTIFICATIONS + " AND emitted", client, count=1)
    # Every message is processed and committed: none stuck behind a rebalance (broker_transport.py).
    await wait_until_consumed(bootstrap, group, ["alerts.matched"], timeout=120)

    assert sorted(a["alert_id"] for a in row["alerts"]) == sorted(m.alert.alert_id for m in matches)
    assert row["truncated_alerts"] == 0
    assert len(await fetch(services.database_url, NOTIFICATIONS, client)) == 1
    assert {m["notification_id"] for m in await ready_for(bootstrap, client)} == {row["notification_id"]}


async def both_hold_partitions_of_alerts_matched(workers) -> list[set[int]]:
    """Each worker's partitions of alerts.matched, once the group has given both some (their
    /readyz `assignment`), all nine between them."""
    every = set(range(settings.topic_partitions))
    async with asyncio.timeout(120):
        while True:
            bodies = [(await asyncio.to_thread(get_json, worker.url + "/readyz"))[1] for worker in workers]
            held = [set(body.get("assignment", {}).get("alerts.matched", [])) if isinstance(body, dict) else set()
                    for body in bodies]
            if all(held) and not held[0] & held[1] and held[0] | held[1] == every:
                return held
            await asyncio.sleep(0.5)


async def test_two_workers_share_the_clients_and_emit_each_group_once_and_complete(services, clean_db, start_worker):
    group = f"grouping-pair-{secrets.token_hex(4)}"
    bootstrap = services.kafka_bootstrap_servers
    workers = [start_worker(APP_ID=group, ROLES="aggregate"),
               start_worker(APP_ID=group, ROLES="aggregate")]  # each also holds a standby copy of the other's groups
    partitions = await both_hold_partitions_of_alerts_matched(workers)
    clients = [await new_client(services.database_url) for _ in range(12)]
    # Both workers have clients to group (12 random clients on 9 partitions: almost always).
    every = tuple(range(settings.topic_partitions))
    while not all(any(partition_for(client.encode(), every) in held for client in clients) for held in partitions):
        clients.append(await new_client(services.database_url))
    rule = str(uuid.uuid4())
    # The new group starts at the beginning of alerts.matched, behind every earlier test's matches
    # (dead letters here, their clients are unknown). Through that backlog a client's three matches
    # could fall into batches seconds apart, past the 3 s window, and open a second group, as
    # processing-time windows do (docs/grouping.md, Limits): seen once in a full suite run.
    await wait_until_consumed(bootstrap, group, ["alerts.matched"], timeout=120)

    for client in clients:
        await produce_matches(bootstrap, grouped_matches(client, rule, 3, window_s=3))
    rows = await wait_for_rows(services.database_url,
                               "SELECT client_id::text FROM notifications"
                               " WHERE emitted AND client_id = ANY($1::uuid[])",
                               clients, count=len(clients))
    await wait_until_consumed(bootstrap, group, ["alerts.matched"], timeout=120)

    assert sorted(row["client_id"] for row in rows) == sorted(clients)
    emitted = [m for m in await read_json(bootstrap, "notifications.ready") if m.get("client_id") in set(clients)]
    assert sorted(m["client_id"] for m in emitted) == sorted(clients)
    assert all(len(m["alerts"]) == 3 for m in emitted)


async def test_a_new_worker_recovers_every_group_of_a_partition_written_in_one_batch(services, clean_db, start_worker):
    """One aggregate batch writes the groups of a partition's clients together: one batch of
    changelog records. A worker taking the partition over must recover every one of them, or the
    groups it misses are never closed and their alerts never notified."""
    from tables.groups import open_groups

    group = f"grouping-batch-{secrets.token_hex(4)}"
    bootstrap = services.kafka_bootstrap_servers
    start_worker(APP_ID=group, ROLES="aggregate").stop()  # the changelog exists; nobody holds the table now
    every = tuple(range(settings.topic_partitions))
    clients = [await new_client(services.database_url) for _ in range(3)]
    partition = partition_for(clients[0].encode(), every)
    while len(clients) < 4 or any(partition_for(c.encode(), every) != partition for c in clients):
        clients = [c for c in clients if partition_for(c.encode(), every) == partition]
        clients.append(await new_client(services.database_url))
    rule, opened_at = str(uuid.uuid4()), time.time() - 60  # their windows have passed
    values = {client: {rule: {"notification_id": str(uuid.uuid4()), "opened_at": opened_at, "window_s": 1,
                              "alerts": [grouped_matches(client, rule, 1, 1)[0].alert.model_dump(mode="json")],
                              "rule_ids": [rule]}}
              for client in clients}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200)
    await producer.start()
    try:
        sent = [await producer.send(f"{group}-notification-groups-changelog", key=client.encode(), partition=partition,
                                    value=app.serializers.dumps_value(None, value, serializer=open_groups.value_serializer))
                for client, value in values.items()]
        offsets = [(await write).offset for write in sent]
    finally:
        await producer.stop()
    assert offsets == list(range(offsets[0], offsets[0] + len(clients)))  # one batch

    start_worker(APP_ID=group, ROLES="aggregate")  # its own DATA_DIR: the table comes from the changelog
    rows = await wait_for_rows(services.database_url,
                               "SELECT client_id::text FROM notifications WHERE emitted AND client_id = ANY($1::uuid[])",
                               clients, count=len(clients), timeout=60)

    assert sorted(row["client_id"] for row in rows) == sorted(clients)
