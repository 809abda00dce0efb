"""The idempotency key of a delivery in Redis: claimed around every send, marked once sent.

Postgres records a delivery SENT in a batch a moment after the send. A worker killed in that
moment leaves the row PENDING; whoever resumes it finds the key marked sent here and records it
without sending again. The claim (SET NX with a TTL, through redis-py's Lock) keeps two workers
from sending at once; its TTL outlives one attempt, so a claim whose holder died frees itself.

What no claim can settle is a worker killed after the request left and before the answer was
marked: the receiver may or may not have it. The claim then expires and the delivery is sent
again, with the same Idempotency-Key, so the receiver can drop it (docs/delivery.md).
"""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

SENT_MARK = b"sent"


class ClaimState(enum.Enum):
    CLAIMED = "claimed"  # ours: send, then mark_sent or release
    SENT = "sent"  # sent already: record it, send nothing
    BUSY = "busy"  # another attempt holds it, for `Claim.busy_for_s` more at most


@dataclass
class Claim:
    state: ClaimState
    lock: Lock | None = None
    busy_for_s: float = 0.0


def claim_key(notification_id: str, endpoint_id: str) -> str:
    return f"alerting:delivery:{notification_id}:{endpoint_id}"


async def claim(redis: Redis, notification_id: str, endpoint_id: str, ttl_s: float) -> Claim:
    lock = Lock(redis, claim_key(notification_id, endpoint_id), timeout=ttl_s, blocking=False)
    if await lock.acquire():
        return Claim(ClaimState.CLAIMED, lock)
    async with redis.pipeline(transaction=False) as pipe:
        value, ttl_ms = await pipe.get(lock.name).pttl(lock.name).execute()
    if value == SENT_MARK:
        return Claim(ClaimState.SENT)
    # The key may have vanished between the two calls (ttl_ms < 0): try again soon.
    return Claim(ClaimState.BUSY, busy_for_s=max(ttl_ms, 100) / 1000)


async def mark_sent(redis: Redis, claimed: Claim, ttl_s: int) -> None:
    # Overwrites the claim's token: from now on the key says "sent" and nobody can release it.
    await redis.set(claimed.lock.name, SENT_MARK, ex=ttl_s)


async def release(claimed: Claim) -> None:
    """The attempt failed: the next attempt, here or on another worker, may claim again."""
    # Lock.release deletes the key only if it still holds our token (an atomic compare-and-delete);
    # a claim that expired meanwhile is already free.
    with contextlib.suppress(LockError):
        await claimed.lock.release()
