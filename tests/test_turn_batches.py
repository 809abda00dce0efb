"""TurnBatches on its own: how a turn's calls are cut into batches, and when a batch's send is
cancelled because nobody waits for it any more."""
from __future__ import annotations

import asyncio

from alerting_app.turn_batches import TurnBatches


async def test_a_turn_longer_than_max_batch_goes_out_in_full_batches_and_every_caller_is_answered():
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        sent.append(items)
        return [item * 10 for item in items]

    batches = TurnBatches(send, max_batch=3)
    async with asyncio.timeout(10):  # a guard against hanging only: an item left out is never answered
        answers = await asyncio.gather(*(batches.submit(n) for n in range(7)))
    assert answers == [n * 10 for n in range(7)]
    assert sent == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_send_is_cancelled_once_its_last_caller_gives_up_and_not_before():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def send(items: list[str]) -> list[str]:
        started.set()
        try:
            await asyncio.Event().wait()  # the other side never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return items

    batches = TurnBatches(send, max_batch=10, cancel_unawaited=True)
    first, second = batches.submit("a"), batches.submit("b")
    async with asyncio.timeout(10):  # a guard against hanging only
        await started.wait()
        first.cancel()  # one caller's timeout: the other still waits on the same send
        for _ in range(5):
            await asyncio.sleep(0)
        assert not cancelled.is_set()
        second.cancel()
        await cancelled.wait()


async def test_without_cancel_unawaited_a_send_runs_on_after_its_callers_gave_up():
    release, finished = asyncio.Event(), asyncio.Event()

    async def send(items: list[str]) -> list[str]:
        await release.wait()
        finished.set()
        return items

    batches = TurnBatches(send, max_batch=10)
    answer = batches.submit("a")
    await asyncio.sleep(0)
    answer.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(10):  # a guard against hanging only
        await finished.wait()
