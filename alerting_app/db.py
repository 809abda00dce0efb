"""The Postgres connection pool, created on first use inside the running event loop."""
from __future__ import annotations

import asyncio
import json

import asyncpg

from alerting_app.app import settings

_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def pool() -> asyncpg.Pool:
    global _pool
    if _pool is None:
        async with _lock:
            if _pool is None:
                _pool = await asyncpg.create_pool(
                    settings.database_url, min_size=1, max_size=10, init=init_connection
                )
    return _pool


async def close() -> None:
    global _pool
    if _pool is not None:
        await _pool.close()
        _pool = None
