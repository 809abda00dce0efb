"""The delivery rows in the real Postgres, with concurrent connections where the behaviour is about
what one transaction sees of another: settling a notification whose last deliveries finish on two
workers at once, and what a sweep leases of each endpoint. The recorder's dead letters go to a broker
of this module's own, reached through a front that can refuse connections or take them and never answer."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from alerting_app.contracts import DeadLetter
from alerting_app.db import init_connection
from alerting_app.dead_letters import send_dead_letters
from alerting_app.delivery.recorder import Recorder
from alerting_app.delivery.records import (DeliveryChange, fence_sends, lease_due, release, renew_leases,
                                           write_outcomes)
from broker_front import OutageFront
from kafka_probe import create_topics, read_topic
from postgres_waits import until_waiting_on_a_lock
from private_brokers import private_broker_behind

CLIENT_NAME = "test_delivery_records"
ALERTS = json.dumps([{"alert_id": "a", "severity": "HIGH", "source": "s", "name": "n", "event_ts": 1}])


@pytest_asyncio.fixture
async def conn(clean_db):
    connection = await asyncpg.connect(clean_db)
    await connection.execute("SET lock_timeout = '60s'")  # a broken test fails rather than hangs
    yield connection
    # Due rows left behind would be swept up by later tests' workers.
    await connection.execute("DELETE FROM clients WHERE name = $1", CLIENT_NAME)
    await connection.close()


async def insert_client(conn: asyncpg.Connection) -> str:
    client_id = str(uuid.uuid4())
    await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, $2, $3)",
                       client_id, CLIENT_NAME, uuid.uuid4().hex)
    return client_id


async def insert_notification(conn: asyncpg.Connection, client_id: str, alerts: str = ALERTS) -> str:
    notification_id = str(uuid.uuid4())
    await conn.execute("INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
                       " VALUES ($1, $2, $3, $4::text::jsonb, ARRAY[gen_random_uuid()])",
                       notification_id, client_id, notification_id, alerts)
    return notification_id


async def insert_endpoint(conn: asyncpg.Connection, client_id: str) -> str:
    rule_id, endpoint_id = str(uuid.uuid4()), str(uuid.uuid4())
    await conn.execute("INSERT INTO rules (rule_id, client_id, severity, source, name)"
                       " VALUES ($1, $2, 'HIGH', $3, '*')", rule_id, client_id, rule_id)
    await conn.execute("INSERT INTO endpoints (endpoint_id, rule_id, client_id, type, value)"
                       " VALUES ($1, $2, $3, 'webhook', 'http://127.0.0.1:1/hook')", endpoint_id, rule_id, client_id)
    return endpoint_id


async def open_delivery(conn: asyncpg.Connection, notification_id: str, endpoint_id: str,
                        due_seconds_ago: float = 0.0) -> None:
    await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
                       " VALUES ($1, $2, 'webhook', 'PENDING', now() - make_interval(secs => $3))",
                       notification_id, endpoint_id, due_seconds_ago)


async def one_due_delivery(conn: asyncpg.Connection) -> tuple[str, str]:
    """(notification_id, endpoint_id) of a PENDING delivery due a second ago, of a new client."""
    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoint_id = await insert_endpoint(conn, client_id)
    notification_id = await insert_notification(conn, client_id)
    await open_delivery(conn, notification_id, endpoint_id, due_seconds_ago=1.0)
    return notification_id, endpoint_id


@contextlib.asynccontextmanager
async def recorder_on(database_url: str, send_letters: Callable[[list[DeadLetter]], Awaitable[None]]
                      = send_dead_letters) -> AsyncIterator[Recorder]:
    """A Recorder of the worker "test-recorder" on a pool of its own, closed after."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=init_connection)

    async def own_pool() -> asyncpg.Pool:
        return pool
    recorder = Recorder("test-recorder", lambda: 0.01, own_pool, send_letters)
    try:
        yield recorder
    finally:
        await recorder.close()
        await pool.close()


LETTERS_TOPIC = "notifications.ready.dlq"  # where the recorder's letters (of notifications.ready) go


@pytest.fixture(scope="module")
def letters_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageFront]:
    """A broker of this module's own (the session's is shared), reachable only through a front that
    can refuse or hang."""
    with private_broker_behind(OutageFront, tmp_path_factory.mktemp("letters-broker")) as front:
        asyncio.run(create_topic(front.address, LETTERS_TOPIC))
        yield front


async def create_topic(bootstrap: str, topic: str) -> None:
    await create_topics(bootstrap, {topic: 1})


class LetterSending:
    """Sends dead letters as `send_dead_letters` does (each to its topic's `.dlq`, then waits for every
    acknowledgement, raising the first failure), with a producer of its own; counts its sends, and
    keeps their failures."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self.sends = 0
        self.failures: list[BaseException] = []

    async def __call__(self, letters: list[DeadLetter]) -> None:
        self.sends += 1
        acks = [await self._producer.send(f"{letter.topic}.dlq", key=letter.key and letter.key.encode(),
                                          value=letter.encode()) for letter in letters]
        results = await asyncio.gather(*acks, return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            self.failures.append(failures[0])
            raise failures[0]


@contextlib.asynccontextmanager
async def letters_sent_through(front: OutageFront, request_timeout_ms: int) -> AsyncIterator[LetterSending]:
    """Dead-letter sending through `front`, connected to the broker before the front is told to fail;
    the front lets everything through again after."""
    producer = AIOKafkaProducer(bootstrap_servers=front.address, acks="all", request_timeout_ms=request_timeout_ms)
    await producer.start()
    try:
        # The topic's leader known and connected to, as a worker's producer is: what follows is about sending.
        await producer.send_and_wait(LETTERS_TOPIC, key=b"warm-up", value=b"{}")
        yield LetterSending(producer)
    finally:
        front.let_through()
        await producer.stop()


async def letters_on_the_topic(front: OutageFront, letter: DeadLetter) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(value) for key, value in await read_topic(front.address, LETTERS_TOPIC)
            if key == letter.key.encode()]


async def lease_to_the_recorder(conn: asyncpg.Connection, *keys: tuple[str, str]) -> None:
    """Leased by the recorder's worker, as the sweep leases them."""
    for key in keys:
        await conn.execute("UPDATE deliveries SET leased_by = 'test-recorder', lease_until = now() + interval '1 minute'"
                           " WHERE notification_id = $1 AND endpoint_id = $2", *key)


