"""Each rule's versions reach rule.changed in version order, however many relays run and whatever
is republished meanwhile: the topic is compacted, so the version published last is the one a
replica reading from scratch keeps.

Against a database of their own (so relaying and republishing touch only these rows), the real
broker and the app's producer; where the broker must not answer, a broker of this module's own
behind a front that can be made to hang, and a Faust app of its own sending to it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from dataclasses import dataclass

import asyncpg
import pytest_asyncio

from agents.rule_outbox import (RULE_OUTBOX, Outbox, lock_relay, record_rule_change, relay_pending,
                                republish_all_rules)
from alerting_app import db
from alerting_app.app import settings
from alerting_app.contracts import Rule, RuleChanged, SilenceChanged
from alerting_app.migrate import apply_migrations
from alerting_app.sending import all_acknowledged
from broker_front import OutageFront
from kafka_probe import read_topic
from private_brokers import app_sending_behind
from test_agent_support import AGENT_LOOP, pipeline  # noqa: F401  (fixtures)

pytestmark = AGENT_LOOP

VERSIONS = 6


@pytest_asyncio.fixture(loop_scope="session")
async def own_pool(empty_database):
    await apply_migrations(empty_database)
    pool = await asyncpg.create_pool(empty_database, min_size=1, max_size=6, init=db.init_connection)
    yield pool
    await pool.close()


@dataclass(frozen=True)
class RelayBroker:
    front: OutageFront  # the only way to the broker: made to hang, the broker answers nothing
    outbox: Outbox  # rule_outbox, relayed to rule.changed on that broker


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def relay_broker(tmp_path_factory):
    """A broker of this module's own (the session's is shared), and a Faust app sending rule_outbox to it."""
    async with app_sending_behind(OutageFront, tmp_path_factory.mktemp("relay-broker"), "outbox-ordering-relay",
                                  "rule.changed", partitions=settings.topic_partitions) as (front, topic):
        try:
            yield RelayBroker(front, dataclasses.replace(RULE_OUTBOX, topic=topic))
        finally:
            front.let_through()


def rule_versions(rule_id: str, client_id: str) -> list[RuleChanged]:
    """Upserts 1..VERSIONS-1, then a delete: nothing is left for later tests' alerts to match."""
    upserts = [RuleChanged.upsert(Rule(rule_id=rule_id, client_id=client_id, severity="HIGH",
                                       source="outbox-ordering", name=f"v{version}", version=version))
               for version in range(1, VERSIONS)]
    return [*upserts, RuleChanged(rule_id=rule_id, client_id=client_id, version=VERSIONS, action="delete")]


async def queue_versions(pool, rule_ids: list[str]) -> None:
    """Each rule's versions queued in a burst, one transaction each, as the API would: concurrent
    relays then hold several versions of one rule at once."""
    client_id = str(uuid.uuid4())
    for rule_id in rule_ids:
        for version in range(VERSIONS):
            async with pool.acquire() as conn, conn.transaction():
                await record_rule_change(conn, rule_versions(rule_id, client_id)[version])


async def published_versions(rule_id: str) -> list[int]:
    return [RuleChanged.model_validate_json(value).version
            for key, value in await read_topic(settings.kafka_bootstrap_servers, "rule.changed")
            if key == rule_id.encode()]


async def relay_until_empty(pool) -> None:
    while await relay_pending(pool, batch_size=1):
        pass


async def test_a_relay_waits_for_another_relay_mid_batch_instead_of_overtaking_it(pipeline, own_pool):
    rule_id = str(uuid.uuid4())
    await queue_versions(own_pool, [rule_id])

    async with own_pool.acquire() as other, other.transaction():
        # What another worker's relay holds while the broker acknowledges its batch of version 1.
        await lock_relay(other, RULE_OUTBOX)
        await other.fetch("SELECT outbox_id FROM rule_outbox ORDER BY outbox_id LIMIT 1 FOR UPDATE")
        relay = asyncio.create_task(relay_until_empty(own_pool))
        await asyncio.sleep(1.0)
        assert not relay.done(), "the relay went ahead while another held the outbox"
    # The other relay died without sending: its row is still there, for this relay, first.
    await asyncio.wait_for(relay, 60)

    assert await published_versions(rule_id) == list(range(1, VERSIONS + 1))


