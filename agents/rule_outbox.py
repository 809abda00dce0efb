"""Outbox relay: rule and silence changes written by the API reach `rule.changed` and `silence.changed`.

The API writes each change's event into an outbox table in the same transaction as the change
(`record_rule_change` into `rule_outbox`, `record_silence_change` into `silence_outbox`), so an
accepted change is never lost when the broker is down. This relay sends each outbox's rows, oldest
first, keyed by their id, waits for the broker's acknowledgement and only then deletes them: a crash
in between sends a row twice, which consumers ignore by version. A row marked `tombstone` is sent
as a null value: retention queues one when it forgets a deletion (agents/retention.py).

Order matters beyond consumers that follow the topic: the topics are compacted, keeping the last
record of each key, so a replica reading from scratch sees only the version published last. Hence
one relay at a time per outbox, across workers (`_relay_batch`), each key's rows in version order
in the outbox, republished ones included (`republish_all_rules`), and each key's current version
queued again behind a batch whose sends may have landed after another relay's (`outbox_in_flight`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import asyncpg
from faust.types import TopicT

from alerting_app import db
from alerting_app.app import app, rule_changed, silence_changed
from alerting_app.broker_transport import GaveUpOnTheBroker, failed_by_giving_up
from alerting_app.contracts import Rule, RuleChanged, SilenceChanged
from alerting_app.failure_streak import FailureStreak
from alerting_app.silencing import SILENCE_COLUMNS, silence_of_row
from alerting_app.sending import all_acknowledged, send_batched

log = logging.getLogger(__name__)

RELAY_INTERVAL_S = 0.5
# While the relay keeps failing, its timer backs off up to this; a wake-up (an API write) still relays at once.
RELAY_MAX_BACKOFF_S = 5.0
BATCH_SIZE = 1000

_wake_up = asyncio.Event()
_relay_failures = FailureStreak(log, "outbox relay")
_requeue_failures = FailureStreak(log, "queuing a stopped relay's keys again")


@dataclass(frozen=True)
class Outbox:
    """An outbox table, the column its messages are keyed by, the topic it is relayed to, and the
    contract of its events."""

    table: str
    key_column: str
    topic: TopicT
    event: type[RuleChanged] | type[SilenceChanged]


RULE_OUTBOX = Outbox("rule_outbox", "rule_id", rule_changed, RuleChanged)
SILENCE_OUTBOX = Outbox("silence_outbox", "silence_id", silence_changed, SilenceChanged)
OUTBOXES = (RULE_OUTBOX, SILENCE_OUTBOX)


# One statement per table however many events: a client's deletion queues one event per rule (up to
# MAX_RULES_PER_CLIENT) and per silence in the transaction that holds its row, and a statement per
# event made deleting a client with 10,000 rules and 1,000 silences take 6 to 10 s (under 1 s so).
# In array order, so that a key's later version gets the larger outbox id, as from one call per event.
_QUEUE = """
INSERT INTO {table} ({key_column}, payload, tombstone)
SELECT key, payload, $3 FROM unnest($1::uuid[], $2::jsonb[]) WITH ORDINALITY AS event(key, payload, n) ORDER BY n
"""
# A deletion is also kept (migrations/007_deletions.sql), for republishing; a key deleted twice in
# one call keeps its greater version, as from one call per event.
_REMEMBER_DELETIONS = """
INSERT INTO {table} AS d ({key_column}, client_id, version)
SELECT DISTINCT ON (key) key, client_id, version
FROM unnest($1::uuid[], $2::uuid[], $3::integer[]) AS deleted(key, client_id, version) ORDER BY key, version DESC
ON CONFLICT ({key_column}) DO UPDATE SET version = GREATEST(d.version, EXCLUDED.version)
"""


async def _queue(conn: asyncpg.Connection, outbox: Outbox, events: Sequence[RuleChanged | SilenceChanged],
                 tombstone: bool = False) -> None:
    """Insert the events into the outbox, in order, in one statement (`tombstone`: each to be sent
    as a null value, queue_tombstones)."""
    await conn.execute(_QUEUE.format(table=outbox.table, key_column=outbox.key_column),
                       [getattr(event, outbox.key_column) for event in events],
                       [event.model_dump(mode="json") for event in events], tombstone)


async def queue_tombstones(conn: asyncpg.Connection, outbox: Outbox, deleted: Sequence[asyncpg.Record]) -> None:
    """Queue a tombstone (a null value) for each of these forgotten deletions (rows of the key,
    client_id and version), in order: agents/retention.py.

    The row keeps the key's delete event as its payload, which this release's relay does not send:
    a relay of a release before migration 009 (in a rolling deployment, or after a rollback) sends
    it instead, a delete every replica ignores by its version, rather than a JSON null each would
    dead-letter, and that compaction would keep as the key's last record."""
    await _queue(conn, outbox, [outbox.event(**{outbox.key_column: str(row[outbox.key_column])},
                                             client_id=str(row["client_id"]), version=row["version"],
                                             action="delete")
                                for row in deleted], tombstone=True)


