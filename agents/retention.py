"""retention: keep the aggregate stage's history from growing for ever.

Two timers on every worker with the aggregate role, each a plain function run every
RETENTION_INTERVAL_S:
- settled notifications created longer ago than NOTIFICATION_RETENTION_DAYS are deleted, with their
  deliveries (ON DELETE CASCADE) and their group memberships (`notification_alerts`);
- fingerprints too old to suppress anything are forgotten (`prune_fingerprints`).

The notifications row is also the deduplication record (one per client and alert): an alert whose
notification was deleted would be notified again if it were matched again, so the retention is
the deduplication window, and it is days where redelivery of a Kafka message is minutes.
"""
from __future__ import annotations

import asyncio
import logging

import asyncpg

from agents.match_outcomes import prune_fingerprints
from alerting_app import db, metrics
from alerting_app.app import app, settings

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 600.0
PRUNE_BATCH_SIZE = 5_000

# Only settled notifications go: a PENDING one still has deliveries to make, and one not yet
# emitted is still the aggregate stage's to send. SKIP LOCKED: a row the recorder or the emitted
# mark holds is simply left for the next round, so this never waits on the pipeline and can take
# no part in a deadlock with it; workers pruning at once take different rows.
# Memberships go in the same statement as their notification: a membership whose notification row
# is missing means "group still open" (agents/match_outcomes.py `_RECORDED`), so one left behind
# would reopen a group for a redelivered member.
_PRUNE_NOTIFICATIONS = """
WITH doomed AS (
    SELECT notification_id FROM notifications
    WHERE created_at < now() - make_interval(secs => $1) AND status <> 'PENDING' AND emitted
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), members AS (
    DELETE FROM notification_alerts a USING doomed d WHERE a.notification_id = d.notification_id
)
DELETE FROM notifications n USING doomed d WHERE n.notification_id = d.notification_id
"""


async def prune_notifications(pool: asyncpg.Pool, older_than_s: float, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete the settled notifications created more than `older_than_s` ago, a batch per transaction; how many.

    Small batches keep each transaction, and the locks and WAL it holds, short, so the first run
    over a large backlog does not stall the pipeline's own writes.
    """
    pruned = 0
    while True:
        status = await pool.execute(_PRUNE_NOTIFICATIONS, float(older_than_s), batch_size)
        deleted = int(status.split()[-1])
        metrics.notifications_pruned.inc(deleted)
        pruned += deleted
        if deleted < batch_size:
            return pruned


async def _run_logged(what: str, prune) -> None:
    try:
        pruned = await db.retry_transient(prune, what)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s failed; trying again in %.0fs", what, RETENTION_INTERVAL_S)
        return
    if pruned:
        log.info("%s: %d rows", what, pruned)


@app.timer(interval=RETENTION_INTERVAL_S)
async def forget_old_notifications() -> None:
    if not settings.notification_retention_days:
        return  # 0: keep for ever

    await _run_logged("deleting notifications past NOTIFICATION_RETENTION_DAYS",
                      lambda pool: prune_notifications(pool, settings.notification_retention_days * 86_400))


@app.timer(interval=RETENTION_INTERVAL_S)
async def forget_old_fingerprints() -> None:
    await _run_logged("forgetting fingerprints too old to suppress anything", prune_fingerprints)
