"""What one delivery sweep costs (records.lease_due) under a storm of queued email, and with webhooks only.

    .venv/bin/python bench/email_sweep.py [--runs 10] [--sizes 1000x30,28800x20] [--webhooks 100000]

Starts an embedded PostgreSQL (the other services are not needed: the sweep is one statement),
applies the migrations, and seeds a backlog with plain SQL writing what records.open_deliveries
writes (a PENDING row per notification and endpoint, unleased, due): `--sizes` lists email backlogs
as ENDPOINTSxPENDING (email endpoints spread over 100 clients, each with PENDING email due), each
measured on its own table; `--webhooks` is a backlog of PENDING webhook rows only (1,000 endpoints,
100 clients). Every table also holds as many SENT rows as PENDING ones, and is ANALYZEd.

Each sweep is timed as agents/deliver.py runs it (nothing held, a batch of SWEEP_BATCH_SIZE) with
email room 0 (the worker holds all the email it may), 1, 10 and 100, each in a transaction rolled back, so every run sees the same backlog:
the median of `--runs` of records.lease_due, then one EXPLAIN (ANALYZE, BUFFERS) for the buffers
the plan touched (shared hit + read) and the rows it read from `deliveries` (every scan, every
loop, with those its filters dropped). The same is done with the statement before email was leased in turn per tenant (commit
f16cac8, `no_email`: room 0 means no email), read from git, on the same data.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

os.environ.setdefault("DATA_DIR", str(Path(tempfile.gettempdir()) / "alerting-bench-process"))
sys.stdout.reconfigure(line_buffering=True)

from stack import machine_summary  # noqa: E402

from alerting_app.db import init_connection  # noqa: E402
from alerting_app.delivery import records  # noqa: E402
from alerting_app.embedded import EmbeddedServices, create_database, drop_database, with_database  # noqa: E402
from alerting_app.migrate import apply_migrations  # noqa: E402

BEFORE = "f16cac8"
SWEEP_BATCH_SIZE = 1_000  # agents/deliver.py
ENDPOINT_BACKLOG, CLIENT_BACKLOG = 1_000, 5_000  # DELIVERY_ENDPOINT_BACKLOG, DELIVERY_CLIENT_BACKLOG defaults
CLIENTS = 100
ALERTS = json.dumps([{"alert_id": "a", "severity": "HIGH", "source": "s", "name": "n", "event_ts": 1}])


def statement_before() -> str:
    """_LEASE_DUE as it was at BEFORE (its $11: no email)."""
    source = subprocess.run(["git", "show", f"{BEFORE}:alerting_app/delivery/records.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LEASE_DUE" for t in node.targets):
            return node.value.value
    raise SystemExit(f"no _LEASE_DUE in {BEFORE}")


async def seed(conn: asyncpg.Connection, endpoints: int, pending: int, channel: str) -> None:
    """`endpoints` endpoints of `channel` over CLIENTS clients (one rule each), each with `pending`
    PENDING rows due (ages spread over the last hour, interleaved across endpoints) and as many SENT."""
    await conn.execute("TRUNCATE clients, notifications, deliveries CASCADE")
    await conn.execute(
        "INSERT INTO clients (client_id, name, api_key_hash)"
        " SELECT gen_random_uuid(), 'client ' || i, md5(random()::text || i) FROM generate_series(1, $1) i", CLIENTS)
    await conn.execute(
        "WITH c AS (SELECT client_id, row_number() OVER () - 1 AS k FROM clients),"
        " r AS (INSERT INTO rules (rule_id, client_id, severity, source, name)"
        "       SELECT gen_random_uuid(), c.client_id, 'HIGH', 'payments', 'rule ' || i"
        "       FROM generate_series(0, $1 - 1) i JOIN c ON c.k = i % $2 RETURNING rule_id, client_id)"
        " INSERT INTO endpoints (endpoint_id, rule_id, client_id, type, value)"
        " SELECT gen_random_uuid(), rule_id, client_id, $3,"
        "        CASE WHEN $3 = 'email' THEN 'oncall@example.com' ELSE 'http://127.0.0.1:9/hook' END FROM r",
        endpoints, CLIENTS, channel)
    # One notification per delivery, in chunks (a notification is one client's alert).
    chunk = 200_000
    total = endpoints * pending * 2
    for start in range(0, total, chunk):
        await conn.execute(
            "WITH e AS (SELECT endpoint_id, client_id, row_number() OVER (ORDER BY endpoint_id) - 1 AS k FROM endpoints),"
            " s AS (SELECT i, e.endpoint_id, e.client_id FROM generate_series($1::bigint, $2::bigint - 1) i"
            "       JOIN e ON e.k = i % $3),"
            " n AS (INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, emitted)"
            "       SELECT gen_random_uuid(), client_id, 'alert-' || i, $4::text::jsonb, ARRAY[gen_random_uuid()], true"
            "       FROM s RETURNING notification_id, client_id, alert_id)"
            " INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
            " SELECT n.notification_id, s.endpoint_id, $5,"
            "        CASE WHEN s.i < $6 THEN 'PENDING' ELSE 'SENT' END,"
            "        now() - make_interval(secs => 3600.0 * ($7 - s.i % $7) / $7)"
            " FROM n JOIN s ON n.alert_id = 'alert-' || s.i",
            start, min(start + chunk, total), endpoints, ALERTS, channel, endpoints * pending, total // 2)
    await conn.execute("VACUUM ANALYZE clients, endpoints, notifications, deliveries")


def buffers_and_rows(plan: dict) -> tuple[int, int]:
    def rows(node: dict) -> int:
        # Rows a scan read and its filter dropped (a leased row, a webhook's among email) were read too.
        own = ((node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
               if node.get("Relation Name") == "deliveries" else 0)
        return own + sum(rows(child) for child in node.get("Plans", []))
    top = plan["Plan"]
    return top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0), int(rows(top))


async def sweep_new(conn: asyncpg.Connection, room: int) -> int:
    return len(await records.lease_due(conn, "bench", 60.0, {}, ENDPOINT_BACKLOG, SWEEP_BATCH_SIZE, {},
                                       CLIENT_BACKLOG, room))


def params_new(room: int) -> tuple:
    return ("bench", 60.0, [], [], ENDPOINT_BACKLOG, SWEEP_BATCH_SIZE, SWEEP_BATCH_SIZE * records._CANDIDATES_PER_LEASE,
            [], [], CLIENT_BACKLOG, room)


def params_before(room: int) -> tuple:
    return ("bench", 60.0, [], [], ENDPOINT_BACKLOG, SWEEP_BATCH_SIZE, SWEEP_BATCH_SIZE * 4, [], [], CLIENT_BACKLOG,
            room == 0)


async def measure(conn: asyncpg.Connection, label: str, statement: str, params: tuple, runs: int) -> None:
    """Median ms of `runs` sweeps (each rolled back), then the plan's buffers and rows read."""
    times, leased = [], 0
    for _ in range(runs):
        transaction = conn.transaction()
        await transaction.start()
        try:
            started = time.perf_counter()
            leased = len(await conn.fetch(statement, *params))
            times.append((time.perf_counter() - started) * 1000)
        finally:
            await transaction.rollback()
    transaction = conn.transaction()
    await transaction.start()
    try:
        [plan] = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, *params))
    finally:
        await transaction.rollback()
    buffers, rows = buffers_and_rows(plan)
    print(f"  {label:<34} {statistics.median(times):8.1f} ms/sweep  leased {leased:5d}"
          f"  buffers {buffers:9,d}  deliveries rows read {rows:9,d}")