async def _record_changes(conn: asyncpg.Connection, outbox: Outbox, deletions_table: str,
                          events: Sequence[RuleChanged | SilenceChanged]) -> None:
    if not events:
        return
    await _queue(conn, outbox, events)
    deleted = [(getattr(event, outbox.key_column), event.client_id, event.version)
               for event in events if event.action == "delete"]
    if deleted:
        await conn.execute(_REMEMBER_DELETIONS.format(table=deletions_table, key_column=outbox.key_column),
                           *(list(column) for column in zip(*deleted)))


async def record_rule_change(conn: asyncpg.Connection, event: RuleChanged) -> None:
    """Queue `event` for rule.changed; call inside the transaction that makes the change."""
    await record_rule_changes(conn, [event])


async def record_rule_changes(conn: asyncpg.Connection, events: Sequence[RuleChanged]) -> None:
    """`record_rule_change` for each event, in order, in two statements at most."""
    await _record_changes(conn, RULE_OUTBOX, "deleted_rules", events)


async def record_silence_change(conn: asyncpg.Connection, event: SilenceChanged) -> None:
    """Queue `event` for silence.changed; call inside the transaction that makes the change."""
    await record_silence_changes(conn, [event])


async def record_silence_changes(conn: asyncpg.Connection, events: Sequence[SilenceChanged]) -> None:
    """`record_silence_change` for each event, in order, in two statements at most."""
    await _record_changes(conn, SILENCE_OUTBOX, "deleted_silences", events)


def silence_deleted(silence_id: str, client_id: str, version: int) -> SilenceChanged:
    """The deletion of a silence held at `version`: its delete event is one version up, so no late
    upsert revives it."""
    return SilenceChanged(silence_id=silence_id, client_id=client_id, version=version + 1, action="delete")


async def record_silence_deleted(conn: asyncpg.Connection, silence_id: str, client_id: str, version: int) -> None:
    """Queue the deletion of a silence held at `version` (`silence_deleted`); call inside the
    transaction that deletes the row."""
    await record_silence_change(conn, silence_deleted(silence_id, client_id, version))


# Each item's current state, or its remembered deletion; all of them when the ids are NULL.
_ONLY = "($1::uuid[] IS NULL OR {key} = ANY($1::uuid[]))"


async def republish_all_rules(pool: asyncpg.Pool) -> int:
    """Queue every rule in Postgres, at its current version, and every deleted rule's deletion, for
    rule.changed; return how many events.

    Postgres is the source of truth and the topic its transport: when the topic starts empty (a
    new cluster, or the in-memory dev broker restarted) this puts the rules back on it. Replicas
    that hold a rule already ignore the repeat, since its version is not newer. The deletions go
    too: a replica holding a rule deleted since (its deletion relayed to another cluster, or lost
    with the topic) must not keep matching it.
    """
    return await republish_rules(pool, None)


