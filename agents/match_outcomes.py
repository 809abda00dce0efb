"""The matches of the aggregate stage that need state: silenced, suppressed, or joining a group.

Issue 5 (docs/grouping.md): a silenced match is recorded SILENCED and a repeat of a fingerprint
notified within its rule's repeat interval SUPPRESSED, neither emitted; a match of a grouping rule
joins its group (tables/groups.py), which the closer (agents/close_groups.py) emits as one
notification when the window has passed. The agent (agents/aggregate.py) sends the matches with
none of these down its plain path and the others here, in batches.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
from faust.types import EventT

from alerting_app import metrics
from alerting_app.app import settings
from alerting_app.contracts import MAX_REPEAT_INTERVAL_S, AlertMatched, DeadLetter, NotificationReady
from alerting_app.dead_letters import dead_letter_for
from alerting_app.silencing import SilenceIndex, active_silences
from tables import group_records, groups

if TYPE_CHECKING:
    from agents.aggregate import Aggregation  # only a type here: agents.aggregate imports this module


def is_grouped(matched: AlertMatched) -> bool:
    return matched.group_window_s > 0 and matched.group_rule_id is not None


def is_repeat_checked(matched: AlertMatched) -> bool:
    return matched.repeat_interval_s > 0 and matched.fingerprint is not None


def needs_state(matched: AlertMatched) -> bool:
    """Whether a match needs more than the plain path: silenced, grouped or repeat-checked."""
    return matched.silenced_by is not None or is_grouped(matched) or is_repeat_checked(matched)


# Serialises the agent's stateful batches with the closer: a group is never joined while it closes.
groups_lock = asyncio.Lock()
# Groups this worker has closed whose key may still be in the table (see tables/groups.py).
closed_here: set[str] = set()

# A client being deleted (web/clients.py) is not known: nothing new is recorded for it, and its
# matches are dropped (alerting_app/deleted_clients.py).
_KNOWN_CLIENTS = "SELECT client_id::text FROM clients WHERE client_id = ANY($1::uuid[]) AND deleting_since IS NULL"

# Two workers may record the same client at once (a rebalance overlap: the partition's old owner
# finishing a batch while its new owner starts), and `groups_lock` serialises one worker only. Each
# takes this transaction lock per client before reading what is recorded and notified, so the
# second reads what the first wrote: a repeat it would otherwise notify too is suppressed.
# The two-int form of the key: the other advisory locks of the codebase (migrate, rule_outbox)
# take the one-bigint form, which Postgres keeps apart, so no key here can collide with theirs.
# The array is locked in its order, which lock_clients sorts: two workers never deadlock.
_CLIENT_LOCK_CLASS = 0x61676772  # "aggr"
_LOCK_CLIENTS = "SELECT pg_advisory_xact_lock($1::int4, key) FROM unnest($2::int4[]) AS key"
# The plain path (agents/aggregate.py) takes the same locks shared: plain batches never wait for
# each other, but a stateful batch and a plain one of the same client take turns, so an alert is
# never notified at once by one worker while another adds it to a group.
_LOCK_CLIENTS_SHARED = "SELECT pg_advisory_xact_lock_shared($1::int4, key) FROM unnest($2::int4[]) AS key"
# The same, and in the same round trip, which of the clients ($3) are being deleted (web/clients.py):
# the plain path records nothing for them, and a look-up of its own cost every batch a round trip.
# Both subqueries are output, so both run; the deletion mark is read as the statement began, as a
# look-up before the lock would read it (a client marked meanwhile: agents/aggregate.py says why it
# does no harm).
_LOCK_CLIENTS_SHARED_READING_DELETIONS = """
SELECT (SELECT count(pg_advisory_xact_lock_shared($1::int4, key)) FROM unnest($2::int4[]) AS key) AS locked,
       array(SELECT client_id::text FROM clients
             WHERE client_id = ANY($3::uuid[]) AND deleting_since IS NOT NULL) AS being_deleted
