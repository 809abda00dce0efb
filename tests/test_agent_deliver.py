"""The deliver agent through Faust's test driver, against the real Postgres and a real local
webhook receiver: each enabled endpoint is delivered to once, and every outcome is recorded."""
from __future__ import annotations

import socket
import uuid

import pytest

from agents.deliver import deliver_notifications
from alerting_app.contracts import Alert, NotificationReady
from test_agent_support import (  # noqa: F401  (fixtures)
    AGENT_LOOP, insert_client, insert_endpoint, insert_rule, pipeline, pool, sent_to, webhook,
)

pytestmark = AGENT_LOOP


async def pending_notification(pool, client_id: str, rule_ids: list[str]) -> NotificationReady:
    """A notification as aggregate leaves it: a PENDING row, and its notifications.ready message."""
    alert = Alert(alert_id=str(uuid.uuid4()), event_ts=1_700_000_000.5, severity="HIGH", source="payments",
                  name="CheckoutLatency", context={"region": "eu-west-1"})
    notification = NotificationReady(client_id=client_id, alerts=[alert], rule_ids=rule_ids)
    await pool.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, emitted)"
        " VALUES ($1, $2, $3, $4, $5, true)",
        notification.notification_id, client_id, alert.alert_id, [alert.model_dump(mode="json")], rule_ids)
    return notification


async def deliver(*values: bytes, key: str = "client-key", partition: int = 0) -> list:
    """Each value is put on notifications.ready and waited for: one DeliverOutcome per value."""
    async with deliver_notifications.test_context() as agent:
        for value in values:
            await agent.put(value, key=key.encode(), partition=partition)
        return [agent.results[i] for i in range(len(values))]


async def deliveries(pool, notification_id: str) -> dict[str, tuple]:
    rows = await pool.fetch(
        "SELECT endpoint_id::text, channel, status, attempts, last_error,"
        " first_attempt_at IS NOT NULL AS attempted"
        " FROM deliveries WHERE notification_id = $1", notification_id)
    columns = ("channel", "status", "attempts", "last_error", "attempted")
    return {row["endpoint_id"]: tuple(row[c] for c in columns) for row in rows}


async def notification_state(pool, notification_id: str) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT status, detail FROM notifications WHERE notification_id = $1",
                              notification_id)
    return row["status"], row["detail"]


async def test_webhook_answering_2xx_receives_the_exact_payload_and_is_recorded_sent(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", webhook.url(204))
    notification = await pending_notification(pool, client, [rule])

    [outcome] = await deliver(notification.encode())

    [post] = webhook.posts
    assert post.body == {
        "version": 1,
        "notification_id": notification.notification_id,
        "client_id": client,
        "rule_ids": [rule],
        "alerts": [{"alert_id": notification.alerts[0].alert_id, "schema_version": 1,
                    "event_ts": 1_700_000_000.5, "severity": "HIGH", "source": "payments",
                    "name": "CheckoutLatency", "context": {"region": "eu-west-1"}}],
        "created_at": notification.created_at,
    }
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["Idempotency-Key"] == f"{notification.notification_id}:{endpoint}"
    assert outcome.report.status == "SENT" and outcome.dead_letter is None
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "SENT", 1, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_webhook_answering_500_is_recorded_failed(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", webhook.url(500))
    notification = await pending_notification(pool, client, [rule])

    [outcome] = await deliver(notification.encode())

    assert len(webhook.posts) == 1
    assert outcome.report.status == "FAILED"
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 1, "HTTP 500", True)}
    status, detail = await notification_state(pool, notification.notification_id)
    assert status == "FAILED"
    assert f"{endpoint}: HTTP 500" in detail


async def test_unreachable_webhook_is_recorded_failed_with_the_error(pool):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", f"http://127.0.0.1:{closed_port}/hook")
    notification = await pending_notification(pool, client, [rule])

    [outcome] = await deliver(notification.encode())

    [(channel, status, attempts, error, _)] = (await deliveries(pool, notification.notification_id)).values()
    assert (channel, status, attempts) == ("webhook", "FAILED", 1)
    assert "ClientConnectorError" in error
    assert outcome.report.status == "FAILED"
    assert endpoint in outcome.report.detail


