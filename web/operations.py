"""Probes and metrics on every worker's web server, without auth (probes and scrapers hold no token).

- `/healthz`: the process is alive and its event loop answers. A container health check uses this
  one (`python -m alerting_app.healthcheck`): restarting a worker whose database is down would
  not bring the database back, only a deployment loop.
- `/readyz`: 200 when the broker, Postgres and Redis answer, Postgres's schema is migrated at
  least to this release's newest migration, the rule and silence replicas have caught up (on a
  worker that evaluates) and the Faust worker has fully started; otherwise 503. The JSON says the
  state of each, so the answer explains itself. (That the pipeline topics exist is checked once,
  before the worker starts: alerting_app/startup_wait.py.) The services' states are probed once
  for requests arriving together, and reused for a second (`dependency_states`).
- `/startedz`: 200 once this worker has been ready (as /readyz says) at least once, whatever its
  dependencies do since; 503 before. ECS's health check uses it by default: a revision that never
  gets ready is rolled back, and an outage of Postgres, Redis or the broker later restarts nothing.
- `/metrics`: Prometheus text format, alerting_app/metrics.py plus the process and platform
  collectors of prometheus-client; consumer lag is computed at scrape time.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka.errors import KafkaError
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from faust.types.transports import ConsumerT
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, REGISTRY, generate_latest
from redis.asyncio import Redis

from alerting_app import db, metrics
from alerting_app.app import app, settings
from alerting_app.dependencies import (
    PROBE_TIMEOUT_S,
    DependencyState,
    broker_topics_missing,
    pool_ready,
    probe,
    redis_answers,
    redis_probe_client,
    shows_full_detail,
)
from alerting_app.kafka_connection import kafka_connection
from alerting_app.roles import parse_roles
from alerting_app.shared_probe import SharedProbe
from tables.rules import rule_index, rule_replica
from tables.silences import silence_replica

log = logging.getLogger(__name__)

_started = asyncio.Event()
_ready_once = asyncio.Event()  # this process has been ready at least once (/startedz)
_redis: Redis | None = None

# len(), not rules(): rules() builds an object per rule, seconds at 450,000 rules.
metrics.rules_held.set_function(lambda: len(rule_index))


@app.task
async def mark_worker_started() -> None:
    # Faust starts tasks once the worker has joined its group and recovered: it is processing.
    _started.set()


def _redis_client() -> Redis:
    global _redis
    if _redis is None:
        _redis = redis_probe_client(settings.redis_url)
    return _redis


def roles() -> frozenset[str]:
    return parse_roles(settings.roles)


async def _probe_dependencies() -> list[DependencyState]:
    return list(await asyncio.gather(
        probe("broker", broker_topics_missing(kafka_connection(settings))),
        probe("postgres", pool_ready(db.pool())),
        probe("redis", redis_answers(_redis_client())),
    ))


# The broker's, Postgres's and Redis's states, probed at most once at a time and once a second.
DEPENDENCY_PROBE_REUSE_S = 1.0
dependency_states = SharedProbe(_probe_dependencies, DEPENDENCY_PROBE_REUSE_S)


async def readiness() -> list[DependencyState]:
    states = list(await dependency_states())
    states.append(DependencyState("worker", _started.is_set(), "started" if _started.is_set() else "starting"))
    if "evaluate" in roles():
        caught_up = rule_replica.is_caught_up
        states.append(DependencyState("rules", caught_up, "caught up" if caught_up else "replica catching up"))
        caught_up = silence_replica.is_caught_up
        states.append(DependencyState("silences", caught_up, "caught up" if caught_up else "replica catching up"))
    return states


def _full(request: Request) -> bool:
    """The services' full details (exception texts naming our hosts) go to the admin only."""
    return shows_full_detail(request.headers.get("Authorization"), settings.admin_token)


@app.page("/healthz")
class HealthView(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "alive"})


@app.page("/startedz")
class StartedView(View):
    async def get(self, request: Request) -> Response:
        if _ready_once.is_set():
            return self.json({"status": "started"})
        states = await readiness()
        if all(state.ok for state in states):
            _ready_once.set()
            return self.json({"status": "started"})
        return self.json({"status": "starting",
                          "dependencies": {state.name: state.as_json(_full(request)) for state in states}},
                         status=503)