async def test_concurrent_relays_publish_each_rules_versions_in_version_order(pipeline, own_pool):
    rule_ids = [str(uuid.uuid4()) for _ in range(4)]
    await queue_versions(own_pool, rule_ids)

    await asyncio.gather(*(relay_until_empty(own_pool) for _ in range(4)))

    assert await own_pool.fetchval("SELECT count(*) FROM rule_outbox") == 0
    for rule_id in rule_ids:
        assert await published_versions(rule_id) == list(range(1, VERSIONS + 1))


async def test_republishing_during_a_change_queues_the_changed_version_last(own_pool):
    client_id, rule_id = str(uuid.uuid4()), str(uuid.uuid4())
    await own_pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'c', $2)",
                           client_id, uuid.uuid4().hex)
    await own_pool.execute("INSERT INTO rules (rule_id, client_id, severity, source, name) "
                           "VALUES ($1, $2, 'HIGH', 'outbox-ordering', 'v1')", rule_id, client_id)

    async with own_pool.acquire() as api, api.transaction():
        # The API changing the rule, as web/rules.py does: lock, update, queue version 2 ...
        row = await api.fetchrow("UPDATE rules SET name = 'v2', version = version + 1 WHERE rule_id = $1 "
                                 "RETURNING rule_id::text, client_id::text, severity, source, name, version",
                                 rule_id)
        await record_rule_change(api, RuleChanged.upsert(Rule(**dict(row))))
        # ... while a republish starts, before the change commits.
        republish = asyncio.create_task(republish_all_rules(own_pool))
        await asyncio.sleep(1.0)
        assert not republish.done(), "the republish read the rule while its change was in flight"
    assert await asyncio.wait_for(republish, 60) == 1

    queued = await own_pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id", rule_id)
    assert [entry["payload"]["version"] for entry in queued] == [2, 2]


class BrokerRefused(Exception):
    pass


async def test_a_relay_whose_send_failed_keeps_its_lock_until_its_other_sends_are_answered(own_pool, monkeypatch):
    """The broker failed one partition's batch while another partition's was still being retried
    (aiokafka fails a batch whose partition has no leader for too long). Released at the failure,
    the lock would let the next relay send newer versions that the late batch then lands after.

    The broker here cannot be made to fail one partition while it keeps another in flight, so the
    relay's sends answer with futures the test settles; the lock and the outbox are Postgres's.
    """
    from agents import rule_outbox

    rule_id = str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, str(uuid.uuid4()))[0])
    loop = asyncio.get_running_loop()
    failed, in_flight = loop.create_future(), loop.create_future()
    failed.set_exception(BrokerRefused("partition 1: no leader"))

    async def two_batches(topic, messages):
        list(messages)
        two_batches.called = True
        return [failed, in_flight]
    two_batches.called = False
    monkeypatch.setattr(rule_outbox, "send_batched", two_batches)
    relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(RULE_OUTBOX,)))
    async with own_pool.acquire() as other:
        async def relay_lock_is_free() -> bool:
            async with other.transaction():  # taken only for this transaction, if free
                return await other.fetchval("SELECT pg_try_advisory_xact_lock('rule_outbox'::regclass::oid::bigint)")

        async with asyncio.timeout(30):
            while not two_batches.called:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not await relay_lock_is_free()  # still held: a batch is in flight
        in_flight.set_result("acknowledged")
        try:
            await relaying
        except BrokerRefused:
            pass
        else:
            raise AssertionError("the relay hid the broker's refusal")
        assert await relay_lock_is_free()
    assert await own_pool.fetchval("SELECT count(*) FROM rule_outbox WHERE rule_id = $1", rule_id) == 1
    # Held throughout, the lock let no other relay send meanwhile: nothing is left to queue again later.
    assert await own_pool.fetchval("SELECT count(*) FROM outbox_in_flight") == 0
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", rule_id)


