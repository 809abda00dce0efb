"""End to end, alerts.new -> notifications.ready (dedup insert included), with 28,800 rules.

    .venv/bin/python bench/end_to_end.py [--workers 1] [--rates 500,1000] [--seconds 60] [--max-alerts 60000] [--stages]

Pipeline workers run `alerting-app worker` with ROLES=evaluate,aggregate,relay (delivery is not
part of this path; production runs it as its own role). A producer process offers generated alerts
at a fixed rate (alerting_app.load.produce_alerts); this process consumes notifications.ready and
measures, per notification, the time from the alert's `event_ts` to its arrival here.

Per offered rate it prints the rate achieved (notifications per second divided by the mean number
of notifications per alert, known from the seeded rules) and p50/p99/max latency. With `--stages` it
also reads alerts.new and alerts.matched and splits each notification's latency into the hops of
the pipeline (from record timestamps and the contracts' own times; it adds the bench's own reading
of those topics to the machine's load, so the headline figures come from runs without it). The last phase
offers alerts as fast as the producer can and reports the drain rate between 10% and 90% of the
expected notifications: the maximum sustained throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
import uuid
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from stack import BenchStack, machine_summary, rss_mib, wait_until_worker_holds
from figures import TooFewToMeasure, percentile, steady_rate


def produce(bootstrap: str, count: int, rate: float, prefix: str) -> None:
    """The producer process: a process of its own, so that consuming here cannot slow it down."""
    from alerting_app.load import produce_alerts

    asyncio.run(produce_alerts(bootstrap, count=count, rate=rate, prefix=prefix))


def expected_notifications(database_url: str, count: int) -> int:
    """How many notifications `count` generated alerts must give, by matching them here."""
    import asyncpg

    from alerting_app.contracts import Rule, RuleChanged
    from alerting_app.matching import RuleIndex
    from alerting_app.seed import alert_stream

    async def rules() -> list:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch("SELECT rule_id::text, client_id::text, severity, source, name, enabled, version "
                                    "FROM rules")
        finally:
            await conn.close()

    index = RuleIndex(RuleChanged.upsert(Rule(**dict(row))) for row in asyncio.run(rules()))
    return sum(len(index.match(alert)) for alert in alert_stream(count))


@dataclass
class Arrivals:
    """Per notification of one phase, in arrival order: arrival time, latency from event_ts, and the
    part of it until aggregate built the notification (its created_at). With stages: the hops."""

    times: list[float]
    latencies: list[float]
    until_aggregate: list[float]
    stages: dict[str, list[float]] | None = None


# The hops of one notification, each from one instant to the next (seconds):
STAGES = (
    ("producer: event_ts -> alerts.new appended", "event_ts", "new_ts"),
    ("evaluate: alerts.new appended -> matched (fetch, batch window, match)", "new_ts", "matched_at"),
    ("evaluate: matched -> alerts.matched appended (encode, send)", "matched_at", "matched_ts"),
    # created_at is taken as aggregate starts on a batch, before its Postgres insert.
    ("aggregate: alerts.matched appended -> batch started (fetch, batch window)", "matched_ts", "created_at"),
    ("aggregate: batch started -> notifications.ready appended (insert, send)", "created_at", "ready_ts"),
    ("bench consumer: notifications.ready appended -> read here", "ready_ts", "arrival"),
)


class StageClock:
    """When each alert and match of the phase passed each topic, joined to its notification."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix.encode()
        self._new_ts: dict[bytes, float] = {}
        self._matched: dict[tuple[str, str], tuple[float, float]] = {}
        self._notified: list[dict[str, float]] = []

    def read(self, record, now: float) -> None:
        if record.topic == "alerts.new":
            if record.key.startswith(self._prefix):
                self._new_ts[record.key] = record.timestamp / 1000
        elif record.topic == "alerts.matched":
            match = json.loads(record.value)
            if match["alert"]["alert_id"].encode().startswith(self._prefix):
                self._matched[(match["alert"]["alert_id"], match["client_id"])] = (
                    match["matched_at"], record.timestamp / 1000)

    def notified(self, notification: dict, record, now: float) -> None:
        alert = notification["alerts"][0]
        self._notified.append({"alert_id": alert["alert_id"], "client_id": notification["client_id"],
                               "event_ts": alert["event_ts"], "created_at": notification["created_at"],
                               "ready_ts": record.timestamp / 1000, "arrival": now})

    def stages(self) -> dict[str, list[float]]:
        hops: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
        for times in self._notified:
            new_ts = self._new_ts.get(times["alert_id"].encode())
            matched = self._matched.get((times["alert_id"], times["client_id"]))
            if new_ts is None or matched is None:
                continue
            instants = {**times, "new_ts": new_ts, "matched_at": matched[0], "matched_ts": matched[1]}
            for label, start, end in STAGES:
                hops[label].append(instants[end] - instants[start])
        return hops


