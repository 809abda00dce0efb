"""alerting_app/sending.py `all_acknowledged` and `send_batched`: nothing of a batch of sends is still in flight
when they return or raise, cancelled or not (the outbox relay releases its ordering lock right after,
agents/rule_outbox.py)."""
from __future__ import annotations

import asyncio

import pytest

from alerting_app.sending import SendCancelled, all_acknowledged, send_batched
from broker_front import BrokerFront, pipe
from private_brokers import app_sending_behind
from test_agent_support import AGENT_LOOP, pipeline  # noqa: F401  (fixtures)


class BrokerRefused(Exception):
    pass


async def test_a_failed_send_is_raised_only_once_every_other_send_is_answered():
    loop = asyncio.get_running_loop()
    failed, still_in_flight = loop.create_future(), loop.create_future()
    failed.set_exception(BrokerRefused("partition 1 has no leader"))
    waiting = asyncio.ensure_future(all_acknowledged([failed, still_in_flight]))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # gather would have raised already, with partition 0 still in flight

    still_in_flight.set_result("acknowledged")
    with pytest.raises(BrokerRefused):
        await waiting


async def test_of_several_failed_sends_the_first_is_raised():
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    first.set_exception(BrokerRefused("partition 0 has no leader"))
    second.set_exception(BrokerRefused("partition 1 has no leader"))

    with pytest.raises(BrokerRefused, match="partition 0"):
        await all_acknowledged([first, second])

async def test_cancelled_it_still_waits_for_the_sends_in_flight_and_leaves_them_alone():
    in_flight = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(all_acknowledged([in_flight]))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.05)
    assert not waiting.done() and not in_flight.cancelled()

    in_flight.set_result("acknowledged")
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_an_ack_cancelled_by_someone_else_is_a_failure_not_the_callers_cancellation():
    # The outbox relay's loop goes on after an Exception; a CancelledError would end it for good.
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    with pytest.raises(SendCancelled):
        await all_acknowledged([cancelled])


async def test_all_answered_it_returns():
    answered = asyncio.get_running_loop().create_future()
    answered.set_result("acknowledged")
    await all_acknowledged([answered])
    await all_acknowledged([])


class SourceFailed(Exception):
    pass


@AGENT_LOOP
async def test_send_batched_raises_only_once_the_batches_it_queued_are_answered(pipeline, monkeypatch):
    """A failure while queueing (here the messages' source) comes after full batches went out: they
    are answered, not left in flight, when the caller sees the failure. Real broker and producer;
    the test only records what send_batch returned."""
    from alerting_app.app import app

    topic = app.topic("sending-test", partitions=1)
    await topic.maybe_declare()
    producer = (await app.maybe_start_producer())._ensure_producer()
    queued: list[asyncio.Future] = []
    real_send_batch = producer.send_batch

    async def recording_send_batch(*args, **kwargs):
        queued.append(await real_send_batch(*args, **kwargs))
        return queued[-1]
    monkeypatch.setattr(producer, "send_batch", recording_send_batch)

    def messages():
        for _ in range(200):  # 200 KB: several full batches of one partition
            yield b"sending-test", b"x" * 1000
        raise SourceFailed("the source broke off")

    with pytest.raises(SourceFailed):
        await send_batched(topic, messages())
    assert queued and all(ack.done() and ack.exception() is None for ack in queued)


@AGENT_LOOP
async def test_send_batched_delivers_every_message_across_full_batches_in_order(pipeline):
    """A message that finds its partition's batch full starts the next batch: it is sent, not dropped."""
    import uuid

    from alerting_app.app import app, settings
    from kafka_probe import read_topic

    topic = app.topic(f"sending-test-{uuid.uuid4().hex[:8]}", partitions=1)
    await topic.maybe_declare()
    values = [str(n).encode() + b":" + b"x" * 1000 for n in range(200)]  # 200 KB: several full batches

    await all_acknowledged(await send_batched(topic, [(b"key", value) for value in values]))

    assert [value for _, value in await read_topic(settings.kafka_bootstrap_servers, topic.get_topic_name())] == values

class AnswerHoldingFront(BrokerFront):
    """Passes requests on to the broker at once; its answers wait while `hold()` is in force, until `release()`:
    a broker slow to acknowledge, on demand."""

    def __init__(self, port: int, upstream_port: int) -> None:
        super().__init__(port, upstream_port)
        self._answers_flow = asyncio.Event()
        self._answers_flow.set()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(pipe(reader, upstream_writer), self._answers(upstream_reader, writer))

    async def _answers(self, upstream_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await upstream_reader.read(65536):
                await self._answers_flow.wait()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def hold(self) -> None:
        self._in_own_loop(self._answers_flow.clear)

    def release(self) -> None:
        self._in_own_loop(self._answers_flow.set)

    def _in_own_loop(self, change) -> None:
        async def apply() -> None:
            change()
        # Waits until applied: an answer arriving right after hold() returns is held.
        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(10)


async def test_send_batched_cancelled_while_queueing_returns_only_once_the_batches_it_queued_are_answered(
        tmp_path, monkeypatch):
    """The worker stopping cancels the outbox relay, perhaps while send_batch waits for a partition's
    earlier batch: the relay releases its ordering lock once the cancellation is through, so the
    batches already queued must be answered by then, not land after another relay's newer versions.
    A private broker behind a front that holds its answers; a Faust app of its own sending to it."""
    async with app_sending_behind(AnswerHoldingFront, tmp_path, "send-batched-cancel",
                                  "send-batched-cancel") as (front, topic):
        try:
            producer = (await topic.app.maybe_start_producer())._ensure_producer()
            entered: list[None] = []
            queued: list[asyncio.Future] = []
            real_send_batch = producer.send_batch

            async def recording_send_batch(*args, **kwargs):
                entered.append(None)
                queued.append(await real_send_batch(*args, **kwargs))
                return queued[-1]
            monkeypatch.setattr(producer, "send_batch", recording_send_batch)

            front.hold()
            # 200 KB to one partition: several full batches, each queued only once the one before it is sent,
            # which waits for the answer to the one before that.
            sending_task = asyncio.ensure_future(send_batched(topic, [(b"cancelled", b"x" * 1000)] * 200))
            async with asyncio.timeout(30):  # a bound, not a measurement
                while not (queued and len(entered) > len(queued)):
                    await asyncio.sleep(0.01)
            sending_task.cancel()
            await asyncio.sleep(0.5)
            assert not sending_task.done()  # waiting for the answers the front holds
            assert not any(ack.done() for ack in queued)

            front.release()
            with pytest.raises(asyncio.CancelledError):
                await sending_task
            assert all(ack.done() and not ack.cancelled() and ack.exception() is None for ack in queued)
        finally:
            front.release()
