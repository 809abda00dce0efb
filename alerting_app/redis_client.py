"""The Redis client, created on first use inside the running event loop (like `db.pool()`)."""
from __future__ import annotations

from redis.asyncio import Redis

from alerting_app.app import settings

_client: Redis | None = None


def redis() -> Redis:
    # redis.asyncio connects lazily, per command, so creating the client needs no await.
    global _client
    if _client is None:
        _client = Redis.from_url(settings.redis_url)
    return _client


async def close() -> None:
    global _client
    if _client is not None:
        await _client.aclose()
        _client = None
