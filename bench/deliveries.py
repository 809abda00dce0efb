"""Delivered webhook notifications per second to a local receiver, with 28,800 rules.

    .venv/bin/python bench/deliveries.py [--clients 100] [--rules-per-client 288] [--alerts 10000]
                                         [--clients-per-alert 8] [--workers 1]

The seeded rules (realistic mix) each have a webhook endpoint on one local receiver, a separate
process that answers 200 at once and notes when each POST arrived. The figure is the receiver's:
POSTs per second between the 10th and 90th percentile of arrivals (the steady state, without start
and tail). Two measurements:

1. The deliver stage alone: for each alert, a notification for each of `--clients-per-alert`
   clients (one of its rules, so one POST each) is written as aggregate writes it and put on
   notifications.ready; a worker running only the deliver agent (ROLES=deliver) delivers
   them.
2. The whole pipeline: one full worker (every agent); the alerts are put on alerts.new as fast as
   the producer goes, and matched by the rules themselves (about 6.5 clients an alert).

Each prints the CPU each process spent and the machine's total (where the time goes).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import psutil

from stack import BenchStack, machine_summary, produce_keyed, wait_until_worker_holds

from alerting_app.embedded import free_port, port_accepts
from alerting_app.seed import alert_stream, seed


def run_receiver(port: int) -> None:
    """The tenants' webhook: answers 200 at once; GET /arrivals lists arrival times (monotonic)."""
    from aiohttp import web

    arrivals: list[float] = []

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        arrivals.append(time.monotonic())
        return web.Response(status=200)

    async def report(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def count(request: web.Request) -> web.Response:
        return web.json_response(len(arrivals))

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        return web.Response(status=204)

    application = web.Application()
    application.router.add_post("/hook", receive)
    application.router.add_get("/arrivals", report)
    application.router.add_get("/arrivals/count", count)
    application.router.add_delete("/arrivals", reset)
    web.run_app(application, host="127.0.0.1", port=port, print=None, access_log=None)


@contextlib.contextmanager
def started_receiver(port: int) -> Iterator[multiprocessing.Process]:
    """`run_receiver` in a process of its own, listening on `port` once this yields; ended after."""
    receiver = multiprocessing.Process(target=run_receiver, args=(port,), daemon=True)
    receiver.start()
    try:
        while not port_accepts(port):
            if not receiver.is_alive():
                raise SystemExit(f"the receiver exited (code {receiver.exitcode}) before listening on {port}")
            time.sleep(0.05)
        yield receiver
    finally:
        receiver.terminate()


def arrivals(port: int) -> list[float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/arrivals", timeout=30) as response:
        return json.load(response)


def arrival_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/arrivals/count", timeout=30) as response:
        return json.load(response)


def forget_arrivals(port: int) -> None:
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/arrivals", method="DELETE"),
                           timeout=30).close()


async def produce(bootstrap: str, count: int) -> float:
    """Put `count` alerts on alerts.new, not waiting for each; return the seconds it took."""
    return await produce_keyed(bootstrap, "alerts.new",
                               ((alert.alert_id.encode(), alert.encode()) for alert in alert_stream(count)))


async def delivery_counts(database_url: str, since: float) -> tuple[int, int, int, int]:
    """(notifications, PENDING notifications, deliveries, SENT deliveries) of notifications created
    since `since` (unix seconds)."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(DISTINCT n.notification_id) AS n,"
            " count(DISTINCT n.notification_id) FILTER (WHERE n.status = 'PENDING') AS pending,"
            " count(d.endpoint_id) AS d, count(d.endpoint_id) FILTER (WHERE d.status = 'SENT') AS sent"
            " FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.notification_id"
            " WHERE n.created_at >= to_timestamp($1)", since)
        return row["n"], row["pending"], row["d"], row["sent"]
    finally:
        await conn.close()


async def put_notifications(stack: BenchStack, alerts: int, clients_per_alert: int) -> None:
    """Notifications as aggregate leaves them: rows in Postgres and messages on notifications.ready."""
    import random

    from alerting_app.contracts import NotificationReady

    rng = random.Random(11)
    conn = await asyncpg.connect(stack.database_url)
    try:
        rules: dict[str, list[str]] = {}
        for row in await conn.fetch("SELECT client_id::text, rule_id::text FROM rules"):
            rules.setdefault(row["client_id"], []).append(row["rule_id"])
        clients = sorted(rules)
        ready = [NotificationReady(client_id=client, alerts=[alert], rule_ids=[rng.choice(rules[client])],
                                   created_at=round(time.time(), 6))
                 for alert in alert_stream(alerts) for client in rng.sample(clients, clients_per_alert)]
        await conn.copy_records_to_table(
            "notifications", columns=["notification_id", "client_id", "alert_id", "alerts", "rule_ids", "emitted"],
            records=[(uuid.UUID(n.notification_id), uuid.UUID(n.client_id), n.alerts[0].alert_id,
                      json.dumps([n.alerts[0].model_dump(mode="json")]), [uuid.UUID(r) for r in n.rule_ids], True)
                     for n in ready])
    finally:
        await conn.close()
    await produce_keyed(stack.bootstrap, "notifications.ready", ((n.client_id.encode(), n.encode()) for n in ready))
    print(f"put {len(ready)} notifications on notifications.ready")


async def seed_with_webhooks(stack: BenchStack, clients: int, rules_per_client: int, url: str):
    pool = await stack.pool()
    try:
        return await seed(pool, clients=clients, rules_per_client=rules_per_client, mix="realistic",
                          webhook_url=url)
    finally:
        await pool.close()


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals = {}
    for name, group in processes.items():
        total = 0.0
        for process in group:
            try:
                for member in [process, *process.children(recursive=True)]:
                    times = member.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        totals[name] = total
    return totals


def service_processes(stack: BenchStack, workers: list,
                      receiver_pid: int | None) -> dict[str, list[psutil.Process]]:
    """The processes to account CPU to: the workers, the receiver (if there is one), and the embedded
    services (their main processes, found by the run's folder on their command line; children are
    counted with them)."""
    groups: dict[str, list[psutil.Process]] = {"worker": [psutil.Process(w.child.pid) for w in workers]}
    if receiver_pid is not None:
        groups["receiver"] = [psutil.Process(receiver_pid)]
    # Redis rewrites its process title to "redis-server host:port"; Tansu is told its listener URL.
    ports = {"redis": urlsplit(os.environ["REDIS_URL"]).port, "broker": urlsplit(f"//{stack.bootstrap}").port}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        for name, marker in (("postgres", "postgres"), ("redis", "redis-server"), ("broker", "broker")):
            if marker in command and (str(stack.folder) in command or f":{ports.get(name)}" in command):
                groups.setdefault(name, []).append(process)
                break
    return groups


def measure(stack: BenchStack, workers: list, port: int, receiver_pid: int, alerts: int, start) -> None:
    """Call `start`, wait until every notification it caused is settled and every SENT delivery
    received, and print the figures."""
    forget_arrivals(port)
    since = time.time() - 1
    processes = service_processes(stack, workers, receiver_pid)
    cpu_before, machine_before = cpu_seconds(processes), psutil.cpu_times()
    start()
    last_progress, seen = time.monotonic(), -1
    while True:
        time.sleep(1.0)
        # The receiver's count is cheap; the database is asked only once arrivals pause, so the
        # benchmark's own polling does not take CPU from what it measures (a full count every
        # second was a quarter of Postgres's CPU).
        received = arrival_count(port)
        if received != seen:
            last_progress, seen = time.monotonic(), received
            continue
        notifications, pending, deliveries, sent = asyncio.run(delivery_counts(stack.database_url, since))
        if pending == 0 and notifications and received >= sent == deliveries:
            break
        if time.monotonic() - last_progress > 120:
            # A small seed can match none of the alerts: nothing to deliver, rather than a stall.
            hint = "; no notification at all: do the rules match none of the alerts?" if not notifications else ""
            raise SystemExit(f"stalled: {received} received, {sent}/{deliveries} sent, {pending} pending{hint}")
    cpu_after, machine_after = cpu_seconds(processes), psutil.cpu_times()
    machine_busy = sum(machine_after) - sum(machine_before) - (machine_after.idle - machine_before.idle)

    times = sorted(arrivals(port))
    low, high = times[len(times) // 10], times[(len(times) * 9) // 10]
    steady = (len(times) * 8 // 10) / (high - low) if high > low else float("nan")
    span = times[-1] - times[0]
    print(f"notifications {notifications}, deliveries {deliveries} (SENT {sent}), POSTs received {len(times)}")
    print(f"POSTs per alert: {len(times) / alerts:.2f}; per notification: {len(times) / notifications:.2f}")
    print(f"delivered webhook notifications/s: {steady:,.0f} steady (10th-90th percentile of arrivals), "
          + (f"{len(times) / span:,.0f} over the whole run ({span:.1f}s)" if span > 0 else "one instant in all"))
    print(f"CPU seconds during the run: {machine_busy:.1f} busy on the machine (all processes), of which:")
    print(f"  (worker: {len(workers)} process(es) together; per delivery "
          f"{1000 * (cpu_after['worker'] - cpu_before['worker']) / max(1, len(times)):.2f} ms)")
    for name in sorted(cpu_after):
        print(f"  {name:10s} {cpu_after[name] - cpu_before.get(name, 0.0):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rules-per-client", type=int, default=288)
    parser.add_argument("--alerts", type=int, default=10_000)
    parser.add_argument("--clients-per-alert", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes in each measurement, one consumer group (default 1)")
    args = parser.parse_args()
    if min(args.clients, args.rules_per_client, args.alerts, args.clients_per_alert, args.workers) < 1:
        parser.error("every number must be at least 1")
    if args.clients_per_alert > args.clients:
        parser.error(f"--clients-per-alert ({args.clients_per_alert}) exceeds --clients ({args.clients})")

    print(f"machine: {machine_summary()}")
    port = free_port()
    receiver = multiprocessing.Process(target=run_receiver, args=(port,), daemon=True)
    receiver.start()
    with BenchStack("deliveries") as stack:
        report = asyncio.run(seed_with_webhooks(stack, args.clients, args.rules_per_client,
                                                f"http://127.0.0.1:{port}/hook"))
        rules = report.rules
        print(f"seeded {report.clients} clients, {rules} rules, {report.endpoints} webhook endpoints")
        print(f"\n1. the deliver stage alone ({args.workers} worker process(es))")
        workers = [stack.start_worker(f"deliver-only-{n}", group="deliver-only", roles="deliver",
                                      ALLOW_PRIVATE_ENDPOINTS="true") for n in range(args.workers)]
        measure(stack, workers, port, receiver.pid, args.alerts,
                lambda: asyncio.run(put_notifications(stack, args.alerts, args.clients_per_alert)))
        for worker in workers:
            stack.stop_worker(worker)

        print(f"\n2. the whole pipeline, alerts.new to the receiver ({args.workers} worker process(es))")
        workers = [stack.start_worker(f"deliveries-{n}", group="deliveries", ALLOW_PRIVATE_ENDPOINTS="true")
                   for n in range(args.workers)]
        held_after = max(wait_until_worker_holds(worker, rules) for worker in workers)
        print(f"workers hold the rules after {held_after:.1f}s")
        measure(stack, workers, port, receiver.pid, args.alerts,
                lambda: print(f"produced {args.alerts} alerts in "
                              f"{asyncio.run(produce(stack.bootstrap, args.alerts)):.1f}s"))
    receiver.terminate()


if __name__ == "__main__":
    main()
