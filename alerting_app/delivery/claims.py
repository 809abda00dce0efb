"""The idempotency key of a delivery in Redis: claimed around every send, marked once sent.

Postgres records a delivery SENT in a batch a moment after the send. A worker killed in that
moment leaves the row PENDING; whoever resumes it finds the key marked sent here and records it
without sending again. The claim (SET NX with a TTL and a random token; released by redis-py's
Lock compare-and-delete) keeps two workers from sending at once; its TTL outlives one attempt, so a
claim whose holder died frees itself. The calls go through `PipelinedRedis`: the claims and marks
of concurrent deliveries share round trips.

The mark is the bare `sent`, as every release has written it: a release that finds anything else
under the key takes it for another attempt's claim, and would wait for it to expire and send again.
When the mark was written is read off what is left of its TTL (`SentMark.marked_at`), so that the
worker that records a dead worker's send can date it without a byte more per send.

What no claim can settle is a worker killed after the request left and before the answer was
marked: the receiver may or may not have it. The claim then expires and the delivery is sent
again, with the same Idempotency-Key, so the receiver can drop it (docs/delivery.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from dataclasses import dataclass

from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from alerting_app.redis_pipelining import PipelinedRedis

SENT_MARK = b"sent"


class ClaimState(enum.Enum):
    CLAIMED = "claimed"  # ours: send, then mark_sent or release
    SENT = "sent"  # sent already: record it, send nothing
    BUSY = "busy"  # another attempt holds it, for `Claim.busy_for_s` more at most


@dataclass(frozen=True)
class SentMark:
    """A delivery's sent mark as found, with how long Redis keeps it still."""

    ttl_left_ms: int  # PTTL: -1 none (a mark written by hand), -2 gone since it was read

    def marked_at(self, marker_ttl_s: float, now: float) -> float | None:
        """When it was written (time.time()), if it was written for `marker_ttl_s` (`mark_sent`,
        DELIVERY_SENT_MARKER_TTL_S); None when it cannot have been: no TTL, or more of one left."""
        age_s = marker_ttl_s - self.ttl_left_ms / 1000
        if self.ttl_left_ms < 0 or age_s < 0:
            return None
        return now - age_s


@dataclass
class Claim:
    state: ClaimState
    key: str
    token: bytes = b""  # what the key holds while this attempt owns it
    busy_for_s: float = 0.0
    mark: SentMark | None = None  # SENT's


def claim_key(notification_id: str, endpoint_id: str) -> str:
    return f"alerting:delivery:{notification_id}:{endpoint_id}"


async def claim(redis: PipelinedRedis, notification_id: str, endpoint_id: str, ttl_s: float) -> Claim:
    key, token = claim_key(notification_id, endpoint_id), secrets.token_hex(16).encode()
    ttl_ms = int(ttl_s * 1000)
    if await redis.call(lambda pipe: pipe.set(key, token, nx=True, px=ttl_ms)):
        return Claim(ClaimState.CLAIMED, key, token)
    value, ttl_left = redis.call(lambda pipe: pipe.get(key)), redis.call(lambda pipe: pipe.pttl(key))
    value, ttl_left_ms = await value, await ttl_left  # both queued first: one round trip
    if value == SENT_MARK:
        return Claim(ClaimState.SENT, key, mark=SentMark(ttl_left_ms))
    # The key may have vanished between the two calls (ttl_left_ms < 0): try again soon.
    return Claim(ClaimState.BUSY, key, busy_for_s=max(ttl_left_ms, 100) / 1000)


async def sent_mark(redis: PipelinedRedis, notification_id: str, endpoint_id: str) -> SentMark | None:
    """The delivery's sent mark, None if it is not marked sent; without claiming it."""
    key = claim_key(notification_id, endpoint_id)
    # Both queued first: one round trip. Gathered: a Redis away fails both, and the second failure
    # must not be logged as never retrieved.
    value, ttl_left_ms = await asyncio.gather(redis.call(lambda pipe: pipe.get(key)),
                                              redis.call(lambda pipe: pipe.pttl(key)))
    return SentMark(ttl_left_ms) if value == SENT_MARK else None


async def mark_sent(redis: PipelinedRedis, claimed: Claim, ttl_s: int) -> None:
    # Overwrites the claim's token: from now on the key says "sent" and nobody can release it. Its
    # TTL dates it (SentMark.marked_at).
    await redis.call(lambda pipe: pipe.set(claimed.key, SENT_MARK, ex=ttl_s))


async def release(redis: PipelinedRedis, claimed: Claim) -> None:
    """The attempt failed: the next attempt, here or on another worker, may claim again."""
    # redis-py's Lock deletes the key only if it still holds our token (an atomic compare-and-delete);
    # a claim that expired meanwhile is already free. Failures are rare: no pipelining needed.
    with contextlib.suppress(LockError):
        await Lock(redis.redis, claimed.key, timeout=1).do_release(claimed.token)
