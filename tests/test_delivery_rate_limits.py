"""Token buckets in the real Redis, shared by every worker: excess waits for its token."""
from __future__ import annotations

import asyncio
import time
import uuid

from datetime import timedelta

import pytest

from redis.asyncio import Redis
from throttled.asyncio import RateLimiterType, Throttled, rate_limiter, store

from alerting_app.delivery.rate_limits import RateLimits
from alerting_app.redis_pipelining import PipelinedRedis


def rate_limits(redis_url: str, burst_s: float) -> RateLimits:
    return RateLimits(PipelinedRedis(Redis.from_url(redis_url)), burst_s=burst_s)


async def take_all(limits: list[RateLimits], bucket: str, rate: float, count: int) -> float:
    """Take `count` tokens spread over `limits` (one per worker) at once; return how long it took."""
    started = time.monotonic()
    await asyncio.gather(*(limits[n % len(limits)].take(bucket, rate) for n in range(count)))
    return time.monotonic() - started


async def test_two_workers_share_one_bucket_and_the_excess_waits(services):
    # Each RateLimits has its own Redis connections, as two worker processes would.
    workers = [rate_limits(services.redis_url, burst_s=0.25) for _ in range(2)]
    bucket = f"endpoint:{uuid.uuid4()}"

    took = await take_all(workers, bucket, rate=20.0, count=25)

    # A bucket of 5 (0.25 s of 20/s) lets 5 through at once; the other 20 need a second.
    assert took >= (25 - 5) / 20.0 * 0.95


async def test_a_fractional_rate_is_kept(services):
    limits = rate_limits(services.redis_url, burst_s=0.4)
    took = await take_all([limits], f"endpoint:{uuid.uuid4()}", rate=2.5, count=4)
    # A bucket of 1 token: the three after the first wait 0.4 s each.
    assert took >= 3 / 2.5 * 0.95