async def delivery_status(conn: asyncpg.Connection, key: tuple[str, str]) -> str:
    return await conn.fetchval("SELECT status FROM deliveries WHERE notification_id = $1 AND endpoint_id = $2", *key)


async def test_two_workers_finishing_a_notifications_last_deliveries_at_once_settle_it(clean_db, conn):
    client_id = await insert_client(conn)
    notification_id = await insert_notification(conn, client_id)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    for endpoint_id in (first, second):
        await open_delivery(conn, notification_id, endpoint_id)
    worker_a, worker_b = await asyncpg.connect(clean_db), await asyncpg.connect(clean_db)
    try:
        # A writes its outcome and holds its transaction open; B writes the other one meanwhile.
        a_transaction = worker_a.transaction()
        await a_transaction.start()
        await write_outcomes(worker_a, "worker-a", [DeliveryChange(notification_id, first, "SENT", 1)])
        b_writing = asyncio.ensure_future(
            write_outcomes(worker_b, "worker-b", [DeliveryChange(notification_id, second, "SENT", 1)]))
        await until_waiting_on_a_lock(conn, pid=worker_b.get_server_pid())
        await a_transaction.commit()
        await b_writing
    finally:
        await worker_a.close()
        await worker_b.close()

    # Each saw the other's delivery PENDING, had B judged the deliveries as of before its wait.
    assert await conn.fetchval("SELECT status FROM notifications WHERE notification_id = $1",
                               notification_id) == "SENT"


async def test_a_sweep_leases_no_more_of_an_endpoint_than_the_room_it_has_for_it(clean_db, conn):
    await init_connection(conn)
    client_id = await insert_client(conn)
    crowded, other = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    # The crowded endpoint's 50 due rows are older than the other's 5.
    for endpoint_id, count, age in ((crowded, 50, 60.0), (other, 5, 30.0)):
        for _ in range(count):
            await open_delivery(conn, await insert_notification(conn, client_id), endpoint_id, due_seconds_ago=age)

    # This worker holds 95 of the crowded endpoint's deliveries, of a backlog of 100.
    jobs = await lease_due(conn, "this-worker", 60.0, {crowded: 95}, backlog=100, limit=20)

    leased = [job.endpoint_id for job in jobs]
    assert (leased.count(crowded), leased.count(other)) == (5, 5)
    assert await conn.fetchval("SELECT count(*) FROM deliveries WHERE leased_by = 'this-worker'") == 10


async def test_a_sweep_leases_no_more_of_a_client_than_the_room_it_has_for_it(clean_db, conn):
    # One tenant whose many endpoints all fail must not fill the worker: its backlog is older and
    # the sweep serves the oldest first, so without a per-client room it would take every lease.
    await init_connection(conn)
    failing, other = await insert_client(conn), await insert_client(conn)
    failing_endpoints = [await insert_endpoint(conn, failing) for _ in range(5)]
    other_endpoint = await insert_endpoint(conn, other)
    for endpoint_id in failing_endpoints:
        for _ in range(10):
            await open_delivery(conn, await insert_notification(conn, failing), endpoint_id, due_seconds_ago=60.0)
    for _ in range(5):
        await open_delivery(conn, await insert_notification(conn, other), other_endpoint, due_seconds_ago=30.0)

    # This worker holds 37 of the failing client's deliveries, of a client backlog of 40.
    jobs = await lease_due(conn, "this-worker", 60.0, {}, backlog=100, limit=20,
                           held_by_client={failing: 37}, client_backlog=40)

    clients = [job.notification.client_id for job in jobs]
    assert (clients.count(failing), clients.count(other)) == (3, 5)


async def test_a_sweep_leases_nothing_of_a_full_endpoint_and_the_oldest_first_of_the_others(clean_db, conn):
    await init_connection(conn)
    client_id = await insert_client(conn)
    full, other = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    await open_delivery(conn, await insert_notification(conn, client_id), full, due_seconds_ago=90.0)
    oldest = await insert_notification(conn, client_id)
    await open_delivery(conn, oldest, other, due_seconds_ago=60.0)
    await open_delivery(conn, await insert_notification(conn, client_id), other, due_seconds_ago=30.0)

    [job] = await lease_due(conn, "this-worker", 60.0, {full: 3}, backlog=3, limit=1)

    assert job.key == (oldest, other)


async def test_a_sweep_loads_a_row_stored_under_an_earlier_looser_contract(clean_db, conn):
    # Before event_ts was bounded, an alert in milliseconds was accepted and stored. Rebuilding it
    # with today's validation raised, and one such row made every sweep fail, for every tenant.
    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoint_id = await insert_endpoint(conn, client_id)
    legacy = json.dumps([{"alert_id": "a", "severity": "HIGH", "source": "s", "name": "n", "event_ts": 1.7e12}])
    notification_id = await insert_notification(conn, client_id, legacy)
    await open_delivery(conn, notification_id, endpoint_id, due_seconds_ago=1.0)

    [job] = await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10)

    assert job.key == (notification_id, endpoint_id)
    assert job.notification.alerts[0].event_ts == 1.7e12
    assert job.notification.alerts[0].severity.value == "HIGH"


@pytest.mark.parametrize("stored_alerts", ["[]", '[{"alert_id": "a", "source": "s"}]', '{"not": "a list"}'])
async def test_a_sweep_fails_a_row_it_cannot_read_and_leases_the_others(clean_db, conn, stored_alerts):
    # A row edited by hand (or by a bug) used to make every sweep raise after leasing its batch: the
    # batch waited out its leases, then the same oldest rows were leased again, and raised again.
    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoint_id = await insert_endpoint(conn, client_id)
    unreadable = await insert_notification(conn, client_id, stored_alerts)
    await open_delivery(conn, unreadable, endpoint_id, due_seconds_ago=60.0)
    readable = await insert_notification(conn, client_id)
    await open_delivery(conn, readable, endpoint_id, due_seconds_ago=30.0)

    [job] = await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10)

    assert job.key == (readable, endpoint_id)
    failed = await conn.fetchrow("SELECT status, last_error FROM deliveries WHERE notification_id = $1", unreadable)
    assert failed["status"] == "FAILED"
    assert failed["last_error"].startswith("the stored notification cannot be read: ")
    settled = await conn.fetchrow("SELECT status, detail FROM notifications WHERE notification_id = $1", unreadable)
    assert settled["status"] == "FAILED" and "cannot be read" in settled["detail"]
    # Nothing is left for the next sweep.
    assert await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10) == []


