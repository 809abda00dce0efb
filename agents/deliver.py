"""deliver: POSTs each notification of `notifications.ready` to the enabled webhook endpoints of its
rules and records the outcome per endpoint in `deliveries`, and overall in `notifications.status`.

Redelivery is safe: an endpoint already SENT for a notification is not called again, and every
POST carries an `Idempotency-Key` so a receiver can drop the duplicate of a retry we could not see
succeed. Email and Slack are recorded as UNSUPPORTED until their channels exist.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
from faust.types import EventT, StreamT

from alerting_app import db, metrics
from alerting_app.app import app, notifications_ready, settings
from alerting_app.contracts import DeadLetter, NotificationReady
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, send_dead_letter

SENT, FAILED, UNSUPPORTED = "SENT", "FAILED", "UNSUPPORTED"
DELIVERABLE_CHANNELS = frozenset({"webhook"})

_ENDPOINTS_TO_DELIVER = """
SELECT e.endpoint_id::text, e.type, e.value, coalesce(d.status = 'SENT', false) AS already_sent
FROM endpoints e
LEFT JOIN deliveries d ON d.notification_id = $1 AND d.endpoint_id = e.endpoint_id
WHERE e.client_id = $2 AND e.rule_id = ANY($3::uuid[]) AND e.enabled
ORDER BY e.endpoint_id
"""

_RECORD_DELIVERY = """
INSERT INTO deliveries AS d (notification_id, endpoint_id, channel, status, attempts, last_error,
                             first_attempt_at, last_attempt_at)
VALUES ($1, $2, $3, $4, $5::int, $6,
        CASE WHEN $5::int > 0 THEN now() END, CASE WHEN $5::int > 0 THEN now() END)
ON CONFLICT (notification_id, endpoint_id) DO UPDATE SET
    channel = EXCLUDED.channel,
    status = EXCLUDED.status,
    attempts = d.attempts + EXCLUDED.attempts,
    last_error = EXCLUDED.last_error,
    first_attempt_at = coalesce(d.first_attempt_at, EXCLUDED.first_attempt_at),
    last_attempt_at = coalesce(EXCLUDED.last_attempt_at, d.last_attempt_at)
"""


class UnknownNotification(LookupError):
    """`notifications.ready` names a notification that is not in Postgres."""


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    channel: str
    value: str
    already_sent: bool


@dataclass(frozen=True)
class EndpointOutcome:
    endpoint_id: str
    channel: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class DeliveryReport:
    """The notification's status after this delivery, and what was done per endpoint.

    `outcomes` lists the endpoints handled now; endpoints SENT by an earlier delivery are skipped.
    """

    notification_id: str
    status: str
    detail: str | None
    outcomes: list[EndpointOutcome]


@dataclass(frozen=True)
class DeliverOutcome:
    """What one `notifications.ready` message produced: a delivery report or a dead letter."""

    report: DeliveryReport | None = None
    dead_letter: DeadLetter | None = None


def webhook_payload(notification: NotificationReady) -> dict:
    return {
        "version": 1,
        "notification_id": notification.notification_id,
        "client_id": notification.client_id,
        "rule_ids": notification.rule_ids,
        "alerts": [alert.model_dump(mode="json") for alert in notification.alerts],
        "created_at": notification.created_at,
    }


async def deliver_webhook(session: aiohttp.ClientSession, url: str, notification: NotificationReady,
                          endpoint_id: str) -> EndpointOutcome:
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": f"{notification.notification_id}:{endpoint_id}",
    }
    body = json.dumps(webhook_payload(notification)).encode()
    try:
        # Redirects are not followed: the endpoint's URL was validated, where it points to was not.
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            if 200 <= response.status < 300:
                return EndpointOutcome(endpoint_id, "webhook", SENT)
            return EndpointOutcome(endpoint_id, "webhook", FAILED, f"HTTP {response.status}")
    except asyncio.TimeoutError:
        return EndpointOutcome(endpoint_id, "webhook", FAILED,
                               f"timed out after {settings.webhook_timeout_s:g}s")
    except aiohttp.ClientError as exc:
        return EndpointOutcome(endpoint_id, "webhook", FAILED, f"{type(exc).__name__}: {exc}")


async def load_endpoints(conn: asyncpg.Pool | asyncpg.Connection,
                         notification: NotificationReady) -> list[Endpoint]:
    """Enabled endpoints of the notification's rules for its client, marking those already SENT."""
    if await conn.fetchval("SELECT 1 FROM notifications WHERE notification_id = $1 AND client_id = $2",
                           notification.notification_id, notification.client_id) is None:
        raise UnknownNotification(notification.notification_id)
    rows = await conn.fetch(_ENDPOINTS_TO_DELIVER, notification.notification_id, notification.client_id,
                            notification.rule_ids)
    return [Endpoint(row["endpoint_id"], row["type"], row["value"], row["already_sent"]) for row in rows]


