"""A rolling deployment's stop, as ECS makes it: SIGTERM to one of two workers mid-burst, and SIGKILL
only if it is still running after the task definition's `stopTimeout` (infra/terraform/ecs.tf). The
worker is not restarted: the other one is what is left.

The stopped worker exits by itself, status 0, well before that bound; the sends it has in flight
finish (or time out) and are recorded, the deliveries it holds are handed back at once (no lease of
it is left to run out: leases here last ten minutes, past every wait of these tests), it leaves its
consumer group, and the other worker sends the rest: every notification reaches the receiver once by
Idempotency-Key. A send to an endpoint that hangs is the one sent twice, after its timeout, as any
timed-out attempt is (docs/delivery.md, Retries). (The SIGKILL case:
tests/test_delivery_e2e_crash.py.)
"""
from __future__ import annotations

import asyncio
import re
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from delivery_platform import Tenant, produce_alerts, wait_for_rules, wait_until_backlog_consumed, wait_until_notified
from delivery_receivers import Receiver
from kafka_probe import read_json, retire_rules_left_on_topic

pytestmark = pytest.mark.e2e

# ECS's contract with a stopping task: SIGKILL this long after SIGTERM.
STOP_TIMEOUT_S = float(re.search(r"stopTimeout\s*=\s*(\d+)",
                                 (Path(__file__).parents[1] / "infra/terraform/ecs.tf").read_text()).group(1))
TENANTS = 4
BURST = 60  # alerts, each notified to every tenant
SLOW_ANSWER_S = 1.5
# A lease left to run out would outlast the test: only a hand-back lets the other worker send.
LONG_LEASE = {"DELIVERY_LEASE_S": "600"}
ENDPOINT_CONCURRENCY = 16  # DELIVERY_ENDPOINT_CONCURRENCY's default: one worker's sends to an endpoint at once


def leases_of(worker) -> str:
    """A LIKE pattern for the worker's lease owner (Dispatcher.owner: host:pid:random)."""
    return f"{socket.gethostname()}:{worker.child.process.pid}:%"


async def held_by(database_url: str, worker, client_id: str | None = None) -> list[str]:
    """The deliveries (as Idempotency-Keys) the worker holds leased and PENDING, of one client if given."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT d.notification_id::text || ':' || d.endpoint_id::text AS key"
            " FROM deliveries d JOIN notifications n USING (notification_id)"
            " WHERE d.status = 'PENDING' AND d.lease_until > now() AND d.leased_by LIKE $1"
            " AND ($2::uuid IS NULL OR n.client_id = $2::uuid)", leases_of(worker), client_id)
        return [row["key"] for row in rows]
    finally:
        await conn.close()


async def stop_as_ecs_does(worker) -> int:
    """SIGTERM, and the worker's exit status once it exits by itself; a failure if ECS would have
    had to SIGKILL it."""
    worker.child.process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(worker.child.process.wait, STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still stopping {STOP_TIMEOUT_S:g}s after SIGTERM, when ECS kills it:\n"
                             f"{worker.log()[-5000:]}") from None


async def group_members(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        async with asyncio.timeout(60):
            await admin.start()
            [response] = await admin.describe_consumer_groups([group])
        [(_, _, _, _, _, members, *_)] = response.groups
        return len(members)
    finally:
        await admin.close()


async def two_workers_and_tenants(services, start_worker, http, receiver, workers: int = 2, tenants: int = TENANTS,
                                  **env: str):
    """Two workers of one group (or `workers`), and TENANTS tenants (or `tenants`) whose endpoints are
    `receiver`'s hook-0, hook-1, ...; `env` for the workers."""
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"rolling-{secrets.token_hex(4)}"
    started = [start_worker(APP_ID=group, **LONG_LEASE, **env)]
    await wait_until_backlog_consumed(services, group)
    started += [start_worker(APP_ID=group, **LONG_LEASE, **env) for _ in range(workers - 1)]
    made = [await Tenant(http, started[0].url).create(services.admin_token, receiver.url(f"hook-{n}"))
            for n in range(tenants)]
    await wait_for_rules(http, services, *started)
    return group, started, made