async def lease_of(conn: asyncpg.Connection, notification_id: str, endpoint_id: str) -> asyncpg.Record:
    return await conn.fetchrow("SELECT status, attempts, leased_by, lease_until IS NOT NULL AS leased,"
                               " next_attempt_at <= now() AS due FROM deliveries"
                               " WHERE notification_id = $1 AND endpoint_id = $2", notification_id, endpoint_id)


async def taken_over_delivery(conn: asyncpg.Connection) -> tuple[str, str]:
    """A delivery leased by "old-holder", whose lease ran out mid-send: the sweep gave it to "new-holder"."""
    notification_id, endpoint_id = await one_due_delivery(conn)
    [_] = await lease_due(conn, "old-holder", 60.0, {}, backlog=10, limit=10)
    await conn.execute("UPDATE deliveries SET lease_until = now() - interval '1 second'")
    [_] = await lease_due(conn, "new-holder", 60.0, {}, backlog=10, limit=10)
    return notification_id, endpoint_id


async def test_a_worker_whose_lease_ran_out_does_not_drop_the_new_holders_lease(clean_db, conn):
    notification_id, endpoint_id = await taken_over_delivery(conn)
    next_attempt_sql = "SELECT next_attempt_at FROM deliveries WHERE notification_id = $1 AND endpoint_id = $2"
    scheduled = await conn.fetchval(next_attempt_sql, notification_id, endpoint_id)

    # The old holder meets the new holder's claim and hands the delivery back for later.
    await write_outcomes(conn, "old-holder", [DeliveryChange(notification_id, endpoint_id, "PENDING", 1, "HTTP 503",
                                                             next_attempt_at=0.0, release=True)])

    row = await lease_of(conn, notification_id, endpoint_id)
    assert (row["leased_by"], row["leased"], row["attempts"]) == ("new-holder", True, 1)
    # The schedule is the holder's too: the old holder's "due at once" would set it for the new one.
    assert await conn.fetchval(next_attempt_sql, notification_id, endpoint_id) == scheduled
    assert await lease_due(conn, "third-worker", 60.0, {}, backlog=10, limit=10) == []

    # The holder's own hand-back does give the lease up and schedule the next attempt.
    await write_outcomes(conn, "new-holder", [DeliveryChange(notification_id, endpoint_id, "PENDING",
                                                             next_attempt_at=0.0, release=True)])
    row = await lease_of(conn, notification_id, endpoint_id)
    assert (row["leased"], row["due"]) == (False, True)


async def test_a_hand_back_that_sent_nothing_keeps_the_reason_the_delivery_is_not_sent_yet(clean_db, conn):
    # A delivery that met another attempt's claim (a lease taken over mid-send, a dead worker's claim)
    # hands itself back without an error of its own. Before, that wrote last_error NULL: the tenant
    # saw a PENDING delivery with attempts and no reason why it is not sent yet.
    notification_id, endpoint_id = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker", 60.0, {}, backlog=10, limit=10)
    await write_outcomes(conn, "worker", [DeliveryChange(notification_id, endpoint_id, "PENDING", 1, "HTTP 503",
                                                         next_attempt_at=0.0)])

    await write_outcomes(conn, "worker", [DeliveryChange(notification_id, endpoint_id, "PENDING",
                                                         next_attempt_at=0.0, release=True)])

    assert await conn.fetchval("SELECT last_error FROM deliveries WHERE notification_id = $1 AND endpoint_id = $2",
                               notification_id, endpoint_id) == "HTTP 503"
    # A send clears it: a SENT delivery has no error left.
    [_] = await lease_due(conn, "worker", 60.0, {}, backlog=10, limit=10)
    await write_outcomes(conn, "worker", [DeliveryChange(notification_id, endpoint_id, "SENT", 1)])
    assert await conn.fetchval("SELECT last_error FROM deliveries WHERE notification_id = $1 AND endpoint_id = $2",
                               notification_id, endpoint_id) is None


async def test_renewing_leases_does_not_take_back_a_delivery_handed_back_meanwhile(clean_db, conn):
    # The sweep lists what it holds, then renews: a hand-back that lands in between must stay one.
    notification_id, endpoint_id = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker", 60.0, {}, backlog=10, limit=10)
    await release(conn, "worker", [(notification_id, endpoint_id)])

    # Not among those renewed either: the worker must not count on a lease it no longer has
    # (dispatcher.Dispatcher.renewed: a send it covers goes without its fence).
    assert await renew_leases(conn, "worker", 60.0, [(notification_id, endpoint_id)]) == set()

    assert (await lease_of(conn, notification_id, endpoint_id))["leased"] is False
    assert len(await lease_due(conn, "other-worker", 60.0, {}, backlog=10, limit=10)) == 1


async def lease_left_s(conn: asyncpg.Connection, key: tuple[str, str]) -> float:
    return await conn.fetchval("SELECT extract(epoch FROM lease_until - now()) FROM deliveries"
                               " WHERE notification_id = $1 AND endpoint_id = $2", *key)


async def test_a_send_is_fenced_while_its_worker_holds_the_row_even_past_its_lease(clean_db, conn):
    # The holder stalled past its lease, and nobody leased the row since: nobody else can have sent
    # it, so it is still the holder's, and its lease now covers the send; no sweep takes it meanwhile.
    key = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker", 1.0, {}, backlog=10, limit=10)
    await conn.execute("UPDATE deliveries SET lease_until = now() - interval '1 second'")

    assert await fence_sends(conn, "worker", [(key, 15.0)]) == {key}

    assert await lease_left_s(conn, key) > 14.0
    assert await lease_due(conn, "other-worker", 1.0, {}, backlog=10, limit=10) == []
    # Renewals (DELIVERY_LEASE_S, shorter here) do not cut the send's cover short.
    await renew_leases(conn, "worker", 1.0, [key])
    assert await lease_left_s(conn, key) > 14.0