async def republish_rules(pool: asyncpg.Pool, rule_ids: list[str] | None) -> int:
    """`republish_all_rules` for these rules only (None: all)."""
    async with pool.acquire() as conn, conn.transaction():
        return await queue_current_rules(conn, rule_ids)


async def queue_current_rules(conn: asyncpg.Connection, rule_ids: list[str] | None) -> int:
    """Queue these rules' current versions and remembered deletions (None: all of them) for
    rule.changed, inside the caller's transaction; return how many events."""
    events = await current_rule_events(conn, rule_ids)
    await _queue(conn, RULE_OUTBOX, events)
    return len(events)


async def current_rule_events(conn: asyncpg.Connection, rule_ids: list[str] | None) -> list[RuleChanged]:
    """These rules' current versions and remembered deletions (None: all of them), as rule.changed
    events, read inside the caller's transaction."""
    only = _ONLY.format(key="rule_id")
    # FOR SHARE: a change in flight commits first and is read at its new version, and a later
    # one waits for this transaction, so no rule is queued here at an older version behind a
    # newer one (which compaction would then keep). In key order, as the API locks them
    # (web/clients.py), so a client's deletion and this wait for each other without deadlock.
    rows = await conn.fetch("SELECT rule_id, client_id, severity, source, name, enabled, version,"
                            " group_window_s, repeat_interval_s, fingerprint_keys FROM rules"
                            f" WHERE {only} ORDER BY rule_id FOR SHARE", rule_ids)
    events = [RuleChanged.upsert(Rule(**{**dict(row), "rule_id": str(row["rule_id"]),
                                        "client_id": str(row["client_id"])})) for row in rows]
    events += [RuleChanged(rule_id=str(row["rule_id"]), client_id=str(row["client_id"]),
                           version=row["version"], action="delete")
               # FOR SHARE too: retention forgetting a deletion queues a tombstone after it
               # (agents/retention.py), which must not come before this queues the deletion again.
               for row in await conn.fetch("SELECT rule_id, client_id, version FROM deleted_rules"
                                           f" WHERE {only} ORDER BY rule_id FOR SHARE", rule_ids)]
    return events


async def republish_all_silences(pool: asyncpg.Pool) -> int:
    """Queue every silence in Postgres, at its current version, and every deleted silence's deletion,
    for silence.changed; return how many events.

    As for rules: when the topic starts empty, this puts the silences back on it, and no silence
    is queued at an older version behind a newer one.
    """
    return await republish_silences(pool, None)


async def republish_silences(pool: asyncpg.Pool, silence_ids: list[str] | None) -> int:
    """`republish_all_silences` for these silences only (None: all)."""
    async with pool.acquire() as conn, conn.transaction():
        return await queue_current_silences(conn, silence_ids)


async def queue_current_silences(conn: asyncpg.Connection, silence_ids: list[str] | None) -> int:
    """`queue_current_rules` for silences and silence.changed."""
    events = await current_silence_events(conn, silence_ids)
    await _queue(conn, SILENCE_OUTBOX, events)
    return len(events)


async def current_silence_events(conn: asyncpg.Connection, silence_ids: list[str] | None) -> list[SilenceChanged]:
    """`current_rule_events` for silences and silence.changed."""
    only = _ONLY.format(key="silence_id")
    rows = await conn.fetch(f"SELECT {SILENCE_COLUMNS} FROM silences WHERE {only} ORDER BY silence_id FOR SHARE",
                            silence_ids)
    events = [SilenceChanged.upsert(silence_of_row(row)) for row in rows]
    events += [SilenceChanged(silence_id=str(row["silence_id"]), client_id=str(row["client_id"]),
                              version=row["version"], action="delete")
               for row in await conn.fetch("SELECT silence_id, client_id, version FROM deleted_silences"
                                           f" WHERE {only} ORDER BY silence_id FOR SHARE", silence_ids)]
    return events


