"""A worker killed (SIGKILL) in the middle of a burst, then restarted: every notification reaches
the receiver, and none twice.

The kill is placed where it hurts most: the receiver has accepted part of the burst, and the
worker has not recorded any of it in Postgres yet (its batches are held back for minutes), so
only the Redis marks know what was sent. The receiver turns the rest away (503) while the worker
retries, until the dead worker's last requests are answered too; a turned-away POST is not a
delivery. Nothing is then ambiguous at the kill, and the test can ask for exactly one accepted POST
per Idempotency-Key. (A request in flight at the kill that the receiver accepts is the one case no
sender can settle; docs/delivery.md says how the Idempotency-Key covers it.)
"""
from __future__ import annotations

import asyncio
import secrets
import aiohttp
import pytest
from redis.asyncio import Redis

from alerting_app.delivery.claims import SENT_MARK, claim_key
from delivery_platform import (
    Tenant, produce_alerts, wait_for_rules, wait_until_backlog_consumed, wait_until_notified,
)
from delivery_receivers import Receiver
from kafka_probe import retire_rules_left_on_topic

pytestmark = pytest.mark.e2e

BURST = 60
ACCEPTED_BEFORE_KILL = 20
QUICK_RETRIES = {"DELIVERY_BACKOFF_INITIAL_S": "0.2", "DELIVERY_BACKOFF_MAX_S": "0.5",
                 "DELIVERY_MAX_ATTEMPTS": "100", "DELIVERY_LEASE_S": "2", "DELIVERY_SWEEP_INTERVAL_S": "0.2"}


async def wait_until_marked_sent(redis: Redis, keys, timeout: float = 60.0) -> None:
    async def all_marked() -> bool:
        values = await redis.mget([claim_key(*key.split(":")) for key in keys])
        return all(value == SENT_MARK for value in values)

    async with asyncio.timeout(timeout):
        while not await all_marked():
            await asyncio.sleep(0.1)


async def test_a_worker_killed_mid_burst_and_restarted_delivers_everything_once(services, clean_db, start_worker):
    await retire_rules_left_on_topic(services.kafka_bootstrap_servers)
    group = f"crash-{secrets.token_hex(4)}"
    # Outcomes wait five minutes before they are written: the kill comes before any is recorded.
    worker = start_worker(APP_ID=group, DELIVERY_RECORD_INTERVAL_S="300", **QUICK_RETRIES)
    await wait_until_backlog_consumed(services, group)
    redis = Redis.from_url(services.redis_url)
    async with Receiver() as receiver, aiohttp.ClientSession() as http:
        receiver.answer("hook", *[200] * ACCEPTED_BEFORE_KILL, 503)
        tenant = await Tenant(http, worker.url).create(services.admin_token, receiver.url())
        await wait_for_rules(http, services, worker)

        await produce_alerts(services.kafka_bootstrap_servers, [f"burst-{n}" for n in range(BURST)])
        await receiver.wait_for_posts(ACCEPTED_BEFORE_KILL + 1)  # and the rest is being turned away
        before_kill = receiver.accepted()
        assert sum(before_kill.values()) == ACCEPTED_BEFORE_KILL
        await wait_until_marked_sent(redis, before_kill)
        recorded = await tenant.call("GET", "/api/v1/notifications", tenant.key, None)
        worker.child.process.kill()
        worker.child.process.wait()

        assert all(n["status"] == "PENDING" for n in recorded[1]["items"])  # sent, but none recorded
        # What the dead worker had already sent is still turned away: it never saw an answer.
        await receiver.wait_until_disconnected()
        receiver.answer("hook", 200)
        restarted = start_worker(APP_ID=group, **QUICK_RETRIES)
        tenant.api_url = restarted.url
        notification_ids = await wait_until_notified(services.database_url, tenant.client_id, BURST)

        accepted = receiver.accepted()
        expected = {f"{notification_id}:{tenant.endpoint_id}" for notification_id in notification_ids}
        assert set(accepted) == expected  # none lost
        assert [key for key, count in accepted.items() if count > 1] == []  # none twice
        status, notification = await tenant.call("GET", f"/api/v1/notifications/{notification_ids[0]}",
                                                 tenant.key)
        assert status == 200 and notification["status"] == "SENT"
        [delivery] = notification["deliveries"]
        assert (delivery["endpoint_id"], delivery["status"]) == (tenant.endpoint_id, "SENT")
        restarted.stop()
    await redis.aclose()