async def test_a_send_is_not_fenced_once_another_worker_leased_the_row_or_it_is_settled(clean_db, conn):
    taken_over = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker", 1.0, {}, backlog=10, limit=10)
    await conn.execute("UPDATE deliveries SET lease_until = now() - interval '1 second'"
                       " WHERE notification_id = $1", taken_over[0])
    [_] = await lease_due(conn, "other-worker", 60.0, {}, backlog=10, limit=10)
    assert await renew_leases(conn, "worker", 60.0, [taken_over]) == set()  # renewed only by its holder
    assert await renew_leases(conn, "other-worker", 60.0, [taken_over]) == {taken_over}
    settled = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker", 60.0, {}, backlog=10, limit=10)
    await write_outcomes(conn, "other-worker", [DeliveryChange(*settled, "SENT", 1)])

    assert await fence_sends(conn, "worker", [(taken_over, 15.0), (settled, 15.0)]) == set()

    assert await lease_left_s(conn, taken_over) > 50.0  # the new holder's lease, untouched
    row = await lease_of(conn, *taken_over)
    assert (row["status"], row["leased_by"]) == ("PENDING", "other-worker")


async def test_a_send_recorded_by_a_worker_whose_lease_ran_out_is_recorded_sent(clean_db, conn):
    notification_id, endpoint_id = await one_due_delivery(conn)
    await conn.execute("UPDATE deliveries SET leased_by = 'new-holder', lease_until = now() + interval '1 minute'")

    await write_outcomes(conn, "old-holder", [DeliveryChange(notification_id, endpoint_id, "SENT", 1)])

    assert (await lease_of(conn, notification_id, endpoint_id))["status"] == "SENT"
    assert await conn.fetchval("SELECT status FROM notifications WHERE notification_id = $1",
                               notification_id) == "SENT"


async def test_a_sweep_leases_other_endpoints_rows_behind_a_full_endpoints_older_backlog(clean_db, conn):
    await init_connection(conn)
    client_id = await insert_client(conn)
    full, other = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    # More of the full endpoint's rows are older than the others than a sweep ranks.
    for _ in range(20):
        await open_delivery(conn, await insert_notification(conn, client_id), full, due_seconds_ago=90.0)
    waiting = await insert_notification(conn, client_id)
    await open_delivery(conn, waiting, other, due_seconds_ago=30.0)

    [job] = await lease_due(conn, "this-worker", 60.0, {full: 3}, backlog=3, limit=1)

    assert job.key == (waiting, other)


def rows_read(plan: dict) -> int:
    """Rows the plan's scans of `deliveries` produced, over every loop."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == "deliveries" else 0
    return own + sum(rows_read(child) for child in plan.get("Plans", []))


def rows_scanned(plan: dict) -> float:
    """Rows the plan's scans of `deliveries` read, those their filters dropped too, over every loop."""
    own = ((plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)) * plan["Actual Loops"]
           if plan.get("Relation Name") == "deliveries" else 0)
    return own + sum(rows_scanned(child) for child in plan.get("Plans", []))


def rows_read_by_index(plan: dict, index: str) -> float:
    """Rows the plan's scans of `index` produced, over every loop."""
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Index Name") == index else 0
    return own + sum(rows_read_by_index(child, index) for child in plan.get("Plans", []))


async def test_a_sweep_reads_a_bounded_part_of_a_large_due_backlog(clean_db, conn):
    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoints = [await insert_endpoint(conn, client_id) for _ in range(10)]
    await conn.execute(
        "WITH n AS (INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
        "  SELECT gen_random_uuid(), $1, i::text, $2::text::jsonb, ARRAY[gen_random_uuid()]"
        "  FROM generate_series(1, 2000) i RETURNING notification_id, alert_id::int AS i)"
        " INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
        " SELECT n.notification_id, ($3::uuid[])[1 + n.i % 10], 'webhook', 'PENDING', now() - make_interval(secs => n.i)"
        " FROM n", client_id, ALERTS, endpoints)
    # Both tables the sweep reads, as autovacuum keeps them: with the notifications' statistics up to
    # date (about as many as the due rows), a join let the planner read every due row first.
    await conn.execute("ANALYZE deliveries, notifications")

    from alerting_app.delivery import records
    async with conn.transaction():
        [plan] = json.loads(await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + records._LEASE_DUE,
            "this-worker", 60.0, [], [], 1000, 10, 10 * records._CANDIDATES_PER_LEASE, [], [], 5000, 0))

    # Ten leased of 2,000 due: what the sweep reads is bounded by what it may lease, not the backlog.
    assert await conn.fetchval("SELECT count(*) FROM deliveries WHERE leased_by = 'this-worker'") == 10
    assert rows_read(plan["Plan"]) <= 200


async def test_a_sweep_leases_email_round_robin_per_client_reading_a_bounded_part_of_a_storms_backlog(
        clean_db, conn):
    # One tenant's storm: 2,000 emails queued over its fifty email endpoints, all older than another
    # tenant's one email and than a webhook's delivery. Oldest first, the sweep leased the storm's
    # emails until none was left, and the other tenant's waited behind all of them.
    await init_connection(conn)
    flooding, other = await insert_client(conn), await insert_client(conn)
    endpoints = [await insert_endpoint(conn, flooding) for _ in range(50)]
    other_endpoint, webhook = await insert_endpoint(conn, other), await insert_endpoint(conn, other)
    await conn.execute("UPDATE endpoints SET type = 'email', value = 'oncall@example.com'"
                       " WHERE endpoint_id = ANY($1::uuid[])", [*endpoints, other_endpoint])
    await conn.execute(
        "WITH n AS (INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
        "  SELECT gen_random_uuid(), $1, i::text, $2::text::jsonb, ARRAY[gen_random_uuid()]"
        "  FROM generate_series(1, 2000) i RETURNING notification_id, alert_id::int AS i)"
        " INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
        " SELECT n.notification_id, ($3::uuid[])[1 + n.i % 50], 'email', 'PENDING', now() - make_interval(secs => 60 + n.i)"
        " FROM n", flooding, ALERTS, endpoints)
    others_email, others_webhook = await insert_notification(conn, other), await insert_notification(conn, other)
    await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
                       " VALUES ($1, $2, 'email', 'PENDING', now() - interval '30 seconds'),"
                       "        ($3, $4, 'webhook', 'PENDING', now() - interval '30 seconds')",
                       others_email, other_endpoint, others_webhook, webhook)
    await conn.execute("ANALYZE deliveries, notifications")

    from alerting_app.delivery import records
    async with conn.transaction():
        # Room for ten, four of them email.
        [plan] = json.loads(await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + records._LEASE_DUE,
            "this-worker", 60.0, [], [], 1000, 10, 10 * records._CANDIDATES_PER_LEASE, [], [], 5000, 4))
    leased = await conn.fetch("SELECT d.notification_id::text, d.channel, n.client_id::text FROM deliveries d"
                              " JOIN notifications n USING (notification_id) WHERE d.leased_by = 'this-worker'")

    # The other tenant's email and webhook, and three of the storm's email: the four email turns are
    # the storm's first, the other tenant's, then the storm's next two.
    assert len(leased) == 5
    assert {row["notification_id"] for row in leased if row["client_id"] == other} == {others_email, others_webhook}
    assert [row["channel"] for row in leased if row["client_id"] == flooding] == ["email"] * 3
    # What the sweep reads of the email waiting is bounded by the clients mailing and the email room,
    # not by the storm nor by its endpoints: an entry per client to find them (and one past the
    # last), and at most the room of each. Found per endpoint, it read up to the room of each of the
    # fifty (and their clients): in a storm over 28,800 endpoints, 0.3 s or more every sweep.
    assert rows_read_by_index(plan["Plan"], "deliveries_email_client_idx") <= 3 * 2 + 2 * 4
    assert rows_read(plan["Plan"]) <= 50