async def compare(conn: asyncpg.Connection, before: str, rooms: list[int], runs: int) -> None:
    # records.lease_due itself, once per room, so the figures below are of the statement it runs.
    for room in rooms:
        transaction = conn.transaction()
        await transaction.start()
        try:
            leased = await sweep_new(conn, room)
        finally:
            await transaction.rollback()
        print(f"  (records.lease_due, email room {room}: leased {leased}, rolled back)")
    for room in rooms:
        await measure(conn, f"now, email room {room}", records._LEASE_DUE, params_new(room), runs)
        await measure(conn, f"before {BEFORE}, " + ("no email" if room == 0 else "email oldest first"),
                      before, params_before(room), runs)


async def run(args: argparse.Namespace, server: str) -> None:
    before = statement_before()
    database = f"alerting_bench_sweep_{os.getpid()}"
    await create_database(server, database)
    try:
        url = with_database(server, database)
        await apply_migrations(url)
        conn = await asyncpg.connect(url)
        await init_connection(conn)
        print(machine_summary())
        try:
            for size in args.sizes.split(","):
                endpoints, pending = (int(part) for part in size.split("x"))
                started = time.monotonic()
                await seed(conn, endpoints, pending, "email")
                print(f"\n{endpoints:,} email endpoints x {pending} PENDING = {endpoints * pending:,} email due"
                      f" ({CLIENTS} clients; as many SENT; seeded in {time.monotonic() - started:.0f} s)")
                await compare(conn, before, [0, 1, 10, 100], args.runs)
            if args.webhooks:
                started = time.monotonic()
                await seed(conn, 1_000, args.webhooks // 1_000, "webhook")
                print(f"\n{args.webhooks:,} PENDING webhook rows over 1,000 endpoints, no email"
                      f" (as many SENT; seeded in {time.monotonic() - started:.0f} s)")
                await compare(conn, before, [0, 10], args.runs)
        finally:
            await conn.close()
    finally:
        await drop_database(server, database)


def main(args: argparse.Namespace) -> None:
    # DATABASE_URL, when set, is used (a database of the run's own is created in it and dropped).
    embedded = EmbeddedServices(Path(tempfile.mkdtemp(prefix="alerting-bench-email-sweep-")) / "services")
    try:
        server = os.environ.get("DATABASE_URL") or embedded.start(kafka=False, redis=False)["DATABASE_URL"]
        asyncio.run(run(args, server))
    finally:
        embedded.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sizes", default="1000x30,28800x20")
    parser.add_argument("--webhooks", type=int, default=100_000)
    main(parser.parse_args())
