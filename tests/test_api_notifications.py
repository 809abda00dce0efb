"""/api/v1/notifications: what each client was notified of, newest first, with its deliveries.

Notifications are written by the aggregate and deliver stages; here they are inserted as those
stages store them.
"""
from __future__ import annotations

import uuid

import pytest

from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def store_notification(client_id: str, rule_id: str, alert_id: str, status: str = "PENDING",
                             deliveries: tuple[tuple[str, str, str, int, str | None], ...] = ()) -> str:
    from alerting_app import db

    notification_id = str(uuid.uuid4())
    alert = {"alert_id": alert_id, "schema_version": 1, "event_ts": 1.0, "severity": "HIGH",
             "source": "payments", "name": "CheckoutLatency", "context": {}}
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            notification_id, client_id, alert_id, [alert], [rule_id], status,
        )
        for endpoint_id, channel, delivery_status, attempts, last_error in deliveries:
            await conn.execute(
                "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts, last_error)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                notification_id, endpoint_id, channel, delivery_status, attempts, last_error,
            )
    return notification_id


async def test_a_notification_is_listed_with_each_endpoints_delivery(api, tenant):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    notification_id = await store_notification(
        tenant.client_id, rule["rule_id"], "alert-1", "FAILED",
        ((hook["endpoint_id"], "webhook", "FAILED", 3, "HTTP 502"), (mail["endpoint_id"], "email", "UNSUPPORTED", 0, None)),
    )
    reply = await api.call("GET", "/api/v1/notifications", tenant.key)
    assert reply.status == 200
    [listed] = reply.body["items"]
    assert (listed["notification_id"], listed["alert_id"], listed["status"]) == (notification_id, "alert-1", "FAILED")
    assert listed["rule_ids"] == [rule["rule_id"]]
    assert listed["alerts"][0]["alert_id"] == "alert-1"
    shown = ("endpoint_id", "channel", "status", "attempts", "last_error")
    deliveries = {d["endpoint_id"]: {name: d[name] for name in shown} for d in listed["deliveries"]}
    assert deliveries == {
        hook["endpoint_id"]: {"endpoint_id": hook["endpoint_id"], "channel": "webhook", "status": "FAILED",
                              "attempts": 3, "last_error": "HTTP 502"},
        mail["endpoint_id"]: {"endpoint_id": mail["endpoint_id"], "channel": "email", "status": "UNSUPPORTED",
                              "attempts": 0, "last_error": None},
    }
    single = await api.call("GET", f"/api/v1/notifications/{notification_id}", tenant.key)
    assert single.body == listed


async def test_notifications_are_filtered_by_status(api, tenant):
    rule = await api.new_rule(tenant)
    sent = await store_notification(tenant.client_id, rule["rule_id"], "a-sent", "SENT")
    await store_notification(tenant.client_id, rule["rule_id"], "a-failed", "FAILED")
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"status": "SENT"})
    assert [n["notification_id"] for n in reply.body["items"]] == [sent]


async def test_the_admin_filters_notifications_by_client(api, tenant, other_tenant):
    mine = await store_notification(tenant.client_id, (await api.new_rule(tenant))["rule_id"], "a-1")
    await store_notification(other_tenant.client_id, (await api.new_rule(other_tenant))["rule_id"], "a-1")
    reply = await api.call("GET", "/api/v1/notifications", api.admin_token, params={"client_id": tenant.client_id})
    assert [n["notification_id"] for n in reply.body["items"]] == [mine]


async def test_notifications_are_paged_newest_first(api, tenant):
    rule = await api.new_rule(tenant)
    stored = [await store_notification(tenant.client_id, rule["rule_id"], f"alert-{i}") for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/notifications", tenant.key, params=params)
        seen += [n["notification_id"] for n in reply.body["items"]]
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(stored))


async def test_another_clients_key_sees_none_of_a_clients_notifications(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    notification_id = await store_notification(tenant.client_id, rule["rule_id"], "alert-x")
    assert (await api.call("GET", f"/api/v1/notifications/{notification_id}", other_tenant.key)).status == 404
    assert (await api.call("GET", "/api/v1/notifications", other_tenant.key)).body["items"] == []
    filtered = await api.call("GET", "/api/v1/notifications", other_tenant.key,
                              params={"client_id": tenant.client_id})
    assert filtered.body["items"] == []


@pytest.mark.parametrize("params, field", [({"status": "DONE"}, "status"), ({"limit": "-1"}, "limit")])
async def test_bad_notification_filters_are_refused(api, tenant, params, field):
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params=params)
    assert reply.failing_fields() == {field}