async def test_a_sweep_finds_webhooks_behind_an_email_storm_without_reading_the_storm(clean_db, conn):
    # 2,000 emails queued, all older than a webhook's delivery, and no room for email. Read from
    # deliveries_due_idx, leaving email out, every sweep read every email row to reach the webhook.
    await init_connection(conn)
    client_id = await insert_client(conn)
    mail, webhook = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    await conn.execute("UPDATE endpoints SET type = 'email', value = 'oncall@example.com' WHERE endpoint_id = $1",
                       mail)
    await conn.execute(
        "WITH n AS (INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids)"
        "  SELECT gen_random_uuid(), $1, i::text, $2::text::jsonb, ARRAY[gen_random_uuid()]"
        "  FROM generate_series(1, 2000) i RETURNING notification_id, alert_id::int AS i)"
        " INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
        " SELECT n.notification_id, $3, 'email', 'PENDING', now() - make_interval(secs => 60 + n.i) FROM n",
        client_id, ALERTS, mail)
    hook_notification = await insert_notification(conn, client_id)
    await open_delivery(conn, hook_notification, webhook, due_seconds_ago=1)
    await conn.execute("ANALYZE deliveries, notifications")

    from alerting_app.delivery import records
    async with conn.transaction():
        [plan] = json.loads(await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + records._LEASE_DUE,
            "this-worker", 60.0, [], [], 1000, 10, 10 * records._CANDIDATES_PER_LEASE, [], [], 5000, 0))

    assert await conn.fetch("SELECT notification_id::text FROM deliveries WHERE leased_by = 'this-worker'") == [
        (hook_notification,)]
    assert rows_scanned(plan["Plan"]) <= 20


async def test_a_retried_email_that_failed_before_migration_021_is_found_by_the_sweep(clean_db, conn):
    # The sweep finds email by its client_id (migration 021), set only on PENDING email: a FAILED
    # email row from before that migration has none, and a tenant's retry makes it PENDING again.
    from alerting_app.delivery.records import retry_failed

    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoint_id = await insert_endpoint(conn, client_id)
    await conn.execute("UPDATE endpoints SET type = 'email', value = 'oncall@example.com' WHERE endpoint_id = $1",
                       endpoint_id)
    notification_id = await insert_notification(conn, client_id)
    await conn.execute("UPDATE notifications SET status = 'FAILED' WHERE notification_id = $1", notification_id)
    await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts)"
                       " VALUES ($1, $2, 'email', 'FAILED', 3)", notification_id, endpoint_id)
    assert await conn.fetchval("SELECT client_id FROM deliveries WHERE notification_id = $1", notification_id) is None

    assert await retry_failed(conn, notification_id, None)

    [job] = await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10, email_room=1)
    assert job.key == (notification_id, endpoint_id)


async def test_a_retried_delivery_whose_endpoint_became_email_since_it_failed_is_leased_as_email(clean_db, conn):
    # The tenant made the endpoint an email after its webhook delivery failed, then retries the
    # notification: the delivery goes by the endpoint's type now, and waits for the worker's email
    # room and its tenant's email turn as an email. Before, it kept the webhook's channel, and the
    # sweep leased it among the webhooks (docs/delivery.md, "Retries").
    from alerting_app.delivery.records import retry_failed

    await init_connection(conn)
    client_id = await insert_client(conn)
    endpoint_id = await insert_endpoint(conn, client_id)
    notification_id = await insert_notification(conn, client_id)
    await conn.execute("UPDATE notifications SET status = 'FAILED' WHERE notification_id = $1", notification_id)
    await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts)"
                       " VALUES ($1, $2, 'webhook', 'FAILED', 3)", notification_id, endpoint_id)
    await conn.execute("UPDATE endpoints SET type = 'email', value = 'oncall@example.com' WHERE endpoint_id = $1",
                       endpoint_id)

    assert await retry_failed(conn, notification_id, None)

    assert tuple(await conn.fetchrow("SELECT channel, client_id::text FROM deliveries WHERE notification_id = $1",
                                     notification_id)) == ("email", client_id)
    assert await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10, email_room=0) == []
    [job] = await lease_due(conn, "this-worker", 60.0, {}, backlog=10, limit=10, email_room=1)
    assert job.key == (notification_id, endpoint_id)


async def test_a_failure_from_a_worker_that_no_longer_holds_the_row_does_not_end_it(clean_db, conn):
    notification_id, endpoint_id = await taken_over_delivery(conn)

    await write_outcomes(conn, "old-holder", [DeliveryChange(notification_id, endpoint_id, "FAILED", 1, "HTTP 400")])

    row = await lease_of(conn, notification_id, endpoint_id)
    assert (row["status"], row["attempts"], row["leased_by"]) == ("PENDING", 1, "new-holder")
    assert await conn.fetchval("SELECT status FROM notifications WHERE notification_id = $1",
                               notification_id) == "PENDING"
    # The holder's own failure does end it.
    await write_outcomes(conn, "new-holder", [DeliveryChange(notification_id, endpoint_id, "FAILED", 1, "HTTP 400")])
    assert (await lease_of(conn, notification_id, endpoint_id))["status"] == "FAILED"