_QUEUE_CURRENT = {RULE_OUTBOX.table: queue_current_rules, SILENCE_OUTBOX.table: queue_current_silences}
_CURRENT_EVENTS = {RULE_OUTBOX.table: current_rule_events, SILENCE_OUTBOX.table: current_silence_events}


async def publish_current_to_new_topic(pool: asyncpg.Pool, outbox: Outbox,
                                       send: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]],
                                       queued_first: bool = True) -> int:
    """For `outbox`'s topic just created (empty: `alerting-app up`'s in-memory broker is new at
    each start; or created by an `up` stopped before it had done this, which leaves a mark for the
    next: alerting_app/up.py `PUBLISH_MARKS`): every current event of its kind, and every remembered deletion, sent at once with
    `send` (keyed messages; it returns once the broker acknowledged them all), in place of what the
    outbox holds, which they supersede; return how many events.

    Queued for the relay instead (`republish_all_rules`), they reached the topic only once a worker
    was running, its replica already caught up with the near-empty topic: for seconds (a minute
    for a million rules) it matched alerts against part of the rules, and `up` said it was ready.
    On the topic before any worker starts, they are read in full before matching begins.

    Under the relay's lock, so no relay sends meanwhile. The outbox rows read first are deleted
    once the events are acknowledged: each is superseded by the current state read after it (FOR
    SHARE: a change in flight commits first). A row committed since stays, for the relay to send
    after these, as the newer version it is. A tombstone stays too, for the relay: the current
    state holds nothing of its key (retention forgot the deletion as it queued it), so nothing
    supersedes it, and the topic may hold the key's delete, which only the null removes: the topic
    an `up` left marked is not new at the next, and a relay may have put the delete there since.
    On a new topic it is a null for a key never written, which compaction removes.

    `queued_first`: the same events are first queued for the relay and committed (they are among
    the rows then deleted), so that a publish that fails partway (the broker refusing a batch, a
    Ctrl-C, a kill) leaves them for the relay, which puts them on the topic after whatever part
    landed. Without, a broker that outlives the run (KAFKA_BOOTSTRAP_SERVERS given) kept that part,
    and the next `up`, finding the topic there, published nothing: the other rules were missing
    from it for good, and matched no alert. Only a broker that goes with the run (`up`'s embedded
    one: each start has a new, empty one) may go without, saving the outbox the writes.
    """
    if queued_first:
        async with pool.acquire() as conn, conn.transaction():
            await _QUEUE_CURRENT[outbox.table](conn, None)
    async with pool.acquire() as conn, conn.transaction():
        await lock_relay(conn, outbox)
        superseded = [row[0] for row in await conn.fetch(f"SELECT outbox_id FROM {outbox.table} WHERE NOT tombstone"
                                                         " FOR UPDATE")]
        events = await _CURRENT_EVENTS[outbox.table](conn, None)
        await send([(getattr(event, outbox.key_column).encode(), event.encode()) for event in events])
        await conn.execute(f"DELETE FROM {outbox.table} WHERE outbox_id = ANY($1::bigint[])", superseded)
    return len(events)


def wake_up() -> None:
    """Relay now instead of at the next tick; the API calls this right after committing a change."""
    _wake_up.set()


async def relay_pending(pool: asyncpg.Pool, batch_size: int = BATCH_SIZE,
                        outboxes: tuple[Outbox, ...] = OUTBOXES) -> int:
    """Send one batch of rows of each outbox to its topic; return how many were sent (and deleted)."""
    return sum([await _relay_batch(pool, outbox, batch_size) for outbox in outboxes])


async def lock_relay(conn: asyncpg.Connection, outbox: Outbox) -> None:
    """Wait until no other relay of `outbox` runs, in any worker; held until the transaction ends."""
    # The outbox table's oid is a key no other advisory lock of this database uses.
    await conn.execute("SELECT pg_advisory_xact_lock($1::text::regclass::oid::bigint)", outbox.table)