"""


def client_lock_key(client_id: str) -> int:
    """The int4 advisory lock key of a client: 32 random bits of its UUID (two clients sharing a key
    only wait for each other)."""
    return int.from_bytes(uuid.UUID(client_id).bytes[-4:], "big", signed=True)


async def lock_clients(conn: asyncpg.Connection, client_ids: Iterable[str], *, shared: bool = False) -> None:
    """Hold these clients' advisory locks until the transaction of `conn` ends, taken in key order;
    `shared`: held with other shared holders, never with an exclusive one."""
    await conn.execute(_LOCK_CLIENTS_SHARED if shared else _LOCK_CLIENTS, _CLIENT_LOCK_CLASS,
                       sorted({client_lock_key(c) for c in client_ids}))


async def lock_clients_shared_reading_deletions(conn: asyncpg.Connection, client_ids: Iterable[str]) -> set[str]:
    """`lock_clients(shared=True)`; return those of the clients that are being deleted."""
    client_ids = set(client_ids)
    row = await conn.fetchrow(_LOCK_CLIENTS_SHARED_READING_DELETIONS, _CLIENT_LOCK_CLASS,
                              sorted({client_lock_key(c) for c in client_ids}), list(client_ids))
    return set(row["being_deleted"])

# What is recorded already for each match: the group it joined (and whether that group is closed),
# or its own notification row.
_RECORDED = """
SELECT b.position, a.notification_id::text AS member_of,
       EXISTS (SELECT 1 FROM notifications g WHERE g.notification_id = a.notification_id) AS member_closed,
       n.notification_id IS NOT NULL AS notified
FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS b(client_id, alert_id, position)
LEFT JOIN notification_alerts a ON a.client_id = b.client_id AND a.alert_id = b.alert_id
LEFT JOIN notifications n ON n.client_id = b.client_id AND n.alert_id = b.alert_id
"""

# `final`: whether that notification is final (migrations/018): made at once or notified at close, or
# a member of a group since closed (a member a silence muted at close had its time taken back then);
# not a member of a group still open, which a silence may yet mute, nor one a release before 018
# recorded (`notified_as_of` left behind). A grouped match joining after it keeps its time, and
# whether it is final, should a silence mute it at close (tables/group_records.py revive_repeats).
_LAST_NOTIFIED = """
SELECT f.client_id::text, f.fingerprint, extract(epoch FROM f.last_notified_at)::float8,
       coalesce(f.notified_as_of = f.last_notified_at
                AND (f.notified_in_group IS NULL
                     OR EXISTS (SELECT 1 FROM notifications n WHERE n.notification_id = f.notified_in_group)),
                false) AS final
FROM fingerprints f JOIN unnest($1::uuid[], $2::text[]) AS b(client_id, fingerprint)
    ON f.client_id = b.client_id AND f.fingerprint = b.fingerprint
"""

# `notified_in_group` (migrations/018): the group a member joined, NULL for a notification made at
# once; it and `notified_as_of` describe the notification last_notified_at records, so they change
# only with it.
_REMEMBER_NOTIFIED = """
INSERT INTO fingerprints AS f (client_id, fingerprint, last_notified_at, notified_in_group, notified_as_of)
SELECT client_id, fingerprint, to_timestamp(at), notified_in_group, to_timestamp(at)
FROM unnest($1::uuid[], $2::text[], $3::float8[], $4::uuid[]) AS b(client_id, fingerprint, at, notified_in_group)
ON CONFLICT (client_id, fingerprint) DO UPDATE
    -- Never back in time: two workers (a rebalance overlap) or a clock stepped back must not make a
    -- fingerprint look notified earlier than it was, which would let a repeat through.
    SET last_notified_at = GREATEST(f.last_notified_at, EXCLUDED.last_notified_at),
        notified_in_group = CASE WHEN EXCLUDED.last_notified_at > f.last_notified_at
                                 THEN EXCLUDED.notified_in_group ELSE f.notified_in_group END,
        notified_as_of = CASE WHEN EXCLUDED.last_notified_at > f.last_notified_at
                              THEN EXCLUDED.notified_as_of ELSE f.notified_as_of END
"""

# No rule suppresses for longer than MAX_REPEAT_INTERVAL_S: an older fingerprint can suppress nothing.
_PRUNE_FINGERPRINTS = "DELETE FROM fingerprints WHERE last_notified_at < now() - make_interval(secs => $1)"


async def prune_fingerprints(pool: asyncpg.Pool) -> int:
    """Forget the fingerprints too old to suppress anything; return how many."""
    status = await pool.execute(_PRUNE_FINGERPRINTS, float(MAX_REPEAT_INTERVAL_S))
    return int(status.split()[-1])


# Notified at once (PENDING), or recorded and settled here (SILENCED, SUPPRESSED: nothing to emit).
# A SUPPRESSED row keeps the fingerprint it repeated (migrations/017) and the interval it was
# suppressed within (migrations/018): if the group member that notified it is silenced when its group
# closes, the closer decides the repeat again, and may notify it instead (tables/group_records.py
# revive_repeats).
_INSERT_OUTCOMES = """
INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, updated_at,
                           status, detail, emitted, fingerprint, repeat_interval_s)
