"""An answer asked once for the callers arriving together, and reused for a moment (`SharedProbe`)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedProbe(Generic[T]):
    """`probe()` run once for the requests arriving together, its answer reused for `reuse_s`.

    /readyz, /startedz and /metrics answer anyone on WEB_PORT, without a token. Each request asked
    the services for itself: a flood of /readyz opened a Redis connection per concurrent request
    (kept after), a broker connection and login per request, and queued on the agents' Postgres
    pool; a flood of /metrics asked the broker for every partition's end offsets per request.
    """

    def __init__(self, probe: Callable[[], Awaitable[T]], reuse_s: float) -> None:
        self._probe, self._reuse_s = probe, reuse_s
        self._probing: asyncio.Future[T] | None = None
        self._probed: tuple[float, T] | None = None  # (when, what) of the last answer

    def _keep(self, probing: asyncio.Future[T]) -> None:
        self._probing = None
        if not probing.cancelled() and probing.exception() is None:
            self._probed = (time.monotonic(), probing.result())

    async def __call__(self) -> T:
        if self._probed is not None and time.monotonic() - self._probed[0] < self._reuse_s:
            return self._probed[1]
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
            self._probing.add_done_callback(self._keep)
        # Shielded: one request given up (its client gone) does not cancel the others' probe.
        return await asyncio.shield(self._probing)
