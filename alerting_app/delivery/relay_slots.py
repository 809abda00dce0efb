"""The SMTP relay's send slots in a worker, every tenant's email: a slot freed goes to the tenants
waiting for one in turn, not to the email that has waited longest.

Every tenant's email goes to the one relay, which takes one endpoint's worth of the worker's sends
(DELIVERY_ENDPOINT_CONCURRENCY). First come, first served, a tenant whose many email endpoints had
queued their emails for the relay kept another tenant's email, held in the same worker, behind all
of them (docs/delivery.md, No head-of-line blocking).
"""
from __future__ import annotations

import asyncio
from collections import deque


class RelaySlots:
    def __init__(self, size: int) -> None:
        self._free = size
        # client -> its emails waiting, oldest first; the clients in the order their turns come.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def of(self, client_id: str) -> "ClientRelaySlot":
        """A slot of the relay for one of `client_id`'s emails (acquire, then release)."""
        return ClientRelaySlot(self, client_id)

    def waiting(self) -> int:
        """How many emails wait for a slot."""
        return sum(len(queue) for queue in self._waiting.values())

    async def acquire(self, client_id: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client_id, deque()).append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # given a slot as it was cancelled: the next turn's
            else:
                self._forget(client_id, waiter)
            raise

    def release(self) -> None:
        """Free a slot: to the first client in turn waiting, whose turn then goes to the end."""
        while self._waiting:
            client_id = next(iter(self._waiting))
            queue = self._waiting.pop(client_id)
            waiter = queue.popleft()
            if queue:
                self._waiting[client_id] = queue
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _forget(self, client_id: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client_id)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[client_id]


class ClientRelaySlot:
    """One client's way to the relay's slots, taken and freed as a semaphore's."""

    __slots__ = ("_slots", "_client_id")

    def __init__(self, slots: RelaySlots, client_id: str) -> None:
        self._slots, self._client_id = slots, client_id

    async def acquire(self) -> None:
        await self._slots.acquire(self._client_id)

    def release(self) -> None:
        self._slots.release()