@dataclass(frozen=True)
class _InFlight:
    """A batch a relay has recorded in `outbox_in_flight` and is sending."""

    in_flight_id: int
    keys: list[str]
    outbox_ids: list[int]


def in_flight_at_most_s() -> float:
    """How long after a relay recorded its batch in flight a send of it may still land.

    aiokafka waits up to the producer's request timeout (Faust's producer_request_timeout, 20
    minutes by default) for the topic's metadata before it queues a batch, and retries the batch
    until it is that old; a request already at the broker when its worker dies lands within moments.
    """
    return 2 * app.conf.producer_request_timeout


async def _relay_batch(pool: asyncpg.Pool, outbox: Outbox, batch_size: int) -> int:
    """One relay at a time per outbox, across workers: two relays sending batches at once could put
    a key's newer version on the topic before its older one, and compaction would then keep the
    older. The rows stay locked until the broker has answered every send, and a failure leaves them
    for the next try.

    If the transaction fails transiently once everything was answered (its Postgres session was
    lost, say), the lock may have gone with the session while the sends were in flight: another
    relay may have sent newer versions of the same keys meanwhile, which ours then landed after.
    Each key's current version is queued again, so that it comes last. A relay that cannot do so
    (its worker killed first) leaves its batch recorded in `outbox_in_flight`, and a later relay
    queues those keys again once none of its sends can still land (`_queue_abandoned_again`).
    """
    await _queue_abandoned(pool, outbox)
    in_flight: list[_InFlight] = []
    try:
        return await _send_and_delete(pool, outbox, batch_size, in_flight)
    except Exception as exc:
        if not (in_flight and db.is_transient(exc)):  # a lost session, an aborted transaction
            raise
        log.warning("the %s relay's transaction failed after the sends of its %d keys; queuing their current "
                    "versions again, so that they come last on %s", outbox.table, len(in_flight[0].keys),
                    outbox.topic.get_topic_name(), exc_info=True)

    async def same_pool() -> asyncpg.Pool:
        return pool
    await db.retry_transient(lambda p: _queue_again(p, outbox, in_flight[0]),
                             f"queuing {outbox.table} keys again", get_pool=same_pool)
    return 0


async def _send_and_delete(pool: asyncpg.Pool, outbox: Outbox, batch_size: int, in_flight: list[_InFlight]) -> int:
    """One batch: locked, recorded in flight, sent, answered, deleted. `in_flight` holds the batch
    from its record, before anything is sent, until that record is deleted with the lock held (or
    left for a later relay, a send having had no answer: `_unanswered`)."""
    refused: Exception | None = None
    async with pool.acquire() as conn, conn.transaction():
        await lock_relay(conn, outbox)
        # Read after the lock is held, so the rows the previous relay deleted are gone. FOR UPDATE
        # (not SKIP LOCKED): a relay of an older release holding rows is waited for, not overtaken.
        rows = await conn.fetch(
            f"SELECT outbox_id, {outbox.key_column} AS key, payload, tombstone FROM {outbox.table}"
            " ORDER BY outbox_id LIMIT $1 FOR UPDATE",
            batch_size,
        )
        if not rows:
            return 0
        batch = await _record_in_flight(pool, outbox, rows)
        in_flight.append(batch)
        acks: list[asyncio.Future] = []
        try:
            # Sent as stored: a payload the consumer cannot decode goes to its dead-letter topic
            # there, instead of blocking every later change here.
            # In record batches: per-message Topic.send made relaying 450,000 seeded rules take a minute.
            # One key's rows keep their order: send_batched appends them to one partition's batches in turn.
            acks = await send_batched(outbox.topic, ((str(row["key"]).encode(), _value_of(row))
                                                     for row in rows))
            # Every answer before the lock is released, failures included: a batch still in flight when
            # the next relay sends the same keys' newer versions could land after them.
            await all_acknowledged(acks)
        except Exception as exc:  # the broker refused some (every send answered): the rows stay for the next try
            refused = exc
        if _unanswered(refused, acks):
            # Its request may still be written after the lock is released, even after the current
            # versions were queued again at once (this session lost): left recorded, for a later
            # relay to queue the keys again once it cannot land.
            in_flight.clear()
        else:
            # This session, and so the lock, lasted through the sends if this succeeds: no other
            # relay sent meanwhile, and nothing needs queuing again.
            await conn.execute("DELETE FROM outbox_in_flight WHERE in_flight_id = $1", batch.in_flight_id)
        if refused is None:
            await conn.execute(f"DELETE FROM {outbox.table} WHERE outbox_id = ANY($1::bigint[])", batch.outbox_ids)
    in_flight.clear()  # seen through
    if refused is not None:
        raise refused
    return len(rows)


