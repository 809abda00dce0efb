"""Rate limits shared by every worker: a token bucket per endpoint, and one for all email.

The buckets live in Redis, so two workers delivering to one endpoint share its rate. They are
throttled-py's GCRA limiter: GCRA is the token bucket written as "virtual scheduling" (it admits
exactly what a bucket of `burst` tokens refilled at `rate` admits), in one atomic Lua call timed
by Redis's clock, with sub-second precision. (throttled-py's own TOKEN_BUCKET refills in whole
seconds, too coarse for a few per second.) Excess waits for its token; nothing is dropped.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta
from fractions import Fraction

from throttled.asyncio import RateLimiterType, Throttled, rate_limiter, store

EMAIL_BUCKET = "email"


class RateLimits:
    def __init__(self, redis_url: str, burst_s: float) -> None:
        self._store = store.RedisStore(server=redis_url)
        self._burst_s = burst_s
        self._throttles: dict[tuple[int, int, int], Throttled] = {}
        # One waiter per bucket in this worker polls Redis; the others queue behind it here, so
        # a backlog costs Redis one call per token, not one per waiting delivery.
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _throttle(self, rate_per_s: float) -> Throttled:
        # The library counts whole requests per whole seconds: 2.5/s is 5 per 2 s.
        rate = Fraction(rate_per_s).limit_denominator(3600)
        burst = max(1, round(rate_per_s * self._burst_s))
        quota_key = (rate.numerator, rate.denominator, burst)
        if quota_key not in self._throttles:
            quota = rate_limiter.per_duration(timedelta(seconds=rate.denominator), rate.numerator, burst)
            self._throttles[quota_key] = Throttled(using=RateLimiterType.GCRA.value, quota=quota, store=self._store)
        return self._throttles[quota_key]

    async def take(self, bucket: str, rate_per_s: float) -> None:
        """Wait for a token of `bucket` (a rate of 0 is unlimited)."""
        if rate_per_s <= 0:
            return
        throttle = self._throttle(rate_per_s)
        async with self._turns[bucket]:
            while (result := await throttle.limit(bucket)).limited:
                await asyncio.sleep(result.state.retry_after)
