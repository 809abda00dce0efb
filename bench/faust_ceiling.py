"""What reading a topic costs before any work: a Faust agent that does nothing vs a bare aiokafka consumer.

    .venv/bin/python bench/faust_ceiling.py [--messages 200000] [--rounds 1] [--compare-monitor]

Both read the same preloaded alerts.new messages with a consumer group of their own; the Faust
figure is how fast the group's committed offset advances (10% to 90%), and the worker process's
CPU time per message over the same stretch; the aiokafka one how fast getmany() hands over the
records. Every stage of the pipeline pays the Faust figure per message it consumes (the evaluator
one per alert, aggregate one per matching client).

On a shared machine the rate follows the load; CPU per message much less so. --rounds repeats the
Faust run, each round with a new consumer group over the same messages. --compare-monitor runs,
alternately, the worker as configured (alerting_app/faust_tuning.py: LeanMonitor) and one with
Faust's own Monitor, so both see the same load (docs/performance.md, "Faust consumer overhead").
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from stack import BenchStack, machine_summary  # first: it keeps alerting_app's DATA_DIR out of the tree
from figures import TooFewToMeasure, steady_window  # noqa: E402
from alerting_app.embedded import ChildProcess  # noqa: E402
from alerting_app.up import WorkerProcess  # noqa: E402

NOOP_WORKER = Path(__file__).resolve().parent / "noop_worker.py"


class NoopWorker(WorkerProcess):
    """WorkerProcess, with bench/noop_worker.py as the command."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:  # noqa: super() would run alerting-app
        self.port = int(env["WEB_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log_offset = 0
        argv = [sys.executable, str(NOOP_WORKER), "worker", "-l", "info"]
        self.child = ChildProcess("noop worker", argv, log_path, env=env)


async def watch_worker(bootstrap: str, group: str, messages: int, pid: int, *, timeout: float = 600.0,
                       poll_s: float = 0.1) -> tuple[float, float]:
    """(messages/s, worker CPU microseconds per message) while the group's committed offset on
    alerts.new goes from 10% to 90% of `messages`.

    Sampled together so that both figures cover the same stretch: start-up and the last commit
    (Faust commits every ~2.8 s, so the offset moves in steps) stay out of it.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()  # a member that never subscribes only reads the group's offsets
    process = psutil.Process(pid)
    samples: list[tuple[float, int, float]] = []  # (time, committed, worker CPU seconds)
    started = time.monotonic()
    try:
        tps = [TopicPartition("alerts.new", p) for p in sorted(consumer.partitions_for_topic("alerts.new") or ())]
        while not samples or samples[-1][1] < messages:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"group {group} did not commit {messages} messages in {timeout:.0f}s")
            await asyncio.sleep(poll_s)
            done = sum([await consumer.committed(tp) or 0 for tp in tps])
            cpu = process.cpu_times()
            samples.append((time.monotonic(), done, cpu.user + cpu.system))
    finally:
        await consumer.stop()
    low, high = steady_window(samples, messages // 10, messages * 9 // 10)
    counted = high[1] - low[1]
    return counted / (high[0] - low[0]), (high[2] - low[2]) / counted * 1e6


def noop_worker_run(stack: BenchStack, name: str, messages: int, **env: str) -> tuple[float, float]:
    worker = NoopWorker(stack.worker_env(name, **env), stack.folder / "logs" / f"{name}.log")
    stack.workers.append(worker)
    try:
        return asyncio.run(watch_worker(stack.bootstrap, f"bench-{name}", messages, worker.child.pid))
    finally:
        stack.stop_worker(worker)


async def bare_consumer_rate(bootstrap: str, messages: int) -> tuple[float, float]:
    """(messages/s, CPU microseconds per message) of aiokafka's getmany() over the topic, after the
    first batch: the clocks start when it arrives, so its records, read before, are not counted."""
    consumer = AIOKafkaConsumer("alerts.new", bootstrap_servers=bootstrap, group_id="bench-bare-consumer",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        read, counted, started, cpu_started = 0, 0, None, None
        while read < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            got = sum(len(records) for records in batches.values())
            read += got
            if started is None:
                if got:
                    started, cpu_started = time.perf_counter(), time.process_time()
            else:
                counted += got
        if not counted:
            raise TooFewToMeasure(f"all {read:,} messages came in the first batch")
        return counted / (time.perf_counter() - started), (time.process_time() - cpu_started) / counted * 1e6
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compare-monitor", action="store_true",
                        help="alternate with a worker that uses Faust's own Monitor (BENCH_FAUST_MONITOR=faust)")
    args = parser.parse_args()
    print(f"machine: {machine_summary()}")
    variants = {"as configured": {}}
    if args.compare_monitor:
        variants["Faust's Monitor"] = {"BENCH_FAUST_MONITOR": "faust"}
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
    with BenchStack("faust-ceiling") as stack:
        from alerting_app.load import produce_alerts

        asyncio.run(produce_alerts(stack.bootstrap, count=args.messages, rate=0))
        runs = 0
        for round_number in range(1, args.rounds + 1):
            for label, env in variants.items():
                runs += 1
                load = os.getloadavg()[0]
                run = f"round {round_number}, Faust agent doing nothing (take_events(500)), {label}"
                try:
                    rate, cpu_us = noop_worker_run(stack, f"noop-{runs}", args.messages, **env)
                except TooFewToMeasure as exc:
                    print(f"{run}: not measured: {exc} (--messages)")
                    continue
                results[label].append((rate, cpu_us))
                print(f"{run}: {rate:,.0f} messages/s, {cpu_us:.1f} us worker CPU per message "
                      f"(load average {load:.2f})")
        for label, figures in results.items():
            if not figures:
                continue
            rates, cpus = [rate for rate, _ in figures], [cpu for _, cpu in figures]
            print(f"Faust agent doing nothing, {label}: {min(rates):,.0f}-{max(rates):,.0f} messages/s, "
                  f"{min(cpus):.1f}-{max(cpus):.1f} us CPU per message ({len(figures)} runs)")
        try:
            rate, cpu_us = asyncio.run(bare_consumer_rate(stack.bootstrap, args.messages))
            print(f"bare aiokafka consumer (getmany): {rate:,.0f} messages/s, {cpu_us:.1f} us CPU per message")
        except TooFewToMeasure as exc:
            print(f"bare aiokafka consumer (getmany): not measured: {exc} (--messages)")
        print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
