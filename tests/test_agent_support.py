"""Driving the agents for tests: Faust's in-memory test driver in, the real broker and Postgres out.

Each agent is run with `agent.test_context()` and fed with `put()`. Its sink is the real one, so
what it yields is what was sent to the real broker (and, for aggregate, recorded as emitted);
`put()` returns once the sink is done. Faust's producer and the asyncpg pool stay bound to the
event loop that first used them, so these tests share the session's loop (`pytestmark =
AGENT_LOOP`, as the API tests do) and each module hands both back when it is done.

This module holds no tests; the test_agent_* modules import its fixtures and helpers.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from kafka_probe import caught_up, read_topic

AGENT_LOOP = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pipeline(services):
    """The app with its agents registered, sending to the real broker; released after the module."""
    import agents  # noqa: F401  (registers the agents)
    from alerting_app import db
    from alerting_app.app import app, settings
    from tables.rule_replica import RuleStore
    from tables.rules import rule_replica, rule_store_path
    from tables.silences import silence_replica

    # The worker's rule and silence replicas, reading the real topics, as evaluate needs them.
    # They are module-level singletons: an earlier module's run left them marked caught up, which
    # would let this module start before its own run has read anything. A worker runs them once.
    for replica in (rule_replica, silence_replica):
        replica._caught_up.clear()
    store = RuleStore(rule_store_path())
    replicas = [asyncio.ensure_future(rule_replica.run(settings.kafka_bootstrap_servers, "rule.changed", store)),
                asyncio.ensure_future(silence_replica.run(settings.kafka_bootstrap_servers, "silence.changed"))]
    try:
        await caught_up(rule_replica, replicas[0])
        await caught_up(silence_replica, replicas[1])
    except BaseException:
        for replica in replicas:
            replica.cancel()
        raise
    # The table changelogs, which a worker creates at start-up, with TOPIC_PARTITIONS partitions:
    # a test writing a table first would have the broker create one with its own count, and every
    # later worker of this APP_ID would refuse to start on it (alerting_app/startup_wait.py).
    for table in app.tables.values():
        await table.changelog_topic.maybe_declare()
    yield app
    for replica in replicas:
        replica.cancel()
    # A bound, not a measurement: a replica that ignored its cancellation would hang the whole run.
    _, still_running = await asyncio.wait(replicas, timeout=30)
    assert not still_running, f"{len(still_running)} replica(s) still running 30s after being cancelled"
    store.close()
    await db.close()
    await app.producer.stop()
    # Lets a later module start the producer again, in whatever loop it runs.
    app.producer.service_reset()


@pytest_asyncio.fixture(loop_scope="session")
async def pool(pipeline):
    from alerting_app import db

    return await db.pool()


async def sent_to(topic: str, key: str) -> list[dict]:
    """Every message with this key on the real broker's topic, decoded."""
    from alerting_app.app import settings

    return [json.loads(value) for k, value in await read_topic(settings.kafka_bootstrap_servers, topic)
            if k == key.encode()]


async def insert_client(pool) -> str:
    client_id = str(uuid.uuid4())
    await pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, $2, $3)",
                       client_id, f"client {client_id[:8]}", uuid.uuid4().hex)
    return client_id


async def insert_rule(pool, client_id: str, severity: str = "HIGH", source: str = "payments",
                      name: str = "*") -> str:
    rule_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO rules (rule_id, client_id, severity, source, name) VALUES ($1, $2, $3, $4, $5)",
        rule_id, client_id, severity, source, name)
    return rule_id


async def insert_endpoint(pool, client_id: str, rule_id: str, type_: str, value: str,
                          enabled: bool = True) -> str:
    endpoint_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO endpoints (endpoint_id, rule_id, client_id, type, value, enabled)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        endpoint_id, rule_id, client_id, type_, value, enabled)
    return endpoint_id


async def delete_client_as_the_api_does(pool, client_id: str, rule_ids: list[str], *, finished: bool = False) -> None:
    """The client as DELETE /api/v1/clients/{id} leaves it (web/clients.py delete_client): each rule's
    deletion remembered, its rules and their endpoints gone, its key gone, the client marked being
    deleted with its notifications still there. `finished`: then its row gone too, with its
    notifications, as retention finishes the deletion (agents/retention.py finish_client_deletion)."""
    await pool.executemany("INSERT INTO deleted_rules (rule_id, client_id, version) VALUES ($1, $2, 2)",
                           [(rule_id, client_id) for rule_id in rule_ids])
    await pool.execute("DELETE FROM rules WHERE client_id = $1", client_id)
    await pool.execute("UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id = $1",
                       client_id)
    if finished:
        await pool.execute("DELETE FROM clients WHERE client_id = $1", client_id)


# Both states a deleted client is in: marked being deleted (its history still there), then gone.
DELETIONS = pytest.mark.parametrize("finished", [False, True], ids=["being-deleted", "deleted"])


@dataclass
class ReceivedPost:
    path: str
    headers: dict[str, str]
    body: dict


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records every POST; `/status/<code>` answers <code>."""

    def __init__(self) -> None:
        self.posts: list[ReceivedPost] = []
        application = web.Application()
        application.router.add_post("/status/{code}", self._receive)
        self.server = TestServer(application, host="127.0.0.1")

    async def _receive(self, request: web.Request) -> web.Response:
        self.posts.append(ReceivedPost(request.path, dict(request.headers), await request.json()))
        return web.Response(status=int(request.match_info["code"]))

    def url(self, status: int) -> str:
        return str(self.server.make_url(f"/status/{status}"))

    def posts_to(self, status: int) -> list[ReceivedPost]:
        return [post for post in self.posts if post.path == f"/status/{status}"]


@pytest_asyncio.fixture(loop_scope="session")
async def webhook():
    receiver = WebhookReceiver()
    await receiver.server.start_server()
    yield receiver
    await receiver.server.close()
