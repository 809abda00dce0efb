"""Issue 5's crash acceptance through the whole path: a worker with every role is SIGKILLed while a
group window is open, a new worker of the same consumer group takes over, and the group is
DELIVERED once and complete.

tests/test_grouping_worker.py proves the aggregate stage alone emits the group complete after such
a crash; this test adds what a tenant sees: alerts on `alerts.new`, a rule and a webhook endpoint
made through the API, and the POSTs a real local receiver records.

Why it can fail: a group lost with the dead worker gives no notification (the wait times out); one
that restarts half-filled, or is emitted twice (once from the restored table, once from Postgres),
gives a body missing alerts or a second Idempotency-Key; a delivery repeated after the restart gives
a key counted twice. (Checked once by hand: a restarted worker whose group table was renamed, so
nothing came back from the changelog, delivered only the uncommitted half of the alerts.)
"""
from __future__ import annotations

import asyncio
import secrets
import time

import aiohttp
import asyncpg
import pytest

from delivery_platform import (
    STAGES, Tenant, count_notifications, produce_alerts, wait_for_rules, wait_until_backlog_consumed,
    wait_until_notified,
)
from delivery_receivers import Receiver
from kafka_probe import retire_rules_left_on_topic, wait_until_consumed

pytestmark = pytest.mark.e2e

BURST = 30
# Long enough that the window is still open at the kill, whatever the machine's load.
WINDOW_S = 40
GROUPED_RULE = {"severity": "HIGH", "source": "payments", "name": "*", "group_window_s": WINDOW_S}


async def grouping_tenant(http: aiohttp.ClientSession, services, worker, receiver: Receiver) -> Tenant:
    """A client with one grouping rule and a webhook endpoint on it, made through the API."""
    tenant = Tenant(http, worker.url)
    status, client = await tenant.call("POST", "/api/v1/clients", services.admin_token, {"name": "Acme"})
    assert status == 201, client
    tenant.client_id, tenant.key = client["client_id"], client["api_key"]
    status, rule = await tenant.call("POST", "/api/v1/rules", tenant.key, GROUPED_RULE)
    assert status == 201, rule
    tenant.rule_id = rule["rule_id"]
    status, endpoint = await tenant.call("POST", "/api/v1/endpoints", tenant.key,
                                         {"rule_id": tenant.rule_id, "type": "webhook", "value": receiver.url()})
    assert status == 201, endpoint
    tenant.endpoint_id = endpoint["endpoint_id"]
    await wait_for_rules(http, services, worker)
    return tenant


async def wait_until_members(database_url: str, client_id: str, count: int, timeout: float = 120.0) -> None:
    """Wait until `count` alerts of the client have joined a group (a bound, not a measurement)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while (members := await conn.fetchval("SELECT count(*) FROM notification_alerts WHERE client_id = $1",
                                              client_id)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{members} of {count} alerts joined the group")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def test_a_worker_killed_in_an_open_window_and_restarted_delivers_the_group_once_complete(
        services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"e2e-grouping-crash-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group)
    await wait_until_backlog_consumed(services, group)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        tenant = await grouping_tenant(http, services, worker, receiver)
        alert_ids = [f"crash-group-{secrets.token_hex(4)}-{n}" for n in range(BURST)]

        # The first half is committed on every stage, so the restarted worker does not read it
        # again: only the group table (restored from its changelog) still lists it ...
        await produce_alerts(services.kafka_bootstrap_servers, alert_ids[:BURST // 2])
        await wait_until_members(services.database_url, tenant.client_id, BURST // 2)
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES, timeout=120)
        # ... the second half is recorded in Postgres, perhaps neither committed nor in the changelog.
        await produce_alerts(services.kafka_bootstrap_servers, alert_ids[BURST // 2:])
        await wait_until_members(services.database_url, tenant.client_id, BURST)
        # The window is still open: nothing notified, nothing delivered yet.
        assert await count_notifications(services.database_url, tenant.client_id) == 0
        assert receiver.posts == []
        worker.child.process.kill()
        worker.child.process.wait()

        # Same consumer group, a DATA_DIR of its own: the group comes back from the changelog
        # and Postgres, not from the dead worker's local RocksDB.
        restarted = start_worker(APP_ID=group)
        tenant.api_url = restarted.url
        [notification_id] = await wait_until_notified(services.database_url, tenant.client_id, 1, timeout=240)
        # Every message is processed and committed: none lost or stuck behind the restarted
        # worker's rebalance (alerting_app/broker_transport.py, `_held_during_rebalance`).
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES, timeout=120)

        key = f"{notification_id}:{tenant.endpoint_id}"
        assert receiver.idempotency_keys() == {key: 1}  # delivered, and only once
        [post] = receiver.posts_to("hook")
        assert sorted(a["alert_id"] for a in post.body["alerts"]) == sorted(alert_ids)  # complete
        assert (post.body["truncated_alerts"], post.body["group_rule_id"]) == (0, tenant.rule_id)

        status, listed = await tenant.call("GET", f"/api/v1/notifications?client_id={tenant.client_id}",
                                           services.admin_token)
        assert status == 200, listed
        assert [(n["notification_id"], n["status"]) for n in listed["items"]] == [(notification_id, "SENT")]
