"""What reading a topic costs before any work: a Faust agent that does nothing vs a bare aiokafka consumer.

    .venv/bin/python bench/faust_ceiling.py [--messages 200000]

Both read the same preloaded alerts.new messages with a consumer group of their own; the Faust
figure is how fast the group's committed offset advances (10% to 90%), the aiokafka one how fast
getmany() hands over the records. Every stage of the pipeline pays the Faust figure per message
it consumes (the evaluator one per alert, aggregate one per matching client).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from stack import BenchStack, machine_summary  # first: it keeps alerting_app's DATA_DIR out of the tree
from alerting_app.embedded import ChildProcess  # noqa: E402
from alerting_app.up import WorkerProcess  # noqa: E402
from offsets import watch_commits  # noqa: E402

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


async def bare_consumer_rate(bootstrap: str, messages: int) -> tuple[float, float]:
    """(messages/s, CPU microseconds per message) of aiokafka's getmany() over the topic."""
    consumer = AIOKafkaConsumer("alerts.new", bootstrap_servers=bootstrap, group_id="bench-bare-consumer",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        read, started, cpu_started = 0, None, None
        while read < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if started is None and batches:
                started, cpu_started = time.perf_counter(), time.process_time()
            read += sum(len(records) for records in batches.values())
        return read / (time.perf_counter() - started), (time.process_time() - cpu_started) / read * 1e6
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    print(f"machine: {machine_summary()}")
    with BenchStack("faust-ceiling") as stack:
        from alerting_app.load import produce_alerts

        asyncio.run(produce_alerts(stack.bootstrap, count=args.messages, rate=0))
        worker = NoopWorker(stack.worker_env("noop"), stack.folder / "logs" / "noop.log")
        stack.workers.append(worker)
        progress = asyncio.run(watch_commits(stack.bootstrap, "bench-noop", "alerts.new", args.messages))
        stack.stop_worker(worker)
        rate = progress.rate_between(args.messages // 10, args.messages * 9 // 10)
        print(f"Faust agent doing nothing (take_events(500)): {rate:,.0f} messages/s (committed offsets)")
        rate, cpu_us = asyncio.run(bare_consumer_rate(stack.bootstrap, args.messages))
        print(f"bare aiokafka consumer (getmany): {rate:,.0f} messages/s, {cpu_us:.1f} us CPU per message")


if __name__ == "__main__":
    main()
