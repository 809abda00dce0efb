"""aggregate: one notification per (client_id, alert_id), however often the alert is matched.

The Postgres unique constraint on (client_id, alert_id) is the durable boundary: only the first
insert emits `notifications.ready`. The row is marked `emitted` once the broker acknowledged the
message; a row left unemitted (the worker died in between) is emitted again, with the same
notification_id, when its `alerts.matched` message is redelivered.

Issue 5 (docs/grouping.md): silenced, repeat-checked and grouped matches need more state; they
are recorded by agents/match_outcomes.py, and groups are closed by agents/close_groups.py. Matches
with none of these take the plain path above.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
from faust.types import EventT, StreamT

from agents.match_outcomes import (groups_lock, lock_clients_shared_reading_deletions, needs_state, record_stateful,
                                   unknown_client)
from alerting_app import db, metrics
from alerting_app.db import REFUSED_BY_POSTGRES
from alerting_app.app import alerts_matched, app, notifications_ready
from alerting_app.contracts import Alert, AlertMatched, DeadLetter, NotificationReady
from alerting_app.dead_letters import UndecodableMessage, dead_letter_for, decode, require_uuids, send_dead_letters
from alerting_app.deleted_clients import deleted_clients, dropped
from alerting_app.sending import send_batched

log = logging.getLogger(__name__)

MATCH_BATCH_SIZE = 1000
MATCH_BATCH_WITHIN_S = 0.05

# A notification's created_at is the worker's clock; its updated_at starts from the same value and
# never goes below it (greatest(now(), created_at) when it changes): Postgres's now(), the start of
# its transaction on another clock, was up to milliseconds (or the clocks' skew) earlier, and a row
# read as updated before it was created.
_INSERT_NOTIFICATION = """
INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, updated_at)
SELECT $1, $2, $3, $4, $5, to_timestamp($6), to_timestamp($6)
WHERE NOT EXISTS (SELECT 1 FROM notification_alerts a WHERE a.client_id = $2 AND a.alert_id = $3)
ON CONFLICT (client_id, alert_id) DO NOTHING
RETURNING notification_id
"""

# One statement for a whole batch: per-row round trips to Postgres were the aggregate stage's cost.
# Arrays of text, cast in SQL, because asyncpg has no codec for arrays of arrays (rule_ids).
_INSERT_NOTIFICATIONS = """
INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, updated_at)
SELECT n.notification_id, n.client_id, n.alert_id, n.alerts::jsonb, n.rule_ids::uuid[],
       to_timestamp(n.created_at), to_timestamp(n.created_at)
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::float8[])
    AS n(notification_id, client_id, alert_id, alerts, rule_ids, created_at)
-- An alert that joined a group is notified by its group (tables/groups.py), not again at once.
WHERE NOT EXISTS (SELECT 1 FROM notification_alerts a WHERE a.client_id = n.client_id AND a.alert_id = n.alert_id)
ON CONFLICT (client_id, alert_id) DO NOTHING
RETURNING notification_id::text
"""

# The rows of matches that were not inserted (seen before) and not yet emitted, by the match's position.
_UNEMITTED_NOTIFICATIONS = """
SELECT m.position, x.notification_id::text, x.alerts, x.rule_ids::text[],
       extract(epoch FROM x.created_at)::float8 AS created_at
FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS m(client_id, alert_id, position)
JOIN notifications x ON x.client_id = m.client_id AND x.alert_id = m.alert_id
WHERE NOT x.emitted AND x.group_rule_id IS NULL  -- a group's notification is the closer's to emit
"""

_EXISTING_NOTIFICATION = """
SELECT notification_id, alerts, rule_ids, extract(epoch FROM created_at)::float8 AS created_at,
       emitted OR group_rule_id IS NOT NULL AS emitted