async def test_a_late_failure_from_before_a_tenants_retry_does_not_undo_the_retry(clean_db, conn):
    from alerting_app.delivery.records import retry_failed

    notification_id, endpoint_id = await one_due_delivery(conn)
    [_] = await lease_due(conn, "worker-a", 60.0, {}, backlog=10, limit=10)
    failure = DeliveryChange(notification_id, endpoint_id, "FAILED", 1, "HTTP 400")
    await write_outcomes(conn, "worker-a", [failure])
    assert await retry_failed(conn, notification_id, None)

    # The same batch written again (its first commit's acknowledgement was lost), after the retry.
    await write_outcomes(conn, "worker-a", [failure])

    assert (await lease_of(conn, notification_id, endpoint_id))["status"] == "PENDING"
    [job] = await lease_due(conn, "worker-b", 60.0, {}, backlog=10, limit=10)  # the retry goes ahead
    assert job.key == (notification_id, endpoint_id)


async def test_a_retry_and_a_redelivered_notification_opening_a_new_endpoint_do_not_deadlock(clean_db, conn):
    from alerting_app.delivery.records import retry_failed

    await init_connection(conn)
    client_id = await insert_client(conn)
    failed, added = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    notification_id = await insert_notification(conn, client_id)
    await open_delivery(conn, notification_id, failed)
    await conn.execute("UPDATE deliveries SET status = 'FAILED'")
    await conn.execute("UPDATE notifications SET status = 'FAILED' WHERE notification_id = $1", notification_id)
    opener, retrier = await asyncpg.connect(clean_db), await asyncpg.connect(clean_db)
    try:
        await init_connection(retrier)
        async with opener.transaction():
            # As records._OPEN does for a redelivered notifications.ready: its ON CONFLICT locks the
            # existing (FAILED) row, then it inserts the row of an endpoint added since.
            await opener.execute(
                "INSERT INTO deliveries AS d (notification_id, endpoint_id, channel, status) VALUES ($1, $2, 'webhook',"
                " 'PENDING') ON CONFLICT (notification_id, endpoint_id) DO UPDATE SET leased_by = EXCLUDED.leased_by"
                " WHERE d.status = 'PENDING'", notification_id, failed)
            retry = asyncio.create_task(retry_failed(retrier, notification_id, None))
            await until_waiting_on_a_lock(conn, pid=retrier.get_server_pid())  # holds the notification, waits for the row
            await opener.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status)"
                                 " VALUES ($1, $2, 'webhook', 'PENDING')", notification_id, added)
        assert await asyncio.wait_for(retry, 30)
    finally:
        await opener.close()
        await retrier.close()
    statuses = dict(await conn.fetch("SELECT endpoint_id::text, status FROM deliveries WHERE notification_id = $1",
                                     notification_id))
    assert statuses == {failed: "PENDING", added: "PENDING"}


async def test_a_delivery_found_sent_already_is_not_counted_as_sent_again(clean_db):
    # AlreadySent (the Redis mark of a send recorded by another worker, or before a crash) is
    # recorded SENT with the send as an attempt (attempts.deliver), already counted by the worker
    # that made it; summed over workers, the counter must count the send once.
    from alerting_app import metrics

    def sent() -> float:
        return metrics.notifications_sent.labels(channel="webhook")._value.get()

    def attempted() -> float:
        return metrics.deliveries.labels(channel="webhook", status="SENT")._value.get()

    before = (sent(), attempted())
    async with recorder_on(clean_db) as recorder:
        recorder.record(DeliveryChange(str(uuid.uuid4()), str(uuid.uuid4()), "SENT"), "webhook")
        recorder.record(DeliveryChange(str(uuid.uuid4()), str(uuid.uuid4()), "SENT", attempts=1), "webhook",
                        already_counted=True)
        assert (sent(), attempted()) == before
        recorder.record(DeliveryChange(str(uuid.uuid4()), str(uuid.uuid4()), "SENT", attempts=1), "webhook")
        assert (sent(), attempted()) == (before[0] + 1, before[1] + 1)


async def test_attempts_recorded_before_their_batch_is_written_all_count(clean_db, conn):
    # A failed attempt and the retry that sent it, recorded within one batch interval, are written as
    # one change: the row must count both attempts, as the tenant reads them.
    key = await one_due_delivery(conn)
    await lease_to_the_recorder(conn, key)
    async with recorder_on(clean_db) as recorder:
        recorder.record(DeliveryChange(*key, "PENDING", 1, "HTTP 503", 1_700_000_000.0, 1_700_000_000.0,
                                       1_700_000_000.1, channel="webhook"), "webhook")
        recorder.record(DeliveryChange(*key, "SENT", 1, None, 1_700_000_000.1, 1_700_000_000.1,
                                       channel="webhook"), "webhook")
        await recorder.written()
    row = await conn.fetchrow("SELECT status, attempts, last_error, extract(epoch FROM first_attempt_at)::float8,"
                              " extract(epoch FROM last_attempt_at)::float8 FROM deliveries"
                              " WHERE notification_id = $1 AND endpoint_id = $2", *key)
    # Dated from the first of them to the last.
    assert tuple(row) == ("SENT", 2, None, 1_700_000_000.0, 1_700_000_000.1)


async def test_a_hand_back_written_in_one_batch_with_the_failed_attempt_before_it_keeps_its_error_and_time(
        clean_db, conn):
    # A failed attempt, then a hand-back that met another attempt's claim (nothing tried: no times),
    # within one batch interval: the row is dated by the attempt.
    key = await one_due_delivery(conn)
    await lease_to_the_recorder(conn, key)
    async with recorder_on(clean_db) as recorder:
        recorder.record(DeliveryChange(*key, "PENDING", 1, "HTTP 503", 1_700_000_000.0, 1_700_000_000.0,
                                       1_700_000_001.0, channel="webhook"), "webhook")
        recorder.record(DeliveryChange(*key, "PENDING", next_attempt_at=1_700_000_002.0, release=True), "webhook")
        await recorder.written()
    row = await conn.fetchrow("SELECT attempts, last_error, extract(epoch FROM first_attempt_at)::float8,"
                              " extract(epoch FROM last_attempt_at)::float8 FROM deliveries"
                              " WHERE notification_id = $1 AND endpoint_id = $2", *key)
    assert tuple(row) == (1, "HTTP 503", 1_700_000_000.0, 1_700_000_000.0)

