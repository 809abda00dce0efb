"""The API's request rate limits, shared by every worker through Redis: a budget per token, and one
of failed authentications per client address.

One tenant's key in a runaway script must not take the Postgres pool every tenant's API calls
share. Each client key has a budget of its own: API_RATE_LIMIT_PER_S requests a second, in bursts
of up to API_RATE_BURST, reads and writes alike. Past it the answer is 429 `rate_limited` with
Retry-After. The operator's tokens (ADMIN_TOKEN, INGEST_TOKEN: alerts from the monitored systems)
are not limited (web/auth.py), and the probes and /metrics are not API views (web/operations.py).

The budget is the key's, not the client's it names: it is spent before the key is looked up
(web/auth.py), so requests past it cost Redis one call each and Postgres nothing. A token that is
none of ours spends a budget of its own, never a tenant's: 401 within it, 429 past it.

A flood of ever new made-up tokens spends a new budget each: each address has a budget of failed
authentications too, API_FAILED_AUTH_LIMIT_PER_S a second in bursts of up to API_FAILED_AUTH_BURST,
spent by each token looked up and found none of ours (401). While it is spent, every request from
that address with a token answers 429 before the token is looked up, a valid client key's too (telling
them apart is the lookup the limit saves), until it refills; the operator's tokens, valid, still pass.
The address is the connection's, or with API_TRUSTED_PROXIES=N the N-th from the right of
X-Forwarded-For (`client_address`).

The buckets are the delivery rate limits' (alerting_app/delivery/rate_limits.py): throttled-py's
GCRA, one atomic Lua call timed by Redis's clock, so every worker spends from the same bucket.

Redis not answering is no reason to refuse the API (fail open): the request goes on unchecked, with
a WARNING and alerting_api_requests_unchecked_total. This worker then asks Redis again only after
UNCHECKED_FOR_S: a Redis that is down costs the log one line per that, not one per request, and a
Redis that hangs holds the requests that asked it CHECK_TIMEOUT_S, then none for UNCHECKED_FOR_S.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
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
# An IPv6 client is its /64: a single host is commonly given a whole /64, and with an address
# of it per request a flood would spend a new budget each, as with a new token each.
IPV6_CLIENT_PREFIX = 64
# What of an entry that is no address (`unknown`, a proxy's obfuscated identifier) names its bucket.
_ADDRESS_TEXT_KEPT = 100
# The two limits: the client keys' request budgets, the addresses' failed authentications.
KEYS, ADDRESSES = "keys", "addresses"
# An address with the port it came from, as some proxies append it (Azure's Application Gateway:
# `203.0.113.7:50123`, `[2001:db8::1]:50123`), or an IPv6 one in brackets: the port is left out.
# Each new connection of a client comes from a new port: counted with it, it was a new budget each.
_WITH_PORT = re.compile(r"\[(?P<ipv6>[^]]*)\](?::\d+)?|(?P<ipv4>[\d.]+):\d+")


def caller_bucket(app_id: str, caller: str) -> str:
    # APP_ID first, as the delivery buckets: deployments sharing one Redis share no budget.
    return f"{app_id}:api-requests:{caller}"


def address_bucket(app_id: str, address: str) -> str:
    return f"{app_id}:api-failed-authentications:{address}"


def client_address(request) -> str:
    """The address `request` came from, as the failed authentications' budget is counted by.

    With API_TRUSTED_PROXIES=N, N proxies in front of the workers each append the address they were
    called from to X-Forwarded-For, and the client's is the N-th from the right (the connection's
    own is the nearest proxy's). The entries left of it were written by the client itself: read, they
    would let a client name a new address with each request. A chain shorter than that (the request did not
    come through every proxy) gives its farthest address. 0 ignores the header: the connection's.
    """
    chain = [entry.strip() for header in request.headers.getall("X-Forwarded-For", [])
             for entry in header.split(",") if entry.strip()]
    chain.append(request.remote or "")
    return _client_of(chain[-1 - settings.api_trusted_proxies] if len(chain) > settings.api_trusted_proxies
                      else chain[0])


def _client_of(address: str) -> str:
    if with_port := _WITH_PORT.fullmatch(address):
        address = with_port["ipv4"] if with_port["ipv6"] is None else with_port["ipv6"]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:_ADDRESS_TEXT_KEPT]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:  # ::ffff:192.0.2.1, on a dual-stack socket, is 192.0.2.1
            return str(parsed.ipv4_mapped)
        # From its number: ip_network kept a zone id (`2001:db8::%a/64`) where the address has
        # nothing past its /64, a budget of its own for each zone id written after it.
        return str(ipaddress.IPv6Network((int(parsed), IPV6_CLIENT_PREFIX), strict=False))
    return str(parsed)


class RequestLimit:
    def __init__(self) -> None:
        # The Redis client they were made for; one PipelinedRedis, so that a request's two checks
        # share one round trip, and per limit (KEYS, ADDRESSES) its burst in seconds and RateLimits.
        self._redis: tuple[Redis, PipelinedRedis] | None = None
        self._limits: dict[str, tuple[float, RateLimits]] = {}
        self.unchecked_until = 0.0  # time.monotonic()

    def _limits_for(self, limit: str, burst: int, rate_per_s: float) -> RateLimits:
        # Made again for a new Redis client (redis_client.close() drops the old one) or burst.
        redis = redis_client.redis()
        if self._redis is None or self._redis[0] is not redis:
            self._redis, self._limits = (redis, PipelinedRedis(redis)), {}
        burst_s = burst / rate_per_s  # the library's burst is in seconds
        made = self._limits.get(limit)
        if made is None or made[0] != burst_s:
            made = self._limits[limit] = (burst_s, RateLimits(self._redis[1], burst_s))
        return made[1]

    async def _take_or_wait_s(self, limit: str, bucket: str, burst: int, rate_per_s: float) -> float:
        if rate_per_s <= 0:  # unlimited (and no burst in seconds to make its RateLimits with)
            return 0.0
        return await self._limits_for(limit, burst, rate_per_s).take_or_wait_s(bucket, rate_per_s)

    async def _wait_s(self, limit: str, bucket: str, burst: int, rate_per_s: float) -> float:
        if rate_per_s <= 0:
            return 0.0
        return await self._limits_for(limit, burst, rate_per_s).wait_s(bucket, rate_per_s)

    def _redis_did_not_answer(self, exc: BaseException) -> None:
        if time.monotonic() >= self.unchecked_until:  # not told already by a request that asked with it
            log.warning("API rate limit: Redis did not answer (%s: %s); requests go on unchecked for %g s",
                        type(exc).__name__, exc or f"nothing within {CHECK_TIMEOUT_S:g} s", UNCHECKED_FOR_S)
        self.unchecked_until = time.monotonic() + UNCHECKED_FOR_S

    async def admit(self, address: str, caller: str) -> None:
        """Before `caller`'s key (it names the key's bucket) is looked up: raise RateLimited, saying
        when to try again, if `address` is past its failed authentications, or else if the key is
        past its budget; spend one request of the key's budget."""
        key_rate_per_s = settings.api_rate_limit_per_s
        failed_rate_per_s = settings.api_failed_auth_limit_per_s
        if key_rate_per_s <= 0 and failed_rate_per_s <= 0:
            return
        if time.monotonic() < self.unchecked_until:
            metrics.api_requests_unchecked.inc()
            return
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                # At once, in one pipeline. The address's is peeked, not spent: only a failed lookup
                # spends one. Each answer is awaited, so none is left failing unread.
                answers = await asyncio.gather(
                    self._wait_s(ADDRESSES, address_bucket(settings.app_id, address), settings.api_failed_auth_burst,
                                 failed_rate_per_s),
                    self._take_or_wait_s(KEYS, caller_bucket(settings.app_id, caller), settings.api_rate_burst,
                                         key_rate_per_s),
                    return_exceptions=True)
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
        except (RedisError, TimeoutError) as exc:
            metrics.api_requests_unchecked.inc()
            self._redis_did_not_answer(exc)
            return
        address_wait_s, key_wait_s = answers
        if address_wait_s:
            metrics.api_requests_limited_by_address.inc()
            retry_after_s = math.ceil(address_wait_s)
            raise RateLimited(retry_after_s, f"too many requests from this address failed to authenticate "
                                             f"(API_FAILED_AUTH_LIMIT_PER_S {failed_rate_per_s:g} a second, in "
                                             f"bursts of up to API_FAILED_AUTH_BURST "
                                             f"{settings.api_failed_auth_burst}); try again in {retry_after_s} s")
        if key_wait_s:
            metrics.api_requests_limited.inc()
            retry_after_s = math.ceil(key_wait_s)
            raise RateLimited(retry_after_s, f"this token made more requests than the API's rate limit "
                                             f"(API_RATE_LIMIT_PER_S {key_rate_per_s:g} a second, in bursts of up to "
                                             f"API_RATE_BURST {settings.api_rate_burst}); try again in "
                                             f"{retry_after_s} s")

    async def count_failed_authentication(self, address: str) -> None:
        """Spend one of `address`'s failed authentications: its token was looked up, none of ours."""
        metrics.api_failed_authentications.inc()
        if time.monotonic() < self.unchecked_until:
            return
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                # Taken if there is one: past the burst, concurrent failures that all passed `admit`
                # find none, and the next request is refused.
                await self._take_or_wait_s(ADDRESSES, address_bucket(settings.app_id, address),
                                           settings.api_failed_auth_burst, settings.api_failed_auth_limit_per_s)
        except (RedisError, TimeoutError) as exc:
            self._redis_did_not_answer(exc)


# One per worker: its Redis client, and when it asks Redis again after it did not answer.
request_limit = RequestLimit()