@app.page("/readyz")
class ReadinessView(View):
    async def get(self, request: Request) -> Response:
        states = await readiness()
        ready = all(state.ok for state in states)
        if ready:
            _ready_once.set()
        body = {
            "status": "ready" if ready else "not_ready",
            "dependencies": {state.name: state.as_json(_full(request)) for state in states},
            # What this worker does, for operators checking a role split.
            "roles": sorted(roles()),
            "agents": sorted(app.agents),
            "assignment": assigned_partitions(),
        }
        return self.json(body, status=200 if ready else 503)


def assigned_partitions() -> dict[str, list[int]]:
    """The partitions this worker consumes, by topic (none without agents or before joining)."""
    if app.producer_only:
        return {}
    try:
        assignment = app.consumer.assignment()
    except ConsumerNotStarted:
        return {}
    by_topic: dict[str, list[int]] = {}
    for tp in assignment:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return {topic: sorted(partitions) for topic, partitions in sorted(by_topic.items())}


async def consumer_lag(consumer: ConsumerT, partitions: Iterable[TP]) -> dict[str, int]:
    """Per topic: messages on the given partitions past this worker's last commit (processed and
    acknowledged), or past its position where it has committed nothing.

    The end offsets are asked of the broker at each scrape. The high-water mark the consumer learns
    from its fetches stands still when its stages are stuck (aiokafka fetches nothing more for a
    partition while what it fetched is unread), which would freeze the gauge as the backlog grows.
    They are ListOffsets's answers on the consumer's own connection, not `end_offsets`' (a new
    client, with its TLS handshake and SASL login, at every scrape of every worker): exact on
    Apache Kafka, short by the rest of a partition's last record batch on the Tansu broker.
    """
    partitions = list(partitions)
    if not partitions:
        return {}
    ends = await consumer.listed_highwaters(*partitions)
    lag: dict[str, int] = {}
    for tp in partitions:
        done = consumer._committed_offset.get(tp)  # faust has no public accessor
        if done is None:
            try:
                done = await consumer.position(tp)
            except (KafkaError, AssertionError):  # revoked meanwhile ("Partition is not assigned")
                continue
        end = ends.get(tp)
        if end is not None and done is not None:
            lag[tp.topic] = lag.get(tp.topic, 0) + max(end - done, 0)
    return lag


def agent_topics() -> frozenset[str]:
    """The topics the app's agents consume: read by its group even before it committed on them."""
    return frozenset(name for agent in app.agents.values() for name in getattr(agent.channel, "topics", ()))


async def _update_consumer_lag() -> None:
    if app.producer_only:  # a worker without agents has no consumer
        return
    try:
        assignment = app.consumer.assignment()
    except ConsumerNotStarted:
        return
    # Only the topics the stages consume. The assignment also holds the tables' changelog partitions,
    # which this group never commits and, once recovered, never reads again: their "lag" would grow
    # with every table write, a stage seemingly falling behind that is not.
    consumed = agent_topics()
    partitions = [tp for tp in assignment if tp.topic in consumed]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):  # not wait_for: see agents/rule_outbox.py
            lag = await consumer_lag(app.consumer, partitions)
    except (TimeoutError, KafkaError, ConsumerNotStarted) as exc:
        # The scrape still answers, with the lag of the last one that could ask the broker.
        log.warning("consumer lag not updated: the broker's end offsets not known within %gs (%s)",
                    PROBE_TIMEOUT_S, type(exc).__name__)
        return
    metrics.consumer_lag.clear()  # topics no longer assigned disappear
    for topic, messages in lag.items():
        metrics.consumer_lag.labels(topic=topic).set(messages)


# The consumer lag a scrape reports: asked of the broker at most once at a time and once a second.
_consumer_lag_updated = SharedProbe(_update_consumer_lag, DEPENDENCY_PROBE_REUSE_S)


@app.page("/metrics")
class MetricsView(View):
    async def get(self, request: Request) -> Response:
        await _consumer_lag_updated()
        # Set as a header: aiohttp refuses a charset inside its content_type argument.
        return self.bytes(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
