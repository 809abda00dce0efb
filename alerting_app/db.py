"""The Postgres connection pools, created on first use inside the running event loop (the agents'
and the API's), and the retry of a stage's batch after a transient Postgres error."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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


@asynccontextmanager
async def connection_of(conn: asyncpg.Connection | asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """`conn` itself, or a connection of the pool `conn` for the block: for what needs one
    connection (a transaction) but may be given either."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as acquired:
            yield acquired
    else:
        yield conn


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
_api_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()
# Its own: the agents' pool may be connecting, with asyncpg's 60 s connect timeout, under _lock.
_api_lock = asyncio.Lock()


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


class _ApiPool(asyncpg.Pool):
    """A pool whose acquire() waits at most API_DATABASE_TIMEOUT_S for a connection unless told
    otherwise, also when called by its own fetch/fetchrow/fetchval, which take no acquire timeout.

    Without it, a burst of requests while Postgres does not answer queues for connections behind
    the stuck ones, the last answered many timeouts later. asyncpg also gives a connection's
    release the timeout of its acquire: the cancel of a statement that timed out, then the reset,
    are waited for at most that long, after which asyncpg terminates the connection, so a stuck
    connection is never handed to the next request.
    """

    def acquire(self, *, timeout: float | None = None):  # type: ignore[override]
        return super().acquire(timeout=settings.api_database_timeout_s if timeout is None else timeout)


async def api_pool() -> asyncpg.Pool:
    """The web views' pool: each statement, and each wait for a connection, is bounded by
    API_DATABASE_TIMEOUT_S, so a request to a Postgres that accepts connections but does not
    answer (a frozen server, a network dropping packets) fails with TimeoutError, which the API
    answers 503 database_unavailable (alerting_app/http_errors.py), instead of waiting until TCP
    gives up, many minutes later. A statement that times out is cancelled, and the cancel waited for
    as long again before the connection is closed: the request answers within about twice the
    setting.

    Not the agents' pool: their batches are retried on transient errors (retry_transient), and a
    timeout there would retry a batch that is slow, not stuck, for ever. None open until the first
    request, so a worker that serves no API calls holds no more connections than before.
    """
    global _api_pool
    if _api_pool is None:
        async with _api_lock:
            if _api_pool is None:
                timeout = settings.api_database_timeout_s
                # create_pool has no pool class to pass; these are its own defaults.
                pool = _ApiPool(settings.database_url, min_size=0, max_size=10, max_queries=50_000,
                                max_inactive_connection_lifetime=300.0, init=init_connection, loop=None,
                                connection_class=asyncpg.Connection, record_class=asyncpg.Record,
                                command_timeout=timeout, timeout=timeout)
                _api_pool = await pool
    return _api_pool


async def close() -> None:
    global _pool, _api_pool
    for pool in (_pool, _api_pool):
        if pool is not None:
            await pool.close()
    _pool = _api_pool = None


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