async def test_a_relay_that_lost_its_session_while_sending_queues_the_keys_current_versions_again(
        own_pool, relay_broker):
    """Its lock went with the session while its sends were in flight: another relay may have sent
    the same keys' newer versions meanwhile, and ours landed after them. Queued again, each key's
    current version (here the rule's deletion) comes last on the topic. The session ends while the
    broker holds the relay's request unanswered."""
    from agents import rule_outbox

    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, client_id)[0])  # version 1, then deleted:
        await record_rule_change(conn, RuleChanged(rule_id=rule_id, client_id=client_id, version=2, action="delete"))
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1 AND payload->>'action' = 'delete'", rule_id)
    front = relay_broker.front

    async def relay_losing_its_session() -> None:
        front.hang()
        relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(relay_broker.outbox,)))
        try:
            async with asyncio.timeout(30):
                while not front.held:  # until this round's batch is at the broker, the lock held
                    await asyncio.sleep(0.01)
            await terminate_the_relays_session(own_pool)
        finally:
            front.let_through()
        await relaying

    async def queued() -> list[tuple[str, int]]:
        return [(event.action, event.version) for event in (RuleChanged.model_validate(row["payload"]) for row in
                await own_pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id",
                                     rule_id))]

    await relay_losing_its_session()
    # Its current version (the deletion) queued in place of the row sent: the next relay sends it last.
    assert await queued() == [("delete", 2)]
    # Failing so again and again, it sends that version each time, and the outbox does not grow.
    await relay_losing_its_session()
    assert await queued() == [("delete", 2)]
    assert await rule_records(rule_id, front.address) == [("upsert", 1), ("delete", 2)]
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", rule_id)


async def test_a_relay_that_lost_its_session_while_a_send_was_refused_queues_the_keys_current_versions_again(
        own_pool, monkeypatch):
    """One partition's batch was refused and another's landed, after its lock had gone with its
    session: that one may have landed after another relay's newer versions, as when all land."""
    from agents import rule_outbox

    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, client_id)[0])  # version 1, then deleted:
        await record_rule_change(conn, RuleChanged(rule_id=rule_id, client_id=client_id, version=2, action="delete"))
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1 AND payload->>'action' = 'delete'", rule_id)
    loop = asyncio.get_running_loop()
    refused, landed = loop.create_future(), loop.create_future()
    refused.set_exception(BrokerRefused("partition 1: no leader"))
    sending = asyncio.Event()

    async def two_batches(topic, messages):
        list(messages)
        sending.set()
        return [refused, landed]
    monkeypatch.setattr(rule_outbox, "send_batched", two_batches)
    relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(RULE_OUTBOX,)))
    await asyncio.wait_for(sending.wait(), 30)
    await terminate_the_relays_session(own_pool)
    landed.set_result("acknowledged")
    await relaying

    queued = await own_pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id", rule_id)
    assert [(row["payload"]["action"], row["payload"]["version"]) for row in queued] == [("delete", 2)]
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", rule_id)


async def rule_records(rule_id: str, bootstrap: str | None = None) -> list[tuple[str, int]]:
    """The rule's records on rule.changed (of the session's broker by default), in order: the last
    is the one compaction keeps."""
    return [(event.action, event.version) for event in (
        RuleChanged.model_validate_json(value)
        for key, value in await read_topic(bootstrap or settings.kafka_bootstrap_servers, "rule.changed")
        if key == rule_id.encode())]


