"""The groups' records in Postgres: who is a member of which group (with the alert of each member
its group does not list), and the notification of each closed group, inserted once with the
silences in force applied to every member, listed or not.

tables/groups.py holds the open groups themselves (the changelog-backed table and the plans that
change it); this module holds what outlives them. A group is closed exactly when its notification
row exists, so the row, not the table, says whether a group is still open (docs/grouping.md).
"""
from __future__ import annotations

import json
import logging
from bisect import bisect_left
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import asyncpg

from alerting_app import metrics
from alerting_app.app import alerts_matched, settings
from alerting_app.contracts import Alert, DeadLetter, NotificationReady
from alerting_app.db import REFUSED_BY_POSTGRES
from alerting_app.sending import partition_for
from alerting_app.silencing import SilenceIndex
from tables.groups import (
    CONTEXT_DIGESTS, MAX_LISTED_BYTES, ClientGroups, DueGroup, as_listed, fill_listing, listing_size, without_context,
)

log = logging.getLogger(__name__)


# A membership moves only while its notification does not exist: once a group is closed, its
# members are final. Its unlisted alert moves with it: a member the group it moves to lists has none
# (the table holds its alert), one it does not list has its alert kept here for the closer. Its
# fingerprint is the one it notified when it first joined (migrations/014), with the time of the
# fingerprint's notification before it and whether that one was final (migrations/018), kept when it
# moves.
# Its rules (migrations/016) gather those of each of its matches, as its group's rule_ids do (a member
# that joined before 016 keeps NULL: every rule of its group).
_UPSERT_MEMBERSHIPS = """
INSERT INTO notification_alerts AS a (client_id, alert_id, notification_id, unlisted_alert, fingerprint,
                                      fingerprint_notified_at, rule_ids, fingerprint_previous_at,
                                      fingerprint_previous_final)
SELECT m.client_id, m.alert_id, m.notification_id, m.unlisted_alert::jsonb, m.fingerprint, to_timestamp(m.notified_at),
       m.rule_ids::uuid[], to_timestamp(m.previous_at), m.previous_final
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::float8[], $7::text[], $8::float8[],
            $9::boolean[])
    AS m(client_id, alert_id, notification_id, unlisted_alert, fingerprint, notified_at, rule_ids, previous_at,
         previous_final)
ON CONFLICT (client_id, alert_id) DO UPDATE
    SET notification_id = EXCLUDED.notification_id, unlisted_alert = EXCLUDED.unlisted_alert,
        rule_ids = CASE WHEN a.rule_ids IS NOT NULL AND EXCLUDED.rule_ids IS NOT NULL
                        THEN ARRAY(SELECT DISTINCT r FROM unnest(a.rule_ids || EXCLUDED.rule_ids) AS r ORDER BY r) END
    WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.notification_id = a.notification_id)
"""

_CLOSED = "SELECT notification_id::text FROM notifications WHERE notification_id = ANY($1::uuid[])"

# (fingerprint, when the member notified it, when the fingerprint was notified before (None: never),
# whether that notification was final): what a member keeps of the fingerprint it notified by joining.
JoinedFingerprint = tuple[str, float, float | None, bool]


async def record_memberships(conn: asyncpg.Connection,
                             memberships: Sequence[tuple[str, str, str, str | None]],
                             fingerprints: Mapping[tuple[str, str], JoinedFingerprint] | None = None,
                             rule_ids: Mapping[tuple[str, str], Sequence[str]] | None = None) -> None:
    """Upsert (client_id, alert_id, notification_id, the alert as JSON if its group does not list it);
    `fingerprints`: by (client_id, alert_id), the fingerprint a member joining for the first time
    notified (the time written to `fingerprints`, and the one it replaced); `rule_ids`: by
    (client_id, alert_id), the rules the member matched (one missing: unknown, every rule of its group)."""
    if memberships:
        keys = [(client_id, alert_id) for client_id, alert_id, _, _ in memberships]
        noted = [(fingerprints or {}).get(key, (None, None, None, None)) for key in keys]
        rules = [(rule_ids or {}).get(key) for key in keys]
        await conn.execute(_UPSERT_MEMBERSHIPS, *(list(column) for column in zip(*memberships)),
                           [fingerprint for fingerprint, _, _, _ in noted], [at for _, at, _, _ in noted],
                           [None if r is None else "{" + ",".join(r) + "}" for r in rules],
                           [previous for _, _, previous, _ in noted], [final for _, _, _, final in noted])


async def closed_groups(conn: asyncpg.Connection | asyncpg.Pool, values: Iterable[ClientGroups | None]) -> set[str]:
    """The notification_ids of these groups that are closed (their notification exists)."""
    ids = [group["notification_id"] for value in values for group in (value or {}).values()]
    return {row[0] for row in await conn.fetch(_CLOSED, ids)} if ids else set()


