"""Only our validated settings reach Faust: its own environment variables are not read, and its
unauthenticated /router and /table views are not served.

Each check imports the app in a fresh interpreter, because the app reads the environment once, at
import.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

_PRINT_FAUST_CONF = """
import json
from alerting_app.app import app
conf = app.conf
print(json.dumps({
    "broker": [str(url) for url in conf.broker],
    "producer_acks": conf.producer_acks,
    "broker_session_timeout": conf.broker_session_timeout,
    "broker_request_timeout": conf.broker_request_timeout,
    "datadir": str(conf.datadir),
    "web_port": conf.web_port,
    "debug": conf.debug,
    "blueprints": sorted(prefix for prefix, _ in app.web.blueprints._enabled),
}))
"""


def _faust_conf(**env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PRINT_FAUST_CONF], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_faust_environment_variables_do_not_override_our_settings(tmp_path):
    conf = _faust_conf(
        KAFKA_BOOTSTRAP_SERVERS="broker-1:9092",
        BROKER_SESSION_TIMEOUT_S="6",
        DATA_DIR=str(tmp_path / "ours"),
        WEB_PORT="7010",
        # Faust's own names for the same settings, and a prefix that would redirect them all:
        BROKER_URL="kafka://elsewhere:9092",
        PRODUCER_ACKS="0",
        BROKER_SESSION_TIMEOUT="45",
        APP_DATADIR=str(tmp_path / "faust-env"),
        APP_DEBUG="true",
        APP_ENV_PREFIX="",
    )

    assert conf["broker"] == ["kafka://broker-1:9092"]
    assert conf["producer_acks"] == -1
    assert conf["broker_session_timeout"] == 6.0
    assert conf["datadir"] == str(tmp_path / "ours" / "faust")
    assert conf["web_port"] == 7010
    assert conf["debug"] is False


def test_faust_router_and_table_views_are_not_served_even_when_its_variables_ask():
    conf = _faust_conf(APP_WEB_ROUTER_ENABLED="true", APP_WEB_TABLES_ENABLED="true")

    assert conf["blueprints"] == [""]  # the production index only: no /router, no /table


def test_the_longest_session_timeout_settings_accept_is_one_faust_accepts():
    # Faust refuses a session timeout above its request timeout, but only once the consumer starts.
    conf = _faust_conf(BROKER_SESSION_TIMEOUT_S="90")

    assert conf["broker_session_timeout"] == 90.0 <= conf["broker_request_timeout"]


_PRINT_DERIVED_TOPICS = """
import json
import alerting_app.cli  # registers the agents, and with them the tables
from alerting_app.app import app
names = [table.changelog_topic.get_topic_name() for table in app.tables.values()]
names.append(app._leader_assignor._leader_topic_name)  # Faust's own, for its leader election
print(json.dumps(names))
"""


def test_every_topic_named_after_the_longest_app_id_allowed_is_one_kafka_takes():
    # Kafka refuses topic names over 249 characters; settings.py bounds APP_ID by the longest suffix.
    from alerting_app.settings import Settings
    [longest] = [rule.max_length for rule in Settings.model_fields["app_id"].metadata if hasattr(rule, "max_length")]
    app_id = "a" * longest
    result = subprocess.run([sys.executable, "-c", _PRINT_DERIVED_TOPICS], env={**os.environ, "APP_ID": app_id},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout.strip().splitlines()[-1])

    assert names and all(name.startswith(app_id) for name in names), names
    assert max(len(name) for name in names) <= 249
