"""retention: keep what the pipeline records from growing for ever.

A timer on every worker with the aggregate role runs, every RETENTION_INTERVAL_S, a plain
function for each kind of record:
- settled notifications created longer ago than NOTIFICATION_RETENTION_DAYS are deleted, with their
  deliveries (ON DELETE CASCADE) and their group memberships (`notification_alerts`);
- fingerprints too old to suppress anything are forgotten (`prune_fingerprints`);
- silences ended longer ago than SILENCE_RETENTION_DAYS are deleted, and their deletion is
  announced on `silence.changed` (through the outbox, as the API announces changes), so every
  worker's silence replica lets go of them too;
- rule deletions made longer ago than DELETED_RULE_RETENTION_DAYS are forgotten (`deleted_rules`),
  as every worker's rule replica forgets them (tables/changelog_replica.py); so are silence deletions
  after SILENCE_RETENTION_DAYS. Each forgotten deletion queues a tombstone (a null value) for its key,
  so that compaction removes the key from the topic (`forget_deletions`).

Another timer, every CLIENT_DELETION_INTERVAL_S, finishes the deletion of clients the API marked
being deleted (web/clients.py): their notification history in batches, then their row
(`finish_client_deletions`). A worker stopped midway leaves the rest to the next round, its own or
another's.

The notifications row is also the deduplication record (one per client and alert): an alert whose
notification was deleted would be notified again if it were matched again, so the retention is
the deduplication window, and it is days where redelivery of a Kafka message is minutes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

import asyncpg

from agents.match_outcomes import prune_fingerprints
from agents.rule_outbox import RULE_OUTBOX, SILENCE_OUTBOX, Outbox, queue_tombstones, record_silence_deleted, wake_up
from alerting_app import db, metrics
from alerting_app.app import app, settings
from alerting_app.failure_streak import FailureStreak

log = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 600.0
# How soon a deleted client's history starts to go (web/clients.py): the look-up is one index scan of
# normally no rows.
CLIENT_DELETION_INTERVAL_S = 10.0
_failures: dict[str, FailureStreak] = {}  # by kind of record: each kind fails and recovers on its own
PRUNE_BATCH_SIZE = 5_000

# SKIP LOCKED: a notification the recorder, the emitted mark or a retry holds is left for the next
# round, and workers deleting at once take different rows. The cascade to its deliveries and the
# delete of its memberships can still wait for a row lock (a redelivered message opening
# deliveries, say); a deadlock there is detected by Postgres and the batch runs again
# (db.retry_transient).
# Memberships go in the same statement as their notification: a membership whose notification row
# is missing means "group still open" (agents/match_outcomes.py `_RECORDED`), so one left behind
# would reopen a group for a redelivered member.
# {which}: the notifications to consider, with parameters from $2 ($1 is the batch size).
_DELETE_NOTIFICATIONS = """
WITH doomed AS (
    SELECT notification_id FROM notifications
    WHERE {which}
    ORDER BY created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), members AS (
    DELETE FROM notification_alerts a USING doomed d WHERE a.notification_id = d.notification_id
)
DELETE FROM notifications n USING doomed d WHERE n.notification_id = d.notification_id
"""
# Only settled notifications are pruned: a PENDING one still has deliveries to make, and one not yet
# emitted is still the aggregate stage's to send.
_PRUNE_NOTIFICATIONS = _DELETE_NOTIFICATIONS.format(which="""
    created_at < now() - make_interval(secs => $2) AND status <> 'PENDING' AND emitted
    -- Settled, yet with a delivery still PENDING (opened as it settled: a race records._OPEN
    -- narrows but cannot close): kept until that delivery is done.
    AND NOT EXISTS (SELECT 1 FROM deliveries d
                    WHERE d.notification_id = notifications.notification_id AND d.status = 'PENDING')""")
# A client being deleted: all of its history, whatever the status, as the cascade of its row would
# take it. Nothing is delivered to it any more (its endpoints are gone), and the pipeline drops what
# it still holds of it, not dead-lettered (alerting_app/deleted_clients.py, records.gone).
_DELETE_CLIENT_HISTORY = _DELETE_NOTIFICATIONS.format(which="client_id = $2")


async def _deleted_in_batches(pool: asyncpg.Pool, statement: str, batch_size: int, *args: object) -> AsyncIterator[int]:
    """How many notifications each batch of `statement` deleted, one transaction each, until a
    batch deletes fewer than `batch_size`.

    Small batches keep each transaction, and the locks and WAL it holds, short, so a run over a
    large backlog does not stall the pipeline's own writes.
    """
    while True:
        deleted = int((await pool.execute(statement, batch_size, *args)).split()[-1])
        yield deleted
        if deleted < batch_size:
            return


async def prune_notifications(pool: asyncpg.Pool, older_than_s: float, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete the settled notifications created more than `older_than_s` ago, a batch per transaction; how many."""
    pruned = 0
    async for deleted in _deleted_in_batches(pool, _PRUNE_NOTIFICATIONS, batch_size, float(older_than_s)):
        metrics.notifications_pruned.inc(deleted)
        pruned += deleted
    return pruned


