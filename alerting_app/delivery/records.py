"""The delivery rows in Postgres: opened PENDING, leased to one worker at a time, then SENT or FAILED.

Every function here is one statement for a whole batch: delivering thousands a second leaves no
room for a round trip per delivery (retype_waiting, a loop of such batches, is no worker's path).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from alerting_app import db
from alerting_app.contracts import Alert, NotificationReady
from alerting_app.delivery.jobs import DeliveryJob, Endpoint

Conn = asyncpg.Pool | asyncpg.Connection

log = logging.getLogger(__name__)

# A notification of a client being deleted (web/clients.py) is gone to the API: its history waits
# only for retention to delete it (agents/retention.py finish_client_deletions).
OF_A_LIVE_CLIENT = """NOT EXISTS (SELECT 1 FROM clients c
                                  WHERE c.client_id = notifications.client_id AND c.deleting_since IS NOT NULL)"""

# Not one of a client being deleted: its message is dropped like that of a client gone
# (alerting_app/deleted_clients.py), and nothing is recorded for it.
_KNOWN = """
SELECT n.notification_id::text, n.client_id::text, n.status
FROM unnest($1::uuid[], $2::uuid[]) AS b(notification_id, client_id)
JOIN notifications n ON n.notification_id = b.notification_id AND n.client_id = b.client_id
JOIN clients c ON c.client_id = n.client_id AND c.deleting_since IS NULL
"""

# One row per (notification, enabled endpoint of its matched rules), while the notification is
# PENDING: a settled one gets no new row, so a redelivered or replayed message does not send it
# to an endpoint added since. A row already there is leased again only if it is still PENDING,
# due, and nobody holds it: a redelivered message resumes what a dead worker left and leaves alone
# what is SENT, FAILED or in hand elsewhere. Leased so, it takes its endpoint's type as its channel,
# as a row the sweep leases does (_LEASE_DUE).
# Endpoints in $5 and clients in $7 (those this worker holds enough of) get an unleased row, for the
# sweep, and so does email with $8 (email waits in Postgres for its turn: the sweep takes it
# round-robin per client, and new email taken here would go before it); with no owner ($4 NULL: the
# worker is full) every row is left for the sweep.
_OPEN = """
WITH wanted AS (
    SELECT DISTINCT b.notification_id, e.endpoint_id, e.type, b.client_id
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS b(notification_id, client_id, rule_id)
    JOIN notifications n ON n.notification_id = b.notification_id AND n.status = 'PENDING'
    JOIN endpoints e ON e.rule_id = b.rule_id AND e.client_id = b.client_id AND e.enabled
), opened AS (
    INSERT INTO deliveries AS d (notification_id, endpoint_id, channel, status, leased_by, lease_until)
    SELECT notification_id, endpoint_id, type, 'PENDING',
           CASE WHEN $4::text IS NULL OR endpoint_id = ANY($5::uuid[]) OR client_id = ANY($7::uuid[])
                     OR ($8::bool AND type = 'email') THEN NULL
                ELSE $4 END,
           CASE WHEN $4::text IS NULL OR endpoint_id = ANY($5::uuid[]) OR client_id = ANY($7::uuid[])
                     OR ($8::bool AND type = 'email') THEN NULL
                ELSE now() + make_interval(secs => $6) END
    FROM wanted
    ON CONFLICT (notification_id, endpoint_id) DO UPDATE
        SET leased_by = EXCLUDED.leased_by, lease_until = EXCLUDED.lease_until, channel = EXCLUDED.channel
        WHERE d.status = 'PENDING' AND EXCLUDED.leased_by IS NOT NULL AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())
    -- xmax is 0 on a row this statement inserted, set on one it updated (found already there).
    RETURNING d.notification_id, d.endpoint_id, d.attempts, d.leased_by, d.xmax::text <> '0' AS resumed
)
SELECT o.notification_id::text, o.attempts, e.endpoint_id::text, e.type, e.value, e.secret,
       e.rate_limit_per_s, e.enabled, o.resumed
