"""Command-line options that make no sense are refused naming the option, before anything is done."""
from __future__ import annotations

import os
import subprocess

import pytest

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