async def the_one_holding_most(services, workers, client_id: str | None = None):
    held = {worker: await held_by(services.database_url, worker, client_id) for worker in workers}
    stopped = max(workers, key=lambda worker: len(held[worker]))
    assert held[stopped], "neither worker holds a delivery: the stop would not be mid-burst"
    return stopped


async def delivered_once(services, receiver: Receiver, tenants, count: int) -> None:
    """Every tenant's `count` notifications settled, each accepted by the receiver exactly once."""
    expected = set()
    for tenant in tenants:
        notification_ids = await wait_until_notified(services.database_url, tenant.client_id, count)
        expected |= {f"{notification_id}:{tenant.endpoint_id}" for notification_id in notification_ids}
    accepted = receiver.accepted()
    assert set(accepted) == expected  # none lost
    assert [key for key, times in accepted.items() if times > 1] == []  # none twice


async def test_a_worker_stopped_mid_burst_exits_and_the_other_delivers_everything_once(
        services, clean_db, start_worker):
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        for n in range(TENANTS):
            receiver.delay(f"hook-{n}", SLOW_ANSWER_S)
        group, workers, tenants = await two_workers_and_tenants(services, start_worker, http, receiver)
        await produce_alerts(services.kafka_bootstrap_servers, [f"burst-{n}" for n in range(BURST)])
        await receiver.wait_for_posts(ENDPOINT_CONCURRENCY)
        stopped = await the_one_holding_most(services, workers)

        assert await stop_as_ecs_does(stopped) == 0, stopped.log()[-5000:]
        assert await held_by(services.database_url, stopped) == []  # handed back, not left to expire
        assert "LeaveGroup request succeeded" in stopped.log()
        assert await group_members(services.kafka_bootstrap_servers, group) < 2  # it left: at most the other
        await delivered_once(services, receiver, tenants, BURST)
        # Its sends in flight finished, and were recorded: none was sent again.
        assert max(receiver.idempotency_keys().values()) == 1

        # The other worker took its partitions: alerts arriving now are notified too.
        await produce_alerts(services.kafka_bootstrap_servers, [f"after-{n}" for n in range(BURST)])
        await delivered_once(services, receiver, tenants, 2 * BURST)


async def test_a_worker_stopped_while_its_endpoint_hangs_exits_and_the_other_sends_what_hung_once(
        services, clean_db, start_worker):
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        # hook-0 never answers a worker's first full round of sends: they end at WEBHOOK_TIMEOUT_S.
        receiver.hang("hook-0", ENDPOINT_CONCURRENCY)
        for n in range(1, TENANTS):
            receiver.delay(f"hook-{n}", SLOW_ANSWER_S)
        group, workers, tenants = await two_workers_and_tenants(services, start_worker, http, receiver)
        await produce_alerts(services.kafka_bootstrap_servers, [f"burst-{n}" for n in range(BURST)])
        hung = await receiver.wait_for_posts(ENDPOINT_CONCURRENCY, "hook-0")
        stopped = await the_one_holding_most(services, workers, tenants[0].client_id)

        assert await stop_as_ecs_does(stopped) == 0, stopped.log()[-5000:]
        assert await held_by(services.database_url, stopped) == []
        assert await group_members(services.kafka_bootstrap_servers, group) < 2  # it left: at most the other
        await delivered_once(services, receiver, tenants, BURST)
        # What hung was sent again after its timeout (the same Idempotency-Key: docs/delivery.md),
        # by the other worker; nothing else was sent twice.
        posted = receiver.idempotency_keys()
        assert {key for key, times in posted.items() if times > 1} == {post.headers["Idempotency-Key"]
                                                                       for post in hung}
        assert max(posted.values()) == 2


# What a worker's log says when Faust has been given partitions, and when Dispatcher.close has
# waited for the sends in flight.
ASSIGNED = "Setting newly assigned partitions"
SENDS_WAITED_FOR = "stopping: done waiting for the sends in flight"