# The truncated count is taken from the members in Postgres, not from the table: a member whose
# table write was lost in a crash is still counted. Inserted once; closing again changes nothing.
# `accounted` counts the members the closer checked (listing_at_close): the listed ones and the
# unlisted ones whose alert it read; `counted`, those of them not silenced that it had no place to
# list. Any other member (one whose alert is in neither, its table write lost in a crash) cannot be
# checked, so it is counted and notified. `silenced` (the detail of a group whose checked members are
# all silenced, else NULL) makes it a SILENCED row, settled and not emitted, only when no member was
# left unchecked. `silenced_alerts` and `truncated_silenced_alerts` (migrations/022): the members
# muted that it does not list (Listing.left_out), listed up to GROUP_MAX_ALERTS, the rest counted.
_INSERT_GROUP_NOTIFICATIONS = """
INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, updated_at,
                           truncated_alerts, group_rule_id, status, detail, emitted, silenced_alerts,
                           truncated_silenced_alerts)
SELECT g.notification_id, g.client_id, g.alert_id, g.alerts::jsonb, g.rule_ids::uuid[], to_timestamp(g.created_at),
       to_timestamp(g.created_at),
       greatest(0, g.members - g.accounted) + g.counted, g.group_rule_id,
       CASE WHEN g.wholly_silenced THEN 'SILENCED' ELSE 'PENDING' END,
       CASE WHEN g.wholly_silenced THEN g.silenced END,
       g.wholly_silenced, g.silenced_alerts::jsonb, g.truncated_silenced_alerts
FROM (SELECT g.*, m.members, g.silenced IS NOT NULL AND m.members <= g.accounted AS wholly_silenced
      FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::int[], $8::int[],
                  $9::uuid[], $10::text[], $11::text[], $12::int[])
          AS g(notification_id, client_id, alert_id, alerts, rule_ids, created_at, accounted, counted, group_rule_id,
               silenced, silenced_alerts, truncated_silenced_alerts)
      CROSS JOIN LATERAL (SELECT count(*) AS members FROM notification_alerts a
                          WHERE a.notification_id = g.notification_id) m) g
ON CONFLICT DO NOTHING
RETURNING notification_id::text, status
"""

@dataclass(frozen=True)
class Listing:
    """What a closing group's notification lists, once the silences in force are applied."""

    alerts: list[dict]
    accounted: int  # the members checked: listed, or unlisted with their alert read
    counted: int = 0  # of those, the ones not silenced that have no place in the listing
    silenced_by: str | None = None  # the detail of a group whose checked members are all silenced
    # The members a silence matched, in the order they joined: alert_id -> the silence that matched it.
    silenced: Mapping[str, str] = field(default_factory=dict)

    def notified_to_nobody(self, status: str) -> list[str]:
        """The silenced members the notification, inserted with `status`, does not notify: all of them
        in a SILENCED one; in a PENDING one, those it does not list (it lists silenced alerts only
        when it must be notified for a member that could not be checked)."""
        if status == "SILENCED":
            return list(self.silenced)
        return [left["alert_id"] for left in self.left_out()]

    def left_out(self) -> list[dict]:
        """The silenced members the notification does not list, each {alert_id, silence_id}, stored
        with it (migrations/022): a group's members are its listed alerts, those counted in
        `truncated_alerts`, and these, so a tenant finds what became of each one."""
        listed = {alert["alert_id"] for alert in self.alerts}
        return [{"alert_id": alert_id, "silence_id": silence_id}
                for alert_id, silence_id in self.silenced.items() if alert_id not in listed]


def listing_at_close(due: DueGroup, silences: SilenceIndex, at: float, unlisted: Iterable[dict] = ()) -> Listing:
    """The group's members that no silence of its client in force at `at` matches: the listed ones,
    then, in the places the silenced ones freed (and within the listing's byte budget), the unlisted
    ones (`unlisted`: their alerts, as `unlisted_pages` reads them), in the order they joined; the
    rest counted.

    A group whose members are all silenced keeps its listed alerts listed: it is recorded SILENCED,
    with them, unless it has members that could not be checked (the insert decides, from the members
    in Postgres), which must be notified; a notification lists at least one alert.
    """
    if not silences.holds_any_of(due.key.decode()):
        return Listing([as_listed(alert) for alert in due.group["alerts"]], accounted=len(due.group["alerts"]))
    closing = ListingAtClose(due, silences, at)
    closing.check(unlisted)
    return closing.listing()


class ListingAtClose:
    """listing_at_close, fed the unlisted members a page at a time: it keeps what it lists and
    counts the rest, so a group's members need not all be held at once."""

    def __init__(self, due: DueGroup, silences: SilenceIndex, at: float) -> None:
        self._listed = due.group["alerts"]
        self._client = due.key.decode()
        self._silences, self._at = silences, at
        self._listed_ids = {alert["alert_id"] for alert in self._listed}
        self._silenced: dict[str, str] = {}  # alert_id -> the silence that matched it
        self._kept = self._not_silenced(self._listed)
        self._accounted = len(self._listed)
        self._counted = 0

    def _not_silenced(self, alerts: Iterable[dict]) -> list[dict]:
        kept = []
        for alert in alerts:
            # An alert kept without its context (too large for a listing) is checked on the digests
            # of its context (tables/groups.py without_context), as a silence would check the context.
            digests = alert.get(CONTEXT_DIGESTS)
            silence_id = self._silences.silencing(self._client, Alert.from_stored(alert), self._at,
                                                  digests if isinstance(digests, dict) else None)
            if silence_id is None:
                kept.append(alert)
            else:
                self._silenced[alert["alert_id"]] = silence_id
        return kept

    def check(self, unlisted: Iterable[dict]) -> None:
        """Check the next unlisted members, in the order they joined."""
        # A member listed by the table and kept as unlisted too (a crash between the two writes) is one member.
        fresh = [alert for alert in unlisted if alert["alert_id"] not in self._listed_ids]
        self._accounted += len(fresh)
        self._counted += len(fill_listing(self._kept, self._not_silenced(fresh), places=len(self._listed)))

    def listing(self) -> Listing:
        if self._kept:
            return Listing([as_listed(alert) for alert in self._kept], self._accounted, counted=self._counted,
                           silenced=dict(self._silenced))
        return Listing([as_listed(alert) for alert in self._listed], self._accounted,
                       silenced_by="silenced by " + ", ".join(sorted(set(self._silenced.values()))),
                       silenced=dict(self._silenced))


