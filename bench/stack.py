"""A private platform for one benchmark run: services, a migrated database, topics, rules, workers.

KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL are used when set (the broker should then be
one the benchmark may fill: its topics are shared); otherwise an embedded Tansu broker, PostgreSQL
and redis-server are started in a temporary folder, removed at the end. Either way the run gets a
database of its own, dropped at the end.

BENCH_KEEP=1 keeps the temporary folder (the workers' logs) after the run.

Workers are real `alerting-app worker` processes (alerting_app.up.WorkerProcess), each with its
own APP_ID (consumer group), DATA_DIR and WEB_PORT, and the ROLES asked for (e.g. `evaluate` alone,
to measure one pipeline stage per process).
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import asyncpg
import psutil

# alerting_app.app (imported below, via alerting_app.db) reads the settings once and creates DATA_DIR:
# keep the benchmark process's own DATA_DIR out of the working tree.
os.environ.setdefault("DATA_DIR", str(Path(tempfile.gettempdir()) / "alerting-bench-process"))
# Figures appear as they are measured, also when the output goes to a file (bench/run_all.py).
sys.stdout.reconfigure(line_buffering=True)

from alerting_app.db import init_connection
from alerting_app.embedded import EmbeddedServices, create_database, drop_database, free_port, \
    with_database
from alerting_app.migrate import apply_migrations
from alerting_app.up import WorkerProcess

ADMIN_TOKEN = "bench-admin-token-0123456789"
REPLICA_CAUGHT_UP_LINE = "rule replica caught up"
_EXPORTED = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL", "ADMIN_TOKEN", "STORE_URL", "APP_ID")
# A stop (SIGTERM: `kill`, a CI timeout) and a closed terminal (SIGHUP) end a run as Ctrl-C does, so
# that leaving `with BenchStack` stops the workers and services and removes the folder: their default
# ended the process at once, the services following it, and left the folder (a PostgreSQL cluster).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    for stop in _STOP_SIGNALS:  # a second one must not cut the clean-up short
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt


def machine_summary() -> str:
    """nproc, CPU model, memory and Python version: the context every figure needs."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} CPUs ({model}), {memory_gib:.1f} GiB RAM, Python {platform.python_version()}, "
            f"load average now {os.getloadavg()[0]:.2f}")