async def test_a_stopping_worker_hands_its_partitions_over_before_its_hung_sends_end(
        services, clean_db, start_worker):
    # Before, the stop waited out its sends in flight (a hung webhook's: WEBHOOK_TIMEOUT_S) before it
    # left its consumer group, and every new notification on its partitions waited that long for
    # the other worker. Hung sends last 20 s here, a wide margin over the rebalance.
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        receiver.hang("hook-0", ENDPOINT_CONCURRENCY)
        group, workers, tenants = await two_workers_and_tenants(services, start_worker, http, receiver,
                                                                tenants=1, WEBHOOK_TIMEOUT_S="20")
        await produce_alerts(services.kafka_bootstrap_servers, [f"burst-{n}" for n in range(BURST)])
        posts = await receiver.wait_for_posts(ENDPOINT_CONCURRENCY, "hook-0")
        hung = {post.headers["Idempotency-Key"] for post in posts}
        # The one with the most hung sends (both may have some): sending them, it holds them.
        held = {worker: hung & set(await held_by(services.database_url, worker)) for worker in workers}
        stopped = max(workers, key=lambda worker: len(held[worker]))
        assert held[stopped], "neither worker holds a hung send"
        [other] = [worker for worker in workers if worker is not stopped]
        assignments_before = other.log().count(ASSIGNED)

        stopping = asyncio.ensure_future(stop_as_ecs_does(stopped))
        while other.log().count(ASSIGNED) == assignments_before and not stopping.done():
            await asyncio.sleep(0.05)
        # The order of events: the other worker had the partitions while the stopped one still waited
        # for its hung sends.
        waited_for_sends_first = SENDS_WAITED_FOR in stopped.log()
        assert await stopping == 0, stopped.log()[-5000:]
        assert other.log().count(ASSIGNED) > assignments_before, other.log()[-5000:]
        assert not waited_for_sends_first, stopped.log()[-5000:]
        log = stopped.log()
        assert log.index("LeaveGroup request succeeded") < log.index(SENDS_WAITED_FOR)
        assert await held_by(services.database_url, stopped) == []
        await delivered_once(services, receiver, tenants, BURST)


async def test_a_stop_whose_sends_outlast_the_brokers_grace_still_sends_their_dead_letters(
        services, clean_db, start_worker):
    # One attempt allowed, and it hangs for 20 s: its dead letter is due 20 s into the stop, later than
    # the broker's 15 s (alerting_app/stop_budget.py). Before, that 15 s ran while the stop waited for
    # the send: the stop gave up on the broker, which answered, and the dead letter failed to send.
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        receiver.hang("hook-0", 1)
        _, [worker], [tenant] = await two_workers_and_tenants(
            services, start_worker, http, receiver, workers=1, tenants=1,
            WEBHOOK_TIMEOUT_S="20", DELIVERY_MAX_ATTEMPTS="1")
        await produce_alerts(services.kafka_bootstrap_servers, ["last-attempt"])
        await receiver.wait_for_posts(1, "hook-0")

        assert await stop_as_ecs_does(worker) == 0, worker.log()[-5000:]
        assert "giving up on the broker" not in worker.log(), worker.log()[-5000:]
        conn = await asyncpg.connect(services.database_url)
        try:
            [(notification_id, status)] = await conn.fetch(
                "SELECT d.notification_id::text, d.status FROM deliveries d JOIN notifications n"
                " USING (notification_id) WHERE n.client_id = $1", tenant.client_id)
        finally:
            await conn.close()
        # Recorded by the stopped worker once its dead letter was sent (nobody else runs).
        assert status == "FAILED", worker.log()[-5000:]
        letters = [letter for letter in await read_json(services.kafka_bootstrap_servers, "notifications.ready.dlq")
                   if tenant.endpoint_id in letter["reason"]]
        assert len(letters) == 1 and notification_id in letters[0]["payload"]
