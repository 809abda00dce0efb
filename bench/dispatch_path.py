"""What a worker's dispatcher costs per delivered webhook, without the Kafka intake in front of it.

    .venv/bin/python bench/dispatch_path.py [--deliveries 15000] [--rounds 3] [--endpoints 3000] [--clients 100]

One `Dispatcher`, in this process, with a worker's settings and GC setting, delivers `--deliveries`
webhook jobs per round to the local receiver of bench/deliveries.py: each takes its slots, its
endpoint's token, its claim, the send (`send_webhook`), its sent mark, and the recorder's write of
its outcome, against a private Redis and PostgreSQL (bench/stack.py). The jobs are submitted as
the dispatcher has room, as the intake does. Not included: Faust, the intake's statements, and
the rows themselves: none were opened, so the recorder's statements find nothing to change.

Prints, per round, the CPU per delivery of this process and of the receiver, and deliveries/s.
Whole-stage runs (bench/deliveries.py) add Faust, the intake and a second worker, and vary by a
quarter between runs on a shared machine; this process's CPU per delivery varies by about a tenth,
so a change to the delivery path shows here first (docs/performance.md, Where the time goes).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid

import psutil

from stack import BenchStack, machine_summary  # first: it keeps alerting_app's DATA_DIR out of the tree

from alerting_app.embedded import free_port  # noqa: E402


async def deliver_rounds(url: str, args: argparse.Namespace, port: int, receiver: psutil.Process) -> None:
    from deliveries import arrival_count, forget_arrivals

    from alerting_app import db
    from alerting_app.app import load_settings, settings
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.dispatcher import Dispatcher
    from alerting_app.delivery.jobs import DeliveryJob, Endpoint
    from alerting_app.gc_tuning import tune_garbage_collector
    from alerting_app.seed import seed

    # The settings were read when bench/stack.py was imported, before it set the services' URLs.
    settings.__dict__.update(load_settings().__dict__)
    tune_garbage_collector()  # as a worker does
    pool = await db.pool()
    await seed(pool, clients=args.clients, rules_per_client=max(1, args.endpoints // args.clients),
               webhook_url=url)
    # The endpoints as a worker reads them (records.endpoints_now): a delivery that waited longer
    # than attempts.ENDPOINT_RECHECK_S for its slots reads its endpoint again before the send.
    rows = await pool.fetch("SELECT client_id::text, endpoint_id::text, type, value, secret, rate_limit_per_s, enabled"
                            " FROM endpoints WHERE type = 'webhook'")
    endpoints = [(row["client_id"], Endpoint(row["endpoint_id"], row["type"], row["value"], row["secret"],
                                             row["rate_limit_per_s"], row["enabled"])) for row in rows]
    rng = random.Random(7)

    def notifications(count: int) -> list[tuple[NotificationReady, Endpoint]]:
        made = []
        for n in range(count):
            client_id, endpoint = rng.choice(endpoints)
            alert = Alert(alert_id=f"dispatch-{n}", event_ts=time.time(), severity="HIGH", source="payments",
                          name="latency", context={"seq": str(n)})
            made.append((NotificationReady(client_id=client_id, alerts=[alert], rule_ids=[str(uuid.uuid4())],
                                           created_at=time.time()), endpoint))
        return made

    dispatcher = Dispatcher(settings)
    me = psutil.Process()
    try:
        for round_number in range(args.rounds + 1):  # round 0 warms up: connections, scripts, caches
            waiting = notifications(args.deliveries)
            forget_arrivals(port)
            cpu_before, receiver_before = sum(me.cpu_times()[:2]), sum(receiver.cpu_times()[:2])
            started = time.monotonic()
            while waiting:
                room = dispatcher.room
                # Jobs made as the intake makes them: their endpoint read a moment before.
                refused = dispatcher.submit([DeliveryJob(notification, endpoint.endpoint_id, endpoint, 0)
                                             for notification, endpoint in waiting[:room]], time.monotonic())
                if refused:
                    raise SystemExit(f"the dispatcher refused {len(refused)} deliveries")
                waiting = waiting[room:]
                if waiting:
                    await asyncio.sleep(0.005)
            await dispatcher.drained()
            seconds = time.monotonic() - started
            cpu = sum(me.cpu_times()[:2]) - cpu_before
            receiver_cpu = sum(receiver.cpu_times()[:2]) - receiver_before
            received = arrival_count(port)
            if received != args.deliveries:
                raise SystemExit(f"the receiver counted {received} POSTs, not {args.deliveries}")
            if round_number:
                print(f"round {round_number}: {args.deliveries / seconds:,.0f} deliveries/s; CPU per delivery:"
                      f" dispatcher {1e6 * cpu / args.deliveries:.0f} us,"
                      f" receiver {1e6 * receiver_cpu / args.deliveries:.0f} us")
    finally:
        await dispatcher.close()
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=15_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=int, default=3_000)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    if min(args.deliveries, args.rounds, args.endpoints, args.clients) < 1:
        parser.error("every number must be at least 1")

    print(f"machine: {machine_summary()}")
    os.environ["ALLOW_PRIVATE_ENDPOINTS"] = "true"  # the receiver is on 127.0.0.1
    port = free_port()
    with BenchStack("dispatch-path") as stack:
        from deliveries import started_receiver

        with started_receiver(port) as receiver:
            print(f"{args.deliveries} webhook deliveries per round to {args.endpoints} endpoints of "
                  f"{args.clients} clients, Redis and PostgreSQL of {stack.folder}")
            asyncio.run(deliver_rounds(f"http://127.0.0.1:{port}/hook", args, port, psutil.Process(receiver.pid)))


if __name__ == "__main__":
    main()
