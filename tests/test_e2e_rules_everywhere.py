"""Every worker holds every rule, through rule changes and rebalances, with several worker processes.

Alerts are partitioned by alert_id, so whichever worker gets an alert must know every tenant's
rules. This runs real workers in one consumer group against the real broker and Postgres, changes
rules through the API, stops and starts workers (each stop and start is a rebalance), and after
each step asks every worker what it holds and how it matches.
"""
from __future__ import annotations

import json
import secrets
import time

import aiohttp
import pytest

from kafka_probe import retire_rules_left_on_topic
from web.worker_state import rules_digest
from worker_probe import wait_until_workers_hold_postgres_rules

pytestmark = pytest.mark.e2e

SOURCES = ["payments", "search", "auth", "billing"]
NAMES = ["Latency", "Errors", "Saturation"]


class Api:
    def __init__(self, http: aiohttp.ClientSession, token: str) -> None:
        self.http = http
        self.token = token

    async def call(self, base_url: str, method: str, path: str, body=None, token: str | None = None):
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with self.http.request(method, base_url + path, json=body, headers=headers) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)


async def wait_until_workers_hold(api: Api, workers, database_url: str) -> str:
    return await wait_until_workers_hold_postgres_rules(api.http, api.token, [w.url for w in workers], database_url)


async def change_rules(api: Api, base_url: str, key: str, rules: list[dict], rng_seed: int) -> None:
    """Create new rules, then update, disable and delete some of the existing ones."""
    for n in range(12):
        status, rule = await api.call(base_url, "POST", "/api/v1/rules", {
            "severity": ["LOW", "HIGH", "CRITICAL", "*"][n % 4],
            "source": SOURCES[(n + rng_seed) % len(SOURCES)],
            "name": f"{NAMES[n % len(NAMES)]}-{rng_seed}-{n}",
        }, token=key)
        assert status == 201, rule
        rules.append(rule)
    for index, rule in enumerate(list(rules)):
        if index % 5 == 0:
            status, _ = await api.call(base_url, "DELETE", f"/api/v1/rules/{rule['rule_id']}", token=key)
            assert status == 204
            rules.remove(rule)
        elif index % 3 == 0:
            status, updated = await api.call(base_url, "PATCH", f"/api/v1/rules/{rule['rule_id']}",
                                             {"enabled": not rule["enabled"], "version": rule["version"]},
                                             token=key)
            assert status == 200, updated
            rules[rules.index(rule)] = updated


async def matches_on(api: Api, worker, alerts: list[dict]) -> list[dict]:
    results = []
    for alert in alerts:
        status, body = await api.call(worker.url, "POST", "/api/v1/worker/match", alert)
        assert status == 200, body
        results.append(body["matches"])
    return results


def probe_alerts() -> list[dict]:
    return [
        {"alert_id": f"probe-{s}-{n}-{sev}", "event_ts": time.time(), "severity": sev, "source": s,
         "name": f"{NAMES[n % len(NAMES)]}-{r}-{n}"}
        for s in SOURCES for n in range(0, 12, 3) for sev in ("LOW", "HIGH", "CRITICAL") for r in (0, 1, 2)
    ]


async def test_every_worker_holds_every_rule_through_changes_and_rebalances(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"rules-everywhere-{secrets.token_hex(4)}"
    first, second = start_worker(APP_ID=group), start_worker(APP_ID=group)
    async with aiohttp.ClientSession() as http:
        api = Api(http, services.admin_token)
        status, client = await api.call(first.url, "POST", "/api/v1/clients", {"name": "Everywhere"})
        assert status == 201
        key = client["api_key"]
        rules: list[dict] = []

        await change_rules(api, first.url, key, rules, rng_seed=0)
        digest = await wait_until_workers_hold(api, [first, second], services.database_url)
        assert digest != rules_digest({})

        running = [first, second]
        for round_number in (1, 2):
            # Stop one worker and start another in the same group: two rebalances per round.
            stopped = running.pop(0)
            stopped.stop()
            await change_rules(api, running[0].url, key, rules, rng_seed=round_number)
            running.append(start_worker(APP_ID=group))
            await change_rules(api, running[-1].url, key, rules, rng_seed=round_number + 10)
            await wait_until_workers_hold(api, running, services.database_url)

        alerts = probe_alerts()
        on_one, on_other = await matches_on(api, running[0], alerts), await matches_on(api, running[1], alerts)
        assert on_one == on_other
        assert any(result for result in on_one), "the probe alerts should match some rules"