def _value_of(row: asyncpg.Record) -> bytes | None:
    """The message value of an outbox row: its payload, or a null value for a tombstone (a forgotten
    deletion's, `queue_tombstones`)."""
    return None if row["tombstone"] else json.dumps(row["payload"]).encode()


def _unanswered(refused: Exception | None, acks: list[asyncio.Future]) -> bool:
    """Whether a send failed because the stopping worker gave up on the broker
    (broker_transport.Producer.give_up_on_the_broker), not by the broker's refusal. Its request may
    be at a broker that writes it later, after the next relay's newer versions of the same keys:
    the batch then stays recorded in flight, and its keys are queued again once it cannot land.

    Only that failure: aiokafka's own timeouts come back every request timeout for as long as the
    broker is away, and a record left by each would queue the same keys again, and again."""
    failures = [refused, *(ack.exception() for ack in acks if ack.done() and not ack.cancelled())]
    return any(isinstance(failure, GaveUpOnTheBroker) for failure in failures)


async def _record_in_flight(pool: asyncpg.Pool, outbox: Outbox, rows: list[asyncpg.Record]) -> _InFlight:
    """Record the batch's keys as in flight. On a connection of its own, committed before anything
    is sent: the relay's transaction may be lost with its session, and the record must outlast it."""
    keys = sorted({row["key"] for row in rows})
    in_flight_id = await pool.fetchval("INSERT INTO outbox_in_flight (outbox, keys) VALUES ($1, $2::uuid[])"
                                       " RETURNING in_flight_id", outbox.table, keys)
    return _InFlight(in_flight_id, [str(key) for key in keys], [row["outbox_id"] for row in rows])


async def _queue_again(pool: asyncpg.Pool, outbox: Outbox, batch: _InFlight) -> int:
    """Queue the current version of each of the batch's keys, in place of its rows and its record
    in flight: a failure that keeps coming back after the sends sends the same keys again each
    time, and never grows the outbox.

    A tombstone stays: its key has no current version to queue (retention
    forgot the deletion when it queued it), and the broker may have refused it; sent twice, it
    changes nothing."""
    async with pool.acquire() as conn, conn.transaction():
        # The record first, as `_queue_abandoned_again` locks it before the outbox rows: no deadlock.
        await conn.execute("DELETE FROM outbox_in_flight WHERE in_flight_id = $1", batch.in_flight_id)
        await conn.execute(f"DELETE FROM {outbox.table} WHERE outbox_id = ANY($1::bigint[]) AND NOT tombstone",
                           batch.outbox_ids)
        return await _QUEUE_CURRENT[outbox.table](conn, batch.keys)


_ABANDONED = "SELECT in_flight_id, keys FROM outbox_in_flight WHERE outbox = $1 AND recorded_at < now() - make_interval(secs => $2)"


async def _queue_abandoned(pool: asyncpg.Pool, outbox: Outbox) -> None:
    """Queue again the keys of the batches still recorded in flight long after they were sent
    (`_queue_abandoned_again`), in a transaction of its own: the relay's own transaction holds its
    rows until the broker has answered, up to the producer's request timeout while the broker is
    away, and the API's changes of those rules (or silences) must not wait for that."""
    if not await pool.fetchval(f"SELECT EXISTS ({_ABANDONED})", outbox.table, in_flight_at_most_s()):
        return
    async with pool.acquire() as conn, conn.transaction():
        await lock_relay(conn, outbox)
        await _queue_abandoned_again(conn, outbox)


