"""An endpoint's rate limit holds across two worker processes, measured at the receiver.

Both workers deliver to the one endpoint: each may hold only two of its deliveries at a time
(DELIVERY_ENDPOINT_BACKLOG), so the rest wait in Postgres and both workers' sweeps take them. The
bucket in Redis is shared; two unshared buckets would let twice the rate through.
"""
from __future__ import annotations

import secrets

import aiohttp
import asyncpg
import pytest

from delivery_platform import (
    Tenant, produce_alerts, wait_for_rules, wait_until_backlog_consumed, wait_until_notified,
)
from delivery_receivers import Receiver
from kafka_probe import retire_rules_left_on_topic

pytestmark = pytest.mark.e2e

RATE_PER_S = 5.0
ALERTS = 30
WORKER_ENV = {"DELIVERY_ENDPOINT_BACKLOG": "2", "DELIVERY_SWEEP_INTERVAL_S": "0.1", "DELIVERY_LEASE_S": "5",
              # A bucket of one token: the rate shows from the first request on.
              "ENDPOINT_RATE_BURST_S": str(1 / RATE_PER_S)}


def most_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + window_s) for i, start in enumerate(times))


async def test_an_endpoints_rate_limit_holds_across_two_workers(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"rate-{secrets.token_hex(4)}"
    workers = [start_worker(APP_ID=group, **WORKER_ENV) for _ in range(2)]
    await wait_until_backlog_consumed(services, group)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        tenant = await Tenant(http, workers[0].url).create(services.admin_token, receiver.url(),
                                                           rate_limit_per_s=RATE_PER_S)
        await wait_for_rules(http, services, *workers)

        await produce_alerts(services.kafka_bootstrap_servers, [f"rated-{n}" for n in range(ALERTS)])
        await wait_until_notified(services.database_url, tenant.client_id, ALERTS)

        arrivals = [post.received_at for post in receiver.posts]
        assert len(receiver.accepted()) == len(arrivals) == ALERTS
        # One token at a time, RATE_PER_S a second: the last token comes 5.8 s after the first, and
        # a stretch of two seconds holds 10 of them. An arrival follows its token by the
        # worker's endpoint read, claim and round trip, which a loaded machine stretches unevenly:
        # with two cores kept busy the span was 5.83 s and the most in two seconds 11, against the
        # earlier bounds of 5.51 s and 12, which a first send a third of a second late, or a few
        # sends bunched by as much, would have failed. A bucket per worker (twice the rate) gave
        # spans of 2.8-2.9 s and 21-22 in two seconds; the bounds leave 0.9 s for a late first
        # arrival, and three arrivals (some 0.6 s of bunching) over the window's ten.
        assert max(arrivals) - min(arrivals) >= (ALERTS - 1) / RATE_PER_S * 0.85, sorted(arrivals)
        assert most_in_any_window(arrivals, 2.0) <= 2 * RATE_PER_S + 3, sorted(arrivals)
        conn = await asyncpg.connect(services.database_url)
        try:
            senders = await conn.fetchval("SELECT count(DISTINCT leased_by) FROM deliveries"
                                          " WHERE endpoint_id = $1 AND status = 'SENT'", tenant.endpoint_id)
        finally:
            await conn.close()
        assert senders == 2