async def collect(bootstrap: str, prefix: str, expected: int, timeout: float, stages: bool = False) -> Arrivals:
    """Read notifications.ready until `expected` notifications of this phase's alerts arrived."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                max_partition_fetch_bytes=4 * 2**20)
    await consumer.start()
    arrivals = Arrivals([], [], [])
    clock = StageClock(prefix) if stages else None
    try:
        topics = ("notifications.ready", "alerts.new", "alerts.matched") if stages else ("notifications.ready",)
        tps = [TopicPartition(topic, p) for topic in topics for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)  # earlier phases' notifications are skipped by prefix too
        marker = f'"alert_id":"{prefix}-'.encode()
        deadline = time.monotonic() + timeout
        while len(arrivals.times) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.time()
            for records in batches.values():
                for record in records:
                    if record.topic != "notifications.ready":
                        clock.read(record, now)
                    elif marker in record.value:
                        notification = json.loads(record.value)
                        event_ts = notification["alerts"][0]["event_ts"]
                        arrivals.times.append(now)
                        arrivals.latencies.append(now - event_ts)
                        arrivals.until_aggregate.append(notification["created_at"] - event_ts)
                        if clock is not None:
                            clock.notified(notification, record, now)
        if clock is not None:
            # A notification may be read before the match it came from: read what is left of those.
            for _ in range(10):
                batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
                for records in batches.values():
                    for record in records:
                        if record.topic != "notifications.ready":
                            clock.read(record, time.time())
            arrivals.stages = clock.stages()
    finally:
        await consumer.stop()
    return arrivals


def run_phase(stack: BenchStack, rate: float, count: int, expected: int, stages: bool = False) -> Arrivals:
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    producer = multiprocessing.get_context("spawn").Process(target=produce,
                                                             args=(stack.bootstrap, count, rate, prefix))

    async def phase() -> Arrivals:
        collecting = asyncio.ensure_future(collect(stack.bootstrap, prefix, expected, timeout=count / 200 + 120,
                                                    stages=stages))
        await asyncio.sleep(1.0)  # the consumer is assigned and at the end before the first alert
        producer.start()
        return await collecting

    arrivals = asyncio.run(phase())
    producer.join()
    return arrivals


def report(label: str, arrivals: Arrivals, expected: int, fan_out: float) -> None:
    got = len(arrivals.times)
    if got < 10:
        print(f"{label}: {got} of {expected} notifications arrived, too few for figures")
        return
    # Steady state: between the 10% and 90% arrivals (start-up and the tail are not the rate).
    arrived = list(zip(arrivals.times, range(1, got + 1)))  # (time, notifications so far)
    try:
        achieved = f"{steady_rate(arrived, got // 10, got * 9 // 10) / fan_out:,.0f} alerts/s achieved"
    except TooFewToMeasure as exc:
        achieved = f"rate not measured ({exc})"
    lat = arrivals.latencies
    print(f"{label}: {achieved} ({got:,} of {expected:,} notifications), latency "
          f"p50 {percentile(lat, 0.5) * 1000:,.0f} ms, p99 {percentile(lat, 0.99) * 1000:,.0f} ms, "
          f"max {max(lat) * 1000:,.0f} ms")
    part = arrivals.until_aggregate
    print(f"    of which event_ts -> aggregate built the notification: p50 {percentile(part, 0.5) * 1000:,.0f} ms, "
          f"p99 {percentile(part, 0.99) * 1000:,.0f} ms")
    for stage, hops in (arrivals.stages or {}).items():
        if hops:
            print(f"    {stage}: p50 {percentile(hops, 0.5) * 1000:,.0f} ms, "
                  f"p99 {percentile(hops, 0.99) * 1000:,.0f} ms ({len(hops):,} notifications)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rules-per-client", type=int, default=288)
    parser.add_argument("--workers", type=int, default=1, help="pipeline worker processes")
    parser.add_argument("--rates", default="500,1000", help="offered alerts/s, one phase each")
    parser.add_argument("--seconds", type=float, default=60, help="length of each fixed-rate phase")
    parser.add_argument("--max-alerts", type=int, default=60_000,
                        help="alerts of the as-fast-as-possible phase (0: no such phase)")
    parser.add_argument("--stages", action="store_true", help="also split the latency into the pipeline's hops")
    args = parser.parse_args()
    rules = args.clients * args.rules_per_client
    print(f"machine: {machine_summary()}")

    with BenchStack("end-to-end") as stack:
        report_ = stack.seed(args.clients, args.rules_per_client)
        workers = [stack.start_worker(f"pipeline-{n}", group="pipeline", roles="evaluate,aggregate,relay")
                   for n in range(args.workers)]
        relayed_s = stack.wait_until_outbox_empty()
        for worker in workers:
            wait_until_worker_holds(worker, rules)
        print(f"seeded {report_.rules:,} rules, relayed in {relayed_s:.1f}s; {args.workers} pipeline worker(s) "
              f"(ROLES=evaluate,aggregate,relay) hold them")

        phases = [(float(rate), int(float(rate) * args.seconds)) for rate in args.rates.split(",") if rate]
        if args.max_alerts:
            phases.append((0.0, args.max_alerts))
        for rate, count in phases:
            expected = expected_notifications(stack.database_url, count)
            fan_out = expected / count
            arrivals = run_phase(stack, rate, count, expected, args.stages)
            label = f"offered {rate:,.0f} alerts/s" if rate else "offered as fast as possible"
            report(f"{label}, {count:,} alerts ({fan_out:.2f} notifications each)", arrivals, expected, fan_out)
            print(f"    worker RSS: {', '.join(f'{rss_mib(w):.0f} MiB' for w in workers)}")


if __name__ == "__main__":
    main()