class BenchStack:
    def __init__(self, name: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"alerting-bench-{name}-"))
        self.embedded = EmbeddedServices(self.folder / "services")
        self.workers: list = []
        self._server_url: str | None = None
        self._database: str | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_handlers: dict = {}

    def __enter__(self) -> "BenchStack":
        # Not over an ignore: under `nohup`, a closed terminal must leave the run going.
        self._saved_handlers = {stop: signal.signal(stop, _interrupt) for stop in _STOP_SIGNALS
                                if signal.getsignal(stop) is not signal.SIG_IGN}
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        given = {name: os.environ.get(name) for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")}
        urls = {name: value for name, value in given.items() if value}
        urls.update(self.embedded.start(kafka="KAFKA_BOOTSTRAP_SERVERS" not in urls,
                                        postgres="DATABASE_URL" not in urls, redis="REDIS_URL" not in urls))
        self._server_url = urls["DATABASE_URL"]
        self._database = f"alerting_bench_{secrets.token_hex(4)}"
        asyncio.run(create_database(self._server_url, self._database))
        self.database_url = with_database(self._server_url, self._database)
        self.bootstrap = urls["KAFKA_BOOTSTRAP_SERVERS"]
        asyncio.run(apply_migrations(self.database_url))
        # The workers inherit these (worker_env passes os.environ on); stop() puts the old values back.
        self._saved_env = {name: os.environ.get(name) for name in _EXPORTED}
        os.environ.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap, DATABASE_URL=self.database_url, REDIS_URL=urls["REDIS_URL"],
            ADMIN_TOKEN=ADMIN_TOKEN, STORE_URL="memory://",
            APP_ID=f"bench-{secrets.token_hex(4)}",
        )
        from alerting_app.app import settings
        from alerting_app.kafka_admin import create_topics

        report = asyncio.run(create_topics(self.bootstrap, settings.topic_partitions,
                                           settings.topic_replication_factor))
        if report.mismatched:
            raise SystemExit(report.mismatch_message(settings.topic_partitions))
        self.partitions = settings.topic_partitions

    def stop(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()
        self.workers.clear()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        try:
            if self._database is not None:
                asyncio.run(drop_database(self._server_url, self._database))
                self._database = None
        finally:
            self.embedded.stop()
            if os.environ.get("BENCH_KEEP"):
                print(f"kept (BENCH_KEEP): workers' logs and data under {self.folder}")
            else:
                shutil.rmtree(self.folder, ignore_errors=True)
            for stop, handler in self._saved_handlers.items():
                signal.signal(stop, handler)
            self._saved_handlers = {}

    # --- workers -------------------------------------------------------------------------------

    def worker_env(self, name: str, group: str | None = None, **env: str) -> dict[str, str]:
        return {
            **os.environ,
            # Workers of one group share the APP_ID (the consumer group) and split its partitions.
            "APP_ID": f"bench-{group or name}",
            "DATA_DIR": str(self.folder / "workers" / name),
            "WEB_PORT": str(free_port()),
            "STORE_URL": "memory://",
            "BROKER_REBALANCE_TIMEOUT_S": "2",
            **{key.upper(): str(value) for key, value in env.items()},
        }

    def start_worker(self, name: str, *, group: str | None = None, roles: str = "all", wait: bool = True,
                     **env: str):
        """`alerting-app worker` named `name`, running `roles` (ROLES), in consumer group APP_ID
        bench-<group> (default: a group of its own, bench-<name>)."""
        worker = WorkerProcess(self.worker_env(name, group, ROLES=roles, **env), self.folder / "logs" / f"{name}.log")
        worker.started_at = time.monotonic()
        self.workers.append(worker)
        if wait:
            worker.wait_until_ready()
        return worker

    def stop_worker(self, worker) -> None:
        worker.stop()
        self.workers.remove(worker)

    # --- rules ---------------------------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        return await asyncpg.create_pool(self.database_url, min_size=1, max_size=4, init=init_connection)

    def seed(self, clients: int, rules_per_client: int, mix: str = "realistic"):
        from alerting_app.seed import seed

        async def run():
            pool = await self.pool()
            try:
                return await seed(pool, clients=clients, rules_per_client=rules_per_client, mix=mix)
            finally:
                await pool.close()

        return asyncio.run(run())

    def outbox_size(self) -> int:
        async def count() -> int:
            conn = await asyncpg.connect(self.database_url)
            try:
                return await conn.fetchval("SELECT count(*) FROM rule_outbox")
            finally:
                await conn.close()

        return asyncio.run(count())

    def wait_until_outbox_empty(self, timeout: float = 1800.0, poll_s: float = 0.5) -> float:
        """Seconds until a running worker has relayed every outbox row to rule.changed."""
        started = time.monotonic()
        while self.outbox_size():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"rule_outbox not relayed after {timeout:.0f}s")
            time.sleep(poll_s)
        return time.monotonic() - started


# --- asking a worker ---------------------------------------------------------------------------

def worker_rules(worker, timeout: float = 60.0) -> dict | None:
    """The worker's GET /api/v1/worker/rules answer, or None while it does not answer."""
    request = urllib.request.Request(worker.url + "/api/v1/worker/rules",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except OSError:
        return None


def wait_until_started(worker, timeout: float = 300.0, poll_s: float = 0.02) -> None:
    """Until the worker's /startedz answers 200, asked every `poll_s`: where a clock starts at the
    worker's readiness (start_worker's wait asks every 0.2 s; a relay has sent rows by then)."""
    started = time.monotonic()
    while True:
        if not worker.child.running():
            raise RuntimeError(f"worker exited; log {worker.log_path}:\n{worker.child.log_tail()}")
        try:
            urllib.request.urlopen(worker.url + "/startedz", timeout=2).close()
            return
        except OSError:  # not listening yet, or 503 (HTTPError)
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"worker not started after {timeout:.0f}s; log {worker.log_path}")
        time.sleep(poll_s)


def wait_until_worker_holds(worker, enabled_rules: int, timeout: float = 1800.0, poll_s: float = 0.5) -> float:
    """Seconds until the worker's replica holds `enabled_rules` enabled rules."""
    started = time.monotonic()
    while True:
        if not worker.child.running():
            raise RuntimeError(f"worker exited; log {worker.log_path}:\n{worker.child.log_tail()}")
        held = worker_rules(worker)
        if held is not None and held["enabled_rules"] == enabled_rules:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"worker holds {held and held['enabled_rules']} rules, not {enabled_rules}")
        time.sleep(poll_s)


def rss_mib(worker) -> float:
    """Resident memory of the worker process (and any children it started), in MiB."""
    process = psutil.Process(worker.child.pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


async def produce_keyed(bootstrap: str, topic: str, messages: Iterable[tuple[bytes, bytes]]) -> float:
    """Put keyed messages on `topic` without waiting for each, then for every acknowledgement;
    return the seconds it took."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        pending = [await producer.send(topic, key=key, value=value) for key, value in messages]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started
