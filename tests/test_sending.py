"""alerting_app/sending.py `all_acknowledged`: nothing of a batch of sends is still in flight when it
returns or raises (the outbox relay releases its ordering lock right after, agents/rule_outbox.py)."""
from __future__ import annotations

import asyncio

import pytest

from alerting_app.sending import SendCancelled, all_acknowledged, send_batched
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
