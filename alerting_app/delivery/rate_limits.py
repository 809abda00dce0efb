"""Rate limits shared by every worker: a token bucket per endpoint, and one for all email.

The buckets live in Redis, so two workers delivering to one endpoint share its rate. They are
throttled-py's GCRA limiter: GCRA is the token bucket written as "virtual scheduling" (it admits
exactly what a bucket of `burst` tokens refilled at `rate` admits), in one atomic Lua call timed
by Redis's clock, with sub-second precision. (throttled-py's own TOKEN_BUCKET refills in whole
seconds, too coarse for a few per second.) Excess waits for its token; nothing is dropped.

Each token is throttled-py's own GCRA Lua script and key, called through `PipelinedRedis`, so the
tokens of concurrent deliveries share one round trip (tests/test_delivery_rate_limits.py checks that
these buckets are the library's: a bucket drained by one is drained for the other).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from fractions import Fraction

from throttled.asyncio import RateLimiterType, Throttled, rate_limiter, store
from throttled.rate_limiter.gcra import RedisLimitAtomicActionSpec, RedisPeekAtomicActionSpec

from alerting_app.redis_pipelining import PipelinedRedis


def endpoint_bucket(app_id: str, endpoint_id: str) -> str:
    # APP_ID first: deployments sharing one Redis (staging and production, say) share no bucket.
    return f"{app_id}:endpoint:{endpoint_id}"


def email_bucket(app_id: str) -> str:
    return f"{app_id}:email"


# A token further off than this is waited for in steps of it, the bucket's rate read again between
# them (`take_in_turn`): a tenant who raises a slow endpoint's rate does not wait out the old one.
RATE_RECHECK_S = 5.0
_LONGEST_PERIOD_S = 3600
_SLOWEST_RATE = Fraction(1, _LONGEST_PERIOD_S)  # per second
_LIMITERS_KEPT = 1_000


class RateLimits:
    def __init__(self, redis: PipelinedRedis, burst_s: float) -> None:
        self._redis = redis
        self._burst_s = burst_s
        self._script = redis.redis.register_script(RedisLimitAtomicActionSpec.SCRIPTS)
        self._peek_script = redis.redis.register_script(RedisPeekAtomicActionSpec.SCRIPTS)
        # The library's limiters, for their key and quota arithmetic only: tokens are taken below.
        self._limiters: dict[tuple[int, int, int], rate_limiter.BaseRateLimiter] = {}
        # One waiter per bucket in this worker polls Redis; the others queue behind it here, so
        # a backlog costs Redis one call per token, not one per waiting delivery.
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}  # bucket -> its lock, how many want it
        # bucket -> (the rate read, when, the rate it replaced): deliveries whose endpoint was read
        # before that, with the replaced rate, use the new one without reading it again themselves.
        # Kept while anyone holds or waits for the bucket's turn (as `_turns`): not per endpoint
        # ever seen. A delivery coming later with the old rate reads the rate again itself.
        self._rates_read: dict[str, tuple[float, float, float]] = {}

    def _limiter(self, rate_per_s: float):
        # The library counts whole requests per whole seconds: 2.5/s is 5 per 2 s. Below one per
        # hour the fraction would round to 0 (a division by zero in the library): the slowest
        # rate kept is one per hour.
        rate = max(Fraction(rate_per_s).limit_denominator(_LONGEST_PERIOD_S), _SLOWEST_RATE)
        burst = max(1, round(rate_per_s * self._burst_s))
        quota_key = (rate.numerator, rate.denominator, burst)
        if quota_key not in self._limiters:
            if len(self._limiters) >= _LIMITERS_KEPT:
                self._limiters.clear()  # tenants choose rates: not one kept per rate ever set
            quota = rate_limiter.per_duration(timedelta(seconds=rate.denominator), rate.numerator, burst)
            throttle = Throttled(using=RateLimiterType.GCRA.value, quota=quota, store=store.MemoryStore())
            self._limiters[quota_key] = throttle.limiter
        return self._limiters[quota_key]

    async def _try(self, bucket: str, rate_per_s: float) -> float:
        """Take a token if there is one: 0.0, else the seconds until there is."""
        key, emission_interval, capacity = self._limiter(rate_per_s)._prepare(bucket)
        limited, _remaining, _reset_after, retry_after = await self._redis.script(
            self._script, [key], [emission_interval, capacity, 1])
        return float(retry_after) if limited else 0.0

    async def _try_at(self, bucket: str, rate_per_s: float) -> float:
        # Each rate a bucket has had gets a Redis key of its own, so a changed rate starts on a
        # schedule of its own, not on the old rate's (one an hour, raised, would wait out the hour).
        return await self._try(f"{bucket}:{rate_per_s:g}", rate_per_s)

    async def wait_s(self, bucket: str, rate_per_s: float) -> float:
        """The seconds until `bucket` has a token (0.0: it has one now; a rate of 0 is unlimited),
        taking none: throttled-py's own peek script, on the key `take_or_wait_s` takes from."""
        if rate_per_s <= 0:
            return 0.0
        key, emission_interval, capacity = self._limiter(rate_per_s)._prepare(f"{bucket}:{rate_per_s:g}")
        limited, _remaining, reset_after, _retry_after = await self._redis.script(
            self._peek_script, [key], [emission_interval, capacity])
        if not limited:
            return 0.0
        # The script's own retry_after is off by the bucket's depth: it counts `capacity`
        # intervals back from the bucket's full time, where the next token is `capacity - 1` back.
        # A bucket of one just taken at 1/s answered 0.0002 s, not 1 s.
        return max(0.0, float(reset_after) - (capacity - 1) * emission_interval)

    async def try_take(self, bucket: str, rate_per_s: float) -> bool:
        """Take a token of `bucket` if there is one now; whether there was (a rate of 0 is unlimited)."""
        return not await self.take_or_wait_s(bucket, rate_per_s)

    async def take_or_wait_s(self, bucket: str, rate_per_s: float) -> float:
        """Take a token of `bucket` if there is one now: 0.0, else the seconds until there is one
        (a rate of 0 is unlimited)."""
        return 0.0 if rate_per_s <= 0 else await self._try_at(bucket, rate_per_s)

    def turn(self, bucket: str) -> "_Turn":
        """This worker's turn at `bucket` (`async with`): one delivery at a time waits for its token
        (and, in attempts.py, for the send slot it spends it in); the others queue here."""
        return _Turn(self._turns, bucket, self._rates_read)

    async def take_in_turn(self, bucket: str, rate_per_s: float,
                           rate_now: Callable[[], Awaitable[float | None]] | None = None,
                           read_at: float = 0.0) -> float:
        """Wait for a token of `bucket`, holding its turn; the rate it was taken at (0: unlimited).

        `rate_per_s` is the rate as read at `read_at` (time.monotonic()). With `rate_now` (the rate
        as it is now; None: unknown), a wait longer than RATE_RECHECK_S is taken in steps, reading
        the rate again between them, and before the first if `read_at` is older than a step.
        """
        taken_up_with = rate_per_s
        read = self._rates_read.get(bucket)
        if read is not None and read_at < read[1] and read[2] == taken_up_with:
            rate_per_s = read[0]  # read after this delivery's: newer
        while rate_per_s > 0:
            wait_s = await self._try_at(bucket, rate_per_s)
            if not wait_s:
                return rate_per_s
            if rate_now is None or wait_s <= RATE_RECHECK_S:
                await asyncio.sleep(wait_s)
                continue
            # A read older than a step (this delivery waited for the turn behind others) is read
            # again before the step, not after it: a slow endpoint's backlog, disabled or deleted,
            # fails one delivery per read, not one per step (1,000 held: 83 minutes).
            if time.monotonic() - read_at < RATE_RECHECK_S:
                await asyncio.sleep(RATE_RECHECK_S)
            rate = await rate_now()
            read_at = time.monotonic()
            if rate is not None and rate != rate_per_s:
                self._rates_read[bucket] = (rate, time.monotonic(), taken_up_with)
                rate_per_s = rate
        return 0.0

    async def take(self, bucket: str, rate_per_s: float) -> None:
        """Wait for a token of `bucket` (a rate of 0 is unlimited)."""
        async with self.turn(bucket):
            await self.take_in_turn(bucket, rate_per_s)


class _Turn:
    """A bucket's lock, kept in `turns` only while someone holds or waits for it (no lock kept per
    endpoint ever seen). A class rather than a generator-based context manager: it is entered once
    per delivery, and this costs a third as much."""

    __slots__ = ("_turns", "_bucket", "_lock", "_rates_read")

    def __init__(self, turns: dict[str, tuple[asyncio.Lock, int]], bucket: str,
                 rates_read: dict[str, tuple[float, float, float]]) -> None:
        self._turns, self._bucket, self._rates_read = turns, bucket, rates_read
        lock, waiting = turns.get(bucket, (None, 0))
        self._lock = lock or asyncio.Lock()
        turns[bucket] = (self._lock, waiting + 1)

    async def __aenter__(self) -> None:
        try:
            await self._lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        lock, waiting = self._turns[self._bucket]
        if waiting == 1:
            del self._turns[self._bucket]
            self._rates_read.pop(self._bucket, None)
        else:
            self._turns[self._bucket] = (lock, waiting - 1)
