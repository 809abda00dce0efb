"""Every worker holds every silence, with two worker processes: created, expired, deleted, after a restart.

Whichever worker gets an alert must know the tenant's silences, so silences are replicated like
rules. Real workers in one consumer group, the real broker and Postgres; after each step every
worker is asked what it holds.
"""
from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from test_silences_support import (held_silences, retire_silences_left_on_topic,
                                   wait_until_workers_hold_postgres_silences)
from web.worker_state import rules_digest

pytestmark = pytest.mark.e2e


async def call(http: aiohttp.ClientSession, base_url: str, method: str, path: str, token: str, body=None):
    async with http.request(method, base_url + path, json=body,
                            headers={"Authorization": f"Bearer {token}"}) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else None)


def silence_body(**fields) -> dict:
    ends_at = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    return {"source": "payments", "ends_at": ends_at, "comment": "incident 42", "created_by": "oncall", **fields}


async def test_every_worker_holds_every_silence_through_changes_and_restarts(services, clean_db, start_worker):
    await retire_silences_left_on_topic(services.kafka_bootstrap_servers)
    admin = services.admin_token
    group = f"silences-everywhere-{secrets.token_hex(4)}"
    first, second = start_worker(APP_ID=group), start_worker(APP_ID=group)
    async with aiohttp.ClientSession() as http:
        async def wait_until_held(*workers) -> str:
            return await wait_until_workers_hold_postgres_silences(http, admin, [w.url for w in workers],
                                                                   services.database_url)

        status, client = await call(http, first.url, "POST", "/api/v1/clients", admin, {"name": "Muted"})
        assert status == 201, client
        key = client["api_key"]
        later = (datetime.now(timezone.utc) + timedelta(minutes=30)).isoformat()
        silences = []
        for fields in ({}, {"severity": "HIGH", "name": "Latency"}, {"source": "*", "context_matchers": {"az": "*"}},
                       {"starts_at": later}):
            status, silence = await call(http, first.url, "POST", "/api/v1/silences", key, silence_body(**fields))
            assert status == 201, silence
            silences.append(silence)

        created = await wait_until_held(first, second)
        assert created != rules_digest({})

        # Expired through the other worker's API: the new version reaches both.
        expired = silences[0]["silence_id"]
        status, _ = await call(http, second.url, "DELETE", f"/api/v1/silences/{expired}", key)
        assert status == 204
        await wait_until_held(first, second)
        for worker in (first, second):
            assert (await held_silences(http, admin, worker.url))["versions"][expired] == 2

        # A worker started now reads every silence from the topic's beginning.
        first.stop()
        third = start_worker(APP_ID=group)
        held = await wait_until_held(second, third)
        assert (await held_silences(http, admin, third.url))["silences"] == len(silences)

        # Deleting the client deletes its silences, on every worker too.
        status, _ = await call(http, second.url, "DELETE", f"/api/v1/clients/{client['client_id']}", admin)
        assert status == 204
        assert await wait_until_held(second, third) == rules_digest({}) != held
