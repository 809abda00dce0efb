"""/api/v1/notifications: what was notified, newest first, with each endpoint's delivery.

POST /api/v1/notifications/{notification_id}/retry delivers a FAILED notification again to the
endpoints that failed (once the tenant has fixed them): they are PENDING and due at once, with a
fresh DELIVERY_MAX_ATTEMPTS, and any deliver worker's sweep sends them (alerting_app/delivery/records.py).

Filters: `client_id` (admin), `status` (PENDING, SENT, FAILED, SUPPRESSED, SILENCED), the
creation time, `since` inclusive and `until` exclusive, so consecutive windows never overlap, and
`alert_id`: the notifications that concern that alert of the client (the admin names the client,
as alert ids are per client). A cursor continues the same query: send the same filters with it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence
from uuid import UUID

import asyncpg
from faust.web import Request, Response

from alerting_app import db
from alerting_app.delivery import records
from alerting_app.app import app
from web.auth import ApiView
from web.errors import Conflict, NotFound, ValidationFailed
from web.pagination import page_of
from web.schemas import DeliveryOut, NotificationOut, NotificationQuery
from web.validation import parse_query, path_id

# A group's members a silence muted at close that it does not list (migrations/022): a notification
# not of a group leaves none out; a group closed by a release before 022 shows null (not known).
COLUMNS = ("notification_id, client_id, alert_id, alerts, rule_ids, status, detail, created_at, updated_at,"
           " truncated_alerts, group_rule_id,"
           " CASE WHEN group_rule_id IS NULL THEN '[]'::jsonb ELSE silenced_alerts END AS silenced_alerts,"
           " CASE WHEN group_rule_id IS NULL THEN 0 ELSE truncated_silenced_alerts END AS truncated_silenced_alerts")

# A page holds at most `limit` notifications, and stops at the first one starting past this many
# bytes of alerts (at least one is listed). A notification lists up to GROUP_MAX_ALERTS alerts of up
# to ~150 KB each: 500 of them could otherwise be gigabytes, held by the worker while it answers.
# Its silenced alerts count too (GROUP_MAX_ALERTS of up to ~1 KB each).
PAGE_ALERT_BYTES = 8 * 1024 * 1024

# The notifications that concern one alert of one client ($10 and $11): the one of it alone
# (notifications' UNIQUE (client_id, alert_id)) and the group's it is a member of, listed, unlisted
# or silenced at close (notification_alerts' primary key, migrations/005). At most two rows, each
# then read by its primary key: without them the filter read every notification of the client.
OF_AN_ALERT = """notification_id IN (
                  SELECT o.notification_id FROM notifications o WHERE o.client_id = $10 AND o.alert_id = $11
                  UNION ALL
                  SELECT m.notification_id FROM notification_alerts m WHERE m.client_id = $10 AND m.alert_id = $11)
              AND """


def list_query(concerning: str = "") -> str:
    """Newest first; the tie-break on notification_id follows the index (client_id, created_at DESC,
    notification_id). `alerts_from`: the bytes of alerts of the rows before this one. Returned: the
    rows starting within $9 bytes, and the first one past them, which only says that more follow.
    `concerning`: a further condition and its AND (OF_AN_ALERT), or nothing."""
    return f"""
    SELECT * FROM (
        SELECT *, lag(alerts_from, 1, 0) OVER (ORDER BY created_at DESC, notification_id) AS previous_from
        FROM (
            SELECT {COLUMNS},
                   sum(listed_bytes) OVER (ORDER BY created_at DESC, notification_id) - listed_bytes AS alerts_from
            FROM notifications
            CROSS JOIN LATERAL (SELECT octet_length(alerts::text)
                                       + coalesce(octet_length(silenced_alerts::text), 0) AS listed_bytes) b
            WHERE {concerning}($1::uuid IS NULL OR client_id = $1)
              AND ($2::uuid IS NULL OR client_id = $2)
              AND {records.OF_A_LIVE_CLIENT}
              AND ($3::text IS NULL OR status = $3)
              AND ($4::timestamptz IS NULL OR created_at >= $4)
              AND ($5::timestamptz IS NULL OR created_at < $5)
              AND ($6::timestamptz IS NULL OR created_at < $6 OR (created_at = $6 AND notification_id > $7::uuid))
            ORDER BY created_at DESC, notification_id
            LIMIT $8
        ) limited
    ) page
    WHERE previous_from < $9
    ORDER BY created_at DESC, notification_id
