"""retry_transient: a stage's batch is run again after a transient Postgres error (here a real
deadlock, and a refused connection), and not after any other error."""
from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from alerting_app import db
from alerting_app.embedded import free_port
from postgres_waits import until_waiting_on_a_lock


@pytest.fixture
async def own_pool(clean_db):
    """A pool of this test's event loop (the worker's global pool belongs to another loop)."""
    test_pool = await asyncpg.create_pool(clean_db, min_size=1, max_size=2)

    async def get_pool() -> asyncpg.Pool:
        return test_pool

    yield get_pool
    await test_pool.close()


@pytest.fixture
async def table(clean_db):
    conn = await asyncpg.connect(clean_db)
    name = f"retry_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
    await conn.execute(f"INSERT INTO {name} (id) VALUES (1), (2)")
    try:
        yield name
    finally:
        await conn.execute(f"DROP TABLE {name}")
        await conn.close()


async def test_the_victim_of_a_real_deadlock_is_run_again_and_succeeds(clean_db, table, own_pool):
    other = await asyncpg.connect(clean_db)
    # The other transaction outwaits ours, so Postgres picks ours as the deadlock's victim.
    await other.execute("SET deadlock_timeout = '30s'")
    calls = []

    async def update_both(_pool) -> str:
        calls.append(len(calls) + 1)
        conn = await asyncpg.connect(clean_db)
        try:
            await conn.execute("SET deadlock_timeout = '50ms'")
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
                if len(calls) == 1:
                    # Row 2 is the other's, which then waits for our row 1: a deadlock.
                    await other_holds_row_2.wait()
                    other_wants_row_1.set()
                    await other_waits_on_a_lock()  # the other's wait begins before ours
                await conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 2")
            return "done"
        finally:
            await conn.close()

    other_holds_row_2, other_wants_row_1 = asyncio.Event(), asyncio.Event()

    async def other_waits_on_a_lock() -> None:
        observer = await asyncpg.connect(clean_db)  # the other two are each inside a statement meanwhile
        try:
            await until_waiting_on_a_lock(observer, pid=other.get_server_pid())
        finally:
            await observer.close()

    async def other_transaction() -> None:
        async with other.transaction():
            await other.execute(f"UPDATE {table} SET n = n + 10 WHERE id = 2")
            other_holds_row_2.set()
            await other_wants_row_1.wait()
            await other.execute(f"UPDATE {table} SET n = n + 10 WHERE id = 1")

    try:
        result, _ = await asyncio.gather(
            db.retry_transient(update_both, "a test batch", get_pool=own_pool, initial_wait_s=0.05),
            other_transaction())
        assert result == "done" and calls == [1, 2]
        # The victim's first attempt was rolled back: each transaction counted once.
        assert dict(await other.fetch(f"SELECT id, n FROM {table}")) == {1: 11, 2: 11}
    finally:
        await other.close()


async def test_a_refused_connection_is_tried_again(clean_db, own_pool):
    closed_port = free_port()
    attempts = []

    async def connect(_pool) -> int:
        attempts.append(1)
        # The first two attempts find nothing listening; the third reaches Postgres.
        url = clean_db if len(attempts) == 3 else f"postgresql://postgres@127.0.0.1:{closed_port}/x"
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return await conn.fetchval("SELECT 42")
        finally:
            await conn.close()

    assert await db.retry_transient(connect, "a test batch", get_pool=own_pool, initial_wait_s=0.01) == 42
    assert len(attempts) == 3


async def test_any_other_error_is_raised_at_once(clean_db, table, own_pool):
    attempts = []

    async def insert_twice(_pool) -> None:
        attempts.append(1)
        conn = await asyncpg.connect(clean_db)
        try:
            await conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
        finally:
            await conn.close()

    with pytest.raises(asyncpg.UniqueViolationError):
        await db.retry_transient(insert_twice, "a test batch", get_pool=own_pool, initial_wait_s=0.01)
    assert len(attempts) == 1


async def test_asyncpgs_report_of_a_connection_dropped_mid_statement_is_transient(own_pool):
    # What a worker's aggregate agent raised when its Postgres was stopped under it (asyncpg issue 784):
    # the pool's reset of the broken connection, as it was released.
    dropped = asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    calls = []

    async def batch(pool) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise dropped
        return await pool.fetchval("SELECT 1")

    assert await db.retry_transient(batch, "a test batch", get_pool=own_pool, initial_wait_s=0.01) == 1
    assert len(calls) == 2


async def test_a_transaction_on_a_terminated_session_is_tried_again_on_a_new_one(own_pool):
    # Ending the transaction raises InterfaceError "... the underlying connection is closed" (the
    # outbox relay's session lost while it waited for the broker, tests/test_outbox_ordering.py).
    calls = []

    async def batch(pool) -> int:
        calls.append(1)
        async with pool.acquire() as conn, conn.transaction():
            if len(calls) == 1:
                await pool.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            return await conn.fetchval("SELECT 1")

    assert await db.retry_transient(batch, "a test batch", get_pool=own_pool, initial_wait_s=0.01) == 1
    assert len(calls) == 2


async def test_any_other_internal_client_error_is_a_bug_and_propagates(own_pool):
    calls = []

    async def batch(pool) -> None:
        calls.append(1)
        raise asyncpg.InternalClientError("unexpected codec state")

    with pytest.raises(asyncpg.InternalClientError):
        await db.retry_transient(batch, "a test batch", get_pool=own_pool, initial_wait_s=0.01)
    assert len(calls) == 1


async def test_a_session_ended_by_another_backends_crash_is_transient(own_pool):
    # 57P02: what a server may send to every session while it restarts after one of its processes
    # crashed (an out-of-memory kill, say); the same batch works once it is back.
    crashed = asyncpg.CrashShutdownError("terminating connection because of crash of another server process")
    calls = []

    async def batch(pool) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise crashed
        return await pool.fetchval("SELECT 1")

    assert await db.retry_transient(batch, "a test batch", get_pool=own_pool, initial_wait_s=0.01) == 1
    assert len(calls) == 2