async def terminate_the_relays_session(pool) -> None:
    relay = await pool.fetchval("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                                " AND objid = 'rule_outbox'::regclass::oid")
    assert relay and await pool.fetchval("SELECT pg_terminate_backend($1)", relay)


class HeldAtTheBroker:
    """The relay's send as a request the broker holds: written once `reaches_the_broker` is set,
    whatever the relay does meanwhile, while the relay gets `answer()` for it."""

    def __init__(self, send_to_the_broker, answer) -> None:
        self.reaches_the_broker = asyncio.Event()
        self.on_the_way: list[asyncio.Future] = []
        self._send_to_the_broker, self._answer = send_to_the_broker, answer

    async def send_batched(self, topic, messages):
        messages = list(messages)

        async def send() -> None:  # a task of its own: like a request at the broker, it lands whatever the relay does
            await self.reaches_the_broker.wait()
            await all_acknowledged(await self._send_to_the_broker(topic, messages))
        self.on_the_way.append(asyncio.ensure_future(send()))
        return [self._answer()]

    async def sent(self) -> None:
        async with asyncio.timeout(30):
            while not self.on_the_way:
                await asyncio.sleep(0.01)


async def the_late_send_lands_after_the_deletion_until_its_keys_are_queued_again(
        own_pool, monkeypatch, held: HeldAtTheBroker, rule_id: str, client_id: str) -> None:
    """The rule is deleted and the next relay sends the deletion; the held send of version 1 lands
    after it, and stays the rule's last record until a relay finds the batch recorded in flight
    since longer than its sends can land, and queues the rule's current version (its deletion) again."""
    from agents import rule_outbox

    monkeypatch.setattr(rule_outbox, "send_batched", held._send_to_the_broker)
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, RuleChanged(rule_id=rule_id, client_id=client_id, version=2, action="delete"))
    await relay_until_empty(own_pool)  # the next relay: version 1 again (its row is still there), the deletion
    held.reaches_the_broker.set()  # the held send lands after them
    await asyncio.wait_for(held.on_the_way[0], 60)
    assert (await rule_records(rule_id))[-1] == ("upsert", 1)

    # Once none of its sends can still be on its way, the next relay queues each of the batch's keys'
    # current version again: here the deletion, which compaction then keeps.
    await own_pool.execute("UPDATE outbox_in_flight SET recorded_at = recorded_at - make_interval(secs => $1)",
                           rule_outbox.in_flight_at_most_s())
    await relay_until_empty(own_pool)
    assert (await rule_records(rule_id))[-1] == ("delete", 2)
    assert await own_pool.fetchval("SELECT count(*) FROM outbox_in_flight") == 0


async def test_a_deletion_that_a_killed_relays_late_send_landed_after_is_queued_again_by_the_next_relay(
        pipeline, own_pool, monkeypatch):
    """A relay lost its session, and its lock, while its send of a rule's version 1 was on its way,
    and its worker was killed before it could queue the rule again. Meanwhile the rule was deleted
    and the next relay sent the deletion; the late send landed after it. The topic is compacted:
    left so, a replica reading it from scratch would hold the deleted rule for ever."""
    from agents import rule_outbox

    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, client_id)[0])
    killed = asyncio.get_running_loop().create_future()  # the killed relay hears no answer, and does nothing more
    held = HeldAtTheBroker(rule_outbox.send_batched, lambda: killed)
    monkeypatch.setattr(rule_outbox, "send_batched", held.send_batched)
    killed_relay = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(RULE_OUTBOX,)))
    try:
        await held.sent()
        await terminate_the_relays_session(own_pool)
        await the_late_send_lands_after_the_deletion_until_its_keys_are_queued_again(
            own_pool, monkeypatch, held, rule_id, client_id)
    finally:
        killed_relay.cancel()
        killed.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await killed_relay


async def test_a_key_of_a_killed_relay_that_cannot_be_queued_again_does_not_stop_the_relay(pipeline, own_pool):
    """A rule row the contract refuses (edited by hand: a fingerprint key over 200 characters) among a
    killed relay's keys fails their queuing on every try; every other change is still relayed."""
    from agents import rule_outbox

    client_id, broken, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    in_the_same_batch = str(uuid.uuid4())  # deleted: its deletion is what must come last
    await own_pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'c', $2)",
                           client_id, uuid.uuid4().hex)
    await own_pool.execute("INSERT INTO rules (rule_id, client_id, severity, source, name, fingerprint_keys)"
                           " VALUES ($1, $2, 'HIGH', 'outbox-ordering', 'broken', ARRAY[repeat('k', 300)])",
                           broken, client_id)
    await own_pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version) VALUES ($1, $2, 3)",
                           in_the_same_batch, client_id)
    await own_pool.execute("INSERT INTO outbox_in_flight (outbox, keys, recorded_at)"
                           " VALUES ('rule_outbox', ARRAY[$1::uuid, $2::uuid], now() - make_interval(secs => $3))",
                           broken, in_the_same_batch, rule_outbox.in_flight_at_most_s() + 60)
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(other, client_id)[0])

    await relay_until_empty(own_pool)

    assert await published_versions(other) == [1]
    # The broken key holds back none of the others of its batch.
    assert (await rule_records(in_the_same_batch))[-1] == ("delete", 3)
    # Only the broken key stays recorded, for the next try.
    assert await own_pool.fetchval("SELECT keys::text[] FROM outbox_in_flight") == [broken]
    await relay_until_empty(own_pool)
    assert await own_pool.fetchval("SELECT keys::text[] FROM outbox_in_flight") == [broken]
    assert await own_pool.fetchval("SELECT count(*) FROM rule_outbox") == 0
    await own_pool.execute("DELETE FROM outbox_in_flight")
    await own_pool.execute("DELETE FROM deleted_rules WHERE rule_id = $1", in_the_same_batch)
    await own_pool.execute("DELETE FROM clients WHERE client_id = $1", client_id)


