"""Settings are validated at start-up, and a bad or missing variable is named in the error."""
from __future__ import annotations

import os
import subprocess

import pytest

from alerting_app.settings import ConfigurationError, load_settings, require_services
from alerting_app.up import alerting_app_executable

BAD_VALUES = [
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost:99999"),
    ("KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092,"),
    ("DATABASE_URL", "mysql://db/alerting"),
    ("REDIS_URL", "http://cache:6379"),
    ("ADMIN_TOKEN", "too-short"),
    ("WEB_PORT", "0"),
    ("WEB_PORT", "http"),
    ("TOPIC_PARTITIONS", "0"),
    ("TOPIC_REPLICATION_FACTOR", "none"),
    ("APP_ID", "two words"),
    ("STORE_URL", "redis://"),
    ("BROKER_REBALANCE_TIMEOUT_S", "-1"),
    ("WEBHOOK_TIMEOUT_S", "soon"),
    ("ALLOW_PRIVATE_ENDPOINTS", "perhaps"),
    ("LOG_LEVEL", "loud"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_stops_start_up_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    message = str(error.value)
    assert f"{variable}:" in message
    assert repr(value) in message


def test_defaults_are_the_documented_ones(monkeypatch):
    for variable in ("WEB_PORT", "TOPIC_PARTITIONS", "APP_ID", "DATA_DIR", "STORE_URL"):
        monkeypatch.delenv(variable, raising=False)

    settings = load_settings()

    assert (settings.web_port, settings.topic_partitions) == (6066, 9)
    assert (settings.app_id, str(settings.data_dir), settings.store_url) == (
        "alerting-app", ".alerting-data", "rocksdb://"
    )


def test_several_kafka_servers_are_accepted(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092, broker-2:9093")

    assert load_settings().kafka_bootstrap_servers == "broker-1:9092,broker-2:9093"


def test_require_services_names_every_missing_variable(monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("REDIS_URL")

    with pytest.raises(ConfigurationError) as error:
        require_services(load_settings())

    message = str(error.value)
    assert "DATABASE_URL" in message and "REDIS_URL" in message
    assert "KAFKA_BOOTSTRAP_SERVERS" not in message and "ADMIN_TOKEN" not in message


def test_require_services_accepts_a_complete_configuration():
    require_services(load_settings())  # the session's environment has every service


def _run_worker(**env: str | None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    for name in [name for name, value in env.items() if value is None]:
        del environment[name]
    # The timeout only guards the suite against a worker that wrongly starts and keeps running.
    return subprocess.run([alerting_app_executable(), "worker", "-l", "info"], env=environment,
                          capture_output=True, text=True, timeout=120)


def test_worker_with_a_bad_kafka_address_exits_naming_the_variable():
    result = _run_worker(KAFKA_BOOTSTRAP_SERVERS="no-port-here")

    assert result.returncode != 0
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr


def test_worker_without_a_database_url_exits_naming_it():
    result = _run_worker(DATABASE_URL=None)

    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