# The alerts of a group's unlisted members, in the order they joined (one batch's by alert_id).
_UNLISTED_MEMBERS = """
SELECT unlisted_alert FROM notification_alerts
WHERE notification_id = $1 AND unlisted_alert IS NOT NULL
ORDER BY joined_at, alert_id
"""
# A storm can leave a group any number of unlisted members, each kept up to MAX_LISTED_BYTES: read
# at once, they were all held in the worker's memory (20 MB for 1,000 alerts of 20 KB), in a loop
# that answered nothing else meanwhile. A page of them is 6.4 MB at most as stored.
UNLISTED_PAGE_ROWS = 100


async def unlisted_pages(conn: asyncpg.Connection | asyncpg.Pool, notification_id: str) -> AsyncIterator[list[dict]]:
    """The alerts of the group's unlisted members, a page at a time, through a cursor (in the
    caller's transaction; a pool's connection gets one of its own)."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own, own.transaction():
            async for page in unlisted_pages(own, notification_id):
                yield page
        return
    cursor = await conn.cursor(_UNLISTED_MEMBERS, notification_id)
    while page := await cursor.fetch(UNLISTED_PAGE_ROWS):
        yield [row["unlisted_alert"] for row in page]


async def listing_of(conn: asyncpg.Connection | asyncpg.Pool, due: DueGroup, silences: SilenceIndex,
                     at: float) -> Listing:
    """listing_at_close, reading the unlisted members only of a group whose client has a silence in
    force: the others' lose nothing to a silence."""
    if not silences.holds_any_of(due.key.decode()):
        return listing_at_close(due, silences, at)
    closing = ListingAtClose(due, silences, at)
    async for page in unlisted_pages(conn, due.group["notification_id"]):
        closing.check(page)
    return closing.listing()


# The rules of a closing group's members that no silence muted, for the groups that have muted
# members ($2-$4: their keys): the notification goes to their endpoints only, as a rule only muted
# members matched has nothing to notify. A rule is kept when more members matched it than muted ones
# did: counted per rule, the members read by their group's index and the muted ones by the primary
# key, so a storm's group with any number of muted members costs two linear reads (an anti-join of
# the members against the muted list could be planned as a nested loop, quadratic). A member recorded
# before migrations/016 has no rules kept: it counts as the nil UUID, and a group where one such is
# notified keeps every rule of its group.
UNKNOWN_RULES = "00000000-0000-0000-0000-000000000000"
_NOTIFIED_RULES = f"""
WITH every AS (
    SELECT a.notification_id, r.rule_id, count(*) AS members
    FROM notification_alerts a
    CROSS JOIN LATERAL unnest(coalesce(a.rule_ids, '{{{UNKNOWN_RULES}}}'::uuid[])) AS r(rule_id)
    WHERE a.notification_id = ANY($1::uuid[])
    GROUP BY 1, 2
), muted AS (
    SELECT a.notification_id, r.rule_id, count(*) AS members
    FROM unnest($2::uuid[], $3::uuid[], $4::text[]) AS s(notification_id, client_id, alert_id)
    JOIN notification_alerts a ON a.client_id = s.client_id AND a.alert_id = s.alert_id
                              AND a.notification_id = s.notification_id
    CROSS JOIN LATERAL unnest(coalesce(a.rule_ids, '{{{UNKNOWN_RULES}}}'::uuid[])) AS r(rule_id)
    GROUP BY 1, 2
)
SELECT e.notification_id::text, array_agg(e.rule_id::text ORDER BY e.rule_id) AS rule_ids
FROM every e LEFT JOIN muted m ON m.notification_id = e.notification_id AND m.rule_id = e.rule_id
WHERE e.members > coalesce(m.members, 0)
GROUP BY e.notification_id
"""


async def notified_rules(conn: asyncpg.Connection | asyncpg.Pool, due: Sequence[DueGroup],
                         listings: Sequence[Listing]) -> list[list[str]]:
    """Each closing group's rule_ids: every rule a member matched (the table's), less those only
    members a silence muted matched. A group whose members are all muted keeps them all: it is
    recorded SILENCED, and its row names what its members matched, as a silenced match's row does."""
    muted = [(d.group["notification_id"], d.key.decode(), alert_id)
             for d, listing in zip(due, listings) for alert_id in listing.silenced]
    if not muted:
        return [d.group["rule_ids"] for d in due]
    notified = dict(await conn.fetch(_NOTIFIED_RULES, sorted({notification_id for notification_id, _, _ in muted}),
                                     *(list(column) for column in zip(*muted))))
    rule_ids = []
    for d in due:
        rules = notified.get(d.group["notification_id"])
        rule_ids.append(d.group["rule_ids"] if not rules or UNKNOWN_RULES in rules else rules)
    return rule_ids