async def test_queuing_a_killed_relays_keys_again_does_not_hold_their_rows_while_the_batch_is_sent(
        own_pool, relay_broker):
    """The relay's transaction holds its rows until the broker has answered its batch: up to the
    producer's request timeout while the broker is away. Queued again in that transaction, the killed
    relay's rules stayed locked FOR SHARE all that time, and the API's changes of them waited."""
    from agents import rule_outbox

    client_id, rule_id = str(uuid.uuid4()), str(uuid.uuid4())
    await own_pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'c', $2)",
                           client_id, uuid.uuid4().hex)
    await own_pool.execute("INSERT INTO rules (rule_id, client_id, severity, source, name)"
                           " VALUES ($1, $2, 'HIGH', 'outbox-ordering', 'n')", rule_id, client_id)
    await own_pool.execute("INSERT INTO outbox_in_flight (outbox, keys, recorded_at)"
                           " VALUES ('rule_outbox', ARRAY[$1::uuid], now() - make_interval(secs => $2))",
                           rule_id, rule_outbox.in_flight_at_most_s() + 60)
    front = relay_broker.front
    front.hang()
    relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(relay_broker.outbox,)))
    try:
        async with asyncio.timeout(30):
            while not front.held:  # the relay's batch is at the broker, unanswered
                await asyncio.sleep(0.01)
        async with own_pool.acquire() as api, api.transaction():
            # Fails with LockNotAvailableError while the relay holds the rule.
            await api.execute("SET LOCAL lock_timeout = '5s'")
            await api.execute("UPDATE rules SET name = 'changed', version = version + 1 WHERE rule_id = $1", rule_id)
    finally:
        front.let_through()
        await relaying
        await own_pool.execute("DELETE FROM rule_outbox")
        await own_pool.execute("DELETE FROM clients WHERE client_id = $1", client_id)


async def test_a_killed_relays_silence_keys_are_queued_again_too(pipeline, own_pool):
    """The silence relay is the same code: a deleted silence among a killed relay's keys gets its
    deletion sent again, last."""
    from agents import rule_outbox

    silence_id = str(uuid.uuid4())
    await own_pool.execute("INSERT INTO deleted_silences (silence_id, client_id, version) VALUES ($1, $2, 3)",
                           silence_id, str(uuid.uuid4()))
    await own_pool.execute("INSERT INTO outbox_in_flight (outbox, keys, recorded_at)"
                           " VALUES ('silence_outbox', ARRAY[$1::uuid], now() - make_interval(secs => $2))",
                           silence_id, rule_outbox.in_flight_at_most_s() + 60)

    await relay_until_empty(own_pool)

    records = [SilenceChanged.model_validate_json(value)
               for key, value in await read_topic(settings.kafka_bootstrap_servers, "silence.changed")
               if key == silence_id.encode()]
    assert [(event.action, event.version) for event in records] == [("delete", 3)]
    assert await own_pool.fetchval("SELECT count(*) FROM outbox_in_flight") == 0


