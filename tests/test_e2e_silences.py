"""Silences through the whole pipeline: a real worker process, the real broker, Postgres and webhooks.

Two tenants have the same rule (HIGH/payments/*), each with its own webhook. Tenant A silences
source=payments: A's matching alerts are recorded SILENCED and never reach A's webhook, while B
receives the very same alerts. Once the silence has ended (by its time, or expired through the
API), A's new alerts are delivered again.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from datetime import datetime, timedelta, timezone

import aiohttp
import asyncpg
import pytest

from delivery_platform import Tenant, produce_alerts, wait_for_rules, wait_until_backlog_consumed, wait_until_notified
from delivery_receivers import Receiver
from kafka_probe import retire_rules_left_on_topic
from test_silences_support import retire_silences_left_on_topic, wait_until_workers_hold_postgres_silences

pytestmark = pytest.mark.e2e

# Long enough for the silence to reach the worker and the first alerts to be matched inside it,
# even on a loaded machine; the test then waits (by polling) for it to end.
WINDOW_S = 20


class Stage:
    def __init__(self, services, worker, http: aiohttp.ClientSession, receiver: Receiver) -> None:
        self.services, self.worker, self.http, self.receiver = services, worker, http, receiver
        self.a = self.b = None

    async def tenants(self) -> tuple[Tenant, Tenant]:
        admin = self.services.admin_token
        self.a = await Tenant(self.http, self.worker.url).create(admin, self.receiver.url("a"))
        self.b = await Tenant(self.http, self.worker.url).create(admin, self.receiver.url("b"))
        return self.a, self.b

    async def silence(self, tenant: Tenant, ends_in_s: float) -> dict:
        ends_at = (datetime.now(timezone.utc) + timedelta(seconds=ends_in_s)).isoformat()
        status, silence = await tenant.call("POST", "/api/v1/silences", tenant.key, {
            "source": "payments", "ends_at": ends_at, "comment": "payments maintenance", "created_by": "oncall"})
        assert status == 201, silence
        return silence

    async def settle_changes(self) -> None:
        """The worker holds Postgres's rules and silences."""
        await wait_for_rules(self.http, self.services, self.worker)
        await wait_until_workers_hold_postgres_silences(self.http, self.services.admin_token, [self.worker.url],
                                                        self.services.database_url)

    async def alerts(self, *alert_ids: str) -> None:
        await produce_alerts(self.services.kafka_bootstrap_servers, list(alert_ids))

    async def statuses(self, tenant: Tenant) -> dict[str, str]:
        conn = await asyncpg.connect(self.services.database_url)
        try:
            rows = await conn.fetch("SELECT alert_id, status FROM notifications WHERE client_id = $1",
                                    tenant.client_id)
            deliveries = await conn.fetchval(
                "SELECT count(*) FROM deliveries JOIN notifications USING (notification_id)"
                " WHERE notifications.client_id = $1 AND notifications.status = 'SILENCED'", tenant.client_id)
        finally:
            await conn.close()
        assert deliveries == 0, "a silenced notification must have no delivery"
        return {row["alert_id"]: row["status"] for row in rows}

    def delivered(self, path: str) -> set[str]:
        return {alert["alert_id"] for post in self.receiver.posts_to(path) for alert in post.body["alerts"]}


@pytest.fixture
async def stage(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    await retire_silences_left_on_topic(services.kafka_bootstrap_servers)
    group = f"silences-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group)
    await wait_until_backlog_consumed(services, group)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        yield Stage(services, worker, http, receiver)


async def wait_until_state(tenant: Tenant, silence_id: str, state: str, timeout: float = 2 * WINDOW_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, silence = await tenant.call("GET", f"/api/v1/silences/{silence_id}", tenant.key)
        assert status == 200, silence
        if silence["state"] == state:
            return
        assert time.monotonic() < deadline, f"silence still {silence['state']}"
        await asyncio.sleep(0.2)


async def test_an_active_silence_mutes_one_tenant_only_until_it_ends(stage: Stage):
    a, b = await stage.tenants()
    silence = await stage.silence(a, ends_in_s=WINDOW_S)
    await stage.settle_changes()

    await stage.alerts("muted-1", "muted-2")
    await wait_until_notified(stage.services.database_url, b.client_id, 2)
    await wait_until_notified(stage.services.database_url, a.client_id, 2)
    await stage.receiver.wait_for_posts(2, path="b")

    assert await stage.statuses(a) == {"muted-1": "SILENCED", "muted-2": "SILENCED"}
    assert await stage.statuses(b) == {"muted-1": "SENT", "muted-2": "SENT"}
    assert stage.delivered("b") == {"muted-1", "muted-2"}
    assert stage.receiver.posts_to("a") == []

    await wait_until_state(a, silence["silence_id"], "expired")
    await stage.alerts("after-end")
    await wait_until_notified(stage.services.database_url, a.client_id, 3)
    await stage.receiver.wait_for_posts(1, path="a")

    assert (await stage.statuses(a))["after-end"] == "SENT"
    assert stage.delivered("a") == {"after-end"}


async def test_a_silence_expired_through_the_api_lets_alerts_flow_again(stage: Stage):
    a, _ = await stage.tenants()
    silence = await stage.silence(a, ends_in_s=3600)
    await stage.settle_changes()
    await stage.alerts("before-expiry")
    await wait_until_notified(stage.services.database_url, a.client_id, 1)
    assert await stage.statuses(a) == {"before-expiry": "SILENCED"}

    status, _ = await a.call("DELETE", f"/api/v1/silences/{silence['silence_id']}", a.key)
    assert status == 204
    await stage.settle_changes()  # the worker holds the expired version
    await stage.alerts("after-expiry")
    await wait_until_notified(stage.services.database_url, a.client_id, 2)
    await stage.receiver.wait_for_posts(1, path="a")

    assert (await stage.statuses(a))["after-expiry"] == "SENT"
    assert stage.delivered("a") == {"after-expiry"}
