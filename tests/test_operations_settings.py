"""LOG_FORMAT and ROLES are validated like every setting; JSON log lines are one object each; the
health-check command needs nothing but Python."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from alerting_app.embedded import free_port
from alerting_app.healthcheck import probe_url, worker_url
from alerting_app.json_logs import JsonLogFormatter
from alerting_app.settings import ConfigurationError, load_settings
from alerting_app.up import alerting_app_executable


@pytest.mark.parametrize(("variable", "value"), [
    ("LOG_FORMAT", "yaml"),
    ("ROLES", "evaluate,notify"),
    ("ROLES", " , "),
])
def test_bad_log_format_or_roles_stops_start_up_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert f"{variable}:" in str(error.value)
    assert repr(value) in str(error.value)


@pytest.mark.parametrize(("value", "roles"), [
    ("all", "evaluate,aggregate,deliver,relay,api"),
    (" Deliver , evaluate", "evaluate,deliver"),
    ("api", "api"),
])
def test_roles_are_read_in_any_order_and_case(monkeypatch, value, roles):
    monkeypatch.setenv("ROLES", value)

    assert load_settings().roles == roles


def test_roles_and_log_format_default_to_everything_and_text(monkeypatch):
    monkeypatch.delenv("ROLES", raising=False)
    monkeypatch.delenv("LOG_FORMAT", raising=False)

    settings = load_settings()

    assert (settings.roles, settings.log_format) == ("evaluate,aggregate,deliver,relay,api", "text")


def test_a_json_log_line_is_one_object_with_the_message_and_the_exception():
    logger = logging.getLogger("alerting.test")
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "delivery to %s failed",
                                   ("endpoint-1",), sys.exc_info())

    line = JsonLogFormatter().format(record)

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "alerting.test"
    assert entry["message"] == "delivery to endpoint-1 failed"
    assert entry["exception"].startswith("Traceback") and "ValueError: broken\nacross lines" in entry["exception"]
    assert entry["ts"].endswith("+00:00")


def test_health_check_asks_loopback_on_web_port_unless_bound_to_one_address():
    assert probe_url({"WEB_PORT": "7001"}, "live") == "http://127.0.0.1:7001/healthz"
    assert probe_url({}, "ready") == "http://127.0.0.1:6066/readyz"
    assert probe_url({"WEB_PORT": "7001", "WEB_BIND": "10.0.3.7"}, "ready") == "http://10.0.3.7:7001/readyz"


@pytest.mark.parametrize("environ, url", [
    ({"web_port": "7002"}, "http://127.0.0.1:7002"),
    ({"Web_Port": "7003", "web_bind": "127.0.0.2"}, "http://127.0.0.2:7003"),
    ({"WEB_PORT": "", "web_port": "7004"}, "http://127.0.0.1:7004"),  # empty is unset, in any case
    ({"WEB_PORT": "7005", "web_port": "7005"}, "http://127.0.0.1:7005"),  # two spellings, one value
])
def test_health_check_asks_the_port_and_address_the_worker_reads_in_any_case(monkeypatch, environ, url):
    # Settings take a variable in any case: reading only WEB_PORT, the check asked 6066 of a worker
    # told web_port=7002, and failed until the container was replaced.
    _only(monkeypatch, {"WEB_PORT": "", "WEB_BIND": "", **environ})
    settings = load_settings()

    assert worker_url(os.environ) == url
    assert url.endswith(f":{settings.web_port}")
    assert settings.web_bind in url or settings.web_bind == "0.0.0.0"


def _only(monkeypatch, environ: dict[str, str]) -> None:
    """`environ` in place of every spelling of its variables."""
    for name in list(os.environ):
        if name.lower() in {key.lower() for key in environ}:
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


def test_a_setting_given_in_two_spellings_with_different_values_stops_start_up_naming_both(monkeypatch):
    # Settings take the last spelling in the environment's order, which nobody sees: the worker ran
    # with one port and the health check, reading another order, could ask the other.
    _only(monkeypatch, {"WEB_PORT": "7000", "web_port": "7001", "LOG_LEVEL": "info", "Log_Level": "info",
                        "ADMIN_TOKEN": "a-token-of-sixteen-or-more", "admin_token": "another-token-of-sixteen",
                        "DATABASE_URL": "postgresql://app:first-secret@db/alerting",
                        "database_url": "postgresql://app:second-secret@db/alerting"})

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    message = str(error.value)
    assert "WEB_PORT: set twice with different values, as WEB_PORT='7000' and web_port='7001'" in message
    assert "ADMIN_TOKEN: set twice with different values, as ADMIN_TOKEN and admin_token:" in message
    assert "DATABASE_URL: set twice" in message
    assert "LOG_LEVEL" not in message  # the same value twice is no question
    assert not any(secret in message for secret in ("token-of", "first-secret", "second-secret"))


def test_the_same_value_in_two_spellings_or_an_empty_one_is_taken(monkeypatch):
    _only(monkeypatch, {"WEB_PORT": "7000", "web_port": "7000", "WEB_BIND": "", "web_bind": "127.0.0.1"})

    settings = load_settings()

    assert (settings.web_port, settings.web_bind) == (7000, "127.0.0.1")
    assert worker_url(os.environ) == "http://127.0.0.1:7000"


def test_health_check_refuses_two_spellings_with_different_values_naming_both():
    with pytest.raises(ValueError, match="WEB_PORT: set twice with different values, as WEB_PORT='7000' and "
                                         "web_port='7001'"):
        worker_url({"WEB_PORT": "7000", "web_port": "7001"})

    result = subprocess.run([sys.executable, "-m", "alerting_app.healthcheck"],
                            env={"WEB_BIND": "127.0.0.1", "web_bind": "::1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert "WEB_BIND: set twice with different values, as WEB_BIND='127.0.0.1' and web_bind='::1'" in result.stderr


def _health_check(*args: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alerting_app.healthcheck", *args],
                          env={"WEB_PORT": str(port), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_health_check_fails_when_no_worker_answers():
    port = free_port()

    result = _health_check(port=port)

    assert result.returncode == 1
    assert f"127.0.0.1:{port}/healthz" in result.stderr


def test_health_check_refuses_an_unknown_check():
    result = _health_check("deep", port=free_port())

    assert result.returncode == 1
    assert "usage:" in result.stderr


def test_worker_refuses_unknown_roles_naming_the_option():
    result = subprocess.run([alerting_app_executable(), "worker", "--roles", "evaluate,notify"],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "--roles: must be all or a comma-separated list of evaluate, aggregate" in result.stderr
    assert "'evaluate,notify'" in result.stderr


@pytest.mark.parametrize("variable", ["DELIVERY_BACKOFF_INITIAL_S", "ENDPOINT_RATE_LIMIT_PER_S",
                                      "NOTIFICATION_RETENTION_DAYS", "GROUP_CLOSE_INTERVAL_S"])
@pytest.mark.parametrize("value", ["nan", "inf", "-infinity", "1e400"])
def test_a_number_that_is_not_finite_stops_start_up_as_such(monkeypatch, variable, value):
    # Against its bounds, nan was refused as "less than or equal to 3600", which it is not over.
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert f"{variable}: Input should be a finite number (got {value!r})" in str(error.value)
