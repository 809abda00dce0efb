"""Waiting, in a test, until PostgreSQL shows a statement waiting on a lock: how a test that holds a
lock knows the statement it races has reached it, without guessing a sleep. This module holds no tests."""
from __future__ import annotations

import asyncio

import asyncpg

# The current database's sessions waiting on a lock, narrowed by whichever of the statement's text
# (a LIKE pattern), the session's pid or its application_name is given.
_WAITING_ON_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    " AND ($1::text IS NULL OR query LIKE $1) AND ($2::int IS NULL OR pid = $2)"
    " AND ($3::text[] IS NULL OR application_name = ANY($3))")


async def until_waiting_on_a_lock(observer: asyncpg.Pool | asyncpg.Connection, *,
                                  query_like: str | None = None, pid: int | None = None,
                                  application_names: list[str] | None = None, sessions: int = 1,
                                  unless_done: asyncio.Future | None = None, bound_s: float = 30.0) -> None:
    """Returns once `sessions` sessions (of those the filters name) wait on a lock.

    `observer` asks: a pool, or a connection that is not running a statement of its own.
    `unless_done` is the task running the statement: done first, it went past the lock (or failed
    elsewhere), and the test fails with its result. `bound_s` is a bound only, so that a broken
    test fails instead of hanging the run."""
    async with asyncio.timeout(bound_s):
        while await observer.fetchval(_WAITING_ON_A_LOCK, query_like, pid, application_names) < sessions:
            if unless_done is not None and unless_done.done():
                raise AssertionError(f"done before it waited on a lock: {unless_done.result()!r}")
            await asyncio.sleep(0.01)