# The members of the fingerprints that members of groups closing for the first time muted, since the
# first of those muted ones or the first member muted at an earlier close whose repeats are still to
# decide (migrations/019), oldest first, with what `fingerprints` holds: whether a notification of
# that fingerprint since then reached the client, or may yet, is read from them (_muted_run). A
# group window longer than the repeat interval collects a fingerprint more than once, and groups
# of different windows close in another order than their members joined. Found by the primary key
# and the fingerprint's index: a storm's group may have any number of muted members.
#
# The muted members are found by the primary key first, alone (MATERIALIZED), then told from closed
# ones: planned as one, the "not closed" anti-join was estimated at one row of the whole table, and
# the plan compared every member with every muted one (36,000 x 4,000 rows: 8-17 s of Postgres
# CPU in one close of 40 groups with 100 muted members each, bench/grouping.py --muting).
_MEMBERS_OF_MUTED_FINGERPRINTS = """
WITH given AS MATERIALIZED (
    SELECT a.client_id, a.fingerprint, a.fingerprint_notified_at, a.notification_id
    FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS s(notification_id, client_id, alert_id)
    JOIN notification_alerts a ON a.client_id = s.client_id AND a.alert_id = s.alert_id
                              AND a.notification_id = s.notification_id AND a.fingerprint IS NOT NULL
), muted AS (
    SELECT DISTINCT g.client_id, g.fingerprint, g.fingerprint_notified_at
    FROM given g
    WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.notification_id = g.notification_id)
), touched AS (
    SELECT m.client_id, m.fingerprint,
           least(min(m.fingerprint_notified_at),
                 (SELECT min(u.fingerprint_notified_at) FROM notification_alerts u
                  WHERE u.client_id = m.client_id AND u.fingerprint = m.fingerprint
                    AND u.muted_repeats_decided = false)) AS since
    FROM muted m
    GROUP BY m.client_id, m.fingerprint
)
SELECT t.client_id::text, t.fingerprint, a.alert_id, a.notification_id::text, a.fingerprint_notified_at,
       extract(epoch FROM a.fingerprint_notified_at)::float8 AS notified_at,
       extract(epoch FROM a.fingerprint_previous_at)::float8 AS previous_at, a.fingerprint_previous_at,
       coalesce(a.fingerprint_previous_final, false) AS previous_final, a.muted_repeats_decided,
       EXISTS (SELECT 1 FROM notifications n WHERE n.notification_id = a.notification_id) AS closed,
       f.last_notified_at, extract(epoch FROM f.last_notified_at)::float8 AS last_notified
FROM touched t
JOIN notification_alerts a ON a.client_id = t.client_id AND a.fingerprint = t.fingerprint
                          AND a.fingerprint IS NOT NULL
                          AND a.fingerprint_notified_at >= t.since - interval '1 microsecond'
LEFT JOIN fingerprints f ON f.client_id = t.client_id AND f.fingerprint = t.fingerprint
ORDER BY t.client_id, t.fingerprint, a.fingerprint_notified_at, a.alert_id
"""

# The repeats those members suppressed: the SUPPRESSED rows of their fingerprints since the first of
# them notified (migrations/017), oldest first, with the interval each was suppressed within
# (migrations/018; NULL: suppressed by a release before it). One suppressed in a member's own batch
# has its batch's time, written as created_at rounded to microseconds and as the member's time
# unrounded: Postgres rounds both to the same microsecond, give or take one. A storm of one
# fingerprint's repeats while its member's group is open leaves any number of them, each with its
# alert, and a silence muting the member usually mutes them too, so that every one is decided: they
# are read a page at a time (UNLISTED_PAGE_ROWS), as a group's unlisted members are.
_SUPPRESSED_REPEATS = """
SELECT m.position, n.notification_id::text, n.alerts, n.rule_ids::text[],
       extract(epoch FROM n.created_at)::float8 AS created_at, n.repeat_interval_s
FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) WITH ORDINALITY AS m(client_id, fingerprint, since, position)
JOIN notifications n ON n.client_id = m.client_id AND n.fingerprint = m.fingerprint AND n.status = 'SUPPRESSED'
                    AND n.created_at >= m.since - interval '1 microsecond'
ORDER BY m.position, n.created_at, n.alert_id
"""

_FORGET_REPEAT = "DELETE FROM notifications WHERE notification_id = ANY($1::uuid[]) AND status = 'SUPPRESSED'"

# A member silenced when its group closed was notified to nobody: the fingerprint it counted as
# notified when it joined is taken back, unless a later notification of that fingerprint wrote it
# since (another time), as a match silenced when it is matched never counts (agents/match_outcomes.py
# decide). What the fingerprint the muted members held ($3) is then: the last repeat notified instead
# (revive_repeats), or the notification before them when final (migrations/018), or, with none
# ($4 NULL), nothing: deleted, and the next alert of that fingerprint is notified. Under the
# clients' locks (the closer's), so what was read is what is changed.
_SETTLE_HELD_FINGERPRINTS = """
WITH settled AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[])
        AS b(client_id, fingerprint, held_at, notified_at)
), restored AS (
    UPDATE fingerprints f SET last_notified_at = b.notified_at, notified_in_group = NULL, notified_as_of = b.notified_at
    FROM settled b
    WHERE f.client_id = b.client_id AND f.fingerprint = b.fingerprint AND f.last_notified_at = b.held_at
      AND b.notified_at IS NOT NULL
)
DELETE FROM fingerprints f USING settled b
WHERE f.client_id = b.client_id AND f.fingerprint = b.fingerprint AND f.last_notified_at = b.held_at
  AND b.notified_at IS NULL
"""


