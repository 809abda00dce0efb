"""`alerting-app up` stops, saying why, when its worker or an embedded service exits under it.

It waited on the worker alone: an embedded service killed while it ran (the OOM killer, a kill)
left the worker retrying it for ever, its reasons in worker.log only, the terminal silent.
Only Redis is embedded here (REDIS_URL unset), the session's broker and Postgres given: the
cheapest service to start, and one the preparation before the worker does not use.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psutil

from alerting_app import up as up_module
from alerting_app.embedded import ChildProcess, EmbeddedServices, free_port
from alerting_app.up import alerting_app_executable
from pipe_lines import read_lines_until

UP_READY_TIMEOUT_S = 420.0  # as in test_up_prepare.py: beyond up's own bounds on its services and worker
# The test's bound on `up` ending once one of its children is gone: its worker's stop included
# (up to 60 s before it is killed), never reached when `up` notices.
UP_STOP_TIMEOUT_S = 150.0


@contextlib.contextmanager
def up_with_embedded_redis(data_dir: Path, app_id: str) -> Iterator[subprocess.Popen]:
    """`alerting-app up` on `data_dir`, Redis embedded; killed at the end if still running (its
    children go with it: PR_SET_PDEATHSIG)."""
    env = {name: value for name, value in os.environ.items() if name.lower() != "redis_url"}
    up = subprocess.Popen([alerting_app_executable(), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**env, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port()),
                                          "APP_ID": f"{app_id}-{os.getpid()}"})
    try:
        yield up
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()


def processes_of(up: subprocess.Popen, data_dir: Path) -> set[psutil.Process]:
    """`up` and every process it started: its descendants, and any process that runs with its
    DATA_DIR in its environment (one left behind has another parent). redis-server's title
    overwrites its environment, hence both."""
    found = {psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)}
    return found | still_running_in(data_dir)


def still_running_in(data_dir: Path) -> set[psutil.Process]:
    return {process for process in psutil.process_iter(["environ", "status"])
            if (process.info["environ"] or {}).get("DATA_DIR") == str(data_dir)
            and process.info["status"] != psutil.STATUS_ZOMBIE}


def left_running(processes: set[psutil.Process], data_dir: Path) -> set[psutil.Process]:
    def running(process: psutil.Process) -> bool:  # the same process: its pid and its start time
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return {process for process in processes if running(process)} | still_running_in(data_dir)


def child_named(up: subprocess.Popen, name: str) -> psutil.Process:
    [child] = [child for child in psutil.Process(up.pid).children() if child.name() == name]
    return child


def rest_of_output(up: subprocess.Popen) -> str:
    """What `up` prints until it ends on its own."""
    return up.communicate(timeout=UP_STOP_TIMEOUT_S)[0]


def test_up_stops_naming_an_embedded_service_killed_while_it_runs(services, tmp_path):
    data_dir = tmp_path / "data"
    with up_with_embedded_redis(data_dir, "up-redis-killed") as up:
        output = read_lines_until(up.stdout, lambda line: line.strip() == "ready", '"ready"', UP_READY_TIMEOUT_S)
        started = processes_of(up, data_dir)
        redis_server, worker = child_named(up, "redis-server"), child_named(up, "alerting-app")
        assert {up.pid, redis_server.pid, worker.pid} <= {process.pid for process in started}, output

        redis_server.send_signal(signal.SIGKILL)
        rest = rest_of_output(up)

    assert up.returncode == 1, rest
    log = data_dir / "services" / "redis" / "redis.log"
    assert (f"the embedded redis-server was killed by SIGKILL (log: {log}); "
            f"stopping the worker and the other services") in rest.splitlines(), rest
    assert "Traceback" not in rest
    assert left_running(started, data_dir) == set()


def test_up_stops_naming_an_embedded_service_killed_before_its_worker_was_ready(services, tmp_path):
    # Killed before the worker starts, Redis is never there for it, so the worker never gets ready:
    # `up` waited out its 300 s for it, then blamed the worker.
    data_dir = tmp_path / "data"
    with up_with_embedded_redis(data_dir, "up-redis-killed-early") as up:
        read_lines_until(up.stdout, lambda line: line.startswith("migrations applied"), '"migrations applied"',
                         UP_READY_TIMEOUT_S)
        started = processes_of(up, data_dir)
        child_named(up, "redis-server").send_signal(signal.SIGKILL)
        rest = rest_of_output(up)

    assert up.returncode == 1, rest
    assert "the embedded redis-server was killed by SIGKILL" in rest and "ready" not in rest.splitlines(), rest
    assert left_running(started, data_dir) == set()


def test_up_still_reports_its_worker_exiting(services, tmp_path):
    data_dir = tmp_path / "data"
    with up_with_embedded_redis(data_dir, "up-worker-killed") as up:
        read_lines_until(up.stdout, lambda line: line.strip() == "ready", '"ready"', UP_READY_TIMEOUT_S)
        started = processes_of(up, data_dir)
        child_named(up, "alerting-app").send_signal(signal.SIGKILL)
        rest = rest_of_output(up)

    assert up.returncode != 0, rest
    assert f"the worker exited with code -9; see {data_dir / 'worker.log'}" in rest.splitlines(), rest
    assert "redis-server" not in rest, rest  # stopped by `up`, not reported as exited
    assert left_running(started, data_dir) == set()


def test_once_its_worker_exited_up_stops_its_services_whatever_signal_comes(tmp_path):
    """The worker's exit is reported, and the stop of the services that follows is not cut short
    by a Ctrl-C (which said "stopped" and exited 0 for a failed worker): the stop signals are
    ignored from then on, as they are once a service has exited."""
    previous = {stop: signal.getsignal(stop) for stop in up_module._STOP_SIGNALS}
    try:
        up_module._stop_on_signals()
        # A real child process that exits at once, as the worker of `up` (its argv aside).
        worker = object.__new__(up_module.WorkerProcess)
        worker.log_path = tmp_path / "worker.log"
        worker.child = ChildProcess("worker", [sys.executable, "-c", "raise SystemExit(3)"], worker.log_path)
        with EmbeddedServices(tmp_path / "services") as services:
            code = up_module._run_until_one_exits(worker, services)

        assert code == 3
        assert {stop: signal.getsignal(stop) for stop in up_module._STOP_SIGNALS} == \
            {stop: signal.SIG_IGN for stop in up_module._STOP_SIGNALS}
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