async def deliver_to_endpoint(conn: asyncpg.Pool, session: aiohttp.ClientSession,
                              notification: NotificationReady, endpoint: Endpoint) -> EndpointOutcome:
    if endpoint.channel in DELIVERABLE_CHANNELS:
        outcome = await deliver_webhook(session, endpoint.value, notification, endpoint.endpoint_id)
    else:
        outcome = EndpointOutcome(endpoint.endpoint_id, endpoint.channel, UNSUPPORTED,
                                  f"{endpoint.channel} delivery is not yet supported")
    attempts = 0 if outcome.status == UNSUPPORTED else 1
    await conn.execute(_RECORD_DELIVERY, notification.notification_id, endpoint.endpoint_id, endpoint.channel,
                       outcome.status, attempts, outcome.error)
    metrics.deliveries.labels(channel=endpoint.channel, status=outcome.status).inc()
    return outcome


def notification_status(endpoints: list[Endpoint], outcomes: list[EndpointOutcome]) -> tuple[str, str | None]:
    """SENT when every deliverable endpoint was sent (now or before), and there is at least one."""
    deliverable = [e for e in endpoints if e.channel in DELIVERABLE_CHANNELS]
    failed = [o for o in outcomes if o.status == FAILED]
    unsupported = sorted({o.channel for o in outcomes if o.status == UNSUPPORTED})
    not_supported_note = f"not yet supported: {', '.join(unsupported)}" if unsupported else None
    if not endpoints:
        return FAILED, "no enabled endpoint on the matched rules"
    if not deliverable:
        return FAILED, f"no deliverable endpoint ({not_supported_note})"
    if failed:
        reasons = "; ".join(f"{o.endpoint_id}: {o.error}" for o in failed)
        return FAILED, f"{len(failed)} of {len(deliverable)} webhook deliveries failed: {reasons}"
    return SENT, not_supported_note


async def deliver_notification(conn: asyncpg.Pool, session: aiohttp.ClientSession,
                               notification: NotificationReady) -> DeliveryReport:
    endpoints = await load_endpoints(conn, notification)
    outcomes = list(await asyncio.gather(*(
        deliver_to_endpoint(conn, session, notification, endpoint)
        for endpoint in endpoints if not endpoint.already_sent
    )))
    status, detail = notification_status(endpoints, outcomes)
    await conn.execute(
        "UPDATE notifications SET status = $2, detail = $3, updated_at = now() WHERE notification_id = $1",
        notification.notification_id, status, detail,
    )
    return DeliveryReport(notification.notification_id, status, detail, outcomes)


def decode_notification(raw: bytes | None) -> NotificationReady:
    """Decode a `notifications.ready` message whose ids fit the tables (UUIDs)."""
    notification = decode(NotificationReady, raw)
    for name, values in (("notification_id", [notification.notification_id]),
                         ("client_id", [notification.client_id]), ("rule_ids", notification.rule_ids)):
        for value in values:
            try:
                uuid.UUID(value)
            except ValueError:
                raise UndecodableMessage(f"{name}: not a UUID: {value!r}") from None
    return notification


async def deliver_event(conn: asyncpg.Pool, session: aiohttp.ClientSession, event: EventT) -> DeliverOutcome:
    try:
        notification = decode_notification(event.message.value)
        return DeliverOutcome(report=await deliver_notification(conn, session, notification))
    except UndecodableMessage as exc:
        return DeliverOutcome(dead_letter=dead_letter_for(event.message, str(exc)))
    except UnknownNotification as exc:
        return DeliverOutcome(dead_letter=dead_letter_for(event.message, f"notification_id: no such notification {exc}"))


async def publish_deliver_outcome(outcome: DeliverOutcome) -> None:
    if outcome.dead_letter is not None:
        await send_dead_letter(outcome.dead_letter)


@app.agent(notifications_ready, sink=[publish_deliver_outcome])
async def deliver_notifications(stream: StreamT) -> AsyncIterator[DeliverOutcome]:
    # One session (connection pool) for the agent's lifetime, shared by all deliveries.
    timeout = aiohttp.ClientTimeout(total=settings.webhook_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async for event in stream.events():
            yield await deliver_event(await db.pool(), session, event)
