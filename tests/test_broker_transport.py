"""The worker's Kafka consumer fetches with BROKER_FETCH_MAX_WAIT_MS, not Faust's fixed 1,500 ms.

The setting reaches aiokafka through an override of Faust's consumer (alerting_app/broker_transport.py)
that sets an attribute aiokafka hands to its Fetcher on start: an upgrade of either library could
silently undo it, and only this test would say so.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import json
import secrets
from pathlib import Path

import aiohttp
import pytest
from faust.agents.agent import Agent
from faust.app.base import App as FaustApp
from faust.streams import Stream
from faust.tables.recovery import Recovery
from faust.transport import conductor as faust_conductor
from faust.transport import consumer as faust_consumer_module
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from mode.utils.queues import FlowControlEvent

from alerting_app.app import app, settings
from alerting_app.broker_transport import Transport
from alerting_app.settings import ConfigurationError, load_settings
from kafka_probe import partition_of, produce, read_json, retire_rules_left_on_topic
from test_e2e_pipeline import Platform, alert


async def _nothing(*args) -> None:
    """The callbacks a Faust consumer requires; this one never consumes."""


async def test_the_worker_consumer_fetches_with_the_configured_wait(services):
    assert isinstance(app.transport, Transport)
    assert app.transport.fetch_max_wait_ms == settings.broker_fetch_max_wait_ms
    # A transport of our own for this test: the app's transport and consumer stay bound to the
    # event loop that first uses them, and later tests of the session may run the app in another.
    transport = Transport(app.conf.broker_consumer, app, fetch_max_wait_ms=settings.broker_fetch_max_wait_ms)
    faust_consumer = transport.create_consumer(callback=_nothing, on_partitions_revoked=_nothing,
                                               on_partitions_assigned=_nothing)
    consumer = faust_consumer._thread._create_worker_consumer(transport)
    await consumer.start()
    try:
        assert consumer._fetcher._fetch_max_wait_ms == settings.broker_fetch_max_wait_ms
        assert settings.broker_fetch_max_wait_ms != 1500, "Faust's own value would pass unnoticed"
    finally:
        await consumer.stop()


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
    "faust Stream.take_events": "607d48aead118ba8",
    "faust Agent._execute_actor": "c750b828d2bda93e",
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
    }


def test_the_drain_override_still_matches_the_installed_faust():
    changed = [name for name, source in _installed_sources().items()
               if hashlib.sha256(source.encode()).hexdigest()[:16] != _SOURCES_THE_DRAIN_OVERRIDE_RELIES_ON[name]]
    assert not changed, (
        f"{changed} changed since faust-streaming 0.15.3: re-check Consumer._drain_messages and "
        "_delivery_cannot_wait in alerting_app/broker_transport.py against the installed code, then "
        "record the new hashes here")
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


async def test_a_commit_the_broker_refused_is_not_recorded_as_done(monkeypatch):
    # faust-streaming 0.15.3 records refused commits as done (upstream PR #692); our Consumer puts
    # the record back so that the next commit interval tries again (alerting_app/broker_transport.py).
    from faust.types import TP

    consumer = app.consumer
    tp, unseen = TP("alerts.new", 0), TP("alerts.new", 1)
    monkeypatch.setattr(consumer, "assignment", lambda: {tp, unseen})
    monkeypatch.setattr(app.tables, "on_commit", lambda offsets: None)
    consumer._committed_offset[tp] = 5

    async def refused(offsets):
        return False

    monkeypatch.setattr(consumer, "_commit", refused)
    assert not await consumer._commit_offsets({tp: 9, unseen: 3})
    assert consumer._committed_offset[tp] == 5 and unseen not in consumer._committed_offset

    async def accepted(offsets):
        return True

    monkeypatch.setattr(consumer, "_commit", accepted)
    assert await consumer._commit_offsets({tp: 9, unseen: 3})
    assert (consumer._committed_offset[tp], consumer._committed_offset[unseen]) == (9, 3)


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
    held[kept] = {7: "k7", 4: "k4", 5: "k5", 6: "k6"}  # fetched twice around a seek: offsets, not arrival
    held[uncommitted] = {2: "u2", 0: "u0", 1: "u1"}
    held[revoked] = {9: "r9"}

    released = [(tp, record) async for tp, record in consumer._release_held()]

    assert [r for tp, r in released if tp == kept] == ["k5", "k6", "k7"]
    assert [r for tp, r in released if tp == uncommitted] == ["u0", "u1", "u2"]
    assert all(tp != revoked for tp, _ in released)
    assert not consumer._held_during_rebalance  # the next records of these partitions flow again
