"""aggregate: one notification per (client_id, alert_id), however often the alert is matched.

The Postgres unique constraint on (client_id, alert_id) is the durable boundary: only the first
insert emits `notifications.ready`. The row is marked `emitted` once the broker acknowledged the
message; a row left unemitted (the worker died in between) is emitted again, with the same
notification_id, when its `alerts.matched` message is redelivered.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import asyncpg
from faust.types import EventT, StreamT

from alerting_app import db, metrics
from alerting_app.app import alerts_matched, app, notifications_ready
from alerting_app.contracts import Alert, AlertMatched, DeadLetter, NotificationReady
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, send_dead_letter

MATCH_BATCH_SIZE = 100
MATCH_BATCH_WITHIN_S = 0.05

_INSERT_NOTIFICATION = """
INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at)
VALUES ($1, $2, $3, $4, $5, to_timestamp($6))
ON CONFLICT (client_id, alert_id) DO NOTHING
RETURNING notification_id
"""

_EXISTING_NOTIFICATION = """
SELECT notification_id, alerts, rule_ids, extract(epoch FROM created_at)::float8 AS created_at, emitted
FROM notifications WHERE client_id = $1 AND alert_id = $2
"""


def decode_matched(raw: bytes | None) -> AlertMatched:
    """Decode an `alerts.matched` message whose ids fit the notifications table (UUIDs)."""
    matched = decode(AlertMatched, raw)
    for name, values in (("client_id", [matched.client_id]), ("rule_ids", matched.rule_ids)):
        for value in values:
            try:
                uuid.UUID(value)
            except ValueError:
                raise UndecodableMessage(f"{name}: not a UUID: {value!r}") from None
    return matched


async def record_first_match(conn: asyncpg.Connection | asyncpg.Pool,
                             matched: AlertMatched) -> NotificationReady | None:
    """The notification to emit for this match, or None when it was emitted already.

    `conn` must come from `db.pool()` (jsonb codec installed).
    """
    # Microsecond precision, as Postgres stores it, so that a re-emitted notification is identical.
    ready = NotificationReady(client_id=matched.client_id, alerts=[matched.alert], rule_ids=matched.rule_ids,
                              created_at=round(time.time(), 6))
    inserted = await conn.fetchval(
        _INSERT_NOTIFICATION,
        ready.notification_id,
        ready.client_id,
        matched.alert.alert_id,
        [alert.model_dump(mode="json") for alert in ready.alerts],
        ready.rule_ids,
        ready.created_at,
    )
    if inserted is not None:
        return ready
    row = await conn.fetchrow(_EXISTING_NOTIFICATION, matched.client_id, matched.alert.alert_id)
    if row is None or row["emitted"]:
        return None
    # Rebuilt from the row, not from this message, so the retry is the very notification first built.
    return NotificationReady(
        notification_id=str(row["notification_id"]),
        client_id=matched.client_id,
        alerts=[Alert.model_validate(alert) for alert in row["alerts"]],
        rule_ids=[str(rule_id) for rule_id in row["rule_ids"]],
        created_at=row["created_at"],
    )


async def mark_emitted(conn: asyncpg.Connection | asyncpg.Pool, notification_ids: list[str]) -> None:
    await conn.execute(
        "UPDATE notifications SET emitted = true, updated_at = now() "
        "WHERE notification_id = ANY($1::uuid[]) AND NOT emitted",
        notification_ids,
    )


@dataclass(frozen=True)
class Aggregation:
    """What one batch of `alerts.matched` messages produced."""

    ready: list[NotificationReady] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


async def aggregate_batch(conn: asyncpg.Pool, events: Iterable[EventT]) -> Aggregation:
    """Record each match; collect the notifications to emit and the dead letters."""
    aggregation = Aggregation()
    to_emit: set[str] = set()
    for event in events:
        try:
            matched = decode_matched(event.message.value)
            ready = await record_first_match(conn, matched)
        except UndecodableMessage as exc:
            aggregation.dead_letters.append(dead_letter_for(event.message, str(exc)))
            continue
        except asyncpg.ForeignKeyViolationError:
            reason = f"client_id: no such client {matched.client_id}"
            aggregation.dead_letters.append(dead_letter_for(event.message, reason))
            continue
        # A match redelivered within the batch finds the row still unemitted: emit it once.
        if ready is not None and ready.notification_id not in to_emit:
            to_emit.add(ready.notification_id)
            aggregation.ready.append(ready)
    return aggregation


async def publish_aggregation(aggregation: Aggregation) -> None:
    pending = [
        await notifications_ready.send(key=ready.client_id.encode(), value=ready.encode())
        for ready in aggregation.ready
    ]
    for letter in aggregation.dead_letters:
        await send_dead_letter(letter)
    # Marked emitted only once the broker holds them; a crash before leaves them to be re-emitted.
    await asyncio.gather(*pending)
    if aggregation.ready:
        await mark_emitted(await db.pool(), [ready.notification_id for ready in aggregation.ready])
        metrics.notifications_emitted.inc(len(aggregation.ready))


@app.agent(alerts_matched, sink=[publish_aggregation])
async def aggregate_matches(stream: StreamT) -> AsyncIterator[Aggregation]:
    async for events in stream.take_events(MATCH_BATCH_SIZE, within=MATCH_BATCH_WITHIN_S):
        # The sink runs before the generator resumes: the time covers recording and sending.
        with metrics.stage_seconds.labels(stage="aggregate_batch").time():
            yield await aggregate_batch(await db.pool(), events)
