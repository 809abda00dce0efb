"""Evaluator throughput: alerts/s matched per worker process, with 28,800 rules.

    .venv/bin/python bench/evaluator.py [--clients 100] [--rules-per-client 288] [--alerts 150000]

1. In process: the evaluate agent's own functions (decode, match, build and encode each
   `alerts.matched`) over pre-encoded alerts, no broker: the ceiling of the matching code.
2. On a real worker: N alerts are preloaded on alerts.new, then `alerting-app worker` with
   ROLES=evaluate (the evaluate agent and the rule replica) starts with a new consumer group; the figure is how fast
   the group's committed offset on alerts.new advances (between 10% and 90% of N), so every alert
   counted was matched and its `alerts.matched` messages acknowledged by the broker.
3. The same with ROLES=all (every agent in one process), for comparison: there the evaluator
   shares its process with aggregate and deliver, which work through the matches it emits.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace

from stack import BenchStack, machine_summary, wait_until_worker_holds
from figures import TooFewToMeasure
from offsets import end_offsets, watch_commits


def in_process_rate(clients: int, rules_per_client: int, mix: str, alerts: int) -> tuple[float, float]:
    """(alerts/s, mean alerts.matched per alert) of the evaluate agent's functions on one core."""
    import random
    import uuid

    from agents.evaluate import evaluate_alerts
    from alerting_app.gc_tuning import tune_garbage_collector
    from alerting_app.contracts import Rule, RuleChanged
    from alerting_app.seed import alert_stream, rule_criteria
    from tables.rules import rule_index

    rng = random.Random(42)
    changes = []
    for _ in range(clients):
        client_id = str(uuid.uuid4())
        for severity, source, name in rule_criteria(rng, rules_per_client, mix):
            changes.append(RuleChanged.upsert(Rule(rule_id=str(uuid.uuid4()), client_id=client_id,
                                                   severity=severity, source=source, name=name, version=1)))
    rule_index.rebuild(changes)
    tune_garbage_collector()  # as a worker does
    # What Faust hands the agent: events whose message value is the raw bytes.
    events = [SimpleNamespace(message=SimpleNamespace(value=alert.encode())) for alert in alert_stream(alerts)]
    rates, matched = [], 0
    for _ in range(3):
        started = time.perf_counter()
        for batch_start in range(0, len(events), 500):
            evaluation = evaluate_alerts(events[batch_start:batch_start + 500])
            encoded = [message.encode() for message in evaluation.matched]
            matched += len(encoded)
        rates.append(len(events) / (time.perf_counter() - started))
    return statistics.median(rates), matched / (3 * len(events))


def worker_rate(stack: BenchStack, name: str, roles: str) -> tuple[float, float]:
    """(alerts/s between 10% and 90%, seconds from process start to the last commit) of a new worker."""
    already = asyncio.run(end_offsets(stack.bootstrap, "alerts.new"))
    worker = stack.start_worker(name, roles=roles, wait=False)
    progress = asyncio.run(watch_commits(stack.bootstrap, f"bench-{name}", "alerts.new", already, timeout=900))
    stack.stop_worker(worker)
    low, high = int(already * 0.1), int(already * 0.9)
    return progress.rate_between(low, high), progress.seconds_until(already)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rules-per-client", type=int, default=288)
    parser.add_argument("--mix", default="realistic", choices=["realistic", "worst"])
    parser.add_argument("--alerts", type=int, default=150_000, help="alerts preloaded for the worker runs")
    parser.add_argument("--skip-full-worker", action="store_true")
    args = parser.parse_args()
    rules = args.clients * args.rules_per_client
    print(f"machine: {machine_summary()}")

    rate, fan_out = in_process_rate(args.clients, args.rules_per_client, args.mix, 20_000)
    print(f"in process (decode + match + encode, one core): {rate:,.0f} alerts/s "
          f"with {rules:,} rules, {fan_out:.2f} alerts.matched per alert")

    with BenchStack("evaluator") as stack:
        report = stack.seed(args.clients, args.rules_per_client, args.mix)
        relay = stack.start_worker("relay")
        relayed_s = stack.wait_until_outbox_empty()
        wait_until_worker_holds(relay, rules)
        stack.stop_worker(relay)
        print(f"seeded {report.rules:,} rules in {report.seconds:.1f}s; relayed to rule.changed in {relayed_s:.1f}s")

        from alerting_app.load import produce_alerts

        sent, seconds = asyncio.run(produce_alerts(stack.bootstrap, count=args.alerts, rate=0))
        print(f"preloaded {sent:,} alerts on alerts.new in {seconds:.1f}s")

        try:
            rate, total_s = worker_rate(stack, "evaluator", "evaluate")
            print(f"worker running only evaluate: {rate:,.0f} alerts/s (committed offsets, 10%-90%); "
                  f"all {sent:,} done {total_s:.1f}s after process start")
            if not args.skip_full_worker:
                rate, total_s = worker_rate(stack, "full", "all")
                print(f"full worker (evaluate + aggregate + deliver in one process): evaluate at {rate:,.0f} "
                      f"alerts/s; all {sent:,} done {total_s:.1f}s after process start")
        except TooFewToMeasure as exc:
            print(f"worker rate not measured: {exc} (--alerts)")


if __name__ == "__main__":
    main()
