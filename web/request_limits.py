"""The API's request rate limit: a budget per token, shared by every worker through Redis.

One tenant's key in a runaway script must not take the Postgres pool every tenant's API calls
share. Each client key has a budget of its own: API_RATE_LIMIT_PER_S requests a second, in bursts
of up to API_RATE_BURST, reads and writes alike. Past it the answer is 429 `rate_limited` with
Retry-After. The operator's tokens (ADMIN_TOKEN, INGEST_TOKEN: alerts from the monitored systems)
are not limited (web/auth.py), and the probes and /metrics are not API views (web/operations.py).

The budget is the key's, not the client's it names: it is spent before the key is looked up
(web/auth.py), so requests past it cost Redis one call each and Postgres nothing. A token that is
none of ours spends a budget of its own, never a tenant's: 401 within it, 429 past it.

The buckets are the delivery rate limits' (alerting_app/delivery/rate_limits.py): throttled-py's
GCRA, one atomic Lua call timed by Redis's clock, so every worker spends from the same bucket.

Redis not answering is no reason to refuse the API (fail open): the request goes on unchecked, with
a WARNING and alerting_api_requests_unchecked_total. This worker then asks Redis again only after
UNCHECKED_FOR_S: a Redis that is down costs the log one line per that, not one per request, and a
Redis that hangs holds the requests that asked it CHECK_TIMEOUT_S, then none for UNCHECKED_FOR_S.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from alerting_app import metrics, redis_client
from alerting_app.app import settings
from alerting_app.delivery.rate_limits import RateLimits
from alerting_app.redis_pipelining import PipelinedRedis
from web.errors import RateLimited

log = logging.getLogger(__name__)

# Redis answers a token in a millisecond; one that takes this long is taken for away.
CHECK_TIMEOUT_S = 1.0
UNCHECKED_FOR_S = 10.0


def caller_bucket(app_id: str, caller: str) -> str:
    # APP_ID first, as the delivery buckets: deployments sharing one Redis share no budget.
    return f"{app_id}:api-requests:{caller}"


class RequestLimit:
    def __init__(self) -> None:
        self._limits: tuple[Redis, float, RateLimits] | None = None
        self.unchecked_until = 0.0  # time.monotonic()

    def _limits_for(self, burst_s: float) -> RateLimits:
        # Made again for a new Redis client (redis_client.close() drops the old one) or burst.
        redis = redis_client.redis()
        if self._limits is None or self._limits[0] is not redis or self._limits[1] != burst_s:
            self._limits = (redis, burst_s, RateLimits(PipelinedRedis(redis), burst_s))
        return self._limits[2]

    async def spend(self, caller: str) -> None:
        """Spend one request of `caller`'s budget (it names the key's bucket), or raise RateLimited
        saying when it has one again."""
        rate_per_s = settings.api_rate_limit_per_s
        if rate_per_s <= 0:
            return
        if time.monotonic() < self.unchecked_until:
            metrics.api_requests_unchecked.inc()
            return
        limits = self._limits_for(settings.api_rate_burst / rate_per_s)  # the library's burst is in seconds
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                wait_s = await limits.take_or_wait_s(caller_bucket(settings.app_id, caller), rate_per_s)
        except (RedisError, TimeoutError) as exc:
            metrics.api_requests_unchecked.inc()
            if time.monotonic() >= self.unchecked_until:  # not told already by a request that asked with it
                log.warning("API rate limit: Redis did not answer (%s: %s); requests go on unchecked for %g s",
                            type(exc).__name__, exc or f"nothing within {CHECK_TIMEOUT_S:g} s", UNCHECKED_FOR_S)
            self.unchecked_until = time.monotonic() + UNCHECKED_FOR_S
            return
        if wait_s:
            metrics.api_requests_limited.inc()
            retry_after_s = math.ceil(wait_s)
            raise RateLimited(retry_after_s, f"this token made more requests than the API's rate limit "
                                             f"(API_RATE_LIMIT_PER_S {rate_per_s:g} a second, in bursts of up to "
                                             f"API_RATE_BURST {settings.api_rate_burst}); try again in "
                                             f"{retry_after_s} s")


# One per worker: its Redis client, and when it asks Redis again after it did not answer.
request_limit = RequestLimit()
