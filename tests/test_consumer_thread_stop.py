"""A worker consumer stopped while a fetch waits to retry (its broker unreachable, or just back)
stops at once and closes its connections.

aiokafka's Fetcher.close let the cancellation of that fetch escape from AIOKafkaConsumer.stop,
before the consumer closed its connections; the consumer thread then never told the worker it had
stopped, and the worker waited 60 s for it (mode's shutdown_timeout), long enough to be killed by
whoever stopped it (alerting_app/broker_transport.py, `ConsumerThread.on_thread_stop`). Measured with
a worker whose broker was cut: 63 s to stop before the fix, 3 s after it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition
from yarl import URL

from alerting_app.app import app, settings
from alerting_app.broker_transport import Transport
from test_agent_support import AGENT_LOOP
from test_e2e_outbox_broker_down import private_broker  # noqa: F401  (fixture)

# Faust's consumer takes the app's producer, which takes the app's loop (tests/conftest.py,
# pytest_runtest_teardown).
pytestmark = AGENT_LOOP

_BOUND_S = 30.0  # far beyond what each wait below takes; only a hang reaches it


async def _nothing(*args) -> None:
    """The callbacks a Faust consumer requires; this one never consumes."""


async def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + _BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {_BOUND_S:g} s"
        await asyncio.sleep(0.05)


async def test_a_consumer_stopped_while_a_fetch_waits_to_retry_stops_and_closes_its_connections(
        private_broker, caplog):  # noqa: F811
    caplog.set_level(logging.ERROR, logger="aiokafka.consumer.fetcher")
    transport = Transport([URL(f"kafka://{private_broker.address}")], app,
                          fetch_max_wait_ms=settings.broker_fetch_max_wait_ms, broker=app.transport.broker)
    faust_consumer = transport.create_consumer(callback=_nothing, on_partitions_revoked=_nothing,
                                               on_partitions_assigned=_nothing)
    thread = faust_consumer._thread
    consumer = thread._consumer = thread._create_worker_consumer(transport)  # what the thread's start makes
    await consumer.start()
    # A failed fetch waits this long before its next try: the stop below finds it waiting, every time.
    consumer._fetcher._retry_backoff = 3600.0
    partition = TopicPartition("alerts.new", 0)
    consumer.assign([partition])
    consumer.seek(partition, 0)  # it fetches at once, without asking the group for a committed offset

    with private_broker.down():
        await wait_until(lambda: "Failed fetch messages" in caplog.text, "a fetch failed")
    await consumer.topics()  # a connection again, through the proxy, for the stop to close
    assert private_broker.open_connections() > 0

    await thread.on_thread_stop()  # as the consumer thread stops: raised CancelledError

    await wait_until(lambda: private_broker.open_connections() == 0, "every connection closed")