@dataclass(frozen=True)
class HeldFingerprint:
    """A fingerprint that members muted at close held in `fingerprints`: what it is to hold instead."""

    client_id: str
    fingerprint: str
    held_at: datetime  # the last of those members' time, which `fingerprints` holds
    settled_at: datetime | None  # the last notification as if they had been silenced when matched; None: none
    # (notification_id, alert_id) of those members: each must be notified to nobody for the
    # notification before them to count as the last one (a group that could not check all its members
    # lists silenced ones, notified after all).
    members: tuple[tuple[str, str], ...]


# Microseconds, as Postgres stores times: a member's time and the one the next member kept as its
# previous were written from the same float, and read back through one (give or take one).
_SAME_TIME_S = 2e-6

# What a close muted (migrations/019): each member a silence muted, notified to nobody, and whether
# its repeats were decided again (or never will be: a later notification reached the client).
_MARK_MUTED = """
UPDATE notification_alerts a SET muted_repeats_decided = m.decided
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::boolean[]) AS m(client_id, alert_id, notification_id, decided)
WHERE a.client_id = m.client_id AND a.alert_id = m.alert_id AND a.notification_id = m.notification_id
"""

# A repeat notified for members muted at different closes, whose fingerprint none of the members
# muted now holds (taken back at an earlier close): notified as of the repeat's time, unless a later
# notification is recorded.
_NOTIFIED_BY_REPEAT = """
INSERT INTO fingerprints AS f (client_id, fingerprint, last_notified_at, notified_in_group, notified_as_of)
SELECT client_id, fingerprint, at, NULL, at FROM unnest($1::uuid[], $2::text[], $3::timestamptz[])
    AS b(client_id, fingerprint, at)
ON CONFLICT (client_id, fingerprint) DO UPDATE
    SET last_notified_at = EXCLUDED.last_notified_at, notified_in_group = NULL, notified_as_of = EXCLUDED.last_notified_at
    WHERE f.last_notified_at < EXCLUDED.last_notified_at
"""

# (client_id, alert_id, notification_id) of a member muted at close -> whether its repeats are decided.
MutedMarks = dict[tuple[str, str, str], bool]


@dataclass(frozen=True)
class _MutedRun:
    """Of one fingerprint's members (_MEMBERS_OF_MUTED_FINGERPRINTS), the muted ones after the last
    notification of it that reached the client or may yet: all notified to nobody."""

    members: list[asyncpg.Record]  # oldest first
    reached_at: float | None  # the last notification since the first member that reached the client


def _muted_run(members: list[asyncpg.Record], muted_now: Collection[tuple[str, str]],
               closing: Collection[str]) -> _MutedRun:
    """A member reached the client unless a close muted it (now, or marked by an earlier close: a
    release before 019 marks none, and its muted members count as notified); one of a group still
    open may yet. A notification made at once is recorded by no member, but is never lost from
    view: it is the time the next member kept as its previous, or the one `fingerprints` holds (only
    the time of a muted member is ever taken back from it)."""
    def is_muted(member: asyncpg.Record) -> bool:
        return ((member["notification_id"], member["alert_id"]) in muted_now
                or member["muted_repeats_decided"] is not None)

    times = [member["notified_at"] for member in members]  # oldest first, as read

    def is_member(at: float) -> bool:
        nearest = bisect_left(times, at - _SAME_TIME_S)
        return nearest < len(times) and times[nearest] <= at + _SAME_TIME_S

    since = members[0]["notified_at"]
    reached: list[float] = []
    may_reach: list[float] = []
    for member in members:
        if not is_muted(member):
            closed = member["closed"] or member["notification_id"] in closing
            (reached if closed else may_reach).append(member["notified_at"])
        previous = member["previous_at"]
        if previous is not None and previous > since + _SAME_TIME_S and not is_member(previous):
            reached.append(previous)
    held = members[0]["last_notified"]
    if held is not None and held > since + _SAME_TIME_S and not is_member(held):
        reached.append(held)
    after = max(reached + may_reach, default=None)
    return _MutedRun([member for member in members if after is None or member["notified_at"] > after + _SAME_TIME_S],
                     max(reached, default=None))


