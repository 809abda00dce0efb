"""Deleting a client through a real worker: the request answers at once, and the worker's retention
deletes its history afterwards, then the client; killed midway, another worker finishes it."""
from __future__ import annotations

import asyncio
import secrets

import aiohttp
import asyncpg
import pytest

from postgres_waits import until_waiting_on_a_lock
from test_api_clients import history, insert_history

pytestmark = pytest.mark.e2e

# Retention's last statement of a client's deletion (agents/retention.py finish_client_deletion).
LAST_STATEMENT = "DELETE FROM clients%"


async def call(http: aiohttp.ClientSession, worker, method: str, path: str, token: str, json=None) -> tuple[int, dict]:
    async with http.request(method, f"{worker.url}{path}", json=json,
                            headers={"Authorization": f"Bearer {token}"}) as response:
        text = await response.text()
        return response.status, (await response.json(content_type=None) if text else None)


async def until_gone(conn: asyncpg.Connection, client_id: str, bound_s: float = 120.0) -> None:
    """Returns once the client's row is gone (a bound only: a broken deletion fails the test)."""
    async with asyncio.timeout(bound_s):
        while await conn.fetchval("SELECT count(*) FROM clients WHERE client_id = $1", client_id):
            await asyncio.sleep(0.2)


async def test_a_client_deletion_answers_at_once_and_a_worker_killed_midway_leaves_it_to_the_next(
        services, clean_db, start_worker):
    group = f"e2e-client-deletion-{secrets.token_hex(4)}"
    worker = start_worker(APP_ID=group)
    admin = services.admin_token
    conn = await asyncpg.connect(services.database_url)
    try:
        async with aiohttp.ClientSession() as http:
            status, created = await call(http, worker, "POST", "/api/v1/clients", admin, {"name": "Leaving"})
            assert status == 201, created
            client_id, key = created["client_id"], created["api_key"]
            await insert_history(conn, client_id, 50)
            held = await conn.fetchval("SELECT notification_id FROM notifications WHERE client_id = $1 LIMIT 1",
                                       client_id)

            # A notification held locked, as the pipeline holds one it settles: the deletion waits
            # for it only in the worker's retention, not in the request.
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM notifications WHERE notification_id = $1 FOR UPDATE", held)
                status, _ = await call(http, worker, "DELETE", f"/api/v1/clients/{client_id}", admin)
                assert status == 204
                assert (await call(http, worker, "GET", f"/api/v1/clients/{client_id}", key))[0] == 401
                assert (await call(http, worker, "GET", f"/api/v1/clients/{client_id}", admin))[0] == 404

                observer = await asyncpg.connect(services.database_url)
                try:
                    await until_waiting_on_a_lock(observer, query_like=LAST_STATEMENT, bound_s=120)
                    worker.child.process.kill()
                    worker.child.process.wait()
                    # Its session would otherwise carry on once the lock is free: Postgres notices a
                    # client gone only when it next writes to it.
                    await observer.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                           " WHERE datname = current_database() AND query LIKE $1", LAST_STATEMENT)
                finally:
                    await observer.close()

            assert await history(conn, client_id) == (1, 2, 2)  # its batches took all the rest
            restarted = start_worker(APP_ID=group)
            await until_gone(conn, client_id)
            assert await history(conn, client_id) == (0, 0, 0)
            assert (await call(http, restarted, "GET", f"/api/v1/clients/{client_id}", admin))[0] == 404
    finally:
        await conn.close()