FROM notifications WHERE client_id = $1 AND alert_id = $2
"""


def decode_matched(raw: bytes | None) -> AlertMatched:
    """Decode an `alerts.matched` message whose ids fit the notifications table (UUIDs)."""
    matched = decode(AlertMatched, raw)
    require_uuids(client_id=[matched.client_id], rule_ids=matched.rule_ids)
    if matched.group_rule_id is not None:
        require_uuids(group_rule_id=[matched.group_rule_id])
    if matched.silenced_by is not None:
        require_uuids(silenced_by=[matched.silenced_by])
    return matched


class ClientsBeingDeleted(Exception):
    """Matches of clients being deleted (web/clients.py) were handed to the plain path, which then
    recorded nothing: their row stays for their history's sake, so the foreign key lets such a match
    through, and only this tells it apart. They are dropped like those of a client gone
    (drop_matches_of_deleted_clients), not recorded; a client marked between this check and the
    insert gets a notification nothing delivers (agents/deliver.py leaves its clients out) and
    its history's deletion takes it."""

    def __init__(self, client_ids: set[str]) -> None:
        super().__init__(f"clients being deleted: {', '.join(sorted(client_ids))}")
        self.client_ids = client_ids


@asynccontextmanager
async def under_client_locks(conn: asyncpg.Connection | asyncpg.Pool,
                             client_ids: Iterable[str]) -> AsyncIterator[asyncpg.Connection]:
    """A transaction holding these clients' locks shared (agents/match_outcomes.py `_LOCK_CLIENTS`);
    raises ClientsBeingDeleted, having written nothing, if some of them are being deleted.

    Without the locks, during a rebalance overlap, one worker could notify an alert at once while the
    other, recording it as a group's member, did not see that uncommitted row: the alert notified
    twice, and if it was the group's first, the group's notification refused as its duplicate.
    """
    async with AsyncExitStack() as stack:
        conn = await stack.enter_async_context(db.connection_of(conn))
        await stack.enter_async_context(conn.transaction())
        # A statement of its own: the insert's snapshot must be taken once the lock is held, so that
        # it sees what a stateful batch holding the lock committed.
        if being_deleted := await lock_clients_shared_reading_deletions(conn, client_ids):
            raise ClientsBeingDeleted(being_deleted)
        yield conn


async def record_first_match(conn: asyncpg.Connection | asyncpg.Pool,
                             matched: AlertMatched) -> NotificationReady | None:
    """The notification to emit for this match, or None when it was emitted already.

    `conn` must come from `db.pool()` (jsonb codec installed).
    """
    async with under_client_locks(conn, [matched.client_id]) as locked:
        return await _record_first_match(locked, matched)


async def _record_first_match(conn: asyncpg.Connection, matched: AlertMatched) -> NotificationReady | None:
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
    return rebuilt_from_row(row, ready)


def rebuilt_from_row(row: asyncpg.Record, built_here: NotificationReady) -> NotificationReady:
    """A notification inserted earlier and never emitted, rebuilt from its row, not from this
    message, so that the retry is the very notification first built.

    `built_here` (what this match would have inserted) fills in a row that cannot be read (edited by
    hand: no alerts, an alert without a severity): raising would fail its batch at every redelivery
    and stop the partition for good.
    """
    try:
        return NotificationReady(notification_id=str(row["notification_id"]), client_id=built_here.client_id,
                                 alerts=[Alert.from_stored(alert) for alert in row["alerts"]],
                                 rule_ids=[str(rule_id) for rule_id in row["rule_ids"]],
                                 created_at=row["created_at"])
    except Exception as exc:
        log.error("notification %s: its row cannot be read (%s); emitted with this match's alert and rules",
                  row["notification_id"], exc)
        return built_here.model_copy(update={"notification_id": str(row["notification_id"]),
                                             "created_at": row["created_at"]})


async def record_first_matches(conn: asyncpg.Connection | asyncpg.Pool,
                               matches: list[AlertMatched]) -> list[NotificationReady]:
    """`record_first_match` for a whole batch, in two statements: the notifications to emit, in order.

    A match repeated within the batch gives one notification. Raises ForeignKeyViolationError
    (inserting nothing) when a match names an unknown client.
    """
    async with under_client_locks(conn, [matched.client_id for matched in matches]) as locked:
        return await _record_first_matches(locked, matches)