async def test_redelivered_notification_posts_again_only_to_the_endpoints_not_yet_sent(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    ok = await insert_endpoint(pool, client, rule, "webhook", webhook.url(200))
    failing = await insert_endpoint(pool, client, rule, "webhook", webhook.url(503))
    notification = await pending_notification(pool, client, [rule])

    first, redelivered = await deliver(notification.encode(), notification.encode())

    assert len(webhook.posts_to(200)) == 1
    assert len(webhook.posts_to(503)) == 2
    assert [o.endpoint_id for o in redelivered.report.outcomes] == [failing]
    assert await deliveries(pool, notification.notification_id) == {
        ok: ("webhook", "SENT", 1, None, True),
        failing: ("webhook", "FAILED", 2, "HTTP 503", True),
    }
    assert first.report.status == redelivered.report.status == "FAILED"


async def test_redelivered_notification_already_sent_everywhere_posts_nothing(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    await insert_endpoint(pool, client, rule, "webhook", webhook.url(200))
    notification = await pending_notification(pool, client, [rule])

    first, redelivered = await deliver(notification.encode(), notification.encode())

    assert len(webhook.posts) == 1
    assert redelivered.report.outcomes == []
    assert first.report.status == redelivered.report.status == "SENT"


async def test_slack_and_email_endpoints_are_recorded_unsupported(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    hook = await insert_endpoint(pool, client, rule, "webhook", webhook.url(200))
    slack = await insert_endpoint(pool, client, rule, "slack", "https://hooks.slack.com/services/T/B/X")
    email = await insert_endpoint(pool, client, rule, "email", "oncall@example.com")
    notification = await pending_notification(pool, client, [rule])

    [outcome] = await deliver(notification.encode())

    assert await deliveries(pool, notification.notification_id) == {
        hook: ("webhook", "SENT", 1, None, True),
        slack: ("slack", "UNSUPPORTED", 0, "slack delivery is not yet supported", False),
        email: ("email", "UNSUPPORTED", 0, "email delivery is not yet supported", False),
    }
    assert len(webhook.posts) == 1
    assert outcome.report.status == "SENT"
    assert await notification_state(pool, notification.notification_id) == (
        "SENT", "not yet supported: email, slack")


async def test_notification_with_only_unsupported_endpoints_is_failed(pool):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    await insert_endpoint(pool, client, rule, "email", "oncall@example.com")
    notification = await pending_notification(pool, client, [rule])

    await deliver(notification.encode())

    assert await notification_state(pool, notification.notification_id) == (
        "FAILED", "no deliverable endpoint (not yet supported: email)")


async def test_only_enabled_endpoints_of_the_notifications_rules_are_called(pool, webhook):
    client = await insert_client(pool)
    matched_rule = await insert_rule(pool, client)
    other_rule = await insert_rule(pool, client, source="search")
    await insert_endpoint(pool, client, matched_rule, "webhook", webhook.url(200))
    await insert_endpoint(pool, client, matched_rule, "webhook", webhook.url(201), enabled=False)
    await insert_endpoint(pool, client, other_rule, "webhook", webhook.url(202))
    notification = await pending_notification(pool, client, [matched_rule])

    await deliver(notification.encode())

    assert [post.path for post in webhook.posts] == ["/status/200"]


async def test_notification_without_any_endpoint_is_failed(pool, webhook):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    notification = await pending_notification(pool, client, [rule])

    [outcome] = await deliver(notification.encode())

    assert webhook.posts == []
    assert outcome.report.outcomes == []
    assert await notification_state(pool, notification.notification_id) == (
        "FAILED", "no enabled endpoint on the matched rules")


def _ready(**fields) -> bytes:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    return NotificationReady(**{"client_id": str(uuid.uuid4()), "alerts": [alert],
                                "rule_ids": [str(uuid.uuid4())], **fields}).encode()


@pytest.mark.parametrize(("value", "reason_names"), [
    (b"<html>not json</html>", "Invalid JSON"),
    (b'{"notification_id": "n", "client_id": "c", "alerts": []}', "alerts: List should have at least 1 item"),
    (b'{"notification_id": "n", "client_id": "c", "alerts": []}', "rule_ids: Field required"),
    (_ready(notification_id="n-1"), "notification_id: not a UUID"),
    (_ready(rule_ids=["r-1"]), "rule_ids: not a UUID"),
    (_ready(), "notification_id: no such notification"),
])
async def test_undecodable_notification_goes_to_the_dead_letter_topic(pool, webhook, value, reason_names):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    await insert_endpoint(pool, client, rule, "webhook", webhook.url(200))
    valid = await pending_notification(pool, client, [rule])
    key = f"dlq-{uuid.uuid4()}"

    bad, good = await deliver(value, valid.encode(), key=key, partition=7)

    assert bad.report is None
    assert reason_names in bad.dead_letter.reason
    letter = bad.dead_letter
    assert (letter.topic, letter.partition, letter.offset, letter.payload) == (
        "notifications.ready", 7, 0, value.decode())
    assert good.report.status == "SENT"
    assert [post.body["notification_id"] for post in webhook.posts] == [valid.notification_id]
    [on_broker] = await sent_to("notifications.ready.dlq", key)
    assert on_broker["reason"] == bad.dead_letter.reason