FROM opened o JOIN endpoints e ON e.endpoint_id = o.endpoint_id
WHERE o.leased_by = $4
"""

# How many due rows a sweep ranks per row it may lease: room for the rows a concurrent sweep holds
# locked (skipped) and for endpoints' caps, without reading the whole backlog.
_CANDIDATES_PER_LEASE = 4

# Due rows nobody holds, oldest first, and of each endpoint no more than the room this worker has
# for it ($5, DELIVERY_ENDPOINT_BACKLOG, less what it holds: $3/$4): one endpoint with a large
# backlog would otherwise take the whole batch every sweep and other endpoints' due rows would wait.
# Only the oldest $7 due rows of endpoints with room are ranked (`candidates`, read in the order of
# deliveries_due_idx and stopped there): ranking every due row cost each sweep of each worker, every
# second, a read and a sort of the whole waiting backlog (docs/delivery.md, "The sweep's cost").
# An endpoint without room is left out of the candidates, so a full endpoint's old backlog cannot
# fill them and starve the others. SKIP LOCKED lets every worker sweep at once. Postgres allows no
# FOR UPDATE beside a window function, so the rows are ranked first and locked after; a row a
# concurrent sweep leased in between is checked again against the outer WHERE (READ COMMITTED
# re-checks a locked row's conditions) and dropped. Rows another sweep holds locked are skipped, so
# an endpoint may get fewer than its room, never more.
# Email is not among those candidates: no more than the email room this worker has left ($11,
# dispatcher.email_room) is leased, round-robin per client (`email_candidates`): each client's
# oldest due email first, then each one's second, and so on. Oldest first, one tenant's storm of
# queued email (thousands, draining at the all-email rate) kept every other tenant's first email
# waiting behind all of it. The clients with email waiting are found by deliveries_email_client_idx
# (migration 021: the row's client_id, set for PENDING email), skipping from one to the next
# (`email_clients`: one probe each), and of each only its oldest $11 due rows, across all its
# endpoints, are read. Found per endpoint (migration 020), a storm over 28,800 email endpoints cost
# each sweep a probe of each and up to $11 rows of each, with their clients: 0.3 s to seconds per
# sweep (bench/email_sweep.py). Taken first in a batch short of room: they are no more than the
# email room.
_LEASE_DUE = """
WITH RECURSIVE held AS (
    SELECT * FROM unnest($3::uuid[], $4::int[]) AS h(endpoint_id, held)
), held_by_client AS (
    SELECT * FROM unnest($8::uuid[], $9::int[]) AS h(client_id, held)
), other_candidates AS (
    SELECT * FROM (
        -- The client by a scalar subquery, not a join: a join lets the planner start from
        -- notifications (when they are about as many as the due rows, say) and read every due
        -- row before the LIMIT; a subquery per row keeps the scan on deliveries_due_idx, stopped
        -- at the LIMIT.
        SELECT d.notification_id, d.endpoint_id, d.next_attempt_at,
               (SELECT n.client_id FROM notifications n WHERE n.notification_id = d.notification_id) AS client_id
        FROM deliveries d
        WHERE d.status = 'PENDING' AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())
          AND NOT EXISTS (SELECT 1 FROM held h WHERE h.endpoint_id = d.endpoint_id AND h.held >= $5)
          AND d.channel <> 'email'
        ORDER BY d.next_attempt_at
    ) due_rows
    WHERE NOT EXISTS (SELECT 1 FROM held_by_client h WHERE h.client_id = due_rows.client_id AND h.held >= $10)
    LIMIT $7
), email_clients AS (
    (SELECT d.client_id FROM deliveries d
     WHERE d.status = 'PENDING' AND d.channel = 'email' AND d.client_id IS NOT NULL AND $11::int > 0
     ORDER BY d.client_id LIMIT 1)
    UNION ALL
    SELECT (SELECT d.client_id FROM deliveries d
            WHERE d.status = 'PENDING' AND d.channel = 'email' AND d.client_id > m.client_id
            ORDER BY d.client_id LIMIT 1)
    FROM email_clients m WHERE m.client_id IS NOT NULL
), email_candidates AS (
    SELECT notification_id, endpoint_id, next_attempt_at, client_id, email_turn FROM (
        SELECT e.notification_id, e.endpoint_id, e.next_attempt_at, m.client_id,
               row_number() OVER (PARTITION BY m.client_id ORDER BY e.next_attempt_at) AS email_turn
        FROM email_clients m
        CROSS JOIN LATERAL (
            SELECT d.notification_id, d.endpoint_id, d.next_attempt_at FROM deliveries d
            WHERE d.client_id = m.client_id AND d.status = 'PENDING' AND d.channel = 'email'
              AND d.next_attempt_at <= now() AND (d.lease_until IS NULL OR d.lease_until < now())
              AND NOT EXISTS (SELECT 1 FROM held h WHERE h.endpoint_id = d.endpoint_id AND h.held >= $5)
            ORDER BY d.next_attempt_at
            LIMIT $11
        ) e
        WHERE m.client_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM held_by_client h WHERE h.client_id = m.client_id AND h.held >= $10)
    ) turns
    ORDER BY email_turn, next_attempt_at
    LIMIT $11
), candidates AS (
    SELECT notification_id, endpoint_id, next_attempt_at, client_id, NULL::bigint AS email_turn
    FROM other_candidates
    UNION ALL
    SELECT * FROM email_candidates
), ranked AS (
    SELECT c.notification_id, c.endpoint_id, c.next_attempt_at, c.client_id, c.email_turn,
           row_number() OVER (PARTITION BY c.endpoint_id ORDER BY c.next_attempt_at) AS nth,
           $5::int - coalesce(h.held, 0) AS room
    FROM candidates c LEFT JOIN held h ON h.endpoint_id = c.endpoint_id
), within_endpoint_room AS (
    -- Ranked per client among the rows its endpoints have room for: a full endpoint's rows must
    -- not use up its client's room, leaving the client's other endpoints nothing.
    SELECT r.notification_id, r.endpoint_id, r.next_attempt_at, r.email_turn,
           row_number() OVER (PARTITION BY r.client_id ORDER BY r.next_attempt_at) AS nth_of_client,
           $10::int - coalesce(hc.held, 0) AS client_room
    FROM ranked r LEFT JOIN held_by_client hc ON hc.client_id = r.client_id
    WHERE r.nth <= r.room
), due AS (
    SELECT d.notification_id, d.endpoint_id, d.leased_by IS NOT NULL AS resumed, r.email_turn, r.next_attempt_at
    FROM within_endpoint_room r JOIN deliveries d ON d.notification_id = r.notification_id
                                                 AND d.endpoint_id = r.endpoint_id
    WHERE r.nth_of_client <= r.client_room
      AND d.status = 'PENDING' AND d.next_attempt_at <= now()
      AND (d.lease_until IS NULL OR d.lease_until < now())
    ORDER BY r.email_turn NULLS LAST, r.next_attempt_at
    LIMIT $6
    FOR UPDATE OF d SKIP LOCKED
), leased AS (
    -- The row takes its endpoint's type as its channel: one left by a retyping that did not reach
    -- it (retype_waiting) is leased by its old channel once, not every time until an attempt settles it.
    UPDATE deliveries d SET leased_by = $1, lease_until = now() + make_interval(secs => $2),
                            channel = coalesce((SELECT e.type FROM endpoints e WHERE e.endpoint_id = d.endpoint_id),
                                               d.channel)
    FROM due WHERE d.notification_id = due.notification_id AND d.endpoint_id = due.endpoint_id
    RETURNING d.notification_id, d.endpoint_id, d.attempts, due.resumed, due.email_turn, due.next_attempt_at
)
SELECT l.notification_id::text, l.attempts, l.endpoint_id::text, e.type, e.value, e.secret,
       e.rate_limit_per_s, e.enabled, l.resumed,
       n.client_id::text, n.alerts, n.rule_ids::text[], extract(epoch FROM n.created_at)::float8 AS created_at,
       n.truncated_alerts, n.group_rule_id::text