"""


LIST = list_query()
# A statement of its own rather than `$11 IS NULL OR ...` in LIST, so that each of its plans, custom
# or generic, starts from the alert's indexes (tests/test_list_indexes.py), and LIST's are unchanged.
LIST_OF_AN_ALERT = list_query(OF_AN_ALERT)
GET = f"""
    SELECT {COLUMNS} FROM notifications
    WHERE notification_id = $1 AND ($2::uuid IS NULL OR client_id = $2) AND {records.OF_A_LIVE_CLIENT}
"""
# A waiting delivery's channel is its endpoint's type, which its next attempt goes by, whether or
# not the retyping after a change of type (records.retype_waiting) has reached its row yet: the row's
# showed the old type for a moment after the PATCH's answer, or until an attempt settled it. A
# settled one's is its last attempt's; one whose endpoint is gone keeps the row's.
DELIVERIES = """
    SELECT d.notification_id, d.endpoint_id,
           CASE WHEN d.status = 'PENDING' THEN coalesce(e.type, d.channel) ELSE d.channel END AS channel,
           d.status, d.attempts, d.last_error, d.created_at, d.first_attempt_at, d.last_attempt_at,
           CASE WHEN d.status = 'PENDING' THEN d.next_attempt_at END AS next_attempt_at
    FROM deliveries d LEFT JOIN endpoints e ON e.endpoint_id = d.endpoint_id
    WHERE d.notification_id = ANY($1::uuid[])
    ORDER BY d.notification_id, d.endpoint_id
"""


async def with_deliveries(pool: asyncpg.Pool, rows: Sequence[Any]) -> list[dict[str, Any]]:
    by_notification: dict[Any, list[DeliveryOut]] = defaultdict(list)
    for delivery in await pool.fetch(DELIVERIES, [row["notification_id"] for row in rows]):
        by_notification[delivery["notification_id"]].append(DeliveryOut.model_validate(dict(delivery)))
    return [{**dict(row), "deliveries": by_notification[row["notification_id"]]} for row in rows]


@app.page("/api/v1/notifications")
class NotificationsView(ApiView):
    query_methods = frozenset({"GET"})  # the list's filters and paging

    async def get(self, request: Request) -> Response:
        query, caller = parse_query(request, NotificationQuery), self.caller(request)
        statement, filters = LIST, [caller.client_id, query.client_id, query.status, query.since, query.until,
                                    *query.after, query.limit + 1, PAGE_ALERT_BYTES]
        if query.alert_id is not None:
            # A client key's alert is its own client's; another client named with it lists nothing
            # (client_id = $2 too), as another client's alert or an unknown one does.
            client_id = caller.client_id or query.client_id
            if client_id is None:
                raise ValidationFailed.field("client_id", "required with alert_id: alert ids are per client")
            statement, filters = LIST_OF_AN_ALERT, [*filters, client_id, query.alert_id]
        pool = await db.api_pool()
        rows = await pool.fetch(statement, *filters)
        within = [row for row in rows if row["alerts_from"] < PAGE_ALERT_BYTES]
        page = page_of(await with_deliveries(pool, within), query, NotificationOut.model_validate,
                       "notification_id", more=len(within) < len(rows))
        return self.json(page.model_dump(mode="json"))


@app.page("/api/v1/notifications/{notification_id}")
class NotificationView(ApiView):
    async def get(self, request: Request, notification_id: str) -> Response:
        return self.json(await notification_out(await db.api_pool(), path_id(notification_id, "notification"),
                                                self.caller(request).client_id))


async def notification_out(pool: asyncpg.Pool, notification_id: UUID, client_id: UUID | None) -> dict[str, Any]:
    row = await pool.fetchrow(GET, notification_id, client_id)
    if row is None:
        raise NotFound("notification")
    [notification] = await with_deliveries(pool, [row])
    return NotificationOut.model_validate(notification).model_dump(mode="json")


@app.page("/api/v1/notifications/{notification_id}/retry")
class NotificationRetryView(ApiView):
    async def post(self, request: Request, notification_id: str) -> Response:
        notification_id, client_id = path_id(notification_id, "notification"), self.caller(request).client_id
        pool = await db.api_pool()
        async with pool.acquire() as conn:
            try:
                found = await records.retry_failed(conn, notification_id, client_id)
            except records.NotRetryable as exc:
                raise Conflict(str(exc)) from None
        if not found:
            raise NotFound("notification")
        return self.json(await notification_out(pool, notification_id, client_id), status=202)
