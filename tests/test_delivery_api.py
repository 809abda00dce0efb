"""The API of delivery: an endpoint's signing secret (once) and rate limit, the refusal of
non-public addresses, and a notification's per-endpoint delivery state."""
from __future__ import annotations

import time
from datetime import datetime
import uuid

import pytest

from test_api_support import API_LOOP, api, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


@pytest.fixture
def private_endpoints_refused(monkeypatch):
    """The production setting; the test session itself allows private endpoints (local receivers)."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "allow_private_endpoints", False)


async def test_creating_an_endpoint_returns_its_signing_secret_once(api, tenant):
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"])
    other = await api.new_endpoint(tenant, rule["rule_id"], value="https://hooks.example.com/other")

    assert len(created["secret"]) >= 32 and created["secret"] != other["secret"]
    read = await api.call("GET", f"/api/v1/endpoints/{created['endpoint_id']}", tenant.key)
    listed = await api.call("GET", "/api/v1/endpoints", tenant.key, params={"rule_id": rule["rule_id"]})
    assert "secret" not in read.body
    assert all("secret" not in item for item in listed.body["items"])


async def test_an_endpoint_has_its_own_rate_limit_until_reset_to_the_default(api, tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/a",
                            "rate_limit_per_s": 2.5})
    assert (reply.status, reply.body["rate_limit_per_s"]) == (201, 2.5)
    path = f"/api/v1/endpoints/{reply.body['endpoint_id']}"

    unchanged = await api.call("PATCH", path, tenant.key, {"enabled": False})
    reset = await api.call("PATCH", path, tenant.key, {"rate_limit_per_s": None})

    assert unchanged.body["rate_limit_per_s"] == 2.5
    assert (reset.body["rate_limit_per_s"], reset.body["enabled"]) == (None, False)


@pytest.mark.parametrize("rate", [0, -1, "fast", True, "2", 100_001])
async def test_a_rate_limit_must_be_a_positive_number_up_to_100000(api, tenant, rate):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/a",
                            "rate_limit_per_s": rate})
    assert reply.failing_fields() == {"rate_limit_per_s"}


@pytest.mark.parametrize(("url", "kind"), [
    ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
    # A name reads the same whether it resolves into our network or not at all (test_api_endpoints.py).
    ("http://localhost/hook", "localhost does not resolve to public addresses only"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
    ("https://10.1.2.3/hook", "10.1.2.3 is a private address"),
    ("https://192.168.0.10/hook", "192.168.0.10 is a private address"),
    ("http://[::1]:9000/hook", "::1 is a loopback address"),
    ("http://[::ffff:10.0.0.1]/hook", "is a private address"),
    ("http://100.64.0.1/hook", "100.64.0.1 is a non-public address"),
])
async def test_endpoints_pointing_into_private_networks_are_refused(api, tenant, private_endpoints_refused,
                                                                    url, kind):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": url})
    assert reply.failing_fields() == {"value"}
    assert kind in reply.body["fields"][0]["message"]
    assert "ALLOW_PRIVATE_ENDPOINTS" in reply.body["fields"][0]["message"]


async def test_without_a_rule_of_its_own_a_key_gets_no_answer_about_an_address(api, tenant, private_endpoints_refused):
    # Otherwise a tenant could have our resolver look up names inside our network for it.
    someone_elses = await api.new_rule(await api.new_tenant("Other"))
    for rule_id in (someone_elses["rule_id"], str(uuid.uuid4())):
        for url in ("http://localhost/hook", "http://no-such-name.invalid/hook"):
            reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                                   {"rule_id": rule_id, "type": "webhook", "value": url})
            assert reply.failing_fields() == {"rule_id"}, reply.body
            assert reply.body["fields"][0]["message"] == "no such rule"


async def test_an_endpoint_cannot_be_moved_into_a_private_network_either(api, tenant, private_endpoints_refused):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "slack", "https://93.184.216.34/services/T/B/X")
    reply = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                           {"value": "http://127.0.0.1/services/T/B/X"})
    assert reply.failing_fields() == {"value"}


async def test_public_addresses_and_email_are_accepted_with_private_endpoints_refused(
        api, tenant, private_endpoints_refused):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://93.184.216.34:8443/hook")
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "oncall@10.0.0.1.example.com")
    assert (hook["value"], mail["value"]) == ("https://93.184.216.34:8443/hook", "oncall@10.0.0.1.example.com")


async def test_private_addresses_are_accepted_when_allowed(api, tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "http://127.0.0.1:9/hook")
    assert endpoint["value"] == "http://127.0.0.1:9/hook"


@pytest.mark.parametrize("address", ["oncall", "oncall@", "@example.com", "on call@example.com",
                                     "oncall@example", "oncall@@example.com"])
async def test_invalid_email_addresses_are_refused(api, tenant, address):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "email", "value": address})
    assert reply.failing_fields() == {"value"}


async def test_a_notification_shows_each_endpoints_delivery_state(api, tenant):
    from alerting_app import db
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.records import DeliveryChange, open_deliveries, write_changes

    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    notification = NotificationReady(client_id=tenant.client_id, alerts=[alert], rule_ids=[rule["rule_id"]])
    pool = await db.pool()
    await pool.execute("INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
                       " VALUES ($1, $2, $3, $4, $5)", notification.notification_id, tenant.client_id, "a-1",
                       [alert.model_dump(mode="json")], [rule["rule_id"]])
    owner = f"test-{uuid.uuid4()}"
    await open_deliveries(pool, [notification], owner, 60, [])
    now = time.time()
    await write_changes(pool, owner, [
        DeliveryChange(notification.notification_id, hook["endpoint_id"], "PENDING", 2, "HTTP 503", now - 5, now,
                       next_attempt_at=now + 30),
        DeliveryChange(notification.notification_id, mail["endpoint_id"], "SENT", 1, None, now, now),
    ])

    reply = await api.call("GET", f"/api/v1/notifications/{notification.notification_id}", tenant.key)

    assert reply.status == 200
    by_endpoint = {d["endpoint_id"]: d for d in reply.body["deliveries"]}
    retrying, sent = by_endpoint[hook["endpoint_id"]], by_endpoint[mail["endpoint_id"]]
    assert (retrying["channel"], retrying["status"], retrying["attempts"], retrying["last_error"]) == (
        "webhook", "PENDING", 2, "HTTP 503")
    first, last, due = (datetime.fromisoformat(retrying[f]) for f in ("first_attempt_at", "last_attempt_at",
                                                                      "next_attempt_at"))
    assert first < last < due
    assert (sent["channel"], sent["status"], sent["attempts"], sent["last_error"]) == ("email", "SENT", 1, None)
    assert sent["first_attempt_at"] == sent["last_attempt_at"] and sent["next_attempt_at"] is None
    assert retrying["created_at"] and sent["created_at"]


async def test_a_waiting_delivery_shows_its_endpoints_type_before_the_retyping_reaches_its_row(api, tenant):
    """A notification read right after its endpoints' types were changed, before the retyping
    that follows each PATCH reached their rows (here: the rows not retyped at all). The waiting
    delivery shows the type its next attempt goes by; before, its row's old channel, for a moment
    after the PATCH, or until an attempt settled it when the retyping never reached it. The sent
    one shows the channel it was sent by."""
    from alerting_app import db
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.records import DeliveryChange, open_deliveries, write_changes

    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    alert = Alert(alert_id="a-retyped", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    notification = NotificationReady(client_id=tenant.client_id, alerts=[alert], rule_ids=[rule["rule_id"]])
    pool = await db.pool()
    await pool.execute("INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
                       " VALUES ($1, $2, $3, $4, $5)", notification.notification_id, tenant.client_id, "a-retyped",
                       [alert.model_dump(mode="json")], [rule["rule_id"]])
    owner = f"test-{uuid.uuid4()}"
    await open_deliveries(pool, [notification], owner, 60, [])
    now = time.time()
    await write_changes(pool, owner, [
        DeliveryChange(notification.notification_id, hook["endpoint_id"], "PENDING", 1, "HTTP 503", now, now,
                       next_attempt_at=now + 30, release=True),
        DeliveryChange(notification.notification_id, mail["endpoint_id"], "SENT", 1, None, now, now,
                       channel="email"),
    ])
    await pool.execute("UPDATE endpoints SET type = 'email', value = 'hook@example.com' WHERE endpoint_id = $1",
                       hook["endpoint_id"])
    await pool.execute("UPDATE endpoints SET type = 'slack', value = 'https://hooks.example.com/s'"
                       " WHERE endpoint_id = $1", mail["endpoint_id"])

    one = await api.call("GET", f"/api/v1/notifications/{notification.notification_id}", tenant.key)
    listed = await api.call("GET", "/api/v1/notifications", tenant.key)

    [in_list] = [n for n in listed.body["items"] if n["notification_id"] == notification.notification_id]
    for shown in (one.body, in_list):
        assert {d["endpoint_id"]: (d["status"], d["channel"]) for d in shown["deliveries"]} == {
            hook["endpoint_id"]: ("PENDING", "email"), mail["endpoint_id"]: ("SENT", "email")}
