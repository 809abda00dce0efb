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

import asyncpg

from agents.aggregate import Aggregation, publish_aggregation
from agents.match_outcomes import closed_here, groups_lock, known_clients, prune_fingerprints
from alerting_app import db
from alerting_app.app import alerts_matched, app, settings
from alerting_app.contracts import NotificationReady
from alerting_app.sending import partition_for
from tables import groups

log = logging.getLogger(__name__)


def table_is_current() -> bool:
    """False while partitions move or the table recovers: a group read then may be an old version."""
    return not (app.rebalancing or app.in_recovery) and app.tables.recovery.completed.is_set()


def owned_partitions() -> set[int]:
    topic = alerts_matched.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


async def close_due_groups(pool: asyncpg.Pool, now: float, owned: set[int]) -> list[NotificationReady]:
    """Emit each due group of the clients whose partition this worker owns, exactly once.

    Runs under `groups_lock`. The notification row (fixed notification_id) is inserted once, sent,
    marked emitted, and only then the key deleted: a closer that dies in between sends the same
    notification again, which the deliver stage delivers once per endpoint.
    """
    partitions = tuple(range(settings.topic_partitions))
    items = [(key, value) for key, value in groups.open_groups.items()
             if partition_for(key, partitions) in owned]
    due = groups.due_groups(items, now, closed_here)
    if due:
        # A client deleted while its group was open took its members along (ON DELETE CASCADE):
        # its group is dropped, not left to fail every close.
        known = await known_clients(pool, [d.key.decode() for d in due])
        gone = [d for d in due if str(uuid.UUID(d.key.decode())) not in known]
        due = [d for d in due if d not in gone]
        closed_here.update(d.group["notification_id"] for d in gone)
    ready = await groups.record_closed_groups(pool, due, now)
    await publish_aggregation(Aggregation(ready=ready))
    closed_here.update(d.group["notification_id"] for d in due)
    if items:
        await groups.prepare_writes()
    for key, value in items:
        ids = {group["notification_id"] for group in (value or {}).values()}
        if ids <= closed_here:
            del groups.open_groups[key]
            closed_here.difference_update(ids)
    return ready


@app.timer(interval=settings.group_close_interval_s)
async def close_groups() -> None:
    if not table_is_current():
        return
    try:
        async with groups_lock:
            await close_due_groups(await db.pool(), time.time(), owned_partitions())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("closing groups failed; trying again")


FINGERPRINT_PRUNE_INTERVAL_S = 600.0


@app.timer(interval=FINGERPRINT_PRUNE_INTERVAL_S)
async def forget_old_fingerprints() -> None:
    """Keep the fingerprints table from growing for ever (every aggregate worker; the DELETE is idempotent)."""
    try:
        pruned = await prune_fingerprints(await db.pool())
        if pruned:
            log.info("forgot %d fingerprints too old to suppress anything", pruned)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("pruning fingerprints failed; trying again in %.0fs", FINGERPRINT_PRUNE_INTERVAL_S)
