"""The Postgres connection pool, created on first use inside the running event loop, and the
retry of a stage's batch after a transient Postgres error."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_exponential_jitter

from alerting_app.app import settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the same statements may well succeed: Postgres rolled the transaction back
# (deadlock, serialization failure), the connection was lost or refused, the server is restarting
# or out of connection slots. OSError covers refused connections and timeouts.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.TransactionRollbackError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    # 57P02, which a server may send to every session when another of its processes crashed (an
    # out-of-memory kill, say) and it restarts; one that just closes them raises a PostgresConnectionError.
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    OSError,
)


# What Postgres (or asyncpg, encoding it) refuses in data that was accepted: a NUL in a text or JSON
# string, say. The contracts should refuse it first; this backstop keeps one such message (or
# group) from crashing an agent on every redelivery and so blocking its partition for ever.
REFUSED_BY_POSTGRES: tuple[type[Exception], ...] = (asyncpg.DataError, ValueError)


def is_transient(exc: BaseException) -> bool:
    """One of TRANSIENT_ERRORS, or asyncpg's report of a connection that Postgres dropped mid-statement.

    When Postgres goes away in the middle of a statement, asyncpg may report it not as a connection
    error but as InternalClientError "cannot switch to state N; another operation (M) is in
    progress", raised by the pool resetting the broken connection as it is released (asyncpg issue
    784, open); the pool then terminates that connection, so the next attempt gets a fresh one.
    Seen here when a worker's Postgres was stopped under it: the aggregate agent crashed, and the
    worker stopped itself, where waiting for Postgres was right. Other InternalClientErrors are bugs
    and propagate. Ending a transaction on such a connection raises InterfaceError "... the
    underlying connection is closed" in its place: transient too (seen when the session was
    terminated during a transaction, tests/test_outbox_ordering.py).
    """
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True
    return isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc)

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


async def retry_transient(operation: Callable[[asyncpg.Pool], Awaitable[T]], what: str, *,
                          get_pool: Callable[[], Awaitable[asyncpg.Pool]] = pool,
                          initial_wait_s: float = 0.1, max_wait_s: float = 5.0) -> T:
    """`operation(pool)`, awaited again after each transient Postgres error until it succeeds (the
    pool's creation included: Postgres may be away when a worker starts). `get_pool` is the
    worker's pool unless a test passes its own.

    Why: an agent whose batch raises is restarted by Faust, but the events of that batch are never
    acknowledged, so the partition's committed offset stays there until the worker restarts (seen:
    the aggregate agent after a deadlock). Every stage's batch step is idempotent, because a
    redelivered message must be handled anyway, so running it again is safe; while Postgres is
    away the stage waits, and nothing is lost. Other errors propagate at once.
    """
    def log_retry(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (attempt %d, %s: %s); trying again in %.2fs", what, state.attempt_number,
                    type(failure).__name__, failure, state.upcoming_sleep)

    async for attempt in AsyncRetrying(retry=retry_if_exception(is_transient),
                                       wait=wait_exponential_jitter(initial=initial_wait_s, max=max_wait_s,
                                                                    jitter=initial_wait_s),
                                       before_sleep=log_retry, reraise=True):
        with attempt:
            return await operation(await get_pool())
    raise AssertionError("unreachable: tenacity retries until the operation returns or raises")
