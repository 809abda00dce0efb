"""The one Faust App, with its topics. Agents, tables and web views register on it.

Importing this module reads and validates the settings, so a bad variable stops any command
before it touches a service. Faust gets its configuration from those settings only: left to
itself it would also read its own environment variables (BROKER_URL, PRODUCER_ACKS, WEB_PORT, ...),
which would override the validated values without a word.
"""
from __future__ import annotations

import faust
import mode

from alerting_app.broker_transport import Agent, Transport
from alerting_app.faust_tuning import APP_SETTINGS as FAUST_TUNING
from alerting_app.http_errors import database_unavailable, json_http_errors
from alerting_app.http_server import Web
from alerting_app.kafka_connection import faust_credentials, kafka_connection
from alerting_app.settings import BROKER_REQUEST_TIMEOUT_S, load_settings

settings = load_settings()

app = faust.App(
    settings.app_id,
    # An empty environment: Faust reads none of os.environ for its settings (not even
    # APP_ENV_PREFIX), so only what is passed here, from `settings`, reaches it.
    env={},
    # Listing commands (`agents`, `tables`) work without a broker; `worker` insists on one.
    broker=f"kafka://{settings.kafka_bootstrap_servers or 'localhost:9092'}",
    # Faust's consumer, producer and admin requests all take their TLS and SASL login from here.
    broker_credentials=faust_credentials(settings),
    store=settings.store_url,
    datadir=str(settings.data_dir / "faust"),
    topic_partitions=settings.topic_partitions,
    topic_replication_factor=settings.topic_replication_factor,
    # A new consumer group starts at the beginning: alerts accepted before a worker ever ran are not lost.
    consumer_auto_offset_reset="earliest",
    broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
    broker_session_timeout=settings.broker_session_timeout_s,
    broker_request_timeout=BROKER_REQUEST_TIMEOUT_S,  # Settings keeps the session timeout within it
    broker_heartbeat_interval=min(3.0, settings.broker_session_timeout_s / 3),
    web_port=settings.web_port,
    web_bind=settings.web_bind,
    web_enabled=True,
    # Faust's own /router and /table views answer without a token, and /table lists table contents
    # (the tenants' open groups): our web server serves only our views.
    web_router_enabled=False,
    web_tables_enabled=False,
    web_application_options={"middlewares": [json_http_errors, database_unavailable]},
    producer_acks=-1,
    # An agent that crashed is not restarted: the worker stops instead (broker_transport.Consumer.
    # on_task_error says why). Restarted, its new actor took over the crashed one's stream while
    # the worker stopped, and the stop then waited for ever in the agent's supervisor whenever the
    # stream still held a backlog (tests/test_e2e_worker_stops_after_a_sink_failed.py).
    agent_supervisor=mode.ForfeitOneForOneSupervisor,
    # Not a crash: an agent whose sends failed because the stopping worker gave up on the broker.
    Agent=Agent,
    **FAUST_TUNING,  # less of Faust's own per-message cost: see the module
)
# Faust's aiohttp web driver, whose own error answers (a request its HTTP parser refuses) are JSON too.
app.web = Web(app)
# Set before anything touches `app.transport` (declaring a topic does): see the module for why.
app.transport = Transport(app.conf.broker_consumer, app, fetch_max_wait_ms=settings.broker_fetch_max_wait_ms,
                          broker=kafka_connection(settings, settings.kafka_bootstrap_servers or "localhost:9092"))


def _raw_topic(name: str) -> faust.TopicT:
    # Values are decoded by our contracts (pydantic), not by Faust, so that a bad message becomes a
    # dead letter with a reason instead of an exception inside the stream.
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )


alerts_new = _raw_topic("alerts.new")
rule_changed = _raw_topic("rule.changed")
silence_changed = _raw_topic("silence.changed")
alerts_matched = _raw_topic("alerts.matched")
notifications_ready = _raw_topic("notifications.ready")

PIPELINE_TOPICS = (alerts_new, rule_changed, silence_changed, alerts_matched, notifications_ready)
DEAD_LETTER_TOPICS = {t.get_topic_name(): _raw_topic(f"{t.get_topic_name()}.dlq") for t in PIPELINE_TOPICS}