FROM leased l
JOIN notifications n ON n.notification_id = l.notification_id
LEFT JOIN endpoints e ON e.endpoint_id = l.endpoint_id
-- In the order leased: the dispatcher starts them so, and email queues for the relay's slots in it.
ORDER BY l.email_turn NULLS LAST, l.next_attempt_at
"""

_RELEASE = """
UPDATE deliveries d SET lease_until = NULL
FROM unnest($2::uuid[], $3::uuid[]) AS k(notification_id, endpoint_id)
WHERE d.notification_id = k.notification_id AND d.endpoint_id = k.endpoint_id AND d.leased_by = $1
"""

# Only a lease still held: the sweep renews what it listed a moment before, and a delivery handed
# back since (lease_until NULL, leased_by kept) would otherwise be leased again by a worker that no
# longer holds it, and wait out DELIVERY_LEASE_S before any sweep took it up.
# Never shortens a lease: a send's fence (_FENCE) may have made it longer than DELIVERY_LEASE_S.
_RENEW = """
UPDATE deliveries d SET lease_until = greatest(d.lease_until, now() + make_interval(secs => $2))
FROM unnest($3::uuid[], $4::uuid[]) AS k(notification_id, endpoint_id)
WHERE d.notification_id = k.notification_id AND d.endpoint_id = k.endpoint_id
  AND d.leased_by = $1 AND d.status = 'PENDING' AND d.lease_until IS NOT NULL
