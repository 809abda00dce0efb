"""Calls of many concurrent callers handed over together: one batch per turn of the event loop.

A worker delivering a thousand notifications a second makes small calls for each of them: Redis
commands (its token, its claim, its sent mark: alerting_app/redis_pipelining.py) and, before a send
that waited, a read of its endpoint (alerting_app/delivery/endpoint_reads.py). Made one by one, each
costs a round trip and the worker's CPU. Here the calls made during one turn of the event loop go
out together, and each caller still awaits its own answer.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TurnBatches(Generic[T]):
    def __init__(self, send: Callable[[list[T]], Awaitable[Sequence[Any]]], max_batch: int, *,
                 cancel_unawaited: bool = False) -> None:
        """`send(items)` answers every item, in order: its value, or an exception for that item's
        caller alone; an exception `send` raises fails the whole batch. At most `max_batch` items go
        to one `send`: a longer batch waits for its last answer while callers could already go on.

        `cancel_unawaited`: cancel a batch's `send` once none of its callers waits any more (their
        timeouts, a stop), rather than let it hold what it uses (a pool connection) for as long as
        the other side does not answer.
        """
        self._send_batch = send
        self._max_batch = max_batch
        self._cancel_unawaited = cancel_unawaited
        self._queued: list[tuple[T, asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # referenced while they run: asyncio keeps only weak references

    def submit(self, item: T) -> asyncio.Future:
        """Queue `item` for this turn's batch; await its answer."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queued.append((item, answer))
        if len(self._queued) == 1:
            # Runs after the callbacks already due in this turn, so their items join this batch.
            loop.call_soon(self._send_queued)
        return answer

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self._max_batch):
            batch = queued[start:start + self._max_batch]
            sending = asyncio.ensure_future(self._send(batch))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
            if self._cancel_unawaited:
                _cancel_once_unawaited(sending, [answer for _, answer in batch])

    async def _send(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            values = await self._send_batch([item for item, _ in batch])
        except Exception as exc:
            for _, answer in batch:
                if not answer.done():  # its caller was cancelled meanwhile (a timeout, a stop)
                    answer.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing, or nobody waits any more)
            for _, answer in batch:
                answer.cancel()
            raise
        for (_, answer), value in zip(batch, values, strict=True):
            if answer.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(value, Exception):
                answer.set_exception(value)
            else:
                answer.set_result(value)


def _cancel_once_unawaited(sending: asyncio.Future, answers: list[asyncio.Future]) -> None:
    """Cancel `sending` once every one of its answers is done: its callers gave up on them while
    the other side did not answer. (Once `sending` has answered them, it is done already.)"""
    remaining = len(answers)

    def one_done(_: asyncio.Future) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            sending.cancel()

    for answer in answers:
        answer.add_done_callback(one_done)
