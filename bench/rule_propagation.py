"""A rule change visible on every worker: from the API's commit to both workers holding the new version.

    .venv/bin/python bench/rule_propagation.py [--changes 20] [--clients 100] [--rules-per-client 288]

Two `alerting-app worker` processes (all roles) hold the seeded rules. Each change is a PATCH of a
rule's name through one worker's API (alternating), with the admin token. The clock starts when
the API has answered (the transaction committed; the outbox relay of that worker is woken) and
stops when GET /api/v1/worker/rules of *both* workers shows the rule at its new version. Both
workers are polled concurrently and continuously, so the resolution is one such GET (printed).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp
import asyncpg

from stack import ADMIN_TOKEN, BenchStack, machine_summary, wait_until_worker_holds
from figures import percentile

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def first_time_holding(http: aiohttp.ClientSession, url: str, rule_id: str, version: int,
                             get_seconds: list[float], timeout: float = 30.0) -> float:
    """time.monotonic() of the first GET /api/v1/worker/rules answer showing `rule_id` at `version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.monotonic()
        async with http.get(url + "/api/v1/worker/rules", headers=HEADERS) as response:
            held = (await response.json())["versions"].get(rule_id)
        answered = time.monotonic()
        get_seconds.append(answered - asked)
        if held == version:
            return answered
    raise TimeoutError(f"{url} does not show {rule_id} at version {version} after {timeout:.0f}s")


async def measure(stack: BenchStack, workers, changes: int) -> tuple[list[float], list[float]]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch("SELECT rule_id::text, version FROM rules WHERE enabled")
    finally:
        await conn.close()
    chosen = random.Random(1).sample(list(rows), changes)
    delays, get_seconds = [], []
    async with aiohttp.ClientSession() as http:
        for n, row in enumerate(chosen):
            api = workers[n % len(workers)].url
            async with http.patch(f"{api}/api/v1/rules/{row['rule_id']}", headers=HEADERS,
                                  json={"version": row["version"], "name": f"renamed-{n}-{row['rule_id'][:8]}"}
                                  ) as response:
                assert response.status == 200, await response.text()
                new_version = (await response.json())["version"]
            committed = time.monotonic()
            seen = await asyncio.gather(*(first_time_holding(http, w.url, row["rule_id"], new_version, get_seconds)
                                          for w in workers))
            delays.append(max(seen) - committed)
            await asyncio.sleep(0.2)
    return delays, get_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rules-per-client", type=int, default=288)
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    rules = args.clients * args.rules_per_client
    if min(args.clients, args.rules_per_client, args.changes) < 1:
        parser.error("every number must be at least 1")
    if args.changes > rules:
        parser.error(f"--changes ({args.changes}) exceeds the {rules} rules seeded")
    print(f"machine: {machine_summary()}")
    with BenchStack("rule-propagation") as stack:
        stack.seed(args.clients, args.rules_per_client)
        workers = [stack.start_worker(f"worker-{n}", group="workers") for n in range(2)]
        stack.wait_until_outbox_empty()
        for worker in workers:
            wait_until_worker_holds(worker, rules)
        delays, get_seconds = asyncio.run(measure(stack, workers, args.changes))
        print(f"rule change visible on both workers ({rules:,} rules, {args.changes} changes): "
              f"p50 {percentile(delays, 0.5) * 1000:,.0f} ms, max {max(delays) * 1000:,.0f} ms "
              f"(one GET /api/v1/worker/rules took p50 {percentile(get_seconds, 0.5) * 1000:,.0f} ms)")


if __name__ == "__main__":
    main()