RETURNING d.notification_id::text, d.endpoint_id::text
"""

# Right before a send, its holder makes its lease cover the send (its timeout and the claim's
# margin: $4, per row), whatever DELIVERY_LEASE_S and the renewals say, and learns that the row is
# still its own: the rows returned. A row another worker leased since (the holder stalled past its
# lease), or one settled since, is not returned, and its send does not happen. Under the row's lock,
# so a sweep leasing the row and this fence are one after the other: either the sweep leased it
# first (this finds another holder) or it finds the lease running until after the send. Before,
# the Redis claim alone kept the two apart, and a Redis restarted empty (claims gone) while a
# stalled holder's lease ran out let both send. A lease already run out with nobody leasing it
# since is still the holder's: nobody else can have sent.
_FENCE = """
UPDATE deliveries d SET lease_until = greatest(d.lease_until, now() + make_interval(secs => k.cover_s))
FROM unnest($2::uuid[], $3::uuid[], $4::float8[]) AS k(notification_id, endpoint_id, cover_s)
WHERE d.notification_id = k.notification_id AND d.endpoint_id = k.endpoint_id
  AND d.leased_by = $1 AND d.status = 'PENDING' AND d.lease_until IS NOT NULL
RETURNING d.notification_id::text, d.endpoint_id::text
"""

# What happened ($1-$7: status, attempts, error, times; $10: the channel of the attempt, which
# follows the endpoint's type when the tenant changes it) is written whoever writes it: a SENT from
# any worker is the truth, and an attempt made was made. The attempt's channel becomes the row's
# only when it settles the row: a row still PENDING keeps the channel it has, its endpoint's type
# (`retype_waiting`), which the sweep leases it by (email in turn per tenant). An attempt that
# went by the old type while the tenant changed it wrote the old channel back, and the delivery
# waited for its retry among the wrong kind. The schedule and the lease (next attempt,
# release) belong to the row's holder ($11) alone: a worker whose lease ran out while it sent (the
# sweep gave the row to another, whose claim it then met) must not move the new holder's next
# attempt or drop its lease, or a third worker would lease the row while the second still holds it.
# So does FAILED, which ends the delivery: from a worker that no longer holds the row (its lease
# was taken over, or a tenant's retry reopened the row since: retry_failed clears the holder; or
# the recorder writing a batch again whose first commit was not acknowledged) it would end the
# attempts of whoever holds the row now, so it leaves the row PENDING; the attempt still counts.
# A PENDING without an error (a hand-back that met another attempt's claim: nothing was tried)
# keeps the last one: it is still why the delivery is not sent yet. A SENT clears it.
_WRITE = """
UPDATE deliveries d SET
    status = CASE WHEN c.status = 'FAILED' AND d.leased_by IS DISTINCT FROM $11 THEN d.status ELSE c.status END,
    attempts = d.attempts + c.attempts,
    last_error = CASE WHEN c.status = 'PENDING' THEN coalesce(c.last_error, d.last_error) ELSE c.last_error END,
    first_attempt_at = coalesce(d.first_attempt_at, to_timestamp(c.first_attempt_at)),
    last_attempt_at = coalesce(to_timestamp(c.last_attempt_at), d.last_attempt_at),
    next_attempt_at = CASE WHEN d.leased_by = $11 THEN coalesce(to_timestamp(c.next_attempt_at), d.next_attempt_at)
                           ELSE d.next_attempt_at END,
    lease_until = CASE WHEN c.release AND d.leased_by = $11 THEN NULL ELSE d.lease_until END,
    channel = CASE WHEN c.status = 'SENT' OR (c.status = 'FAILED' AND d.leased_by = $11)
                   THEN coalesce(c.channel, d.channel) ELSE d.channel END
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::float8[], $7::float8[],
            $8::float8[], $9::bool[], $10::text[])
    AS c(notification_id, endpoint_id, status, attempts, last_error, first_attempt_at, last_attempt_at,
         next_attempt_at, release, channel)
WHERE d.notification_id = c.notification_id AND d.endpoint_id = c.endpoint_id AND d.status = 'PENDING'
"""

# The notifications `write_outcomes` settles, locked in notification_id order (the order of the
# emitted mark and of _SETTLE) before the outcomes are written.
_LOCK_FOR_SETTLE = """
SELECT notification_id FROM notifications
WHERE notification_id = ANY($1::uuid[]) AND status = 'PENDING'
ORDER BY notification_id
FOR UPDATE
"""

# A notification is SENT when every delivery is, FAILED when every delivery is final and one
# failed, or when it has no delivery at all (no enabled endpoint on its rules). The rows are locked
# in notification_id order first, as aggregate's emitted mark locks them: two statements on the
# same rows that each locked them in their own plan's order deadlocked (tests/test_notification_lock_order.py).
_SETTLE = f"""
WITH locked AS ({_LOCK_FOR_SETTLE}), summary AS (
    SELECT n.notification_id,
           count(d.endpoint_id) AS total,
           count(*) FILTER (WHERE d.status = 'PENDING') AS pending,
           count(*) FILTER (WHERE d.status = 'FAILED') AS failed,
           string_agg(d.endpoint_id || ': ' || d.last_error, '; ' ORDER BY d.endpoint_id)
               FILTER (WHERE d.status = 'FAILED') AS reasons
    FROM locked n LEFT JOIN deliveries d ON d.notification_id = n.notification_id
    GROUP BY n.notification_id
)
UPDATE notifications n SET
    status = CASE WHEN s.total = 0 OR s.failed > 0 THEN 'FAILED' ELSE 'SENT' END,
    detail = CASE WHEN s.total = 0 THEN 'no enabled endpoint on the matched rules'
                  WHEN s.failed > 0 THEN s.failed || ' of ' || s.total || ' deliveries failed: ' || s.reasons
             END,
    updated_at = greatest(now(), n.created_at)