_CLIENTS_BEING_DELETED = "SELECT client_id FROM clients WHERE deleting_since IS NOT NULL ORDER BY deleting_since"
# Last, once its history is gone: what is left (rows the pipeline held during the batches, the
# memberships of groups still open, fingerprints) goes with it (ON DELETE CASCADE), and is little.
_DELETE_CLIENT = "DELETE FROM clients WHERE client_id = $1 AND deleting_since IS NOT NULL"


async def finish_client_deletion(pool: asyncpg.Pool, client_id: UUID, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete the notification history of a client being deleted (web/clients.py), a batch per
    transaction, then its row; how many notifications. Stopped midway, it leaves the rest to the
    next call: each batch is committed on its own, and the client stays marked until its row goes."""
    deleted = sum([deleted async for deleted in _deleted_in_batches(pool, _DELETE_CLIENT_HISTORY, batch_size,
                                                                     client_id)])
    await pool.execute(_DELETE_CLIENT, client_id)
    return deleted


async def finish_client_deletions(pool: asyncpg.Pool, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """`finish_client_deletion` for every client being deleted, oldest deletion first; how many
    notifications. Workers running it at once share the batches (SKIP LOCKED)."""
    return sum([await finish_client_deletion(pool, row[0], batch_size)
                for row in await pool.fetch(_CLIENTS_BEING_DELETED)])


# Locked, so an API change of the same silence waits and then finds it gone; SKIP LOCKED, so a
# silence the API holds is simply left for the next round.
_LOCK_ENDED_SILENCES = """
SELECT silence_id::text, client_id::text, version FROM silences
WHERE ends_at < now() - make_interval(secs => $1)
ORDER BY ends_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
_DELETE_SILENCES = "DELETE FROM silences WHERE silence_id = ANY($1::uuid[])"


async def prune_silences(pool: asyncpg.Pool, ended_before_s: float, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete the silences that ended more than `ended_before_s` ago; how many.

    Each deletion is queued for silence.changed in the same transaction (a delete event, one
    version up, as when a client is deleted): replicas drop the silence, and a replica reading the
    topic from scratch later never sees it at all once the topic is compacted.
    """
    pruned = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            ended = await conn.fetch(_LOCK_ENDED_SILENCES, float(ended_before_s), batch_size)
            for row in ended:
                await record_silence_deleted(conn, row["silence_id"], row["client_id"], row["version"])
            await conn.execute(_DELETE_SILENCES, [row["silence_id"] for row in ended])
        pruned += len(ended)
        if ended:
            wake_up()  # the relay, when this worker runs it
        if len(ended) < batch_size:
            # The remembered deletions of silences (for republishing) are kept only as long as ended
            # silences: a silence deleted by retention had ended, and one deleted with its client can
            # mute nothing once that client's rules are gone, so a replica that never hears of its
            # deletion matches no differently; it only keeps a little memory.
            await forget_deletions(pool, SILENCE_OUTBOX, "deleted_silences", ended_before_s, batch_size)
            return pruned


# Remembered so that republishing carries the deletion to a topic that never got it (one recreated,
# or the other cluster of a blue/green switch: docs/operations.md), and so that a relay that lost
# its lock can queue it again (agents/rule_outbox.py): both happen within hours of the deletion
# being relayed, never the retention later. A deletion still in the outbox (the broker away all
# that time), or in a batch recorded in flight that a later relay is yet to queue again (no relay
# running since), is kept until then. Batched, as a million deletions may be due at once.
#
# Each deletion forgotten queues a tombstone (relayed as a null value: rule_outbox.queue_tombstones)
# for its key in the same transaction: it follows the key's delete on the compacted topic, every replica forgets
# the key on reading it (tables/changelog_replica.py), and compaction removes the delete, then the
# tombstone itself (after the topic's delete.retention.ms), so the topic does not keep every
# deletion ever made. Locked in key order, SKIP LOCKED: a republish holding a deletion FOR SHARE
# (`queue_current_rules`) queues it before this queues the tombstone, or finds it gone; never after.
# {table}, {key}: the deletions table and its key column; {outbox}: the key's outbox.
_UNRELAYED = ("({key} IN (SELECT {key} FROM {outbox})"
              " OR {key} IN (SELECT unnest(keys) FROM outbox_in_flight WHERE outbox = '{outbox}'))")
_FORGET_DELETIONS = f"""
WITH forgotten AS (
    DELETE FROM {{table}} WHERE {{key}} IN (
        SELECT {{key}} FROM {{table}}
        WHERE deleted_at < now() - make_interval(secs => $1) AND relayed_by IS NOT NULL AND NOT {_UNRELAYED}
        ORDER BY {{key}}
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING {{key}}, client_id, version, relayed_by
)
SELECT * FROM forgotten ORDER BY {{key}}
"""
# Every deletion forgotten was relayed before this: the newest time a round found one of them relayed
# (`relayed_by`, below), plus a round's length for the workers' clocks, by which their stores date
# what they read, against Postgres's. Workers trust their rule store only if it read the topic up to
# a later time (migrations/012, tables/rule_replica.py `outdated`). Not deleted_at plus a round:
# that holds only while rounds run every RETENTION_INTERVAL_S, and a delete relayed while none ran
# (the aggregate workers down along with the relay) was relayed after it (migrations/013).
# Raised, never lowered: a worker with a longer retention forgets older deletions.
_RECORD_FORGOTTEN = f"""
INSERT INTO forgotten_deletions (deletions, relayed_before)
VALUES ($1, $2::timestamptz + make_interval(secs => {RETENTION_INTERVAL_S}))
ON CONFLICT (deletions) DO UPDATE
SET relayed_before = GREATEST(forgotten_deletions.relayed_before, EXCLUDED.relayed_before)
"""
# The tombstone must come the retention after the delete was *relayed*, not only after it was made:
# a worker's rule store is trusted for that long (tables/rule_replica.py `outdated`), and one
# stopped before a delete that was relayed late, and so followed at once by its tombstone, could
# find both compacted away. So a deletion still waiting to be relayed is dated again, every round
# (RETENTION_INTERVAL_S), and is then dated within a round of its relaying while rounds run. Normally
# the outbox is empty and this touches nothing. In key order, SKIP LOCKED, as above.
_DATE_UNRELAYED_DELETIONS = f"""
UPDATE {{table}} SET deleted_at = now() WHERE {{key}} IN (
    SELECT {{key}} FROM {{table}} WHERE {_UNRELAYED} ORDER BY {{key}} FOR UPDATE SKIP LOCKED
)
"""
# Then each deletion found relayed for the first time is stamped: it was on the topic by now, however
# long ago the last round ran. Normally the few made since the last round (a partial index holds the
# unstamped ones). A deletion relayed after this statement is stamped, and forgotten, a round later.
_STAMP_RELAYED_DELETIONS = f"""
UPDATE {{table}} SET relayed_by = now() WHERE {{key}} IN (
    SELECT {{key}} FROM {{table}} WHERE relayed_by IS NULL AND NOT {_UNRELAYED}
    ORDER BY {{key}} FOR UPDATE SKIP LOCKED
)
"""


async def forget_deletions(pool: asyncpg.Pool, outbox: Outbox, table: str, older_than_s: float,
                           batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Forget the deletions in `table` made (or last seen waiting to be relayed) more than
    `older_than_s` ago and found relayed by a round, queuing a tombstone for each on `outbox` and
    raising the table's `forgotten_deletions.relayed_before` past them, a batch per transaction; how many."""
    names = {"table": table, "key": outbox.key_column, "outbox": outbox.table}
    await pool.execute(_DATE_UNRELAYED_DELETIONS.format(**names))
    await pool.execute(_STAMP_RELAYED_DELETIONS.format(**names))
    statement = _FORGET_DELETIONS.format(**names)
    forgotten = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetch(statement, float(older_than_s), batch_size)
            await queue_tombstones(conn, outbox, deleted)
            if deleted:
                await conn.execute(_RECORD_FORGOTTEN, table, max(row["relayed_by"] for row in deleted))
        done = len(deleted)
        forgotten += done
        if done:
            wake_up()  # the relay, when this worker runs it
        if done < batch_size:
            return forgotten


async def forget_rule_deletions(pool: asyncpg.Pool, older_than_s: float, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Forget the rule deletions made more than `older_than_s` ago and relayed (`forget_deletions`); how many."""
    return await forget_deletions(pool, RULE_OUTBOX, "deleted_rules", older_than_s, batch_size)


async def _run_logged(what: str, prune: Callable[[asyncpg.Pool], Awaitable[int]],
                      interval_s: float = RETENTION_INTERVAL_S) -> None:
    """`prune`, retried while Postgres is away; another failure is logged, saying when its timer
    (every `interval_s`) tries again."""
    failures = _failures.setdefault(what, FailureStreak(log, what))
    try:
        pruned = await db.retry_transient(prune, what)
    except asyncio.CancelledError:
        raise
    except Exception:
        failures.failed("%s failed; trying again in %.0fs", what, interval_s)
        return
    failures.succeeded()
    if pruned:
        log.info("%s: %d rows", what, pruned)


@app.timer(interval=CLIENT_DELETION_INTERVAL_S)
async def delete_clients_history() -> None:
    await _run_logged("deleting the history of deleted clients", finish_client_deletions, CLIENT_DELETION_INTERVAL_S)


@app.timer(interval=RETENTION_INTERVAL_S)
async def forget_old_records() -> None:
    # Each kind on its own: one failing is logged and the others still run. A retention of 0 keeps for ever.
    if settings.notification_retention_days:
        await _run_logged("deleting notifications past NOTIFICATION_RETENTION_DAYS",
                          lambda pool: prune_notifications(pool, settings.notification_retention_days * 86_400))
    if settings.silence_retention_days:
        await _run_logged("deleting silences ended more than SILENCE_RETENTION_DAYS ago",
                          lambda pool: prune_silences(pool, settings.silence_retention_days * 86_400))
    if settings.deleted_rule_retention_days:
        await _run_logged("forgetting rule deletions older than DELETED_RULE_RETENTION_DAYS",
                          lambda pool: forget_rule_deletions(pool, settings.deleted_rule_retention_days * 86_400))
    await _run_logged("forgetting fingerprints too old to suppress anything", prune_fingerprints)
