"""LOG_LEVEL sets the worker's log level; `-l/--loglevel` on the command line wins over it.

The worker is pointed at closed ports, so it stays in its wait for the services and logs a warning
per round: the lines before the first warning show which levels it writes.
"""
from __future__ import annotations

import os
import subprocess

from alerting_app.embedded import free_port
from alerting_app.up import alerting_app_executable


def _log_until_first_wait_warning(*args: str, **env: str) -> str:
    closed = free_port()
    environment = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/alerting",
        "REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "WEB_PORT": str(free_port()),
        "WEB_BIND": "127.0.0.1",
        "LOG_FORMAT": "text",
        **env,
    }
    worker = subprocess.Popen([alerting_app_executable(), *args], env=environment,
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in worker.stderr:  # ends when the worker exits: then the assertion below says why
            lines.append(line)
            if "[WARNING] waiting for" in line:
                break
    finally:
        worker.kill()
        worker.wait(timeout=30)
        worker.stderr.close()
    log = "".join(lines)
    assert "[WARNING] waiting for" in log, log
    return log


def test_log_level_debug_applies_when_no_loglevel_option_is_given():
    log = _log_until_first_wait_warning("worker", LOG_LEVEL="debug")

    assert "[DEBUG]" in log


def test_the_loglevel_option_wins_over_log_level_before_or_after_worker():
    for args in (["worker", "-l", "warn"], ["-l", "warn", "worker"], ["worker", "--loglevel", "info"]):
        log = _log_until_first_wait_warning(*args, LOG_LEVEL="debug")

        assert "[DEBUG]" not in log, args


def test_the_worker_up_starts_logs_at_log_level_and_is_still_seen_ready(start_worker):
    # `up` (and the tests) used to start `worker -l info` and wait for Faust's "Ready" line at info.
    worker = start_worker(LOG_LEVEL="warning", LOG_FORMAT="text")

    log = worker.log()
    assert "[INFO]" not in log and "[^Worker]: Ready" not in log, log



def test_at_log_level_debug_the_kafka_connections_requests_are_not_logged():
    # aiokafka logs every request at DEBUG, the SASL login's included: with PLAIN, its password.
    import logging

    from alerting_app.json_logs import log_to_stderr

    root_level, root_handlers = logging.root.level, logging.root.handlers[:]
    try:
        log_to_stderr("text", "debug")
        assert logging.root.isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("aiokafka.conn").isEnabledFor(logging.INFO)
    finally:
        logging.root.setLevel(root_level)
        logging.root.handlers[:] = root_handlers
        logging.getLogger("aiokafka.conn").setLevel(logging.NOTSET)