async def revive_repeats(conn: asyncpg.Connection | asyncpg.Pool, due: Sequence[DueGroup],
                         listings: Sequence[Listing], silences: SilenceIndex, now: float
                         ) -> tuple[set[int], list[HeldFingerprint], MutedMarks]:
    """Make the repeats that members muted at close suppressed, and that a match silenced when it was
    matched would not have, members of the closing groups, and settle the fingerprints they were
    repeats of; return the positions in `due` of the groups the repeats joined, the fingerprints
    muted members held that no repeat was notified for, to be settled once the groups' notifications
    are inserted (`HeldFingerprint`), and what to mark on the muted members (`mark_muted`).

    A member counted its fingerprint as notified when it joined, and its repeats were suppressed
    meanwhile; muted at close, it was notified to nobody, and the repeats would be lost with it. So
    are the members of that fingerprint muted with it, or at an earlier close, when no notification
    of it since the first of them reached the client (or may yet: `_muted_run`). As if they had been
    silenced when they were matched, the repeats since the first of them are decided again in order,
    as the agent decides a repeat: one no silence mutes now is notified (in the closing group of a
    member muted now: late, or early if its own group rule's window is longer, rather than never)
    unless the last notification so far suppresses it within the repeat's own interval (rules with
    different intervals may share a fingerprint). That last notification is, at first, the
    fingerprint's notification before the first member when it was final as that member joined
    (migrations/018), else none; then the last repeat notified here. A repeat after a member and
    after a repeat notified here since that member stays suppressed whatever its interval: within it
    from the member, so from that later repeat too. Without its interval (suppressed by a release
    before 018) a repeat is notified unless that holds. The repeats of a member an earlier close
    decided are not decided again, nor any at a group's later close: what a close decided is never
    decided again. The muted members before a member of a group still open wait for its close."""
    muted = [(position, d.group["notification_id"], alert_id) for position, (d, listing) in enumerate(zip(due, listings))
             for alert_id in listing.silenced]
    if not muted:
        return set(), [], {}
    rows = await conn.fetch(_MEMBERS_OF_MUTED_FINGERPRINTS, [nid for _, nid, _ in muted],
                            [due[position].key.decode() for position, _, _ in muted],
                            [alert_id for _, _, alert_id in muted])
    if not rows:
        return set(), [], {}
    position_of = {(nid, alert_id): position for position, nid, alert_id in muted}
    closing = {d.group["notification_id"] for d in due}
    by_fingerprint: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for row in rows:
        by_fingerprint.setdefault((row["client_id"], row["fingerprint"]), []).append(row)
    marks: MutedMarks = {}
    runs: list[list[asyncpg.Record]] = []  # each with a member muted now, to join its group
    for members in by_fingerprint.values():
        run = _muted_run(members, position_of, closing)
        decided = {id(member) for member in run.members} if any(
            (m["notification_id"], m["alert_id"]) in position_of for m in run.members) else set()
        for member in members:
            key = (member["notification_id"], member["alert_id"])
            if key not in position_of and member["muted_repeats_decided"] is not False:
                continue  # not muted, or decided already
            mark = id(member) in decided or (
                run.reached_at is not None and member["notified_at"] <= run.reached_at + _SAME_TIME_S)
            if key in position_of or mark:
                marks[(member["client_id"], member["alert_id"], member["notification_id"])] = mark
        if decided:
            runs.append(run.members)
    if not runs:
        return set(), [], marks
    replays = [_Replay(run, [m for m in run if (m["notification_id"], m["alert_id"]) in position_of])
               for run in runs]
    revived: list[tuple[int, asyncpg.Record, str, str]] = []  # (group position, repeat, client_id, fingerprint)
    async for repeat in _suppressed_repeats(conn, runs):
        replay = replays[repeat["position"] - 1]
        joins = replay.decide(repeat, silences, now)
        if joins is not None:
            revived.append((position_of[(joins["notification_id"], joins["alert_id"])], repeat,
                            replay.client, replay.fingerprint))
    settled: list[HeldFingerprint] = []  # with a repeat notified instead
    unsettled: list[HeldFingerprint] = []
    notified_apart: list[tuple[str, str, datetime]] = []  # not held by a member muted now
    for replay in replays:
        run, muted_now = replay.run, replay.muted_now
        holder = run[0]["last_notified"]
        if holder is not None and any(abs(m["notified_at"] - holder) <= _SAME_TIME_S for m in muted_now):
            # The fingerprint as if its muted members had been silenced when matched.
            (settled if replay.any_notified else unsettled).append(HeldFingerprint(
                replay.client, replay.fingerprint, run[0]["last_notified_at"], replay.last_at,
                tuple((m["notification_id"], m["alert_id"]) for m in muted_now)))
        elif replay.any_notified:
            notified_apart.append((replay.client, replay.fingerprint, replay.last_at))
    if revived:
        await conn.execute(_FORGET_REPEAT, [repeat["notification_id"] for _, repeat, _, _ in revived])
        await record_memberships(
            conn,
            [(client, repeat["alerts"][0]["alert_id"], due[position].group["notification_id"],
              json.dumps(kept_unlisted(repeat["alerts"][0]), separators=(",", ":")))
             for position, repeat, client, _ in revived],
            {(client, repeat["alerts"][0]["alert_id"]): (fingerprint, repeat["created_at"], None, False)
             for _, repeat, client, fingerprint in revived},
            {(client, repeat["alerts"][0]["alert_id"]): repeat["rule_ids"] for _, repeat, client, _ in revived})
        # The fingerprint notified by a repeat, whatever the groups' notifications turn out to be.
        await settle_held_fingerprints(conn, settled)
        if notified_apart:
            await conn.execute(_NOTIFIED_BY_REPEAT, *(list(column) for column in zip(*notified_apart)))
    return {position for position, _, _, _ in revived}, unsettled, marks


