"""A tenant's view of real worker processes, for the end-to-end delivery tests.

This module holds no tests.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import asyncpg

from kafka_probe import produce, wait_until_consumed
from worker_probe import wait_until_workers_hold_postgres_rules


class Tenant:
    """One client with one rule (HIGH/payments/*) and one webhook endpoint, made through the API."""

    def __init__(self, http: aiohttp.ClientSession, api_url: str) -> None:
        self.http, self.api_url = http, api_url
        self.client_id = self.key = self.rule_id = self.endpoint_id = ""

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.api_url + path, json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)

    async def create(self, admin_token: str, webhook_url: str, **endpoint: Any) -> "Tenant":
        status, client = await self.call("POST", "/api/v1/clients", admin_token, {"name": "Acme"})
        assert status == 201, client
        self.client_id, self.key = client["client_id"], client["api_key"]
        status, rule = await self.call("POST", "/api/v1/rules", self.key,
                                       {"severity": "HIGH", "source": "payments", "name": "*"})
        assert status == 201, rule
        self.rule_id = rule["rule_id"]
        status, created = await self.call("POST", "/api/v1/endpoints", self.key,
                                          {"rule_id": self.rule_id, "type": "webhook", "value": webhook_url,
                                           **endpoint})
        assert status == 201, created
        self.endpoint_id = created["endpoint_id"]
        return self


STAGES = ["alerts.new", "alerts.matched", "notifications.ready"]


async def wait_until_backlog_consumed(services, group: str) -> None:
    """A new consumer group starts at the beginning of every topic: let it get through the earlier
    tests' alerts before a tenant exists whose rule they could match."""
    await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)
    await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)


async def wait_for_rules(http: aiohttp.ClientSession, services, *workers) -> None:
    await wait_until_workers_hold_postgres_rules(http, services.admin_token, [w.url for w in workers],
                                                 services.database_url)


async def produce_alerts(bootstrap: str, alert_ids: list[str]) -> None:
    alerts = [{"alert_id": alert_id, "schema_version": 1, "event_ts": time.time(), "severity": "HIGH",
               "source": "payments", "name": "CheckoutLatency", "context": {"n": str(n)}}
              for n, alert_id in enumerate(alert_ids)]
    await produce(bootstrap, "alerts.new", [(a["alert_id"].encode(), json.dumps(a).encode()) for a in alerts])


async def count_notifications(database_url: str, client_id: str) -> int:
    """How many notifications the client has, whatever their status."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", client_id)
    finally:
        await conn.close()


async def wait_until_notified(database_url: str, client_id: str, count: int, timeout: float = 120.0) -> list[str]:
    """Wait until the client has `count` notifications, all settled (not PENDING); return their ids."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch("SELECT notification_id::text, status FROM notifications WHERE client_id = $1",
                                    client_id)
            if len(rows) == count and all(row["status"] != "PENDING" for row in rows):
                return [row["notification_id"] for row in rows]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(rows)} of {count} notifications, "
                                   f"{sum(r['status'] == 'PENDING' for r in rows)} still PENDING")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
