"""Asking a running worker what it holds: its rules, compared with Postgres."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg

from web.worker_state import rules_digest


async def enabled_rules_in_postgres(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT rule_id::text, version FROM rules WHERE enabled")
        return {row["rule_id"]: row["version"] for row in rows}
    finally:
        await conn.close()


async def wait_until_workers_hold_postgres_rules(http: aiohttp.ClientSession, admin_token: str, worker_urls,
                                                 database_url: str, timeout: float = 60.0) -> str:
    """Wait until every worker's enabled rules equal those in Postgres; return the common digest."""
    deadline = time.monotonic() + timeout
    while True:
        want = rules_digest(await enabled_rules_in_postgres(database_url))
        held = {}
        for url in worker_urls:
            async with http.get(url + "/api/v1/worker/rules",
                                headers={"Authorization": f"Bearer {admin_token}"}) as response:
                assert response.status == 200, await response.text()
                held[url] = (await response.json())["digest"]
        if all(digest == want for digest in held.values()):
            return want
        if time.monotonic() > deadline:
            raise AssertionError(f"workers diverge from Postgres ({want}): {held}")
        await asyncio.sleep(0.2)