async def _record_first_matches(conn: asyncpg.Connection, matches: list[AlertMatched]) -> list[NotificationReady]:
    created_at = round(time.time(), 6)  # microseconds, as Postgres stores it (see record_first_match)
    firsts: dict[tuple[str, str], NotificationReady] = {}
    for matched in matches:
        firsts.setdefault((matched.client_id, matched.alert.alert_id), NotificationReady(
            client_id=matched.client_id, alerts=[matched.alert], rule_ids=matched.rule_ids,
            created_at=created_at))
    candidates = list(firsts.values())
    # Inserted in key order: two workers inserting the same keys (a partition handed over during a
    # rebalance) then wait for each other instead of deadlocking on each other's rows.
    in_key_order = sorted(candidates, key=lambda ready: (ready.client_id, ready.alerts[0].alert_id))
    inserted = {row[0] for row in await conn.fetch(
        _INSERT_NOTIFICATIONS,
        [ready.notification_id for ready in in_key_order],
        [ready.client_id for ready in in_key_order],
        [ready.alerts[0].alert_id for ready in in_key_order],
        ["[" + ready.alerts[0].model_dump_json() + "]" for ready in in_key_order],
        # UUIDs (checked by decode_matched), so the array literal needs no quoting.
        ["{" + ",".join(ready.rule_ids) + "}" for ready in in_key_order],
        [created_at] * len(in_key_order),
    )}
    seen_before = [(position, ready) for position, ready in enumerate(candidates, 1)
                   if ready.notification_id not in inserted]
    unemitted: dict[int, NotificationReady] = {}  # by position in `candidates`
    if seen_before:
        rows = await conn.fetch(_UNEMITTED_NOTIFICATIONS, [ready.client_id for _, ready in seen_before],
                                [ready.alerts[0].alert_id for _, ready in seen_before])
        for row in rows:
            # The row's position is within `seen_before`, not within `candidates`.
            position, match = seen_before[row["position"] - 1]
            unemitted[position] = rebuilt_from_row(row, match)
    to_emit: dict[str, NotificationReady] = {}
    for position, ready in enumerate(candidates, 1):
        if ready.notification_id in inserted:
            to_emit[ready.notification_id] = ready
        elif position in unemitted:
            # A match repeated within the batch finds the same row: emit it once.
            to_emit.setdefault(unemitted[position].notification_id, unemitted[position])
    return list(to_emit.values())


async def unemitted_notifications(conn: asyncpg.Connection | asyncpg.Pool,
                                  matches: list[AlertMatched]) -> list[NotificationReady]:
    """The notifications of these matches, notified at once earlier, that were never emitted."""
    rows = await conn.fetch(_UNEMITTED_NOTIFICATIONS, [m.client_id for m in matches],
                            [m.alert.alert_id for m in matches])
    found = {}
    for row in rows:
        if row["notification_id"] not in found:
            match = matches[row["position"] - 1]
            found[row["notification_id"]] = rebuilt_from_row(row, NotificationReady(
                client_id=match.client_id, alerts=[match.alert], rule_ids=match.rule_ids))
    return list(found.values())


# Rows locked in notification_id order, as every statement that updates many notifications does
# (records._SETTLE): two of them on the same rows then wait for each other instead of deadlocking.
_MARK_EMITTED = """
WITH locked AS (
    SELECT notification_id FROM notifications
    WHERE notification_id = ANY($1::uuid[]) AND NOT emitted
    ORDER BY notification_id
    FOR UPDATE
)
UPDATE notifications n SET emitted = true, updated_at = greatest(now(), n.created_at)
FROM locked WHERE n.notification_id = locked.notification_id
"""


async def mark_emitted(conn: asyncpg.Connection | asyncpg.Pool, notification_ids: list[str]) -> None:
    await conn.execute(_MARK_EMITTED, notification_ids)


@dataclass(frozen=True)
class Aggregation:
    """What one batch of `alerts.matched` messages produced."""

    ready: list[NotificationReady] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Matches naming a client Postgres does not have: dropped if it was deleted, else dead letters
    # (record_matches, at the end).
    unknown_clients: list[tuple[EventT, AlertMatched]] = field(default_factory=list)


async def aggregate_batch(conn: asyncpg.Pool, events: Iterable[EventT]) -> Aggregation:
    """Record the batch's matches; collect the notifications to emit and the dead letters."""
    aggregation = Aggregation()
    decoded: list[tuple[EventT, AlertMatched]] = []
    for event in events:
        try:
            decoded.append((event, decode_matched(event.message.value)))
        except UndecodableMessage as exc:
            aggregation.dead_letters.append(dead_letter_for(event.message, str(exc)))
    await record_matches(conn, decoded, aggregation)
    return aggregation