async def _suppressed_repeats(conn: asyncpg.Connection | asyncpg.Pool,
                              runs: Sequence[list[asyncpg.Record]]) -> AsyncIterator[asyncpg.Record]:
    """The SUPPRESSED repeats since the first member of each run (its position in `runs`, from 1),
    oldest first, read through a cursor a page at a time (in the caller's transaction; a pool's
    connection gets one of its own)."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own, own.transaction():
            async for repeat in _suppressed_repeats(own, runs):
                yield repeat
        return
    cursor = await conn.cursor(_SUPPRESSED_REPEATS, [run[0]["client_id"] for run in runs],
                               [run[0]["fingerprint"] for run in runs],
                               [run[0]["fingerprint_notified_at"] for run in runs])
    while page := await cursor.fetch(UNLISTED_PAGE_ROWS):
        for repeat in page:
            yield repeat


class _Replay:
    """The repeats of one run of muted members (_muted_run) decided again in order, as the agent
    decides a repeat (revive_repeats): fed them oldest first, it keeps only where it stands, so a
    storm's repeats need not all be held, and finds each one's member by walking the run along."""

    def __init__(self, run: list[asyncpg.Record], muted_now: list[asyncpg.Record]) -> None:
        self.run, self.muted_now = run, muted_now  # oldest first; muted_now: those muted at this close
        self.client, self.fingerprint = run[0]["client_id"], run[0]["fingerprint"]
        final = run[0]["previous_final"]
        self.last = run[0]["previous_at"] if final else None  # the last notification, as the agent reads it
        self.last_at = run[0]["fingerprint_previous_at"] if final else None  # the same, as Postgres holds it
        self.any_notified = False
        self._member = 0  # the member whose notification the repeats so far repeated: the last at or before them
        self._joins = 0  # the first member muted now at or after it

    def decide(self, repeat: asyncpg.Record, silences: SilenceIndex, now: float) -> asyncpg.Record | None:
        """The member muted now whose closing group the repeat joins, notified; None: it stays SUPPRESSED."""
        at, interval_s = repeat["created_at"], repeat["repeat_interval_s"]
        while self._member + 1 < len(self.run) and self.run[self._member + 1]["notified_at"] - _SAME_TIME_S <= at:
            self._member += 1
        member = self.run[self._member]
        if member["muted_repeats_decided"]:
            return None  # decided at the member's own close
        if self.last is not None and self.last >= member["notified_at"] - _SAME_TIME_S:
            return None  # after a repeat notified since that member: suppressed by it too
        if self.last is not None and interval_s is not None and at - self.last < interval_s:
            return None  # suppressed by the last notification, as the agent decides
        if silences.silencing(self.client, Alert.from_stored(repeat["alerts"][0]), now) is not None:
            return None  # muted now: notified to nobody either way
        # In the closing group of the member, or of a member muted now after it (else the last).
        while (self._joins < len(self.muted_now)
               and self.muted_now[self._joins]["notified_at"] < member["notified_at"] - _SAME_TIME_S):
            self._joins += 1
        joins = self.muted_now[min(self._joins, len(self.muted_now) - 1)]
        self.last, self.last_at, self.any_notified = at, datetime.fromtimestamp(at, timezone.utc), True
        return joins


async def mark_muted(conn: asyncpg.Connection | asyncpg.Pool, marks: MutedMarks, closing: Collection[str],
                     nobody: Collection[tuple[str, str]]) -> None:
    """Write the marks `revive_repeats` decided: on a member of a group closing now (`closing`: their
    notification_ids) only when its notification notified it to nobody (`nobody`: (notification_id,
    alert_id); a group that could not check all its members lists muted ones); on a member of a
    group closed before, always."""
    kept = [(client, alert_id, nid, decided) for (client, alert_id, nid), decided in marks.items()
            if nid not in closing or (nid, alert_id) in nobody]
    if kept:
        await conn.execute(_MARK_MUTED, *(list(column) for column in zip(*kept)))


async def settle_held_fingerprints(conn: asyncpg.Connection | asyncpg.Pool, held: Sequence[HeldFingerprint]) -> None:
    if held:
        await conn.execute(_SETTLE_HELD_FINGERPRINTS, [h.client_id for h in held], [h.fingerprint for h in held],
                           [h.held_at for h in held], [h.settled_at for h in held])


def kept_unlisted(alert: dict) -> dict:
    """An alert as an unlisted member keeps it (tables/groups.py unlisted_record): within
    MAX_LISTED_BYTES as the table encodes it, else without its context."""
    return without_context(alert) if listing_size(alert) > MAX_LISTED_BYTES else alert


# A notification's columns as `notification_ready` rebuilds its message from them.
NOTIFICATION_READY_COLUMNS = """notification_id::text, client_id::text, alerts, rule_ids::text[],
       extract(epoch FROM created_at)::float8 AS created_at, truncated_alerts, group_rule_id::text"""

# What to emit: the rows as stored, so a group closed again after a crash emits what it first built.
_UNEMITTED_GROUPS = f"""
SELECT {NOTIFICATION_READY_COLUMNS}
FROM notifications WHERE notification_id = ANY($1::uuid[]) AND NOT emitted
"""


async def record_closed_groups(conn: asyncpg.Connection | asyncpg.Pool, due: Sequence[DueGroup],
                               now: float, silences: SilenceIndex) -> list[NotificationReady]:
    """Insert the notifications of these groups (once), without the members silenced at `now`
    (`silences`: those of the groups' clients in force then, silencing.active_silences); return
    those not emitted yet."""
    if not due:
        return []
    created_at = round(now, 6)  # microseconds, as Postgres stores it
    listings = [await listing_of(conn, d, silences, now) for d in due]
    # A repeat a muted member suppressed joins its group as an unlisted member: listed again, in a
    # place the muted ones freed.
    relisted, held, marks = await revive_repeats(conn, due, listings, silences, now)
    for position in relisted:
        listings[position] = await listing_of(conn, due[position], silences, now)
    rule_ids = await notified_rules(conn, due, listings)
    left_out = [listing.left_out() for listing in listings]
    inserted = await conn.fetch(
        _INSERT_GROUP_NOTIFICATIONS,
        [d.group["notification_id"] for d in due],
        [d.key.decode() for d in due],
        [listing.alerts[0]["alert_id"] for listing in listings],
        [json.dumps(listing.alerts, separators=(",", ":")) for listing in listings],
        ["{" + ",".join(rules) + "}" for rules in rule_ids],
        [created_at] * len(due),
        [listing.accounted for listing in listings],
        [listing.counted for listing in listings],
        [d.group_rule_id for d in due],
        [listing.silenced_by for listing in listings],
        [json.dumps(left[:settings.group_max_alerts], separators=(",", ":")) for left in left_out],
        [max(0, len(left) - settings.group_max_alerts) for left in left_out],
    )
    # Counted when inserted, as the agent counts its silenced matches; a transaction rolled back
    # after this (a lost connection) counts them again when the group is closed again.
    metrics.notifications_silenced.inc(sum(row["status"] == "SILENCED" for row in inserted))
    # Only at the first close, in its transaction: a group closed again decides nothing anew.
    listing_of_group = {d.group["notification_id"]: listing for d, listing in zip(due, listings)}
    nobody = {(row["notification_id"], alert_id) for row in inserted
              for alert_id in listing_of_group[row["notification_id"]].notified_to_nobody(row["status"])}
    # The fingerprints muted members held, no repeat notified instead: set back to the notification
    # before them when they all were notified to nobody; when only the last was (a group that could
    # not check all its members lists the others), forgotten (set back no further than it knows).
    await settle_held_fingerprints(
        conn, [h if all(member in nobody for member in h.members) else replace(h, settled_at=None)
               for h in held if h.members[-1] in nobody])
    await mark_muted(conn, marks, {d.group["notification_id"] for d in due}, nobody)
    return await unemitted_groups(conn, [d.group["notification_id"] for d in due])


async def record_closed_groups_apart(conn: asyncpg.Connection, due: Sequence[DueGroup], now: float,
                                     silences: SilenceIndex
                                     ) -> tuple[list[NotificationReady], list[tuple[DueGroup, Exception]]]:
    """`record_closed_groups` inside the caller's transaction: the groups to emit, and those Postgres
    refused. All in one statement; if Postgres refuses it, one group at a time, each in a savepoint,
    so that a refused group neither aborts the caller's transaction nor keeps the others out."""
    if not due:
        return [], []
    try:
        async with conn.transaction():
            return await record_closed_groups(conn, due, now, silences), []
    except REFUSED_BY_POSTGRES as exc:
        log.warning("Postgres refused closing %d groups at once (%s: %s); closing them one by one",
                    len(due), type(exc).__name__, exc)
    ready: list[NotificationReady] = []
    refused: list[tuple[DueGroup, Exception]] = []
    for d in due:
        try:
            async with conn.transaction():
                ready.extend(await record_closed_groups(conn, [d], now, silences))
        except REFUSED_BY_POSTGRES as exc:
            refused.append((d, exc))
    return ready, refused


def refused_letter(due: DueGroup, exc: Exception) -> DeadLetter:
    """The dead letter of a group Postgres refuses: groups are built from `alerts.matched`, so it
    goes to that topic's dead-letter topic, with the group as its payload."""
    client = due.key.decode("utf-8", "replace")
    log.error("dropping group %s (group rule %s) of client %s: Postgres refuses it: %s: %s",
              due.group["notification_id"], due.group_rule_id, client, type(exc).__name__, exc)
    return DeadLetter(
        topic=alerts_matched.get_topic_name(),
        partition=partition_for(due.key, tuple(range(settings.topic_partitions))),
        key=client,
        reason=f"group {due.group['notification_id']} (group rule {due.group_rule_id}) of client {client}: "
               f"refused by Postgres: {type(exc).__name__}: {exc}",
        payload=json.dumps(due.group, separators=(",", ":")),
    )


async def unemitted_groups(conn: asyncpg.Connection | asyncpg.Pool,
                           notification_ids: Sequence[str]) -> list[NotificationReady]:
    """The closed groups among these whose notification was inserted but not emitted yet."""
    return [notification_ready(row) for row in await conn.fetch(_UNEMITTED_GROUPS, list(notification_ids))]


def notification_ready(row: asyncpg.Record) -> NotificationReady:
    """The `notifications.ready` message of a notification row (read with NOTIFICATION_READY_COLUMNS)."""
    return NotificationReady(notification_id=row["notification_id"], client_id=row["client_id"],
                             alerts=[Alert.from_stored(alert) for alert in row["alerts"]],
                             rule_ids=row["rule_ids"], created_at=row["created_at"],
                             truncated_alerts=row["truncated_alerts"], group_rule_id=row["group_rule_id"])
