"""The worker's Kafka consumer fetches with BROKER_FETCH_MAX_WAIT_MS, not Faust's fixed 1,500 ms.

The setting reaches aiokafka through an override of Faust's consumer (alerting_app/broker_transport.py)
that sets an attribute aiokafka hands to its Fetcher on start: an upgrade of either library could
silently undo it, and only this test would say so.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import inspect
import json
import logging
import secrets
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.producer.producer import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.sender import SendProduceReqHandler
from faust.agents.agent import Agent
from faust.app.base import App as FaustApp
from faust.streams import Stream
from faust.tables.recovery import Recovery
from faust.types import TP
from faust.transport import conductor as faust_conductor
from faust.transport import consumer as faust_consumer_module
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from mode.utils.queues import FlowControlEvent

from alerting_app.app import app, settings
from alerting_app import broker_transport
from alerting_app.broker_transport import Transport
from alerting_app.settings import ConfigurationError, load_settings
from kafka_probe import partition_of, produce, read_json, retire_rules_left_on_topic
from pinned_sources import changed_sources
from test_agent_support import AGENT_LOOP
from test_e2e_pipeline import Platform, alert

# The tests that use the app share the session's loop (AGENT_LOOP): even a consumer of a test's own
# takes the app's producer, and with it the app's loop; left bound to a closed loop, the app fails
# the later tests of the process (tests/conftest.py, pytest_runtest_teardown).


async def _nothing(*args) -> None:
    """The callbacks a Faust consumer requires; this one never consumes."""


@AGENT_LOOP
async def test_the_worker_consumer_fetches_with_the_configured_wait(services):
    assert isinstance(app.transport, Transport)
    assert app.transport.fetch_max_wait_ms == settings.broker_fetch_max_wait_ms
    # A transport and consumer of our own, started and stopped here: the app's stay as they were
    # for the later tests of the process.
    transport = Transport(app.conf.broker_consumer, app, fetch_max_wait_ms=settings.broker_fetch_max_wait_ms,
                          broker=app.transport.broker)
    faust_consumer = transport.create_consumer(callback=_nothing, on_partitions_revoked=_nothing,
                                               on_partitions_assigned=_nothing)
    consumer = faust_consumer._thread._create_worker_consumer(transport)
    await consumer.start()
    try:
        assert consumer._fetcher._fetch_max_wait_ms == settings.broker_fetch_max_wait_ms
        assert settings.broker_fetch_max_wait_ms != 1500, "Faust's own value would pass unnoticed"
    finally:
        await consumer.stop()


@AGENT_LOOP
async def test_table_recovery_takes_listoffsets_when_no_fetch_answers_in_time(services, monkeypatch):
    """Faust's table recovery stops the worker on any error of `highwaters`: when `end_offsets`
    cannot tell the true ends (no fetch answered in time; here it is given no time at all), the
    ends come from ListOffsets instead, exact on Apache Kafka."""
    monkeypatch.setattr(broker_transport, "_END_OFFSETS_TIMEOUT_S", 0.0)
    transport = Transport(app.conf.broker_consumer, app, fetch_max_wait_ms=settings.broker_fetch_max_wait_ms,
                          broker=app.transport.broker)
    faust_consumer = transport.create_consumer(callback=_nothing, on_partitions_revoked=_nothing,
                                               on_partitions_assigned=_nothing)
    thread = faust_consumer._thread
    thread._consumer = thread._create_worker_consumer(transport)  # what the consumer thread's start makes
    await thread._consumer.start()
    try:
        tps = [TP("alerts.new", partition) for partition in range(settings.topic_partitions)]
        listed = await thread._highwaters(tps)
        # The consumer thread is not started here: its calls run on this loop instead.
        monkeypatch.setattr(thread, "call_thread", lambda method, *args: method(*args))

        assert await faust_consumer.highwaters(*tps) == listed
    finally:
        await thread._consumer.stop()


def test_fetch_wait_is_read_from_the_environment_and_validated(monkeypatch):
    monkeypatch.setenv("BROKER_FETCH_MAX_WAIT_MS", "25")
    assert load_settings().broker_fetch_max_wait_ms == 25
    monkeypatch.setenv("BROKER_FETCH_MAX_WAIT_MS", "0")
    with pytest.raises(ConfigurationError, match="BROKER_FETCH_MAX_WAIT_MS"):
        load_settings()


# What `Consumer._drain_messages` in alerting_app/broker_transport.py copies (faust-streaming 0.15.3),
# what its `_delivery_cannot_wait` knows of the callback's waits, and the end of a rebalance that
# `_held_during_rebalance` works around (resume, seek, then a queue-clearing resume; `rebalancing`
# cleared last), and what `on_task_error` guards against, by sha256 of the source.
_SOURCES_THE_DRAIN_OVERRIDE_RELIES_ON = {
    "faust Consumer._drain_messages (copied)": "44a2500309e83c63",
    "faust Conductor._compile_message_handler": "9fbc0538097aa4ec",
    "faust ConductorHandler (_cython/conductor.pyx)": "dde1f974267881cf",
    "mode FlowControlEvent.acquire": "ed0208e866e64d0b",
    "faust ProducerBuffer.wait_until_ebb": "758dd5744044071b",
    "asyncio.Lock.acquire": "54bbd184d16df3a1",
    "faust Recovery.on_recovery_completed": "6ef567acf072e46d",
    "faust Recovery._resume_streams": "d986a6710c1aca98",
    "mode FlowControlEvent.resume": "4dcdc1253fd0dcb4",
    "faust App.on_rebalance_start": "5c1e23de30674082",
    "faust App.on_rebalance_end": "b7ff69e1e3772f30",
    # Consumer.on_task_error: take_events acks its batch in a finally; a crashed actor is replaced.
    # Agent._execute_actor: what Faust does with an actor's exception, which Agent wraps.
    "faust Stream.take_events": "607d48aead118ba8",
    "faust Agent._execute_actor": "c750b828d2bda93e",
    # Producer.give_up_on_the_broker and fail_pending_sends: how aiokafka fails, re-queues and flushes
    # batches and stops; that its commit waits for the coordinator without a bound; that Faust
    # flushes the producer before it commits (_commit), and the stop's waits on the broker.
    "aiokafka MessageAccumulator.fail_all": "f1e12e8100bfcb8c",
    "aiokafka MessageAccumulator.reenqueue": "f75f518a1ae27ade",
    "aiokafka MessageAccumulator._pop_batch": "41cc98a298ef2628",
    "aiokafka MessageAccumulator.flush": "2b0eaa3da8519269",
    "aiokafka SendProduceReqHandler.do": "2dccd3d56b1607fb",
    "aiokafka AIOKafkaProducer.stop": "43ef97147111893b",
    "aiokafka GroupCoordinator.commit_offsets": "5cbe31af28d6cc06",
    "faust Consumer._commit_offsets": "1a69799041188441",
    "faust Consumer.wait_empty": "e4662fe24f094819",
    "faust App.on_stop": "bfe5a933defb2324",
    "faust aiokafka Producer.send": "0b5bd08f52e5e2a9",
    "faust aiokafka Producer.flush": "36d0cb3615f65b01",
}


def _installed_sources() -> dict[str, str]:
    compiled_handler = importlib.util.find_spec(faust_conductor.ConductorHandler.__module__).origin
    return {
        "faust Consumer._drain_messages (copied)": inspect.getsource(faust_consumer_module.Consumer._drain_messages),
        "faust Conductor._compile_message_handler": inspect.getsource(
            faust_conductor.Conductor._compile_message_handler),
        "faust ConductorHandler (_cython/conductor.pyx)": Path(compiled_handler).with_name("conductor.pyx").read_text(),
        "mode FlowControlEvent.acquire": inspect.getsource(FlowControlEvent.acquire),
        "faust ProducerBuffer.wait_until_ebb": inspect.getsource(ProducerBuffer.wait_until_ebb),
        "asyncio.Lock.acquire": inspect.getsource(asyncio.Lock.acquire),
        "faust Recovery.on_recovery_completed": inspect.getsource(Recovery.on_recovery_completed),
        "faust Recovery._resume_streams": inspect.getsource(Recovery._resume_streams),
        "mode FlowControlEvent.resume": inspect.getsource(FlowControlEvent.resume),
        "faust App.on_rebalance_start": inspect.getsource(FaustApp.on_rebalance_start),
        "faust App.on_rebalance_end": inspect.getsource(FaustApp.on_rebalance_end),
        "faust Stream.take_events": inspect.getsource(Stream.take_events),
        "faust Agent._execute_actor": inspect.getsource(Agent._execute_actor),
        "aiokafka MessageAccumulator.fail_all": inspect.getsource(MessageAccumulator.fail_all),
        "aiokafka MessageAccumulator.reenqueue": inspect.getsource(MessageAccumulator.reenqueue),
        "aiokafka MessageAccumulator._pop_batch": inspect.getsource(MessageAccumulator._pop_batch),
        "aiokafka MessageAccumulator.flush": inspect.getsource(MessageAccumulator.flush),
        "aiokafka SendProduceReqHandler.do": inspect.getsource(SendProduceReqHandler.do),
        "aiokafka AIOKafkaProducer.stop": inspect.getsource(AIOKafkaProducer.stop),
        "aiokafka GroupCoordinator.commit_offsets": inspect.getsource(GroupCoordinator.commit_offsets),
        "faust Consumer._commit_offsets": inspect.getsource(faust_consumer_module.Consumer._commit_offsets),
        "faust Consumer.wait_empty": inspect.getsource(faust_consumer_module.Consumer.wait_empty),
        "faust App.on_stop": inspect.getsource(FaustApp.on_stop),
        "faust aiokafka Producer.send": inspect.getsource(faust_aiokafka.Producer.send),
        "faust aiokafka Producer.flush": inspect.getsource(faust_aiokafka.Producer.flush),
    }


def test_the_drain_override_still_matches_the_installed_faust():
    changed = changed_sources(_installed_sources(), _SOURCES_THE_DRAIN_OVERRIDE_RELIES_ON)
    assert not changed, (
        f"{changed} changed since faust-streaming 0.15.3 (aiokafka 0.14.0): re-check Consumer._drain_messages, "
        "_delivery_cannot_wait and Producer.give_up_on_the_broker in alerting_app/broker_transport.py "
        "against the installed code, then record the new hashes here")
    # The direct await is only taken with Faust's Cython handler, whose subscribed channels it reads.
    assert faust_conductor.ConductorHandler is not None and hasattr(faust_conductor.ConductorHandler, "channels")


@pytest.mark.e2e
async def test_a_worker_evaluates_every_alert_of_a_partition_in_order_and_commits(services, clean_db, start_worker):
    """Thousands of alerts on one partition reach alerts.matched in the order they were produced."""
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"drain-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group)
    async with aiohttp.ClientSession() as http:
        platform = Platform(http, worker.url, services.kafka_bootstrap_servers, group, services.admin_token,
                            services.database_url)
        await platform.settle()  # earlier tests' alerts are behind the new group before our rule exists
        status, client = await platform.call("POST", "/api/v1/clients", services.admin_token, {"name": "Order"})
        assert status == 201, client
        # No endpoint: the order is read on alerts.matched, and nothing needs to be delivered.
        status, rule = await platform.call("POST", "/api/v1/rules", client["api_key"],
                                           {"severity": "HIGH", "source": "ordered", "name": "*"})
        assert status == 201, rule
        await platform.settle()

        # Keys that all hash to one partition of alerts.new, produced in this order.
        keys = [key for key in (f"{group}-{n}".encode() for n in range(100_000))
                if partition_of(key, settings.topic_partitions) == 0][:3000]
        await produce(services.kafka_bootstrap_servers, "alerts.new",
                      [(key, json.dumps(alert(key.decode(), source="ordered")).encode()) for key in keys])
        await platform.settle()  # committed past every message of alerts.new, alerts.matched, notifications.ready

    matched = [message["alert"]["alert_id"] for message in await read_json(services.kafka_bootstrap_servers,
                                                                           "alerts.matched")
               if message["client_id"] == client["client_id"]]
    assert matched == [key.decode() for key in keys]
    assert "Drain messages raised" not in worker.log()


@AGENT_LOOP
async def test_offsets_the_broker_refused_to_commit_are_committed_at_the_next_commit(monkeypatch):
    # faust-streaming 0.15.3 records refused commits as done (upstream PR #692) and drops the
    # acknowledgements they covered; our Consumer commits them again next time, with or without
    # newer acknowledgements, and later commits go on (alerting_app/broker_transport.py).
    from faust.types import TP

    consumer = app.consumer
    tp = TP("alerts.matched", 0)
    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    monkeypatch.setattr(app.topics, "acks_enabled_for", lambda topic: True)
    monkeypatch.setattr(app.tables, "on_commit", lambda offsets: None)

    async def flush():
        pass
    monkeypatch.setattr(app.producer, "flush", flush)
    answers = iter([True, False, True, True])
    at_broker = []

    async def broker_commit(offsets):
        accepted = next(answers)
        at_broker.append((dict(offsets), accepted))
        return accepted
    monkeypatch.setattr(consumer, "_commit", broker_commit)
    for name in ("_acked", "_acked_index", "_committed_offset", "_gap"):
        monkeypatch.setattr(consumer, name, type(getattr(consumer, name))(getattr(consumer, name).default_factory))

    class Record:  # what Consumer.ack reads of a message (it keeps a weak reference)
        def __init__(self, offset: int) -> None:
            self.acked, self.tp, self.offset, self.topic = False, tp, offset, tp.topic

    def acknowledge(offsets: range) -> None:
        for offset in offsets:
            consumer.ack(Record(offset))

    acknowledge(range(0, 10))
    assert await consumer.commit()  # accepted: 10
    acknowledge(range(10, 20))
    assert not await consumer.commit()  # refused: 20
    assert await consumer.commit()  # nothing new acknowledged: 20 again
    acknowledge(range(20, 30))
    assert await consumer.commit()  # 30: later commits go on

    assert at_broker == [({tp: 10}, True), ({tp: 20}, False), ({tp: 20}, True), ({tp: 30}, True)]
    assert not consumer._refused_commits


@AGENT_LOOP
async def test_after_an_agent_crashed_the_worker_commits_nothing_more_and_stops(monkeypatch, caplog):
    # Faust's own path for an agent that raised: App._on_agent_error -> consumer.on_task_error. The
    # batch the agent held was not processed, but Faust's take_events acknowledges it as soon as the
    # crashed agent drops the iterator; committing after that would pass over it for good.
    from faust.types import TP

    from alerting_app import metrics

    consumer = app.consumer
    monkeypatch.setattr(consumer, "crashed_agent", None)  # restored after the test
    stops = []
    monkeypatch.setattr(consumer, "stop_worker", lambda: stops.append(True))
    broker_commits = []

    async def commit_at_broker(self, offsets, start_new_transaction=True):
        broker_commits.append(dict(offsets))
        return True

    monkeypatch.setattr(faust_aiokafka.Consumer, "_commit_offsets", commit_at_broker)
    # Faust's on_task_error commits (Consumer.commit, which ends in _commit_offsets); its bookkeeping
    # needs a running consumer, so only the call is recorded here.
    commit_calls = []

    async def commit(*args, **kwargs):
        commit_calls.append(args)
        return True

    monkeypatch.setattr(consumer, "commit", commit)
    tp = TP("alerts.new", 0)
    assert await consumer._commit_offsets({tp: 5}) is True  # before any crash: Faust's commit runs
    before = metrics.agent_crashes._value.get()

    await app._on_agent_error(object(), RuntimeError("boom"))

    assert metrics.agent_crashes._value.get() == before + 1
    assert "an agent crashed (RuntimeError: boom)" in caplog.text
    assert stops == [True]
    assert commit_calls == [()]
    assert await consumer._commit_offsets({tp: 9}) is False
    assert broker_commits == [{tp: 5}]  # nothing reached the broker after the crash


@AGENT_LOOP
async def test_a_commit_waiting_for_the_flush_when_the_stop_gives_up_on_the_broker_commits_nothing(monkeypatch):
    # Faust's commit (Consumer._commit_offsets) flushes the producer, then commits at the broker.
    # Giving up on the broker fails the sends still pending, which ends the flush: the commit must
    # not follow, or it would pass over input whose output never reached the broker.
    from aiokafka import TopicPartition
    from faust.types import TP

    consumer, producer = app.consumer, app.producer
    assert isinstance(producer, broker_transport.Producer)
    tp = TP("alerts.new", 0)
    monkeypatch.setattr(consumer, "gave_up_on_the_broker", asyncio.Event())  # all restored after the test
    monkeypatch.setattr(consumer, "_committed_offset", {})
    monkeypatch.setattr(consumer, "_refused_commits", {})
    monkeypatch.setattr(consumer, "assignment", lambda: {tp})
    monkeypatch.setattr(producer, "gave_up", None)
    monkeypatch.setattr(broker_transport, "exit_unless_stopped_within", lambda *args, **kwargs: None)
    broker_commits = []

    async def commit_at_broker(self, offsets):
        broker_commits.append(dict(offsets))
        return True

    monkeypatch.setattr(faust_consumer_module.ThreadDelegateConsumer, "_commit", commit_at_broker)
    # A send waiting in aiokafka's accumulator, as with the broker unreachable (never started: nothing sends it).
    kafka_producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    monkeypatch.setattr(producer, "_producer", kafka_producer)
    sent = await kafka_producer._message_accumulator.add_message(
        TopicPartition("alerts.new", 0), b"key", b"value", timeout=1.0)

    committing = asyncio.ensure_future(consumer._commit_offsets({tp: 9}))
    await asyncio.sleep(0.1)
    assert not committing.done()  # waiting in the flush, for the send
    producer.give_up_on_the_broker()

    assert await committing is False
    assert broker_commits == []
    # Its own failure, which the outbox relay tells from a refusal (agents/rule_outbox.py, _unanswered).
    with pytest.raises(broker_transport.GaveUpOnTheBroker, match="not acknowledged by the broker"):
        await sent
    with pytest.raises(KafkaTimeoutError):  # and every later send
        await kafka_producer._message_accumulator.add_message(TopicPartition("alerts.new", 0), b"key", b"value",
                                                              timeout=1.0)


async def _run_an_agent_until_its_actor_ends(monkeypatch, process) -> list[bool]:
    """An agent of the app's Agent class, fed one value, whose actor runs `process(value)`; Faust's
    error handling is the app's (App._on_agent_error, Consumer.on_task_error). Returns the worker
    stops it asked for."""
    consumer, producer = app.consumer, app.producer
    monkeypatch.setattr(consumer, "gave_up_on_the_broker", asyncio.Event())  # all restored after the test
    monkeypatch.setattr(consumer, "crashed_agent", None)
    stops = []
    monkeypatch.setattr(consumer, "stop_worker", lambda: stops.append(True))

    async def commit(*args, **kwargs):  # Faust's on_task_error commits; its bookkeeping needs a running consumer
        return True

    monkeypatch.setattr(consumer, "commit", commit)
    monkeypatch.setattr(producer, "gave_up", None)
    monkeypatch.setattr(producer, "_producer", None)  # nothing for the give-up to fail but later sends
    monkeypatch.setattr(broker_transport, "exit_unless_stopped_within", lambda *args, **kwargs: None)

    async def agent_fun(stream):
        async for value in stream:
            await process(value)

    channel = app.channel()
    agent = app.conf.Agent(agent_fun, name=f"test-agent-{secrets.token_hex(4)}", app=app, channel=channel,
                           on_error=app._on_agent_error)
    assert isinstance(agent, broker_transport.Agent)
    flowing = app.flow_control.is_active()
    app.flow_control.resume()  # channels hold their values until it is: a worker resumes it once recovered
    await agent.start()
    try:
        await agent.send(value=b"a batch")
        actors = [aref.actor_task for aref in agent._actors]
        # A bound, not a measurement: the actor ends as soon as it has handled the value.
        _, still_running = await asyncio.wait(actors, timeout=30)
        assert not still_running
    finally:
        await agent.stop()
        if not flowing:
            app.flow_control.suspend()
    return stops


@AGENT_LOOP
async def test_an_agent_whose_sends_failed_because_the_stop_gave_up_on_the_broker_ends_without_a_crash(
        monkeypatch, caplog):
    from alerting_app import metrics

    async def send_once_given_up(value):
        app.producer.give_up_on_the_broker()
        await (await app.producer.send("alerts.matched", b"key", value, None, None, None))
    before = metrics.agent_crashes._value.get()

    stops = await _run_an_agent_until_its_actor_ends(monkeypatch, send_once_given_up)

    assert metrics.agent_crashes._value.get() == before
    assert stops == [] and app.consumer.crashed_agent is None
    # Nothing from our code, Faust's agent and its actor, or mode's supervisor (asyncio's own may
    # report what an earlier test left to the garbage collector).
    assert [record.getMessage() for record in caplog.records
            if record.levelno >= logging.ERROR and record.name.split(".")[0] in ("alerting_app", "faust", "mode")] == []
    stopped = [record for record in caplog.records
               if "its sends failed when this worker gave up" in record.getMessage()]
    assert len(stopped) == 1 and stopped[0].levelno == logging.WARNING and stopped[0].exc_info is None


@AGENT_LOOP
async def test_an_agent_that_raised_anything_else_still_crashes(monkeypatch, caplog):
    from alerting_app import metrics

    async def time_out(value):
        raise KafkaTimeoutError("the broker did not answer")  # a broker that timed out, not a give-up
    before = metrics.agent_crashes._value.get()

    stops = await _run_an_agent_until_its_actor_ends(monkeypatch, time_out)

    assert metrics.agent_crashes._value.get() == before + 1
    assert stops == [True]
    assert "an agent crashed (KafkaTimeoutError" in caplog.text


def test_a_failure_raised_from_a_send_the_stop_gave_up_on_is_the_give_up():
    from tables.groups import ChangelogWriteFailed

    given_up = broker_transport.GaveUpOnTheBroker("not acknowledged by the broker within 15s of the worker's stop")
    try:
        raise ChangelogWriteFailed("1 of 1 changelog writes failed") from copy.copy(given_up)
    except ChangelogWriteFailed as raised:
        changelog_write_failed = raised

    assert broker_transport.failed_by_giving_up(copy.copy(given_up))
    assert broker_transport.failed_by_giving_up(changelog_write_failed)
    assert not broker_transport.failed_by_giving_up(KafkaTimeoutError("the broker did not answer"))
    assert not broker_transport.failed_by_giving_up(ChangelogWriteFailed("the producer's buffer crashed"))


@AGENT_LOOP
async def test_records_held_during_a_rebalance_are_released_in_order_past_the_commit(monkeypatch):
    # What the drain loop hands over once `app.rebalancing` is over (alerting_app/broker_transport.py,
    # `_held_during_rebalance`): partitions still assigned, offsets ascending, none already committed.
    from faust.types import TP

    consumer = app.consumer
    kept, uncommitted, revoked = TP("alerts.new", 0), TP("alerts.new", 1), TP("alerts.new", 2)
    monkeypatch.setattr(consumer, "assignment", lambda: {kept, uncommitted})
    monkeypatch.setitem(consumer._committed_offset, kept, 5)
    consumer._committed_offset.pop(uncommitted, None)
    held = consumer._held_during_rebalance
    now, before = app.consumer_generation_id, app.consumer_generation_id - 1

    def record(name: str, generation: int = now) -> SimpleNamespace:
        return SimpleNamespace(name=name, generation_id=generation)
    held[kept] = {7: record("k7"), 4: record("k4"), 5: record("k5"), 6: record("k6")}  # fetched twice around a seek
    # A second rebalance began before the release: fetched again from the commit up to 1, not yet
    # up to 2; released, the 2 of the first generation would count as read, and the 2 fetched
    # again dropped.
    held[uncommitted] = {2: record("u2-first", before), 0: record("u0"), 1: record("u1")}
    held[revoked] = {9: record("r9")}

    released = [(tp, record.name) async for tp, record in consumer._release_held()]

    assert [r for tp, r in released if tp == kept] == ["k5", "k6", "k7"]
    assert [r for tp, r in released if tp == uncommitted] == ["u0", "u1"]
    assert all(tp != revoked for tp, _ in released)
    assert not consumer._held_during_rebalance  # the next records of these partitions flow again
