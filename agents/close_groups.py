"""close_groups: emit each notification group whose window has passed, once, on `notifications.ready`.

A timer on every worker with the aggregate role. The agent (agents/aggregate.py, through
agents/match_outcomes.py) opens groups and adds their members; this stage closes them, for the
partitions of `alerts.matched` the worker actively owns. docs/grouping.md says why a group is
emitted exactly once, across crashes.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import asyncpg

from agents.aggregate import Aggregation, publish_aggregation
from agents.match_outcomes import closed_here, groups_lock, lock_clients
from alerting_app import db
from alerting_app.app import alerts_matched, app, settings
from alerting_app.broker_transport import failed_by_giving_up
from alerting_app.contracts import NotificationReady
from alerting_app.failure_streak import FailureStreak
from alerting_app.sending import partition_for
from alerting_app.silencing import active_silences
from tables import group_records, groups

log = logging.getLogger(__name__)

_closing_failures = FailureStreak(log, "closing groups")


def table_is_current() -> bool:
    """False while partitions move or the table recovers: a group read then may be an old version."""
    return not (app.rebalancing or app.in_recovery) and app.tables.recovery.completed.is_set()


def owned_partitions() -> set[int]:
    topic = alerts_matched.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


def writable_partitions() -> set[int]:
    """The partitions whose groups this worker may write now: those it owns, none while the table
    is not current."""
    return owned_partitions() if table_is_current() else set()


async def close_due_groups(pool: asyncpg.Pool, now: float, owned: set[int],
                           still_owned: Callable[[], set[int]] | None = None) -> list[NotificationReady]:
    """Emit each due group of the clients whose partition this worker owns, exactly once.

    Runs under `groups_lock`. The notification row (fixed notification_id) is inserted once, sent,
    marked emitted, and only then the key deleted: a closer that dies in between sends the same
    notification again, which the deliver stage delivers once per endpoint. A group Postgres
    refuses becomes a dead letter and is removed from the table, so it does not stop the others.

    `still_owned()` (default: `owned`) is asked again after the awaits, just before the table is
    written: a rebalance may have moved a partition meanwhile (Faust does not wait for timers), and
    its new owner may have written the client's value since. Only partitions still owned are
    written, each from the value the table holds now, not from the one read before the awaits.
    """
    partitions = tuple(range(settings.topic_partitions))
    items: list[tuple[bytes, groups.ClientGroups]] = []
    malformed: list[groups.Malformed] = []
    for key, value in groups.open_groups.items():
        if partition_for(key, partitions) in owned:
            well_formed, bad = groups.sorted_out(key, value)
            items.append((key, well_formed))
            malformed += bad
    due = groups.due_groups(items, now, closed_here)
    # A key that is no UUID cannot name a client (asyncpg would refuse the whole lookup of clients).
    refused: list[tuple[groups.DueGroup, Exception]] = [
        (d, ValueError(f"client_id: not a UUID: {d.key!r}")) for d in due if not is_uuid(d.key)]
    due = [d for d in due if is_uuid(d.key)]
    ready, refused_now = await record_due_groups(pool, due, now)
    refused += refused_now
    await publish_aggregation(Aggregation(ready=ready, dead_letters=[group_records.refused_letter(d, exc) for d, exc in refused]
                                          + [groups.malformed_letter(m) for m in malformed]))
    # The refused ones too, and those of deleted clients (record_due_groups): they are removed.
    closed_here.update(d.group["notification_id"] for d in due)
    closed_here.update(d.group["notification_id"] for d, _ in refused)
    if items:
        await groups.prepare_writes()
    writable = still_owned() if still_owned is not None else owned
    # Malformed parts, sent to the dead-letter topic above, are left out of what is written back.
    refused_keys = {d.key for d, _ in refused} | {m.key for m in malformed}
    written = False
    in_table: set[str] = set()
    for key, _ in items:
        if partition_for(key, partitions) not in writable:
            continue  # moved away (or moving) meanwhile: left to its owner, and this set forgets it
        value, bad = groups.sorted_out(key, groups.open_groups.get(key))
        if not value and not bad:
            continue
        ids = {group["notification_id"] for group in value.values()}
        in_table |= ids
        if ids <= closed_here:
            del groups.open_groups[key]
        elif key in refused_keys:
            # Other groups of the client are still open: write its value without the closed ones.
            groups.write_value_of_partition(key, {rule_id: group for rule_id, group in value.items()
                                                  if group["notification_id"] not in closed_here},
                                            partition_for(key, partitions))
        else:
            continue
        closed_here.difference_update(ids)
        written = True
    # Forget the closed groups that are in no value of this worker's partitions any more: their
    # partition was taken away before their value was rewritten. Forgetting is safe: a group
    # closed again finds its notification emitted and sends nothing.
    closed_here.intersection_update(in_table)
    if written:
        # A failed write leaves the group in the changelog: closed again after a restart, it finds
        # its notification emitted and sends nothing (a refused group is a dead letter again).
        await groups.wait_until_written()
    return ready


def is_uuid(key: bytes) -> bool:
    try:
        uuid.UUID(key.decode())
    except ValueError:  # UnicodeDecodeError included
        return False
    return True


# The due groups' clients that exist and are not being deleted, their rows locked as the foreign key
# of the notifications' insert would lock them (FOR KEY SHARE), but before it: a client whose
# deletion is under way is waited for, then not returned. Found by the insert's foreign key check
# instead, its deletion would fail the insert, and the round, for every client's due groups.
_LOCK_KNOWN_CLIENTS = """
SELECT client_id::text FROM clients WHERE client_id = ANY($1::uuid[]) AND deleting_since IS NULL
ORDER BY client_id FOR KEY SHARE
"""


async def record_due_groups(pool: asyncpg.Pool, due: list[groups.DueGroup], now: float
                            ) -> tuple[list[NotificationReady], list[tuple[groups.DueGroup, Exception]]]:
    """Insert the due groups' notifications: those to emit, and the groups Postgres refused (a NUL
    in an alert, an id it cannot read), each group then on its own (`record_closed_groups_apart`,
    as the agent closes groups early). Their members, listed or not, that a silence in force now
    matches are left out; a group with nothing left to notify is recorded SILENCED
    (tables/group_records.py listing_at_close). Transient errors propagate: the timer tries again.

    The group of a client that does not exist, or is being deleted, is neither: a client deleted
    while its group was open takes its members along (ON DELETE CASCADE) when its row goes, and its
    group is dropped, not left to fail every round.
    """
    if not due:
        return [], []
    async with pool.acquire() as conn, conn.transaction():
        # The clients' locks, as the agent takes them (agents/match_outcomes.py): during a
        # rebalance another worker's agent may be adding an alert to one of these groups. Without
        # them, its member could commit after this insert counted the group's members: in a closed
        # group, neither listed nor counted, and never notified. With them, either that alert is
        # committed first and counted, or its batch waits, finds the group closed and opens another.
        await lock_clients(conn, [d.key.decode() for d in due])
        known = {row[0] for row in await conn.fetch(_LOCK_KNOWN_CLIENTS,
                                                    sorted({client_of(d) for d in due}))}
        # Silences are applied when a group closes, as Alertmanager applies them at each flush: one
        # created while the group was open mutes the members it holds. Read from Postgres, one
        # statement per round: this worker may keep no silence replica (evaluate role only).
        silences = await active_silences(conn, known, now)
        return await group_records.record_closed_groups_apart(conn, [d for d in due if client_of(d) in known], now,
                                                       silences)


def client_of(due: groups.DueGroup) -> str:
    """The group's client_id, as Postgres writes it (the key is a UUID: see is_uuid)."""
    return str(uuid.UUID(due.key.decode()))


@app.timer(interval=settings.group_close_interval_s)
async def close_groups() -> None:
    if not table_is_current():
        return
    try:
        async with groups_lock:
            await close_due_groups(await db.pool(), time.time(), owned_partitions(), writable_partitions)
        _closing_failures.succeeded()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if failed_by_giving_up(exc):
            # The worker is stopping and gave up on the broker: what was due stays in the table.
            log.warning("closing groups: the writes failed when this worker gave up on the broker while stopping")
        else:
            _closing_failures.failed("closing groups failed; trying again")

