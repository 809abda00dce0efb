"""A send's lease fence (records._FENCE), for many concurrent sends: one statement per turn of the
event loop, as endpoint_reads.py reads endpoints.

Right before its send a delivery makes its lease in Postgres cover the send, and learns whether the
row is still its worker's. The Redis claim keeps two workers from sending one delivery at once only
while Redis keeps it; a Redis restarted empty loses every claim in flight, and a worker stalled
(a long pause, a starved VM) past its lease meanwhile found another worker's sweep sending its
delivery a second time. The lease, in Postgres, is the fence that holds then.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from alerting_app.delivery import records
from alerting_app.turn_batches import TurnBatches

MAX_FENCE = 500


class LeaseFences:
    def __init__(self, owner: str, get_pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._owner, self._get_pool = owner, get_pool
        # Cancelled once no caller waits (their timeouts): a frozen Postgres must not keep a pool
        # connection per turn.
        self._fences = TurnBatches(self._fence, MAX_FENCE, cancel_unawaited=True)

    def fence(self, key: tuple[str, str], cover_s: float) -> asyncio.Future:
        """Whether this worker still holds the delivery `key`, its lease now running `cover_s` more at least."""
        return self._fences.submit((key, cover_s))

    async def _fence(self, sends: list[tuple[tuple[str, str], float]]) -> list[bool]:
        held = await records.fence_sends(await self._get_pool(), self._owner, sends)
        return [key in held for key, _ in sends]
