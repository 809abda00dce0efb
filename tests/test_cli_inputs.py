"""Command-line input that makes no sense is refused naming the option, before anything is done, and a
service that cannot be reached is named in a one-line error."""
from __future__ import annotations

import os
import subprocess

import pytest

from alerting_app.embedded import free_port
from alerting_app.up import alerting_app_executable

COMMAND_TIMEOUT_S = 120


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([alerting_app_executable(), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


@pytest.mark.parametrize("args, option", [
    # A negative count "sent -3 alerts"; a negative or nan rate sent as fast as possible.
    (["--count", "-3"], "--count"),
    (["--count", "2", "--rate", "-5"], "--rate"),
    (["--count", "2", "--rate", "nan"], "--rate"),
    (["--count", "2", "--rate", "inf"], "--rate"),
])
def test_produce_alerts_refuses_a_count_or_rate_below_zero_or_not_a_number(args, option):
    result = run("produce-alerts", *args)

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Invalid value for '{option}'" in result.stderr and "sent" not in result.stdout


@pytest.mark.parametrize("command", ["migrate", "republish-rules", "republish-silences", "seed"])
def test_a_command_whose_postgres_refuses_names_the_command_as_typed_and_the_server(command):
    # It said "republish_rules failed: [Errno 111] Connect call failed ('127.0.0.1', 5432)".
    url = f"postgresql://alerting:secret@127.0.0.1:{free_port()}/alerting"

    result = run(command, DATABASE_URL=url)

    assert result.returncode == 1, result.stdout
    [line] = result.stderr.splitlines()
    hidden = url.replace(":secret@", ":***@")
    assert line.startswith(f"{command} failed: Postgres at {hidden} (DATABASE_URL): "), line
    assert "Connect call failed" in line


@pytest.mark.parametrize("command", [["topics"], ["tail", "alerts.new"], ["create-topics"], ["produce-alerts"]])
def test_a_command_whose_broker_refuses_names_the_variable_and_leaves_no_warnings(command):
    # It said "topics failed: KafkaConnectionError: Unable to bootstrap from [...]"; produce-alerts
    # then also printed "Unclosed AIOKafkaProducer" and the producer's repr.
    address = f"127.0.0.1:{free_port()}"

    result = run(*command, KAFKA_BOOTSTRAP_SERVERS=address)

    assert result.returncode == 1, result.stdout
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{command[0]} failed: no connection to the broker (KAFKA_BOOTSTRAP_SERVERS={address}): "
                           "KafkaConnectionError: Unable to bootstrap"), result.stderr
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
