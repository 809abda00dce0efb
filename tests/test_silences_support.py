"""Silences for the multi-worker tests: make the topic agree with Postgres, and ask each worker what it holds.

This module holds no tests; test_silences_everywhere.py and test_e2e_silences.py import its helpers.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
import asyncpg

from kafka_probe import produce, read_topic
from web.worker_state import rules_digest


async def retire_silences_left_on_topic(bootstrap: str, topic: str = "silence.changed") -> int:
    """Publish a delete for every silence still alive on `topic`; return how many.

    Like kafka_probe.retire_rules_left_on_topic: clean_db empties Postgres between tests but the
    topic keeps earlier tests' silences, which every worker would hold.
    """
    from alerting_app.contracts import SilenceChanged

    newest: dict[str, SilenceChanged] = {}
    for _, value in await read_topic(bootstrap, topic):
        try:
            change = SilenceChanged.model_validate_json(value)
        except ValueError:
            continue
        if change.silence_id not in newest or change.version > newest[change.silence_id].version:
            newest[change.silence_id] = change
    deletes = [SilenceChanged(silence_id=c.silence_id, client_id=c.client_id, version=c.version + 1,
                              action="delete")
               for c in newest.values() if c.action == "upsert"]
    await produce(bootstrap, topic, [(d.silence_id.encode(), d.encode()) for d in deletes])
    return len(deletes)


async def silences_in_postgres(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        return {row["silence_id"]: row["version"]
                for row in await conn.fetch("SELECT silence_id::text, version FROM silences")}
    finally:
        await conn.close()


async def held_silences(http: aiohttp.ClientSession, admin_token: str, worker_url: str) -> dict:
    async with http.get(worker_url + "/api/v1/worker/silences",
                        headers={"Authorization": f"Bearer {admin_token}"}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def wait_until_workers_hold_postgres_silences(http: aiohttp.ClientSession, admin_token: str, worker_urls,
                                                    database_url: str, timeout: float = 60.0) -> str:
    """Wait until every worker holds exactly the silences (and versions) in Postgres; return the digest."""
    deadline = time.monotonic() + timeout
    while True:
        want = rules_digest(await silences_in_postgres(database_url))
        held = {url: (await held_silences(http, admin_token, url))["digest"] for url in worker_urls}
        if all(digest == want for digest in held.values()):
            return want
        if time.monotonic() > deadline:
            raise AssertionError(f"workers' silences diverge from Postgres ({want}): {held}")
        await asyncio.sleep(0.2)
