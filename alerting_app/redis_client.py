"""The Redis client, created on first use inside the running event loop (like `db.pool()`)."""
from __future__ import annotations

from redis.asyncio import Redis

from alerting_app.app import settings

# A Redis that stops answering (a paused VM, a failover that leaves the connection open) must fail
# the calls waiting on it, so that their deliveries are retried later, not hold them and the send
# slots they hold for ever while the sweep keeps their leases alive. A pipeline of a few hundred
# small commands answers in milliseconds. A query option of REDIS_URL (`?socket_timeout=10`)
# overrides these: redis-py lets the URL's options win.
REDIS_TIMEOUT_S = 5.0

_client: Redis | None = None


def client_for(url: str) -> Redis:
    # TCP keepalive is a TCP connection's: redis-py's Unix-socket connection refuses the argument,
    # and every command of a worker given REDIS_URL=unix://... failed with a TypeError.
    keepalive = {} if url.startswith("unix:") else {"socket_keepalive": True}
    return Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                          health_check_interval=30, **keepalive)


def redis() -> Redis:
    # redis.asyncio connects lazily, per command, so creating the client needs no await.
    global _client
    if _client is None:
        _client = client_for(settings.redis_url)
    return _client


async def close() -> None:
    global _client
    if _client is not None:
        await _client.aclose()
        _client = None