async def _queue_abandoned_again(conn: asyncpg.Connection, outbox: Outbox) -> None:
    """Queue the current version of each key of the batches still recorded in flight long after
    they were sent, when none of their sends can land any more. Such a batch was never seen
    through: its relay may have lost its lock with the sends on their way (so they may have landed
    after another relay's newer versions), and was killed or stopped before it could queue the
    keys again itself. Called by the relay holding the lock, in its transaction.

    A key whose row cannot be queued (the contract refuses it: edited by hand) stays recorded, alone,
    for the next try; the others are queued all the same."""
    abandoned = await conn.fetch(_ABANDONED, outbox.table, in_flight_at_most_s())
    if not abandoned:
        return
    keys = sorted({str(key) for row in abandoned for key in row["keys"]})
    await conn.execute("DELETE FROM outbox_in_flight WHERE in_flight_id = ANY($1::bigint[])",
                       [row["in_flight_id"] for row in abandoned])
    refused: list[str] = []
    try:
        await _queue_current_in_savepoint(conn, outbox, keys)
    except Exception as exc:
        if db.is_transient(exc):
            raise
        _requeue_failures.failed("queuing again the %d keys of a stopped %s relay failed; each is tried alone, "
                                 "and relaying goes on", len(keys), outbox.table)
        refused = keys if len(keys) == 1 else [key for key in keys if not await _queued_alone(conn, outbox, key)]
        if refused:
            # Recorded as old as it was, so the next relay tries it again at once.
            await conn.execute("INSERT INTO outbox_in_flight (outbox, keys, recorded_at)"
                               " VALUES ($1, $2::uuid[], now() - make_interval(secs => $3))",
                               outbox.table, refused, in_flight_at_most_s() + 1)
    else:
        _requeue_failures.succeeded()
    if len(refused) < len(keys):
        log.warning("a %s relay stopped with %d keys in flight; their current versions queued again, to come "
                    "last on %s", outbox.table, len(keys) - len(refused), outbox.topic.get_topic_name())


async def _queue_current_in_savepoint(conn: asyncpg.Connection, outbox: Outbox, keys: list[str]) -> None:
    async with conn.transaction():  # a savepoint: a key that cannot be queued must not stop the relay
        await _QUEUE_CURRENT[outbox.table](conn, keys)


async def _queued_alone(conn: asyncpg.Connection, outbox: Outbox, key: str) -> bool:
    """Whether the key's current version could be queued (not: the contract refuses its row)."""
    try:
        await _queue_current_in_savepoint(conn, outbox, [key])
    except Exception as exc:
        if db.is_transient(exc):
            raise
        return False
    return True


@app.task
async def relay_rule_outbox() -> None:
    """Relay every RELAY_INTERVAL_S (backing off while it fails), or at once when woken; one loop, so
    batches go out in order."""
    while not app.should_stop:
        try:
            pool = await db.pool()
            while await relay_pending(pool) > 0:
                pass  # until every outbox is empty
            _relay_failures.succeeded()
        except Exception as exc:
            # Broker or database unavailable: the rows stay in the outbox and the next tick retries.
            if failed_by_giving_up(exc):
                # The worker is stopping and gave up on the broker: no failure to report in full.
                log.warning("outbox relay: its sends failed when this worker gave up on the broker while "
                            "stopping; the rows stay for the next relay")
            else:
                _relay_failures.failed("outbox relay failed; retrying")
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that arrives as
        # the wake-up does (it returns the result instead), and the relay then went on for ever after
        # its task was cancelled. The project's other bounded waits use asyncio.timeout for the same reason.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_relay_failures.backoff_s(RELAY_INTERVAL_S, RELAY_MAX_BACKOFF_S)):
                await _wake_up.wait()
        _wake_up.clear()