async def record_matches(conn: asyncpg.Pool, decoded: list[tuple[EventT, AlertMatched]],
                         aggregation: Aggregation) -> None:
    """Record decoded matches into `aggregation`: its notifications in input order, its dead letters."""
    # Most matches take the plain path; silenced, grouped and repeat-checked
    # ones need the aggregate state (record_stateful).
    stateful_paths = [needs_state(matched) for _, matched in decoded]
    if any(stateful_paths):
        # An alert takes the path of its first match in the batch. The plain path runs first, so a
        # later match of an alert first silenced or grouped (sent again once the silence ended, or
        # the rule changed) would otherwise be notified before the first one's fate was recorded.
        first_path: dict[tuple[str, str], bool] = {}
        for (_, matched), stateful_path in zip(decoded, stateful_paths):
            first_path.setdefault((matched.client_id, matched.alert.alert_id), stateful_path)
        stateful_paths = [first_path[(matched.client_id, matched.alert.alert_id)] for _, matched in decoded]
    plain = [pair for pair, stateful_path in zip(decoded, stateful_paths) if not stateful_path]
    stateful = [pair for pair, stateful_path in zip(decoded, stateful_paths) if stateful_path]
    while plain:
        try:
            aggregation.ready.extend(await record_first_matches(conn, [matched for _, matched in plain]))
        except ClientsBeingDeleted as exc:
            # Dropped at the end (drop_matches_of_deleted_clients); the others are recorded again.
            aggregation.unknown_clients.extend(pair for pair in plain if pair[1].client_id in exc.client_ids)
            plain = [pair for pair in plain if pair[1].client_id not in exc.client_ids]
            continue
        except (asyncpg.ForeignKeyViolationError, *REFUSED_BY_POSTGRES):
            # Some match names an unknown client, or holds what Postgres refuses, and the batch
            # statement inserted nothing: record the matches one by one, so only that one becomes a
            # dead letter.
            await record_one_by_one(conn, plain, aggregation)
        break
    if stateful:
        async with groups_lock:
            seen_before = await record_stateful_isolating(conn, stateful, aggregation)
            if seen_before:
                # Notified at once before, possibly never emitted (the worker died in between).
                emitted = {ready.notification_id for ready in aggregation.ready}
                for ready in await unemitted_notifications(conn, seen_before):
                    if ready.notification_id not in emitted:
                        aggregation.ready.append(ready)
    # The two paths above ran one after the other; notifications.ready must still carry each
    # client's notifications in the order of their matches (docs/architecture.md). The plain path
    # alone keeps that order already.
    if stateful:
        aggregation.ready.sort(key=input_order([matched for _, matched in decoded]))
    await drop_matches_of_deleted_clients(conn, aggregation)


async def drop_matches_of_deleted_clients(conn: asyncpg.Pool, aggregation: Aggregation) -> None:
    """Drop the matches of clients deleted while they were in flight (alerting_app/deleted_clients.py);
    the other matches naming an unknown client become dead letters."""
    unknown = list(aggregation.unknown_clients)
    aggregation.unknown_clients.clear()
    if not unknown:
        return
    deleted = await deleted_clients(conn, [(matched.client_id, matched.rule_ids) for _, matched in unknown])
    dropped("alerts.matched", [matched.client_id for _, matched in unknown if matched.client_id in deleted])
    aggregation.dead_letters.extend(dead_letter_for(event.message, unknown_client(matched.client_id))
                                    for event, matched in unknown if matched.client_id not in deleted)


def input_order(matches: list[AlertMatched]) -> Callable[[NotificationReady], int]:
    """A sort key putting each notification at the position of its match's first occurrence.

    (A closed group's notification found never emitted is not among them: record_stateful emits
    it before anything of this batch, as its alerts arrived first.)
    """
    positions: dict[tuple[str, str], int] = {}
    for position, matched in enumerate(matches):
        positions.setdefault((matched.client_id, matched.alert.alert_id), position)

    def position_of(ready: NotificationReady) -> int:
        return positions.get((ready.client_id, ready.alerts[0].alert_id), -1)
    return position_of


def refused_reason(exc: Exception) -> str:
    return f"refused by Postgres: {type(exc).__name__}: {exc}"


def refused(aggregation: Aggregation, event: EventT, matched: AlertMatched, exc: Exception) -> None:
    """A match recorded on its own that Postgres refused: its client is unknown (or was deleted
    meanwhile: judged at the end of the batch), or it holds what Postgres cannot store."""
    if isinstance(exc, (asyncpg.ForeignKeyViolationError, ClientsBeingDeleted)):
        aggregation.unknown_clients.append((event, matched))
    else:
        aggregation.dead_letters.append(dead_letter_for(event.message, refused_reason(exc)))


