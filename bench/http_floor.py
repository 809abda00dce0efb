"""What the HTTP exchange alone costs per delivered webhook: our webhook channel, nothing else.

    .venv/bin/python bench/http_floor.py [--posts 30000] [--concurrency 256]

The same local receiver as bench/deliveries.py (a separate aiohttp process answering 200 at once)
receives `--posts` POSTs from this process, sent by `send_webhook` (body, signature, headers,
aiohttp request) over one session of `endpoint_session`, as a worker's dispatcher sends them, with
`--concurrency` in flight. No Kafka, Postgres or Redis. Prints POSTs/s and the CPU per POST of the
sender and of the receiver: the floor under bench/deliveries.py's per-delivery figures, since every
delivery pays at least this much on a machine that also runs the receiver.
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import psutil

from stack import machine_summary  # first: it keeps alerting_app's DATA_DIR out of the tree
from deliveries import arrival_count, forget_arrivals, started_receiver  # noqa: E402

from alerting_app.channels.http import endpoint_session  # noqa: E402
from alerting_app.channels.webhook import send_webhook  # noqa: E402
from alerting_app.contracts import Alert, NotificationReady  # noqa: E402
from alerting_app.embedded import free_port  # noqa: E402
from alerting_app.gc_tuning import tune_garbage_collector  # noqa: E402


def notifications(count: int) -> list[NotificationReady]:
    client_id, rule_id = str(uuid.uuid4()), str(uuid.uuid4())
    return [NotificationReady(client_id=client_id, rule_ids=[rule_id], created_at=time.time(),
                              alerts=[Alert(alert_id=f"floor-{n}", event_ts=time.time(), severity="HIGH",
                                            source="payments", name="latency", context={"seq": str(n)})])
            for n in range(count)]


async def send_all(url: str, ready: list[NotificationReady], endpoint_ids: list[str], concurrency: int) -> float:
    """Send every notification, `concurrency` at a time; return the seconds it took."""
    session = endpoint_session(concurrency=concurrency, allow_private=True)
    slots = asyncio.Semaphore(concurrency)
    secret = uuid.uuid4().hex

    async def one(notification: NotificationReady, endpoint_id: str) -> None:
        async with slots:
            await send_webhook(session, url, secret, endpoint_id, notification, 10.0)

    try:
        started = time.monotonic()
        await asyncio.gather(*(one(n, e) for n, e in zip(ready, endpoint_ids)))
        return time.monotonic() - started
    finally:
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()

    print(f"machine: {machine_summary()}")
    tune_garbage_collector()  # as a worker does
    port = free_port()
    with started_receiver(port) as receiver:
        ready, endpoint_ids = notifications(args.posts), [str(uuid.uuid4()) for _ in range(args.posts)]
        asyncio.run(send_all(f"http://127.0.0.1:{port}/hook", ready[:500], endpoint_ids, args.concurrency))  # warm-up
        forget_arrivals(port)
        receiver_cpu, sender_cpu = psutil.Process(receiver.pid), psutil.Process()
        receiver_before, sender_before = sum(receiver_cpu.cpu_times()[:2]), sum(sender_cpu.cpu_times()[:2])
        seconds = asyncio.run(send_all(f"http://127.0.0.1:{port}/hook", ready, endpoint_ids, args.concurrency))
        receiver_after, sender_after = sum(receiver_cpu.cpu_times()[:2]), sum(sender_cpu.cpu_times()[:2])
        received = arrival_count(port)
    if received != args.posts:
        raise SystemExit(f"the receiver counted {received} POSTs, not {args.posts}")
    print(f"{args.posts} POSTs, {args.concurrency} in flight: {args.posts / seconds:,.0f} POSTs/s")
    print(f"CPU per POST: sender (send_webhook, aiohttp) {1e6 * (sender_after - sender_before) / args.posts:.0f} us,"
          f" receiver {1e6 * (receiver_after - receiver_before) / args.posts:.0f} us")


if __name__ == "__main__":
    main()