async def test_buckets_are_independent(services):
    limits = rate_limits(services.redis_url, burst_s=1.0)
    busy = f"endpoint:{uuid.uuid4()}"
    await take_all([limits], busy, rate=1.0, count=1)  # empties the busy endpoint's bucket of one

    # Another endpoint's token is there at once; the busy one would wait a second.
    other = asyncio.ensure_future(limits.take(f"endpoint:{uuid.uuid4()}", 1.0))
    waiting = asyncio.ensure_future(limits.take(busy, 1.0))
    done, _ = await asyncio.wait({other, waiting}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {other}
    await waiting


async def test_a_rate_of_zero_is_unlimited(services):
    limits = rate_limits("redis://127.0.0.1:1/0", burst_s=1.0)  # never asked: nothing listens there
    await take_all([limits], "email", rate=0, count=1000)


def test_an_endpoints_own_rate_of_zero_is_unlimited_whatever_the_default():
    from alerting_app.delivery.jobs import Endpoint

    def endpoint(rate_limit_per_s: float | None) -> Endpoint:
        return Endpoint(str(uuid.uuid4()), "webhook", "https://hooks.example.com/x", "secret", rate_limit_per_s)

    assert endpoint(0).rate_per_s(100.0) == 0  # the tenant lifted the limit of this endpoint
    assert endpoint(None).rate_per_s(100.0) == 100.0  # ENDPOINT_RATE_LIMIT_PER_S
    assert endpoint(2.5).rate_per_s(100.0) == 2.5

async def test_the_buckets_are_throttled_pys_own(services):
    """Tokens are taken with the library's script and key: a bucket drained through the library's own
    limiter is drained for us, and the other way round."""
    bucket = f"endpoint:{uuid.uuid4()}"
    ours = rate_limits(services.redis_url, burst_s=2.0)  # 1/s, a bucket of 2
    quota = rate_limiter.per_duration(timedelta(seconds=1), 1, 2)
    library = Throttled(using=RateLimiterType.GCRA.value, quota=quota,
                        store=store.RedisStore(server=services.redis_url))

    assert not (await library.limit(bucket)).limited
    assert await ours._try(bucket, 1.0) == 0.0  # the second token of two
    assert (await library.limit(bucket)).limited
    assert 0.5 < await ours._try(bucket, 1.0) <= 1.0  # the next token is a second after the first


async def test_looking_at_a_bucket_takes_no_token_and_tells_the_wait(services):
    # An endpoint test looks at every bucket it needs before taking any (web/endpoint_trial.py).
    bucket = f"endpoint:{uuid.uuid4()}"
    limits = rate_limits(services.redis_url, burst_s=1.0)  # 1/s, a bucket of one token

    assert await limits.wait_s(bucket, 1.0) == 0.0
    assert await limits.wait_s(bucket, 1.0) == 0.0  # looked at twice, still there
    assert await limits.try_take(bucket, 1.0)
    assert 0.5 < await limits.wait_s(bucket, 1.0) <= 1.0
    assert await limits.wait_s(bucket, 0) == 0.0  # unlimited

    deep = f"endpoint:{uuid.uuid4()}"
    deeper = rate_limits(services.redis_url, burst_s=2.0)  # 1/s, a bucket of two
    assert await deeper.try_take(deep, 1.0) and await deeper.wait_s(deep, 1.0) == 0.0
    assert await deeper.try_take(deep, 1.0)
    assert 0.5 < await deeper.wait_s(deep, 1.0) <= 1.0


async def test_a_rate_below_one_an_hour_is_one_an_hour(services):
    # 1e-5/s rounds to 0 per 3,600 s, which the library divides by.
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket = f"endpoint:{uuid.uuid4()}"

    assert await limits._try(bucket, 1e-5) == 0.0  # the bucket's one token
    assert 3590 < await limits._try(bucket, 1e-5) <= 3600


async def test_a_rate_raised_while_a_delivery_waits_for_its_token_reaches_it(services, monkeypatch):
    # One an hour, raised by PATCH to 100/s: the held deliveries used to wait out the hour, on the
    # old rate's schedule in Redis.
    from alerting_app.delivery import rate_limits as module

    monkeypatch.setattr(module, "RATE_RECHECK_S", 0.2)
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket, slow = f"endpoint:{uuid.uuid4()}", 1 / 3600
    assert await limits.take_in_turn(bucket, slow) == slow  # the bucket's one token
    answers = iter([None])  # the first read fails (None: unknown), the next sees the new rate

    async def rate_now() -> float | None:
        return next(answers, 100.0)

    async with asyncio.timeout(30):  # a guard: the old rate's next token is an hour away
        assert await limits.take_in_turn(bucket, slow, rate_now) == 100.0
        # A delivery taken up with the old rate, after that: the new one, without reading it again.
        assert await limits.take_in_turn(bucket, slow) == 100.0
    # One taken up with the rate as it is now is not overridden.
    assert await limits.take_in_turn(bucket, 50.0) == 50.0
    # Nor one whose endpoint was read after the new rate was: the tenant set the old rate back.
    with pytest.raises(TimeoutError):  # it waits for the old rate's next token, an hour away
        await asyncio.wait_for(limits.take_in_turn(bucket, slow, read_at=time.monotonic()), 1.0)


async def test_a_token_due_within_a_step_is_waited_for_without_reading_the_rate_again(services):
    # Reading the rate is for a token further off than RATE_RECHECK_S: one due sooner is simply
    # waited for, not a whole step (5 s) and a read of the endpoint.
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket = f"endpoint:{uuid.uuid4()}"
    await limits.take_in_turn(bucket, 1.0)  # the bucket's one token: the next in a second
    reads = []

    async def rate_now() -> float:
        reads.append(1.0)
        return 1.0

    async with asyncio.timeout(30):  # a guard against hanging only
        assert await limits.take_in_turn(bucket, 1.0, rate_now, read_at=time.monotonic()) == 1.0
    assert reads == []

async def test_a_delivery_that_waited_its_turn_reads_its_endpoint_before_it_waits_a_step(services, monkeypatch):
    # A slow endpoint's backlog queues for the bucket's turn, each delivery behind the one before it.
    # When the tenant disables or deletes the endpoint, each learns it from its read: before, each
    # waited a whole step (RATE_RECHECK_S) after taking the turn before reading, so a held backlog of
    # 1,000 took 1,000 steps, 83 minutes, to fail, holding its places in the worker all that time.
    from alerting_app.delivery import rate_limits as module

    class Gone(Exception):
        pass

    monkeypatch.setattr(module, "RATE_RECHECK_S", 600.0)
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket, slow = f"endpoint:{uuid.uuid4()}", 1 / 3600
    await limits.take_in_turn(bucket, slow)  # the bucket's one token

    async def gone() -> float | None:
        raise Gone()

    async with asyncio.timeout(30):  # a guard: a step is 600 s here
        with pytest.raises(Gone):
            # Its endpoint read more than a step ago (it waited for the turn that long).
            await limits.take_in_turn(bucket, slow, gone, read_at=time.monotonic() - 3600)
    # One read a moment ago waits its step first, as before: its read is news enough.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limits.take_in_turn(bucket, slow, gone, read_at=time.monotonic()), 1.0)


async def test_a_rate_read_is_kept_only_while_the_buckets_turn_is_held_or_awaited(services, monkeypatch):
    # Not one entry per endpoint ever rate-changed, for the worker's lifetime.
    from alerting_app.delivery import rate_limits as module

    monkeypatch.setattr(module, "RATE_RECHECK_S", 0.2)
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket, slow = f"endpoint:{uuid.uuid4()}", 1 / 3600
    await limits.take_in_turn(bucket, slow)  # the bucket's one token

    async def raised() -> float:
        return 100.0

    async with asyncio.timeout(30):
        async with limits.turn(bucket):
            later = limits.turn(bucket)  # another delivery, waiting for the turn
            assert await limits.take_in_turn(bucket, slow, raised) == 100.0
            assert bucket in limits._rates_read
        async with later:
            assert await limits.take_in_turn(bucket, slow) == 100.0  # read before: the new rate
    assert bucket not in limits._rates_read and bucket not in limits._turns


async def test_a_rate_changed_to_unlimited_while_waiting_lets_the_delivery_go(services, monkeypatch):
    from alerting_app.delivery import rate_limits as module

    monkeypatch.setattr(module, "RATE_RECHECK_S", 0.2)
    limits = rate_limits(services.redis_url, burst_s=1.0)
    bucket, slow = f"endpoint:{uuid.uuid4()}", 1 / 3600
    await limits.take_in_turn(bucket, slow)

    async def unlimited() -> float:
        return 0.0

    async with asyncio.timeout(30):
        assert await limits.take_in_turn(bucket, slow, unlimited) == 0.0


async def test_deployments_sharing_one_redis_share_no_bucket(services):
    # Staging and production on one Redis: each keeps its own all-email limit and endpoint buckets.
    from alerting_app.delivery.rate_limits import email_bucket, endpoint_bucket

    limits = rate_limits(services.redis_url, burst_s=1.0)
    staging, production = f"staging-{uuid.uuid4()}", f"production-{uuid.uuid4()}"
    assert await limits.try_take(email_bucket(staging), 1.0)
    assert not await limits.try_take(email_bucket(staging), 1.0)  # staging's one token is spent
    assert await limits.try_take(email_bucket(production), 1.0)
    endpoint_id = str(uuid.uuid4())
    assert await limits.try_take(endpoint_bucket(staging, endpoint_id), 1.0)
    assert await limits.try_take(endpoint_bucket(production, endpoint_id), 1.0)