async def record_one_by_one(conn: asyncpg.Pool, decoded: list[tuple[EventT, AlertMatched]],
                            aggregation: Aggregation) -> None:
    to_emit: set[str] = set()
    for event, matched in decoded:
        try:
            ready = await record_first_match(conn, matched)
        except (asyncpg.ForeignKeyViolationError, ClientsBeingDeleted, *REFUSED_BY_POSTGRES) as exc:
            refused(aggregation, event, matched, exc)
            continue
        # A match redelivered within the batch finds the row still unemitted: emit it once.
        if ready is not None and ready.notification_id not in to_emit:
            to_emit.add(ready.notification_id)
            aggregation.ready.append(ready)


async def record_stateful_isolating(conn: asyncpg.Pool, decoded: list[tuple[EventT, AlertMatched]],
                                    aggregation: Aggregation) -> list[AlertMatched]:
    """`record_stateful` for the batch; if Postgres refuses some match, for each match on its own,
    so that only the refused ones become dead letters. Runs under `groups_lock`.

    Safe to repeat: record_stateful writes Postgres in one transaction, which a refusal rolls back,
    and the groups table only after it; a batch of one is what a quiet partition gives anyway.
    """
    try:
        return await _record_stateful_or_nothing(conn, decoded, aggregation)
    except (asyncpg.ForeignKeyViolationError, *REFUSED_BY_POSTGRES):
        # A refusal, or a client deleted after record_stateful checked it was known.
        log.warning("Postgres refused a batch of %d stateful matches; recording them one by one", len(decoded))
    seen_before: list[AlertMatched] = []
    for event, matched in decoded:
        try:
            seen_before.extend(await _record_stateful_or_nothing(conn, [(event, matched)], aggregation))
        except (asyncpg.ForeignKeyViolationError, *REFUSED_BY_POSTGRES) as exc:
            refused(aggregation, event, matched, exc)
    return seen_before


async def _record_stateful_or_nothing(conn: asyncpg.Pool, decoded: list[tuple[EventT, AlertMatched]],
                                      aggregation: Aggregation) -> list[AlertMatched]:
    """`record_stateful`, adding its notifications and dead letters to `aggregation` only if it succeeds."""
    attempt = Aggregation()
    seen_before = await record_stateful(conn, decoded, attempt, emit_now)
    aggregation.ready.extend(attempt.ready)
    aggregation.dead_letters.extend(attempt.dead_letters)
    aggregation.unknown_clients.extend(attempt.unknown_clients)
    return seen_before


async def emit_now(ready: list[NotificationReady], dead_letters: list[DeadLetter]) -> None:
    """Emit before the batch's own notifications (groups closed early, or closed and never emitted:
    record_stateful)."""
    await publish_aggregation(Aggregation(ready=ready, dead_letters=dead_letters))


async def publish_aggregation(aggregation: Aggregation) -> None:
    pending = await send_batched(notifications_ready,
                                 ((ready.client_id.encode(), ready.encode()) for ready in aggregation.ready))
    # Acknowledged by the broker before the batch is: a refused letter fails the sink, and the batch
    # stays unacknowledged rather than losing the message.
    await send_dead_letters(aggregation.dead_letters)
    # Marked emitted only once the broker holds them; a crash before leaves them to be re-emitted.
    await asyncio.gather(*pending)
    if aggregation.ready:
        emitted = [ready.notification_id for ready in aggregation.ready]
        await db.retry_transient(lambda pool: mark_emitted(pool, emitted), "marking notifications emitted")
        metrics.notifications_emitted.inc(len(aggregation.ready))


@app.agent(alerts_matched, sink=[publish_aggregation])
async def aggregate_matches(stream: StreamT) -> AsyncIterator[Aggregation]:
    """Matches to notifications, once per client and alert: at once, grouped, suppressed or silenced."""
    async for events in stream.take_events(MATCH_BATCH_SIZE, within=MATCH_BATCH_WITHIN_S):
        # The sink runs before the generator resumes: the time covers recording and sending.
        with metrics.stage_seconds.labels(stage="aggregate_batch").time():
            yield await db.retry_transient(lambda pool: aggregate_batch(pool, events), "aggregating a batch of matches")