FROM summary s
WHERE n.notification_id = s.notification_id AND s.pending = 0
"""

# A tenant's retry of a FAILED notification (POST /api/v1/notifications/{id}/retry): its failed
# deliveries become PENDING and due now, with a fresh attempt budget, and nobody's lease; any
# worker's sweep takes them (and a late FAILED from an earlier holder cannot end them: _WRITE).
# The notification is locked first, as the recorder locks it, but FOR NO KEY UPDATE: a
# redelivered notifications.ready opening a delivery for an endpoint added since (_OPEN) holds the
# FAILED row (its ON CONFLICT) and then needs the notification's FOR KEY SHARE (the foreign key);
# FOR UPDATE would block that while waiting for the row: a deadlock. The recorder's FOR UPDATE
# still waits for this lock, and this one for it.
_LOCK_FOR_RETRY = f"""
SELECT status FROM notifications
WHERE notification_id = $1 AND ($2::uuid IS NULL OR client_id = $2) AND {OF_A_LIVE_CLIENT}
FOR NO KEY UPDATE
"""
# Only deliveries whose endpoint is still there and enabled: one deleted or disabled since would
# fail again at once, and the tenant would have been told 202 for nothing. Waiting again, a delivery
# takes its endpoint's type as its channel (the tenant may have changed it since: `retype_waiting`).
_REOPEN_FAILED = """
UPDATE deliveries d SET status = 'PENDING', attempts = 0, next_attempt_at = now(), leased_by = NULL,
                        lease_until = NULL, channel = e.type
