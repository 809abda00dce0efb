"""Issue 5's acceptance through the whole path: API rules with a group window or a repeat interval,
alerts on `alerts.new`, a real worker, and a real local webhook receiver.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from delivery_platform import Tenant, produce_alerts, wait_for_rules, wait_until_backlog_consumed, wait_until_notified
from delivery_receivers import Receiver
from kafka_probe import retire_rules_left_on_topic, wait_until_consumed
from test_silences_support import retire_silences_left_on_topic

pytestmark = pytest.mark.e2e

STAGES = ["alerts.new", "alerts.matched", "notifications.ready"]


async def tenant_with_rules(http: aiohttp.ClientSession, services, worker, receiver: Receiver,
                            *rules: dict[str, Any]) -> tuple[Tenant, list[str]]:
    """A client with these rules, each with a webhook endpoint of its own (path hook-<n>)."""
    tenant = Tenant(http, worker.url)
    status, client = await tenant.call("POST", "/api/v1/clients", services.admin_token, {"name": "Acme"})
    assert status == 201, client
    tenant.client_id, tenant.key = client["client_id"], client["api_key"]
    rule_ids = []
    for n, rule in enumerate(rules):
        status, created = await tenant.call("POST", "/api/v1/rules", tenant.key, rule)
        assert status == 201, created
        rule_ids.append(created["rule_id"])
        status, endpoint = await tenant.call("POST", "/api/v1/endpoints", tenant.key,
                                             {"rule_id": created["rule_id"], "type": "webhook",
                                              "value": receiver.url(f"hook-{n}")})
        assert status == 201, endpoint
    await wait_for_rules(http, services, worker)
    return tenant, rule_ids


async def start(services, start_worker, **env: str):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"e2e-grouping-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group, **env)
    await wait_until_backlog_consumed(services, group)
    return worker, group


PAYMENTS = {"severity": "HIGH", "source": "payments", "name": "*"}


@pytest.mark.parametrize(("max_alerts", "listed", "truncated"), [("100", 50, 0), ("20", 20, 30)])
async def test_fifty_alerts_within_the_window_are_delivered_as_one_notification(
        services, clean_db, start_worker, max_alerts, listed, truncated):
    worker, group = await start(services, start_worker, GROUP_MAX_ALERTS=max_alerts)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        tenant, [rule_id] = await tenant_with_rules(http, services, worker, receiver,
                                                    {**PAYMENTS, "group_window_s": 5})
        alert_ids = [f"burst-{secrets.token_hex(4)}-{n}" for n in range(50)]

        await produce_alerts(services.kafka_bootstrap_servers, alert_ids)
        [notification_id] = await wait_until_notified(services.database_url, tenant.client_id, 1)
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)

        [post] = receiver.posts_to("hook-0")
        assert post.body["notification_id"] == notification_id
        # Alerts reach the stage in no set order (alerts.new is keyed by alert_id): any `listed` of them.
        shown_ids = [a["alert_id"] for a in post.body["alerts"]]
        assert len(shown_ids) == len(set(shown_ids)) == listed and set(shown_ids) <= set(alert_ids)
        assert (post.body["truncated_alerts"], post.body["group_rule_id"]) == (truncated, rule_id)
        status, shown = await tenant.call("GET", f"/api/v1/notifications/{notification_id}", tenant.key)
        assert status == 200 and shown["status"] == "SENT"
        assert len(shown["alerts"]) == listed


async def test_an_alert_of_a_zero_second_and_a_sixty_second_rule_is_delivered_at_once_and_once(
        services, clean_db, start_worker):
    worker, group = await start(services, start_worker)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        tenant, rule_ids = await tenant_with_rules(
            http, services, worker, receiver, {**PAYMENTS, "group_window_s": 0},
            {"severity": "*", "source": "payments", "name": "CheckoutLatency", "group_window_s": 60})

        await produce_alerts(services.kafka_bootstrap_servers, ["urgent-and-digest"])
        [notification_id] = await wait_until_notified(services.database_url, tenant.client_id, 1)
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)

        # Notified at once, not collected by the 60-second rule's window.
        conn = await asyncpg.connect(services.database_url)
        try:
            assert await conn.fetchval("SELECT group_rule_id FROM notifications WHERE notification_id = $1",
                                       notification_id) is None
            assert await conn.fetchval("SELECT count(*) FROM notification_alerts WHERE client_id = $1",
                                       tenant.client_id) == 0
        finally:
            await conn.close()

        status, shown = await tenant.call("GET", f"/api/v1/notifications/{notification_id}", tenant.key)
        assert status == 200 and shown["status"] == "SENT"
        assert sorted(shown["rule_ids"]) == sorted(rule_ids)  # lists every matching rule
        # Delivered once, to the endpoints of both rules.
        assert [len(receiver.posts_to(f"hook-{n}")) for n in range(2)] == [1, 1]
        assert {post.body["notification_id"] for post in receiver.posts} == {notification_id}


async def test_the_same_fingerprint_ten_times_in_a_minute_is_delivered_once_and_suppressed_nine_times(
        services, clean_db, start_worker):
    worker, group = await start(services, start_worker)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        tenant, _ = await tenant_with_rules(http, services, worker, receiver, {**PAYMENTS, "repeat_interval_s": 60})

        # The same severity, source and name each time: one fingerprint (the rule has no fingerprint keys).
        alert_ids = [f"repeat-{secrets.token_hex(4)}-{n}" for n in range(10)]
        await produce_alerts(services.kafka_bootstrap_servers, alert_ids)
        await wait_until_notified(services.database_url, tenant.client_id, 10)
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)

        assert len(receiver.posts_to("hook-0")) == 1
        status, suppressed = await tenant.call("GET", "/api/v1/notifications?status=SUPPRESSED", tenant.key)
        assert status == 200 and len(suppressed["items"]) == 9
        status, sent = await tenant.call("GET", "/api/v1/notifications?status=SENT", tenant.key)
        assert status == 200 and len(sent["items"]) == 1


async def test_a_silence_created_while_a_group_is_open_leaves_its_matching_members_out_of_the_delivery(
        services, clean_db, start_worker):
    await retire_silences_left_on_topic(services.kafka_bootstrap_servers)
    worker, group = await start(services, start_worker)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        # Long enough for the silence to be created while the group is open, even on a loaded machine.
        tenant, [rule_id] = await tenant_with_rules(http, services, worker, receiver,
                                                    {**PAYMENTS, "group_window_s": 30})
        alert_ids = [f"maintenance-{secrets.token_hex(4)}-{n}" for n in range(4)]  # context n = 0..3

        await produce_alerts(services.kafka_bootstrap_servers, alert_ids)
        conn = await asyncpg.connect(services.database_url)
        try:
            deadline = time.monotonic() + 120  # a bound against hanging, not a measurement
            while await conn.fetchval("SELECT count(*) FROM notification_alerts WHERE client_id = $1",
                                      tenant.client_id) < len(alert_ids):
                assert time.monotonic() < deadline, "the alerts never joined their group"
                await asyncio.sleep(0.2)
            # Every alert is a member of the open group, matched before the silence existed.
            assert await conn.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1",
                                       tenant.client_id) == 0
        finally:
            await conn.close()
        status, silence = await tenant.call("POST", "/api/v1/silences", tenant.key, {
            "source": "payments", "context_matchers": {"n": "1"}, "ends_at": time.time() + 3600,
            "comment": "payments maintenance", "created_by": "oncall"})
        assert status == 201, silence
        [notification_id] = await wait_until_notified(services.database_url, tenant.client_id, 1)
        await wait_until_consumed(services.kafka_bootstrap_servers, group, STAGES)

        [post] = receiver.posts_to("hook-0")
        assert post.body["notification_id"] == notification_id
        assert sorted(a["alert_id"] for a in post.body["alerts"]) == sorted(alert_ids[:1] + alert_ids[2:])
        assert (post.body["truncated_alerts"], post.body["group_rule_id"]) == (0, rule_id)
