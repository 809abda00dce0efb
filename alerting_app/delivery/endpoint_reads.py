"""Endpoints as they are now, for many concurrent deliveries: one statement per turn of the event loop.

A delivery reads its endpoint again before a retry, between the steps of a long wait for a token,
and before a send that waited for its slots or tokens (attempts.py): on a worker holding a backlog,
before nearly every send. A statement each cost 100-180 us of the worker's CPU (asyncpg, 4,000
reads, 64 at a time, on the 2-vCPU VM, 28 Nov): about half the 0.25 ms a whole delivery may cost at
the target rate (README, "Status"). Read 10 or 50 to a statement, 18-27 or 4-6 us a read. So the
reads asked for during one turn of the event loop go to Postgres together, as the Redis commands
of deliveries do (alerting_app/redis_pipelining.py), and each caller awaits its own answer.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from alerting_app.delivery import records

# A longer list waits for its last row while callers could already go on (as MAX_PIPELINE).
MAX_READ = 500


class EndpointReads:
    def __init__(self, get_pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._get_pool = get_pool
        self._queued: dict[str, list[asyncio.Future]] = {}  # endpoint_id -> its callers' answers
        self._reading: set[asyncio.Task] = set()  # referenced while they run: asyncio keeps only weak references

    def read(self, endpoint_id: str) -> asyncio.Future:
        """The endpoint as it is now (None once deleted), read with the others asked for in this turn."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        if not self._queued:
            # Runs after the callbacks already due in this turn, so their reads join this statement.
            loop.call_soon(self._read_queued)
        self._queued.setdefault(endpoint_id, []).append(answer)
        return answer

    def _read_queued(self) -> None:
        queued, self._queued = list(self._queued.items()), {}
        for start in range(0, len(queued), MAX_READ):
            batch = dict(queued[start:start + MAX_READ])
            reading = asyncio.ensure_future(self._read(batch))
            self._reading.add(reading)
            reading.add_done_callback(self._reading.discard)
            _cancel_once_unawaited(reading, [answer for waiting in batch.values() for answer in waiting])

    async def _read(self, batch: dict[str, list[asyncio.Future]]) -> None:
        answers = [answer for waiting in batch.values() for answer in waiting]
        try:
            found = await records.endpoints_now(await self._get_pool(), list(batch))
        except Exception as exc:
            for answer in answers:
                if not answer.done():  # its caller was cancelled meanwhile (a timeout, a stop)
                    answer.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): nobody is left to answer
            for answer in answers:
                answer.cancel()
            raise
        for endpoint_id, waiting in batch.items():
            for answer in waiting:
                if not answer.done():
                    answer.set_result(found.get(endpoint_id))


def _cancel_once_unawaited(reading: asyncio.Future, answers: list[asyncio.Future]) -> None:
    """Cancel `reading` (its statement with it) once every one of its answers is done: its callers
    gave up on them (their timeout, a stop) while Postgres did not answer. Left running, such a read
    would hold one of the agents' pool connections, and each turn's read would add another, for as
    long as Postgres does not answer. (Once `reading` has answered them, it is done already.)"""
    remaining = len(answers)

    def one_done(_: asyncio.Future) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            reading.cancel()

    for answer in answers:
        answer.add_done_callback(one_done)
