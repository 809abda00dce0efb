"""Statements that update many notification rows at once lock them in one order (notification_id),
so that two of them on overlapping rows wait for each other instead of deadlocking.

Seen in the suite: aggregate's emitted mark (agents/aggregate.py, `mark_emitted`) and deliver's
settle of notifications without endpoints (alerting_app/delivery/records.py, `settle_notifications`)
ran at once on the same rows, each locking them in its own plan's order; Postgres aborted one with
"deadlock detected" and the aggregate agent crashed.
"""
from __future__ import annotations

import asyncio
import json
import random
import uuid

import asyncpg

from agents.aggregate import mark_emitted
from alerting_app.db import init_connection
from alerting_app.delivery.records import settle_notifications

ROWS = 400
ROUNDS = 30


async def insert_notifications(pool: asyncpg.Pool, client_id: str, count: int) -> list[str]:
    # Inserted in random order, so that the table's physical order is not notification_id order.
    ids = [str(uuid.uuid4()) for _ in range(count)]
    random.shuffle(ids)
    alert = json.dumps([{"alert_id": "a", "severity": "HIGH", "source": "s", "name": "n", "event_ts": 0}])
    await pool.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
        " SELECT n, $2, n::text, $3::jsonb, ARRAY[gen_random_uuid()] FROM unnest($1::uuid[]) AS n",
        ids, client_id, alert)
    return ids


async def test_the_emitted_mark_and_the_settle_on_the_same_rows_never_deadlock(clean_db):
    pool = await asyncpg.create_pool(clean_db, min_size=2, max_size=4, init=init_connection)
    try:
        client_id = str(uuid.uuid4())
        await pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'c', $2)",
                           client_id, uuid.uuid4().hex)
        for _ in range(ROUNDS):
            ids = await insert_notifications(pool, client_id, ROWS)
            # Each in the order its caller has them: arrival order for the mark, sorted for the settle.
            await asyncio.gather(mark_emitted(pool, ids), settle_notifications(pool, sorted(ids, reverse=True)))
            emitted, settled = await pool.fetchrow(
                "SELECT count(*) FILTER (WHERE emitted), count(*) FILTER (WHERE status = 'FAILED')"
                " FROM notifications WHERE notification_id = ANY($1::uuid[])", ids)
            assert (emitted, settled) == (ROWS, ROWS)
    finally:
        await pool.close()