@pytest.mark.parametrize("broker", ["refuses", "hangs"])
async def test_while_dead_letters_cannot_be_sent_the_other_outcomes_are_still_written(clean_db, conn, monkeypatch,
                                                                                     letters_broker, broker):
    """A FAILED outcome waits for its dead letter; the others must not wait with it, or while the
    broker is down no outcome reaches Postgres, every lease lapses and other workers send again.
    The broker is made to refuse connections (the send fails once its request timeout is over, here
    a second, and is tried again) or to take them and never answer (the send waits for as long: 20
    minutes in a worker); Postgres is real."""
    from alerting_app.delivery import recorder as recorder_module

    sent_key, failed_key = await one_due_delivery(conn), await one_due_delivery(conn)
    await lease_to_the_recorder(conn, sent_key, failed_key)
    monkeypatch.setattr(recorder_module, "_RETRY_WRITE_S", 0.05)
    letter = DeadLetter(topic="notifications.ready", key=str(uuid.uuid4()), reason="400 Bad Request", payload="{}")
    request_timeout_ms = 1000 if broker == "refuses" else 300_000

    async with (letters_sent_through(letters_broker, request_timeout_ms) as sending,
                recorder_on(clean_db, sending) as recorder):
        letters_broker.refuse() if broker == "refuses" else letters_broker.hang()
        recorder.record(DeliveryChange(*sent_key, "SENT", 1), "webhook")
        recorder.record(DeliveryChange(*failed_key, "FAILED", 1, "400 Bad Request"), "webhook", letter)
        # The recorder lets go of the SENT one a moment after its commit is visible, hence both waited for.
        async with asyncio.timeout(30):
            while (await delivery_status(conn, sent_key) != "SENT"
                   or recorder.pending_keys() != [failed_key]):  # its lease is renewed meanwhile (Dispatcher.held_keys)
                await asyncio.sleep(0.02)
            while broker == "refuses" and not sending.failures:  # a failed send is tried again
                await asyncio.sleep(0.02)
        assert await delivery_status(conn, failed_key) == "PENDING"

        letters_broker.let_through()
        async with asyncio.timeout(30):
            await recorder.written()
        assert await delivery_status(conn, failed_key) == "FAILED"
        assert await letters_on_the_topic(letters_broker, letter) == [letter]


async def test_endpoints_asked_for_in_one_turn_are_read_in_one_statement_each_as_it_is_now(clean_db, conn):
    from alerting_app.delivery.endpoint_reads import EndpointReads

    await init_connection(conn)
    client = await insert_client(conn)
    kept, changed, deleted = [await insert_endpoint(conn, client) for _ in range(3)]
    await conn.execute("UPDATE endpoints SET value = 'https://hooks.example.com/fixed', enabled = false"
                       " WHERE endpoint_id = $1", changed)
    await conn.execute("DELETE FROM endpoints WHERE endpoint_id = $1", deleted)
    statements = []

    class CountedConnection:
        """The test's connection, its statements counted."""

        async def fetch(self, query, *args):
            statements.append(query)
            return await conn.fetch(query, *args)

    async def get_pool():
        return CountedConnection()

    reads = EndpointReads(get_pool)
    found = await asyncio.gather(*(reads.read(endpoint_id) for endpoint_id in (kept, changed, deleted, kept)))

    assert len(statements) == 1
    assert [endpoint and (endpoint.endpoint_id, endpoint.value, endpoint.enabled) for endpoint in found] == [
        (kept, "http://127.0.0.1:1/hook", True), (changed, "https://hooks.example.com/fixed", False), None,
        (kept, "http://127.0.0.1:1/hook", True)]


async def test_an_endpoint_read_nobody_waits_for_any_more_is_cancelled_with_its_statement(clean_db, conn):
    """A delivery waits ENDPOINT_READ_TIMEOUT_S for its endpoint, then goes on without it. When
    Postgres does not answer (here: the table locked), the read must not outlive its callers: left
    running, each turn's read keeps one of the agents' pool connections (ten, shared by every
    agent) and piles up behind the others for as long as Postgres does not answer, as the reads
    of one statement per delivery, cancelled by the caller's timeout, did not."""
    from alerting_app.delivery.endpoint_reads import EndpointReads

    endpoint_id = await insert_endpoint(conn, await insert_client(conn))
    pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2, init=init_connection)

    async def get_pool():
        return pool

    reads = EndpointReads(get_pool)
    waiting_reads = ("SELECT count(*) FROM pg_locks WHERE NOT granted"
                     " AND relation = 'endpoints'::regclass")
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE endpoints IN ACCESS EXCLUSIVE MODE")
            answer = reads.read(endpoint_id)
            async with asyncio.timeout(30):
                while not await pool.fetchval(waiting_reads):  # the read waits for the lock
                    await asyncio.sleep(0.01)
            answer.cancel()  # its caller gave up (its timeout, a stop)
            async with asyncio.timeout(30):
                while await pool.fetchval(waiting_reads):
                    await asyncio.sleep(0.05)
    finally:
        await pool.close()


async def test_an_endpoint_without_room_does_not_use_up_its_clients_room(clean_db, conn):
    await init_connection(conn)
    client_id = await insert_client(conn)
    nearly_full, other = await insert_endpoint(conn, client_id), await insert_endpoint(conn, client_id)
    for endpoint_id, age in ((nearly_full, 60.0), (other, 30.0)):  # the nearly full one's rows are older
        for _ in range(10):
            await open_delivery(conn, await insert_notification(conn, client_id), endpoint_id, due_seconds_ago=age)

    jobs = await lease_due(conn, "this-worker", 60.0, {nearly_full: 99}, backlog=100, limit=20,
                           held_by_client={client_id: 94}, client_backlog=100)

    leased = [job.endpoint_id for job in jobs]
    assert (leased.count(nearly_full), leased.count(other)) == (1, 5)


