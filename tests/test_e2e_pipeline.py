"""The whole pipeline through a real worker process, the real broker, Postgres and a local webhook.

A tenant creates a rule through the API, an alert arrives on Kafka (produced with a plain Kafka
client, as any monitored system would), and the tenant's webhook receives exactly one POST.
"""
from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from alerting_app.embedded import free_port
from kafka_probe import produce, read_json, retire_rules_left_on_topic, wait_until_consumed
from worker_probe import wait_until_workers_hold_postgres_rules

pytestmark = pytest.mark.e2e

STAGES = ["alerts.new", "alerts.matched", "notifications.ready"]


class WebhookReceiver:
    """A tenant's webhook: records every POST it receives."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "WebhookReceiver":
        application = web.Application()
        application.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(application)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        self.posts.append({"body": await request.json(), "headers": dict(request.headers)})
        return web.json_response({"ok": True})

    def alert_ids(self) -> Counter:
        return Counter(alert["alert_id"] for post in self.posts for alert in post["body"]["alerts"])


class Platform:
    """The worker's API and the broker, as a tenant and a monitored system see them."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, bootstrap: str, group: str,
                 admin_token: str, database_url: str) -> None:
        self.http = http
        self.admin_token = admin_token
        self.database_url = database_url
        self.base_url = base_url
        self.bootstrap = bootstrap
        self.group = group

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method, self.base_url + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)

    async def produce_alerts(self, *values: bytes | dict, keys: list[str] | None = None) -> None:
        messages = []
        for n, value in enumerate(values):
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            key = keys[n] if keys else (value["alert_id"] if isinstance(value, dict) else f"raw-{n}")
            messages.append((key.encode(), raw))
        await produce(self.bootstrap, "alerts.new", messages)

    async def settle(self) -> None:
        """Wait until the worker holds Postgres's rules and has fully processed every stage's messages."""
        await wait_until_workers_hold_postgres_rules(self.http, self.admin_token, [self.base_url], self.database_url)
        # Each stage feeds the next: committed past everything twice in a row means nothing is in flight.
        await wait_until_consumed(self.bootstrap, self.group, STAGES)
        await wait_until_consumed(self.bootstrap, self.group, STAGES)


def alert(alert_id: str, severity: str = "HIGH", source: str = "payments", name: str = "CheckoutLatency") -> dict:
    return {"alert_id": alert_id, "schema_version": 1, "event_ts": time.time(), "severity": severity,
            "source": source, "name": name, "context": {"region": "eu-west-1"}}


@pytest.fixture
async def platform(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"e2e-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group)
    # The new group starts at the beginning of every topic: let it get through the earlier tests'
    # alerts before a tenant exists whose rule they could match.
    await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)
    async with aiohttp.ClientSession() as http:
        yield Platform(http, worker.url, services.kafka_bootstrap_servers, group, services.admin_token,
                       services.database_url)


async def create_tenant_with_webhook(platform: Platform, admin: str, webhook_url: str) -> tuple[str, str, dict]:
    status, client = await platform.call("POST", "/api/v1/clients", admin, {"name": "Acme"})
    assert status == 201, client
    key = client["api_key"]
    status, rule = await platform.call(
        "POST", "/api/v1/rules", key, {"severity": "HIGH", "source": "payments", "name": "*"}
    )
    assert status == 201, rule
    status, endpoint = await platform.call(
        "POST", "/api/v1/endpoints", key, {"rule_id": rule["rule_id"], "type": "webhook", "value": webhook_url}
    )
    assert status == 201, endpoint
    return client["client_id"], key, rule


async def test_matching_alert_reaches_the_webhook_exactly_once(platform, services):
    async with WebhookReceiver() as receiver:
        client_id, key, rule = await create_tenant_with_webhook(platform, services.admin_token, receiver.url)
        await platform.settle()  # the rule has reached the worker's rules table

        await platform.produce_alerts(alert("checkout-1"))
        await platform.settle()
        assert receiver.alert_ids() == Counter({"checkout-1": 1})
        post = receiver.posts[0]
        assert post["body"]["client_id"] == client_id
        assert post["body"]["rule_ids"] == [rule["rule_id"]]
        assert post["body"]["alerts"][0]["name"] == "CheckoutLatency"
        assert post["headers"]["Idempotency-Key"].startswith(post["body"]["notification_id"])

        # The same alert_id again, and an alert of a severity the rule does not ask for.
        await platform.produce_alerts(alert("checkout-1"), alert("low-1", severity="LOW"))
        await platform.settle()
        assert receiver.alert_ids() == Counter({"checkout-1": 1})

        status, notifications = await platform.call("GET", "/api/v1/notifications", key)
        assert status == 200
        assert [(n["alert_id"], n["status"]) for n in notifications["items"]] == [("checkout-1", "SENT")]


async def test_disabled_rule_matches_nothing(platform, services):
    async with WebhookReceiver() as receiver:
        _, key, rule = await create_tenant_with_webhook(platform, services.admin_token, receiver.url)
        status, updated = await platform.call(
            "PATCH", f"/api/v1/rules/{rule['rule_id']}", key, {"enabled": False, "version": rule["version"]}
        )
        assert status == 200, updated
        assert updated["enabled"] is False
        await platform.settle()

        await platform.produce_alerts(alert("after-disable"))
        await platform.settle()
        assert receiver.posts == []

        status, _ = await platform.call(
            "PATCH", f"/api/v1/rules/{rule['rule_id']}", key, {"enabled": True, "version": updated["version"]}
        )
        assert status == 200
        await platform.settle()
        await platform.produce_alerts(alert("after-enable"))
        await platform.settle()
        assert receiver.alert_ids() == Counter({"after-enable": 1})


async def test_garbage_on_alerts_new_is_dead_lettered_and_the_next_alert_is_delivered(platform, services):
    async with WebhookReceiver() as receiver:
        await create_tenant_with_webhook(platform, services.admin_token, receiver.url)
        await platform.settle()
        missing_name = alert("no-name")
        del missing_name["name"]

        await platform.produce_alerts(
            b"this is not json",
            alert("bad-severity", severity="URGENT"),
            missing_name,
            alert("valid-after-garbage"),
            keys=["garbage", "bad-severity", "no-name", "valid-after-garbage"],
        )
        await platform.settle()

        assert receiver.alert_ids() == Counter({"valid-after-garbage": 1})
        letters = {letter["key"]: letter for letter in await read_json(platform.bootstrap, "alerts.new.dlq")}
        assert "json" in letters["garbage"]["reason"].lower()
        assert letters["garbage"]["payload"] == "this is not json"
        assert letters["bad-severity"]["reason"].startswith("severity")
        assert letters["no-name"]["reason"].startswith("name")


async def test_second_client_cannot_read_or_change_the_first_clients_rules(platform, services):
    admin = services.admin_token
    _, _, rule = await create_tenant_with_webhook(platform, admin, "http://127.0.0.1:9/hook")
    status, other = await platform.call("POST", "/api/v1/clients", admin, {"name": "Other"})
    assert status == 201
    other_key = other["api_key"]

    status, _ = await platform.call("GET", f"/api/v1/rules/{rule['rule_id']}", other_key)
    assert status == 404
    status, _ = await platform.call(
        "PATCH", f"/api/v1/rules/{rule['rule_id']}", other_key, {"enabled": False, "version": rule["version"]}
    )
    assert status == 404
    status, listing = await platform.call("GET", "/api/v1/rules", other_key)
    assert status == 200 and listing["items"] == []
