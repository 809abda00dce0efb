"""A Tansu broker of a test's own, reachable only through a front (broker_front.py) the test controls,
and a Faust app of the test's own sending to it. This module holds no tests."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import faust
from faust.types import TopicT

from alerting_app.embedded import free_port
from alerting_app.sending import all_acknowledged, send_batched
from broker_front import BrokerFront
from operations_support import start_tansu

Front = TypeVar("Front", bound=BrokerFront)


@contextlib.contextmanager
def private_broker_behind(front_type: Callable[[int, int], Front], folder: Path) -> Iterator[Front]:
    """A private in-memory broker (its log in `folder`) behind a `front_type(front_port, broker_port)`,
    whose address it advertises. The session's broker would not do: it advertises its own address,
    so a client that came through a front to it would be sent on to that address after its first
    request, past the front. The broker is started with an event loop of its own: enter this in a
    thread from a coroutine (or use `app_sending_behind`)."""
    broker_port, front_port = free_port(), free_port()
    with front_type(front_port, broker_port) as front:
        broker = start_tansu(broker_port, folder, advertised_port=front_port)
        try:
            yield front
        finally:
            broker.stop()


@contextlib.asynccontextmanager
async def app_sending_behind(front_type: Callable[[int, int], Front], folder: Path, app_id: str, topic_name: str,
                             *, partitions: int = 1, **app_settings: object) -> AsyncIterator[tuple[Front, TopicT]]:
    """A Faust app `app_id` sending to a `private_broker_behind(front_type, folder)`, and its topic
    `topic_name`, declared. One message is acknowledged first: the producer is connected to the
    leader and knows the metadata, as a worker's is, so what the test does next is about answers.
    A test that made the front hold or refuse lets it through again before leaving: the producer's
    stop waits for the broker."""
    with contextlib.ExitStack() as broker:
        front = await asyncio.to_thread(broker.enter_context, private_broker_behind(front_type, folder))
        app = faust.App(app_id, env={}, broker=f"kafka://127.0.0.1:{front.port}", datadir=str(folder / "faust"),
                        **app_settings)
        try:
            topic = app.topic(topic_name, partitions=partitions)
            await topic.maybe_declare()
            await all_acknowledged(await send_batched(topic, [(b"warm-up", b"{}")]))
            yield front, topic
        finally:
            await app.producer.stop()
