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
from alerting_app.delivery.jobs import Endpoint
from alerting_app.turn_batches import TurnBatches

# A longer list waits for its last row while callers could already go on (as MAX_PIPELINE).
MAX_READ = 500


class EndpointReads:
    def __init__(self, get_pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._get_pool = get_pool
        # A read none of whose callers waits any more is cancelled, with its statement: left running
        # while Postgres does not answer, each turn's read would keep one of the agents' pool
        # connections (ten, shared by every agent) and pile up behind the others.
        self._reads = TurnBatches(self._read, MAX_READ, cancel_unawaited=True)

    def read(self, endpoint_id: str) -> asyncio.Future:
        """The endpoint as it is now (None once deleted), read with the others asked for in this turn."""
        return self._reads.submit(endpoint_id)

    async def _read(self, endpoint_ids: list[str]) -> list[Endpoint | None]:
        found = await records.endpoints_now(await self._get_pool(), sorted(set(endpoint_ids)))
        return [found.get(endpoint_id) for endpoint_id in endpoint_ids]