async def test_outcomes_recorded_while_a_dead_letter_waits_for_the_broker_are_written_too(clean_db, conn,
                                                                                          monkeypatch, letters_broker):
    """A dead letter whose broker does not answer (down: the producer waits up to its request
    timeout, 20 minutes) must not hold back what deliveries record after it: their SENT would stay
    out of Postgres for the whole outage (the API showing them PENDING), and a worker stopped
    meanwhile hands their rows back unrecorded. The broker takes the connections and never answers,
    as in the test above."""
    from alerting_app.delivery import recorder as recorder_module

    failed_key, later_key = await one_due_delivery(conn), await one_due_delivery(conn)
    await lease_to_the_recorder(conn, failed_key, later_key)
    monkeypatch.setattr(recorder_module, "_RETRY_WRITE_S", 0.05)
    letter = DeadLetter(topic="notifications.ready", key=str(uuid.uuid4()), reason="400 Bad Request", payload="{}")

    async with (letters_sent_through(letters_broker, request_timeout_ms=300_000) as sending,
                recorder_on(clean_db, sending) as recorder):
        letters_broker.hang()
        recorder.record(DeliveryChange(*failed_key, "FAILED", 1, "400 Bad Request"), "webhook", letter)
        async with asyncio.timeout(30):
            while not sending.sends:
                await asyncio.sleep(0.01)
        recorder.record(DeliveryChange(*later_key, "SENT", 1), "webhook")
        # The recorder lets go of the SENT one a moment after its commit is visible, hence both waited for.
        async with asyncio.timeout(30):
            while (await delivery_status(conn, later_key) != "SENT"
                   or recorder.pending_keys() != [failed_key]):
                await asyncio.sleep(0.02)
        assert await delivery_status(conn, failed_key) == "PENDING"

        letters_broker.let_through()
        async with asyncio.timeout(30):
            await recorder.written()
        assert await delivery_status(conn, failed_key) == "FAILED"
        # The letter was sent once, not again while it waited: a second send would have landed too.
        assert sending.sends == 1
        assert await letters_on_the_topic(letters_broker, letter) == [letter]


async def test_a_lease_fence_nobody_waits_for_any_more_is_cancelled_with_its_statement(clean_db, conn):
    """As an endpoint's read (above): a send waits LEASE_FENCE_TIMEOUT_S for its fence, then goes
    on its claim alone. When Postgres does not answer (here: the table locked), the fence's statement
    must not outlive its callers, each turn's fence keeping one of the agents' pool connections."""
    from alerting_app.delivery.lease_fences import LeaseFences

    key = await one_due_delivery(conn)
    pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2, init=init_connection)

    async def get_pool():
        return pool

    fences = LeaseFences("this-worker", get_pool)
    waiting_fences = ("SELECT count(*) FROM pg_locks WHERE NOT granted"
                      " AND relation = 'deliveries'::regclass")
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
            answer = fences.fence(key, 20.0)
            async with asyncio.timeout(30):
                while not await pool.fetchval(waiting_fences):  # the fence waits for the lock
                    await asyncio.sleep(0.01)
            answer.cancel()  # its caller gave up (its timeout, a stop)
            async with asyncio.timeout(30):
                while await pool.fetchval(waiting_fences):
                    await asyncio.sleep(0.05)
    finally:
        await pool.close()


async def test_an_outcome_recorded_while_its_earlier_change_fails_to_be_written_is_written_over_it(clean_db, conn):
    """A change whose write fails (Postgres away) is kept and written again, merged with what was
    recorded meanwhile: the later outcome wins. While its batch is being written its lease stays
    renewed (Recorder.pending_keys), or another worker's sweep could take the delivery up again."""
    key = await one_due_delivery(conn)
    await lease_to_the_recorder(conn, key)
    pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2, init=init_connection)
    writing, fail_it = asyncio.Event(), asyncio.Event()
    calls = []

    async def failing_once() -> asyncpg.Pool:
        calls.append(None)
        if len(calls) == 1:
            writing.set()
            await fail_it.wait()
            raise ConnectionRefusedError("Postgres is away")
        return pool

    recorder = Recorder("test-recorder", lambda: 0.01, failing_once)
    try:
        recorder.record(DeliveryChange(*key, "PENDING", 1, "HTTP 503", 1_700_000_000.0, 1_700_000_000.0,
                                       1_700_000_001.0, channel="webhook"), "webhook")
        async with asyncio.timeout(30):  # guards against hanging only
            await writing.wait()
            assert recorder.pending_keys() == [key]  # its batch, being written
            recorder.record(DeliveryChange(*key, "SENT", 1, None, 1_700_000_001.0, 1_700_000_001.0,
                                           channel="webhook"), "webhook")
            fail_it.set()
            await recorder.written()
    finally:
        await recorder.close()
        await pool.close()
    row = await conn.fetchrow("SELECT status, attempts, last_error FROM deliveries"
                              " WHERE notification_id = $1 AND endpoint_id = $2", *key)
    assert tuple(row) == ("SENT", 2, None)


async def test_a_change_written_to_a_settled_delivery_changes_nothing(clean_db, conn):
    """A late change (a worker whose lease ran out, a batch written again) to a delivery SENT or
    FAILED since: the row is final, and is neither reopened nor counted more attempts."""
    key = await one_due_delivery(conn)
    await lease_to_the_recorder(conn, key)
    await write_outcomes(conn, "test-recorder", [DeliveryChange(*key, "SENT", 1, None, 1_700_000_000.0,
                                                                1_700_000_000.0, channel="webhook")])

    await write_outcomes(conn, "test-recorder", [DeliveryChange(*key, "PENDING", 1, "HTTP 503", 1_700_000_001.0,
                                                                1_700_000_001.0, 1_700_000_002.0, release=True,
                                                                channel="webhook")])

    row = await conn.fetchrow("SELECT status, attempts, last_error, extract(epoch FROM last_attempt_at)::float8"
                              " FROM deliveries WHERE notification_id = $1 AND endpoint_id = $2", *key)
    assert tuple(row) == ("SENT", 1, None, 1_700_000_000.0)


async def test_a_delivery_of_a_client_being_deleted_is_gone_though_its_row_is_still_there(clean_db, conn):
    """Its failure needs no dead letter (Recorder._of_deleted_clients): the client's history waits
    only for retention to delete it."""
    from alerting_app.delivery.records import gone

    being_deleted, kept = await one_due_delivery(conn), await one_due_delivery(conn)
    await conn.execute("UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id ="
                       " (SELECT client_id FROM notifications WHERE notification_id = $1)", being_deleted[0])

    assert await gone(conn, [being_deleted, kept]) == {being_deleted}