FROM endpoints e
WHERE d.notification_id = $1 AND d.status = 'FAILED' AND e.endpoint_id = d.endpoint_id AND e.enabled
"""
_ANY_FAILED = "SELECT EXISTS (SELECT 1 FROM deliveries WHERE notification_id = $1 AND status = 'FAILED')"
_REOPEN_NOTIFICATION = """
UPDATE notifications SET status = 'PENDING', detail = NULL, updated_at = greatest(now(), created_at)
WHERE notification_id = $1
"""


class NotRetryable(Exception):
    """The notification is not FAILED, or failed with no delivery to try again; the message says which."""


async def retry_failed(conn: asyncpg.Connection, notification_id: str | UUID, client_id: str | UUID | None) -> bool:
    """Make a FAILED notification's failed deliveries due again; False if there is no such notification
    (of `client_id`, unless None). Raises NotRetryable when there is nothing to retry."""
    async with conn.transaction():
        status = await conn.fetchval(_LOCK_FOR_RETRY, notification_id, client_id)
        if status is None:
            return False
        if status != "FAILED":
            raise NotRetryable(f"the notification is {status}; only a FAILED one can be retried")
        reopened = int((await conn.execute(_REOPEN_FAILED, notification_id)).split()[-1])
        if not reopened:
            if await conn.fetchval(_ANY_FAILED, notification_id):
                raise NotRetryable("every endpoint this notification failed to reach has since been deleted "
                                   "or disabled")
            # Settled FAILED with no delivery at all: no enabled endpoint on its rules when it came.
            raise NotRetryable("no delivery of this notification failed: it had no enabled endpoint")
        await conn.execute(_REOPEN_NOTIFICATION, notification_id)
    return True


@dataclass
class DeliveryChange:
    """What to write for one delivery; `attempts` counts the attempts since the last write."""

    notification_id: str
    endpoint_id: str
    status: str  # PENDING (to be retried), SENT or FAILED
    attempts: int = 0
    last_error: str | None = None
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    next_attempt_at: float | None = None
    release: bool = False  # give the lease up: any worker may take the row when it is due
    channel: str | None = None  # the endpoint's type its attempt went by; None: no attempt, kept as it was


def _pairs(notifications: Iterable[NotificationReady]) -> tuple[list[str], list[str], list[str]]:
    notification_ids, client_ids, rule_ids = [], [], []
    for notification in notifications:
        for rule_id in notification.rule_ids:
            notification_ids.append(notification.notification_id)
            client_ids.append(notification.client_id)
            rule_ids.append(rule_id)
    return notification_ids, client_ids, rule_ids


# An endpoint's waiting deliveries take its type as their channel once a PATCH changed it
# (web/endpoints.py change_endpoint, after its commit): the sweep leases email by its rows'
# channel, in turn per tenant and within the worker's email room, the rest apart. Before, a
# webhook's delivery waiting when its endpoint became email was leased among the webhooks, after
# every email turn, and handed back by a worker whose email room was taken, until a storm of other
# tenants' email had drained; an email's delivery whose endpoint became a webhook waited for email
# room. The channel decides only when a row is leased: its send goes by the endpoint's type read as
# it is leased and again before the send (delivery/attempts.py), so a row retyped late is late,
# never sent by the wrong channel.
# In batches of RETYPE_BATCH_ROWS, each a short transaction of its own: done in the PATCH's
# transaction, 100,000 rows took 1.2-2 s and half a million would pass API_DATABASE_TIMEOUT_S, and
# the PATCH, locking them in its scan's order, deadlocked with a worker recording their outcomes.
# Rows another transaction holds (a recorder's write, a sweep's lease) are skipped, never waited
# for: a batch waits for no delivery's lock (only for its endpoint's, taken first: below), so it is
# in no deadlock. The recorder leaves a PENDING row the channel it has (_WRITE), so what was skipped
# is taken by a later pass; a row settled meanwhile has its attempt's channel and is no longer sought.
# The channel set is the endpoint's type as the batch reads it, not the PATCH's, and the batch reads
# it FOR SHARE, first, in its own statement (`_TYPE_NOW`), holding it until the batch commits. Read
# by the batch's UPDATE alone, the type was the one of the statement's start: a second change of type
# committed while a batch of the first one's ran (webhook -> email -> Slack), whose retyping read the
# email rows before that batch committed (finding none) and ended, left that whole batch email for
# good, since the first one's later batches seek only the rows that were not email. Under the lock a
# second change waits for the batch (one batch: 0.1 s of a non-email endpoint's with 200,000 other
# rows waiting, whose scan it reads; docs/delivery.md), so its retyping, started after it
# commits, finds that batch's rows; and a batch waiting for a change under way reads its new type.
# No deadlock: the lock is the transaction's first, and the batch then waits for no row (SKIP LOCKED).
# Each batch reads one partial index, from where the last one stopped (next_attempt_at, ties read
# again): the tenant's PENDING email (deliveries_email_client_idx), or every PENDING row that is not
# email (deliveries_other_due_idx: there is no index by endpoint, which would cost every delivery's
# insert a write), read only when the endpoint was not email.
RETYPE_BATCH_ROWS = 2_000
# Passes over the waiting rows, RETYPE_PASS_PAUSE_S apart, for the rows each found held by another
# transaction (held for milliseconds: a batch of outcomes, a lease): what is still left after the
# last is logged and is leased by its old channel once (late, not lost), taking its endpoint's type
# as it is leased (_LEASE_DUE).
RETYPE_PASSES = 10
RETYPE_PASS_PAUSE_S = 0.5

_WAITING_EMAIL = "d.client_id = $2 AND d.status = 'PENDING' AND d.channel = 'email' AND d.endpoint_id = $1"
# The other rows are found by their endpoint alone (their client_id is set on email only); the
# client ($2) is named here so that both kinds' statements take the same arguments.
_WAITING_OTHER = "d.status = 'PENDING' AND d.channel <> 'email' AND d.endpoint_id = $1 AND $2::uuid IS NOT NULL"
_MISTYPED = "d.channel <> (SELECT e.type FROM endpoints e WHERE e.endpoint_id = $1)"
_TYPE_NOW = "SELECT type FROM endpoints WHERE endpoint_id = $1 FOR SHARE"
# $5: the endpoint's type, read under _TYPE_NOW's lock in the same transaction.
_RETYPE_BATCH = """
WITH batch AS (
    SELECT d.notification_id, d.endpoint_id FROM deliveries d
    WHERE {waiting} AND d.channel <> $5 AND d.next_attempt_at >= coalesce($3::timestamptz, '-infinity')
    ORDER BY d.next_attempt_at
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d SET channel = $5
FROM batch b
WHERE d.notification_id = b.notification_id AND d.endpoint_id = b.endpoint_id
RETURNING d.next_attempt_at
"""
_LEFT = "SELECT count(*) FROM deliveries d WHERE {waiting} AND {mistyped}"


async def retype_waiting(pool: asyncpg.Pool, endpoint_id: UUID | str, client_id: UUID | str,
                         old_type: str) -> int:
    """Give the endpoint's PENDING deliveries its type as their channel, a batch at a time; return
    how many are left with another (0: all done), held by others through every pass."""
    waiting = _WAITING_EMAIL if old_type == "email" else _WAITING_OTHER
    batch = _RETYPE_BATCH.format(waiting=waiting)
    left_sql = _LEFT.format(waiting=waiting, mistyped=_MISTYPED)
    left = 0
    for pass_ in range(RETYPE_PASSES):
        if pass_:
            await asyncio.sleep(RETYPE_PASS_PAUSE_S)
        after = None
        while True:
            async with pool.acquire() as conn, conn.transaction():
                type_now = await conn.fetchval(_TYPE_NOW, endpoint_id)
                if type_now is None:
                    return 0  # deleted: its deliveries fail at their send, whatever their channel
                rows = await conn.fetch(batch, endpoint_id, client_id, after, RETYPE_BATCH_ROWS, type_now)
            if len(rows) < RETYPE_BATCH_ROWS:
                break
            after = max(row["next_attempt_at"] for row in rows)
        left = await pool.fetchval(left_sql, endpoint_id, client_id)
        if not left:
            return 0
    log.warning("%d waiting deliveries of endpoint %s keep their channel, held by others through %d passes: "
                "each is leased by that channel once, then takes its endpoint's type, which it is sent by", left,
                endpoint_id, RETYPE_PASSES)
    return left


_ENDPOINTS_NOW = """
SELECT endpoint_id::text, type, value, secret, rate_limit_per_s, enabled FROM endpoints
WHERE endpoint_id = ANY($1::uuid[])
"""


async def endpoints_now(conn: Conn, endpoint_ids: Sequence[str]) -> dict[str, Endpoint]:
    """These endpoints as they are now, by id; a deleted one is missing."""
    return {row["endpoint_id"]: _endpoint(row) for row in await conn.fetch(_ENDPOINTS_NOW, list(endpoint_ids))}


def _endpoint(row: asyncpg.Record) -> Endpoint | None:
    if row["type"] is None:
        return None
    return Endpoint(row["endpoint_id"], row["type"], row["value"], row["secret"], row["rate_limit_per_s"],
                    row["enabled"])


# Deliveries gone with their client: their row deleted with their notification, or their client
# being deleted (web/clients.py), its endpoints gone and its history soon (agents/retention.py
# finish_client_deletions). Retention deletes no other notification a worker may still hold.
_GONE = f"""
SELECT k.notification_id::text, k.endpoint_id::text
FROM unnest($1::uuid[], $2::uuid[]) AS k(notification_id, endpoint_id)
WHERE NOT EXISTS (SELECT 1 FROM deliveries d JOIN notifications USING (notification_id)
                  WHERE d.notification_id = k.notification_id AND d.endpoint_id = k.endpoint_id
                    AND {OF_A_LIVE_CLIENT})
"""


async def gone(conn: Conn, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of these deliveries (notification_id, endpoint_id) gone with their client (`_GONE`)."""
    rows = await conn.fetch(_GONE, [key[0] for key in keys], [key[1] for key in keys])
    return {(row[0], row[1]) for row in rows}


async def known_notifications(conn: Conn, notifications: Sequence[NotificationReady]) -> dict[tuple[str, str], str]:
    """(notification_id, client_id) -> status, of those of `notifications` that are in Postgres for
    their client, a client not being deleted."""
    rows = await conn.fetch(_KNOWN, [n.notification_id for n in notifications], [n.client_id for n in notifications])
    return {(row[0], row[1]): row[2] for row in rows}


async def open_deliveries(conn: Conn, notifications: Sequence[NotificationReady], owner: str | None,
                          lease_s: float, unleased_endpoints: Sequence[str],
                          unleased_clients: Sequence[str] = (), unleased_email: bool = False) -> list[DeliveryJob]:
    """Open a PENDING row per endpoint to deliver to; return the jobs now leased to `owner` (none of
    `unleased_endpoints`, of `unleased_clients`, nor with `unleased_email` any email)."""
    by_id = {n.notification_id: n for n in notifications}
    rows = await conn.fetch(_OPEN, *_pairs(notifications), owner, list(unleased_endpoints), lease_s,
                            list(unleased_clients), unleased_email)
    return [DeliveryJob(by_id[row["notification_id"]], row["endpoint_id"], _endpoint(row), row["attempts"],
                        row["resumed"]) for row in rows]


async def lease_due(conn: Conn, owner: str, lease_s: float, held: Mapping[str, int], backlog: int,
                    limit: int, held_by_client: Mapping[str, int] | None = None,
                    client_backlog: int = 2**31 - 1, email_room: int | None = None) -> list[DeliveryJob]:
    """Lease up to `limit` due rows nobody holds, at most `backlog - held[endpoint]` of an endpoint
    and `client_backlog - held_by_client[client]` of a client, and no more than `email_room` email
    (None: `limit`), taken round-robin per client."""
    held_by_client = held_by_client or {}
    email_room = limit if email_room is None else min(email_room, limit)
    rows = await conn.fetch(_LEASE_DUE, owner, lease_s, list(held), list(held.values()), backlog, limit,
                            limit * _CANDIDATES_PER_LEASE, list(held_by_client), list(held_by_client.values()),
                            client_backlog, email_room)
    jobs, unreadable = [], []
    for row in rows:
        try:
            notification = _stored_notification(row)
        except Exception as exc:  # whatever a row edited by hand holds: it must not stop the others
            unreadable.append(DeliveryChange(row["notification_id"], row["endpoint_id"], "FAILED",
                                             last_error=f"the stored notification cannot be read: {exc}"[:1000]))
            continue
        jobs.append(DeliveryJob(notification, row["endpoint_id"], _endpoint(row), row["attempts"], row["resumed"]))
    if unreadable:
        # Leased above, so without this they would come back every sweep, after every lease ran out,
        # and fail the whole sweep again: the oldest due rows are leased first, and these stay oldest.
        log.error("failing %d deliveries whose stored notification cannot be read (first: %s)",
                  len(unreadable), unreadable[0].last_error)
        await write_outcomes(conn, owner, unreadable)
    return jobs


def _stored_notification(row: asyncpg.Record) -> NotificationReady:
    return NotificationReady(
        notification_id=row["notification_id"], client_id=row["client_id"],
        alerts=[Alert.from_stored(alert) for alert in row["alerts"]], rule_ids=row["rule_ids"],
        created_at=row["created_at"], truncated_alerts=row["truncated_alerts"],
        group_rule_id=row["group_rule_id"],
    )


async def release(conn: Conn, owner: str, keys: Sequence[tuple[str, str]]) -> None:
    if keys:
        await conn.execute(_RELEASE, owner, [k[0] for k in keys], [k[1] for k in keys])


async def renew_leases(conn: Conn, owner: str, lease_s: float,
                       keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Renew `owner`'s leases of `keys`; return those renewed (not one handed back, taken over or settled)."""
    if not keys:
        return set()
    rows = await conn.fetch(_RENEW, owner, lease_s, [k[0] for k in keys], [k[1] for k in keys])
    return {(row[0], row[1]) for row in rows}


async def fence_sends(conn: Conn, owner: str, sends: Sequence[tuple[tuple[str, str], float]]) -> set[tuple[str, str]]:
    """Of these deliveries ((notification_id, endpoint_id), seconds their send needs), those `owner`
    still holds, their leases now covering their sends (`_FENCE`)."""
    rows = await conn.fetch(_FENCE, owner, [key[0] for key, _ in sends], [key[1] for key, _ in sends],
                            [cover_s for _, cover_s in sends])
    return {(row[0], row[1]) for row in rows}


async def write_changes(conn: Conn, owner: str, changes: Sequence[DeliveryChange]) -> None:
    """Write `changes` as `owner` wrote them: their schedule and lease only where `owner` holds the row."""
    columns = ("notification_id", "endpoint_id", "status", "attempts", "last_error", "first_attempt_at",
               "last_attempt_at", "next_attempt_at", "release", "channel")
    await conn.execute(_WRITE, *([getattr(change, column) for change in changes] for column in columns), owner)


async def settle_notifications(conn: Conn, notification_ids: Sequence[str]) -> None:
    if notification_ids:
        await conn.execute(_SETTLE, list(notification_ids))


async def write_outcomes(conn: Conn, owner: str, changes: Sequence[DeliveryChange]) -> None:
    """Write a batch of `owner`'s outcomes and settle the notifications they finish, in one transaction.

    The notifications of final outcomes are locked first, in a statement of their own. In READ
    COMMITTED each statement sees what was committed when it started: a settle that first waited
    for another worker's lock on the notification would judge its deliveries as of before that
    wait, so two workers finishing a notification's last two deliveries at once would each see the
    other's PENDING and leave it PENDING for good. Taking the locks first makes the write and the
    settle start after the other worker committed.
    """
    settling = sorted({change.notification_id for change in changes if change.status != "PENDING"})
    async with db.connection_of(conn) as conn, conn.transaction():
        if settling:
            await conn.execute(_LOCK_FOR_SETTLE, settling)
        await write_changes(conn, owner, changes)
        await settle_notifications(conn, settling)
