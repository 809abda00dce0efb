"""An experiment, not the product: the evaluator's own code fed by a bare aiokafka consumer instead of Faust.

    .venv/bin/python bench/bare_evaluator.py [--alerts 150000]

The same functions the evaluate agent runs (agents.evaluate.evaluate_alerts, send_batched) over
the same preloaded alerts.new, in one process, with a consumer group of its own: getmany() a
batch, match it, send the matches, wait for the broker's acknowledgements, commit. It shows what
the evaluator would reach per process if alerts.new were read without Faust's per-message stream
machinery (bench/faust_ceiling.py measures that machinery alone).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

from stack import BenchStack, machine_summary, wait_until_worker_holds  # first: sets DATA_DIR
from figures import TooFewToMeasure, steady_rate


async def evaluate_from_bare_consumer(bootstrap: str, alerts: int, store_path: Path) -> tuple[float, float]:
    """(alerts/s between 10% and 90%, CPU microseconds per alert) over `alerts` preloaded alerts."""
    from aiokafka import AIOKafkaConsumer

    from agents.evaluate import evaluate_alerts, publish_evaluation
    from alerting_app.gc_tuning import tune_garbage_collector
    from alerting_app.app import app
    from tables.rule_replica import RuleStore
    from tables.rules import rule_replica

    store = RuleStore(store_path)
    replica = asyncio.ensure_future(rule_replica.run(bootstrap, "rule.changed", store))
    await rule_replica.wait_until_caught_up()
    tune_garbage_collector()  # as a worker does
    consumer = AIOKafkaConsumer("alerts.new", bootstrap_servers=bootstrap, group_id="bench-bare-evaluator",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        done, samples = 0, []  # (time, alerts done) after each batch
        cpu_started = time.process_time()
        while done < alerts:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            records = [record for records in batches.values() for record in records]
            if not records:
                continue
            # What Faust hands the agent: events whose message is the consumed record.
            await publish_evaluation(evaluate_alerts(SimpleNamespace(message=record) for record in records))
            await consumer.commit()
            done += len(records)
            samples.append((time.perf_counter(), done))
        cpu_per_alert = (time.process_time() - cpu_started) / done * 1e6
        return steady_rate(samples, alerts // 10, alerts * 9 // 10), cpu_per_alert
    finally:
        await consumer.stop()
        replica.cancel()
        await asyncio.gather(replica, return_exceptions=True)
        store.close()
        await app.producer.stop()


def run_experiment(bootstrap: str, alerts: int, store_path: Path) -> tuple[float, float]:
    return asyncio.run(evaluate_from_bare_consumer(bootstrap, alerts, store_path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rules-per-client", type=int, default=288)
    parser.add_argument("--alerts", type=int, default=150_000)
    args = parser.parse_args()
    print(f"machine: {machine_summary()}")
    with BenchStack("bare-evaluator") as stack:
        stack.seed(args.clients, args.rules_per_client)
        relay = stack.start_worker("relay", roles="relay,evaluate")
        stack.wait_until_outbox_empty()
        wait_until_worker_holds(relay, args.clients * args.rules_per_client)
        stack.stop_worker(relay)
        from alerting_app.load import produce_alerts

        asyncio.run(produce_alerts(stack.bootstrap, count=args.alerts, rate=0))
        # In a process of its own, started now: the app there reads the settings this stack exported.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            try:
                rate, cpu_us = pool.apply(run_experiment, (stack.bootstrap, args.alerts, stack.folder / "bare-rules"))
            except TooFewToMeasure as exc:
                print(f"evaluator code on a bare aiokafka consumer: not measured: {exc} (--alerts)")
                return
        print(f"evaluator code on a bare aiokafka consumer (experiment): {rate:,.0f} alerts/s, "
              f"{cpu_us:.0f} us CPU per alert (this process; the broker runs beside it)")


if __name__ == "__main__":
    main()