SELECT n.notification_id, n.client_id, n.alert_id, n.alerts::jsonb, n.rule_ids::uuid[], to_timestamp($6),
       to_timestamp($6), n.status, n.detail, n.status <> 'PENDING', n.fingerprint, n.repeat_interval_s
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $7::text[], $8::text[], $9::text[],
            $10::int[])
    AS n(notification_id, client_id, alert_id, alerts, rule_ids, status, detail, fingerprint, repeat_interval_s)
ON CONFLICT (client_id, alert_id) DO NOTHING
RETURNING notification_id::text, status
"""


@dataclass(frozen=True)
class Recorded:
    """What Postgres already holds for one match (see _RECORDED)."""

    member_of: str | None = None
    member_closed: bool = False
    notified: bool = False


@dataclass
class Outcome:
    """What to write for the stateful matches of one batch."""

    rows: list[tuple[AlertMatched, str, str | None]] = field(default_factory=list)  # (match, status, detail)
    joins: list[groups.Join] = field(default_factory=list)
    notified_fingerprints: dict[tuple[str, str], float] = field(default_factory=dict)
    seen_before: list[AlertMatched] = field(default_factory=list)  # notified at once earlier: maybe unemitted
    closed_groups: set[str] = field(default_factory=set)  # groups of members seen before: maybe unemitted
    # (client_id, alert_id) -> (fingerprint, time, time of the fingerprint's notification before it,
    # whether that one is final) of a grouped match that notified its fingerprint by joining: kept with
    # its membership, taken back if a silence mutes it at close (tables/group_records.py).
    joined_fingerprints: dict[tuple[str, str], group_records.JoinedFingerprint] = field(default_factory=dict)


def decide(matches: list[AlertMatched], recorded: list[Recorded], last_notified: dict[tuple[str, str], float],
           now: float, final: Collection[tuple[str, str]] = ()) -> Outcome:
    """Silenced, suppressed, grouped or notified at once: each match's fate, in order.

    A match recorded before keeps its first fate (a member of an open group stays in it). Then a
    silence wins; then a fingerprint notified within the repeat interval (earlier in this batch
    too) is suppressed; what is left joins its group or is notified at once, and its fingerprint
    counts as notified from now. `final`: the (client_id, fingerprint) of `last_notified` whose
    notification is final (see _LAST_NOTIFIED); a member joining keeps its time, and whether it is.
    """
    outcome = Outcome()
    seen: set[tuple[str, str]] = set()
    for matched, before in zip(matches, recorded):
        client = matched.client_id  # canonical: aggregate refuses any other form (require_uuids)
        if (client, matched.alert.alert_id) in seen:
            continue
        seen.add((client, matched.alert.alert_id))
        if before.member_of is not None:
            if not before.member_closed:
                outcome.joins.append(groups.Join(matched, before.member_of))
            else:
                outcome.closed_groups.add(before.member_of)
        elif before.notified:
            outcome.seen_before.append(matched)
        elif matched.silenced_by is not None:
            outcome.rows.append((matched, "SILENCED", f"silenced by {matched.silenced_by}"))
        elif is_repeat_checked(matched) and (client, matched.fingerprint) in last_notified and (
                now - last_notified[(client, matched.fingerprint)] < matched.repeat_interval_s):
            outcome.rows.append((matched, "SUPPRESSED", f"repeats fingerprint {matched.fingerprint} notified "
                                                       f"within {matched.repeat_interval_s}s"))
        else:
            previous = last_notified.get((client, matched.fingerprint))
            if is_repeat_checked(matched):
                last_notified[(client, matched.fingerprint)] = now
                outcome.notified_fingerprints[(client, matched.fingerprint)] = now
            if is_grouped(matched):
                outcome.joins.append(groups.Join(matched))
                if is_repeat_checked(matched):
                    outcome.joined_fingerprints[(client, matched.alert.alert_id)] = (
                        matched.fingerprint, now, previous, (client, matched.fingerprint) in final)
            else:
                outcome.rows.append((matched, "PENDING", None))
    return outcome


def unknown_client(client_id: str) -> str:
    """The dead-letter reason of a match whose client does not exist (any more)."""
    return f"client_id: no such client {client_id}"


async def known_clients(conn: asyncpg.Pool, client_ids: Iterable[str]) -> set[str]:
    return {row[0] for row in await conn.fetch(_KNOWN_CLIENTS, list(set(client_ids)))}


async def read_recorded(conn: asyncpg.Pool, matches: list[AlertMatched]) -> list[Recorded]:
    rows = await conn.fetch(_RECORDED, [m.client_id for m in matches], [m.alert.alert_id for m in matches])
    by_position = {row["position"]: Recorded(row["member_of"], row["member_closed"], row["notified"])
                   for row in rows}
    return [by_position[position] for position in range(1, len(matches) + 1)]


async def read_last_notified(conn: asyncpg.Pool, matches: list[AlertMatched]
                             ) -> tuple[dict[tuple[str, str], float], set[tuple[str, str]]]:
    """When each (client_id, fingerprint) of the repeat-checked matches was last notified, and which of
    those notifications are final (see _LAST_NOTIFIED)."""
    checked = [m for m in matches if is_repeat_checked(m)]
    if not checked:
        return {}, set()
    rows = await conn.fetch(_LAST_NOTIFIED, [m.client_id for m in checked], [m.fingerprint for m in checked])
    return {(row[0], row[1]): row[2] for row in rows}, {(row[0], row[1]) for row in rows if row["final"]}


async def write_outcome(conn: asyncpg.Connection, outcome: Outcome, plan: groups.JoinPlan,
                        created_at: float) -> list[tuple[NotificationReady, str]]:
    """Write the rows, memberships and fingerprints; the rows inserted, with status.

    In the caller's transaction (record_stateful's), which holds the clients' locks.
    """
    built = [(NotificationReady(client_id=m.client_id, alerts=[m.alert], rule_ids=m.rule_ids, created_at=created_at),
              status, detail) for m, status, detail in outcome.rows]
    repeated = [m.fingerprint if status == "SUPPRESSED" else None for m, status, _ in outcome.rows]
    within = [m.repeat_interval_s if status == "SUPPRESSED" else None for m, status, _ in outcome.rows]
    inserted = {}
    if built:
        inserted = dict(await conn.fetch(
            _INSERT_OUTCOMES,
            [ready.notification_id for ready, _, _ in built],
            [ready.client_id for ready, _, _ in built],
            [ready.alerts[0].alert_id for ready, _, _ in built],
            ["[" + ready.alerts[0].model_dump_json() + "]" for ready, _, _ in built],
            ["{" + ",".join(ready.rule_ids) + "}" for ready, _, _ in built],
            created_at,
            [status for _, status, _ in built],
            [detail for _, _, detail in built],
            repeated,
            within,
        ))
    await group_records.record_memberships(conn, plan.memberships, outcome.joined_fingerprints,
                                           {(join.matched.client_id, join.matched.alert.alert_id): join.matched.rule_ids
                                            for join in outcome.joins})
    if outcome.notified_fingerprints:
        # A fingerprint a member notified by joining is final only once its group is closed.
        group_of = {(client_id, alert_id): notification_id for client_id, alert_id, notification_id, _ in plan.memberships}
        joined_in = {(client_id, fingerprint): group_of[(client_id, alert_id)]
                     for (client_id, alert_id), (fingerprint, _, _, _) in outcome.joined_fingerprints.items()}
        keys = list(outcome.notified_fingerprints)
        await conn.execute(_REMEMBER_NOTIFIED, [k[0] for k in keys], [k[1] for k in keys],
                           [outcome.notified_fingerprints[k] for k in keys], [joined_in.get(k) for k in keys])
    return [(ready, status) for ready, status, _ in built if ready.notification_id in inserted]


# Sends notifications and dead letters to the broker and marks the notifications emitted
# (agents/aggregate.py publish_aggregation); passed in, as that module imports this one.
Emit = Callable[[list[NotificationReady], list[DeadLetter]], Awaitable[None]]


async def record_stateful(pool: asyncpg.Pool, decoded: list[tuple[EventT, AlertMatched]],
                          aggregation: Aggregation, emit: Emit) -> list[AlertMatched]:
    """Record silenced, suppressed and grouped matches (and the repeat-checked notified at once).

    Runs under `groups_lock`; reads, decides and writes Postgres in one transaction holding the
    clients' advisory locks (see _LOCK_CLIENTS). The table is written after it commits: a crash in
    between leaves members in Postgres that the redelivered messages put back in their group.
    Groups closed early (tables/groups.py close_early), and closed groups found never emitted (their
    emitter died), are emitted with `emit` between the two: the table forgets them only once they
    are emitted, so until then a redelivered batch finds them in the table, closed, and emits them
    (the check of `closed` below).
    Returns the matches notified at once before, whose notification may never have been emitted:
    emitting them again is the plain path's business (agents/aggregate.py).
    """
    known = await known_clients(pool, [m.client_id for _, m in decoded])
    accepted: list[tuple[EventT, AlertMatched]] = []
    for event, matched in decoded:
        if matched.client_id not in known:
            # Dropped if the client was deleted, else a dead letter: the caller judges (record_matches).
            aggregation.unknown_clients.append((event, matched))
        elif event.message.key != matched.client_id.encode():
            # The group table is keyed, and partitioned, by the client_id (tables/groups.py), and any
            # match recorded here may join a group: a grouped one, or one whose alert is a member of
            # an open group (its client changed its rules since); written under another key's event,
            # its client's value would go to the wrong changelog partition.
            aggregation.dead_letters.append(dead_letter_for(
                event.message, "key: a match must be keyed by its client_id (docs/contracts.md)"))
        else:
            accepted.append((event, matched))
    if not accepted:
        return []
    matches = [matched for _, matched in accepted]
    async with pool.acquire() as conn, conn.transaction():
        # Read, decided and written under the clients' locks (see _LOCK_CLIENTS): across workers,
        # not just within this one.
        await lock_clients(conn, [m.client_id for m in matches])
        now = time.time()
        last_notified, final = await read_last_notified(conn, matches)
        outcome = decide(matches, await read_recorded(conn, matches), last_notified, now, final)
        keys = {join.matched.client_id.encode() for join in outcome.joins}
        current: dict[bytes, groups.ClientGroups | None] = {}
        malformed: list[groups.Malformed] = []
        for key in keys:
            current[key], bad = groups.sorted_out(key, groups.open_groups.get(key))
            malformed += bad
        closed = await group_records.closed_groups(conn, current.values())
        # A closed group is about to be dropped from the table, or a member of a closed group is
        # delivered again; if the group's notification was inserted and its emitter died before
        # emitting it (the closer, or this agent closing it early), no closer would ever see it
        # again: emit it here.
        left_unemitted = (await group_records.unemitted_groups(conn, sorted(closed | outcome.closed_groups))
                          if closed or outcome.closed_groups else [])
        plan = groups.plan_joins(current, outcome.joins, closed, now, settings.group_max_alerts)
        # A client with too many open groups for one changelog message has its oldest closed now.
        closed_early = groups.close_early(plan)
        inserted = await write_outcome(conn, outcome, plan, round(now, 6))
        # Closed early or on time, a group's listed alerts are checked against the silences in force.
        silences = (await active_silences(conn, {d.key.decode() for d in closed_early}, now) if closed_early
                    else SilenceIndex())
        closed_early_ready, refused = await group_records.record_closed_groups_apart(conn, closed_early, now, silences)
    if left_unemitted:
        # Before the table forgets them, as groups closed early are: left to the batch's sink, they
        # were lost for good when the worker died once the table was written, as the batch
        # delivered again may hold none of their members, and its clients' values no longer hold them.
        await emit(left_unemitted, [])
    if malformed:
        # Sent before the client's value is written without them (tables/groups.py Malformed).
        await emit([], [groups.malformed_letter(m) for m in malformed])
    if closed_early:
        await emit(closed_early_ready, [group_records.refused_letter(d, exc) for d, exc in refused])
        metrics.groups_closed_early.inc(len(closed_early))
    events_by_key = {event.message.key: event for event, _ in accepted}
    if plan.values:
        await groups.prepare_writes()
    # Written even when the table holds the value already: after a crash that came before the
    # broker had a batch's changelog write, the local store (RocksDB) may still hold that value, and
    # the redelivered batch rebuilds exactly it; not written again, it would be in no changelog,
    # and the partition's next owner would recover the table without it.
    for key, value in plan.values.items():
        groups.write_value(key, value, events_by_key[key])
    if plan.values:
        await groups.wait_until_written()
    closed_here.difference_update(closed)  # pruned from the table just now
    for ready, status in inserted:
        if status == "PENDING":
            aggregation.ready.append(ready)
    metrics.notifications_silenced.inc(sum(status == "SILENCED" for _, status in inserted))
    metrics.notifications_suppressed.inc(sum(status == "SUPPRESSED" for _, status in inserted))
    return outcome.seen_before