async def test_a_send_given_up_on_is_no_answer_its_keys_are_queued_again_once_it_cannot_land(
        pipeline, own_pool, monkeypatch):
    """A stopping worker gave up on a broker that accepts requests but does not answer
    (Producer.give_up_on_the_broker): the relay's send failed with GaveUpOnTheBroker while its
    request was at the broker, and the relay let go of its lock, its session intact. That failure
    is no refusal: the request can still be written after the next relay sent the rule's deletion,
    so the batch stays recorded in flight, for its keys to be queued again once it cannot land."""
    from agents import rule_outbox
    from alerting_app.broker_transport import GaveUpOnTheBroker

    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, client_id)[0])

    def gave_up() -> asyncio.Future:  # what give_up_on_the_broker fails the send with
        answer = asyncio.get_running_loop().create_future()
        answer.set_exception(GaveUpOnTheBroker("not acknowledged by the broker within 15s of the worker's stop"))
        return answer
    held = HeldAtTheBroker(rule_outbox.send_batched, gave_up)
    monkeypatch.setattr(rule_outbox, "send_batched", held.send_batched)
    try:
        await rule_outbox.relay_pending(own_pool, outboxes=(RULE_OUTBOX,))
        raise AssertionError("the relay hid the failed send")
    except GaveUpOnTheBroker:
        pass
    await the_late_send_lands_after_the_deletion_until_its_keys_are_queued_again(
        own_pool, monkeypatch, held, rule_id, client_id)


async def test_a_relay_that_lost_its_session_while_its_send_was_given_up_on_leaves_the_keys_for_later(
        pipeline, own_pool, monkeypatch):
    """As above, and the relay's Postgres session was lost too. Queuing the keys' current versions
    again at once would not do: the request given up on can still be written after them. The batch
    stays recorded in flight instead, for its keys to be queued again once it cannot land."""
    from agents import rule_outbox
    from alerting_app.broker_transport import GaveUpOnTheBroker

    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with own_pool.acquire() as conn, conn.transaction():
        await record_rule_change(conn, rule_versions(rule_id, client_id)[0])
    gave_up = asyncio.get_running_loop().create_future()
    held = HeldAtTheBroker(rule_outbox.send_batched, lambda: gave_up)
    monkeypatch.setattr(rule_outbox, "send_batched", held.send_batched)
    relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(RULE_OUTBOX,)))
    await held.sent()
    await terminate_the_relays_session(own_pool)
    gave_up.set_exception(GaveUpOnTheBroker("not acknowledged by the broker within 15s of the worker's stop"))
    with contextlib.suppress(Exception):
        await relaying
    await the_late_send_lands_after_the_deletion_until_its_keys_are_queued_again(
        own_pool, monkeypatch, held, rule_id, client_id)


async def test_a_publish_to_a_new_topic_that_fails_partway_leaves_every_rule_queued_for_the_relay(own_pool):
    """`up` on a broker of the settings (one that outlives the run), whose rule.changed it created:
    a publish of the rules that failed partway (the broker refusing a batch, a Ctrl-C, a kill) left
    the topic with the part that landed, and the next `up`, finding the topic there, published
    nothing. The other rules were missing from it for good, and no alert matched them. Queued for
    the relay first, they reach the topic after that part."""
    from agents.rule_outbox import publish_current_to_new_topic

    client_id, rule_ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)]
    await own_pool.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'c', $2)",
                           client_id, uuid.uuid4().hex)
    for rule_id in rule_ids:
        await own_pool.execute("INSERT INTO rules (rule_id, client_id, severity, source, name, version) "
                               "VALUES ($1, $2, 'HIGH', 'outbox-ordering', $3, 2)", rule_id, client_id, rule_id)
    landed: list[tuple[bytes, bytes]] = []

    async def refused_after_the_first(messages: list[tuple[bytes, bytes]]) -> None:
        landed.extend(messages[:1])
        raise RuntimeError("the broker refused the rest")

    try:
        await publish_current_to_new_topic(own_pool, RULE_OUTBOX, refused_after_the_first)
    except RuntimeError:
        pass
    assert len(landed) == 1

    queued = await own_pool.fetch("SELECT rule_id::text, payload FROM rule_outbox WHERE rule_id = ANY($1::uuid[])",
                                  rule_ids)
    assert sorted((row["rule_id"], row["payload"]["version"]) for row in queued) == sorted(
        (rule_id, 2) for rule_id in rule_ids)
    await own_pool.execute("DELETE FROM rule_outbox WHERE rule_id = ANY($1::uuid[])", rule_ids)
