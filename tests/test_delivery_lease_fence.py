"""A send's lease fence (delivery/lease_fences.py) as a worker's dispatcher uses it, against the real
Postgres, Redis and a local endpoint: no statement on the hot path with the default lease, and no
send once another worker leased the row."""
from __future__ import annotations

import asyncio
import time

from alerting_app.delivery import records
from test_agent_deliver import pending_notification, tenant_with_endpoint
from test_agent_support import AGENT_LOOP, pipeline, pool  # noqa: F401  (fixtures)
from test_delivery_stop import delivery_row, opened, receiver, redis_closed_after_the_module, settings  # noqa: F401

pytestmark = AGENT_LOOP


async def fenced_sends(monkeypatch) -> list[list[tuple[tuple[str, str], float]]]:
    """The lease fences' statements from now on, each with the sends it fenced (counted, then run)."""
    statements: list[list[tuple[tuple[str, str], float]]] = []
    fence_sends = records.fence_sends

    async def counted(conn, owner, sends):
        statements.append(list(sends))
        return await fence_sends(conn, owner, sends)

    monkeypatch.setattr(records, "fence_sends", counted)
    return statements


async def opened_for(pool, dispatcher, opened, url: str):
    """One new notification's delivery to `url`, leased to `dispatcher` as the intake leases it; the
    jobs, and when the leasing statement was sent."""
    client, rule, _ = await tenant_with_endpoint(pool, "webhook", url)
    notification = await pending_notification(pool, client, [rule])
    opened.append(notification.notification_id)
    leased_at = time.monotonic()
    jobs = await records.open_deliveries(pool, [notification], dispatcher.owner, dispatcher.settings.delivery_lease_s,
                                         [])
    return notification, jobs, leased_at


async def test_a_send_under_the_default_lease_costs_no_fence_statement(pool, settings, receiver, opened, monkeypatch):
    from alerting_app.delivery.dispatcher import Dispatcher

    statements = await fenced_sends(monkeypatch)
    receiver.answer("fenced-ok", 200)
    dispatcher = Dispatcher(settings)
    try:
        notification, jobs, leased_at = await opened_for(pool, dispatcher, opened, receiver.url("fenced-ok"))
        assert dispatcher.submit(jobs, leased_at) == []
        async with asyncio.timeout(20):  # a guard against hanging, not a measurement
            while (await delivery_row(pool, notification.notification_id))["status"] != "SENT":
                await asyncio.sleep(0.01)
        # Its lease (DELIVERY_LEASE_S, 60 s, from before the statement that leased it) covers the
        # send (WEBHOOK_TIMEOUT_S and the claim's margin): known in the worker, no statement.
        assert statements == []

        # A lease the worker does not know (no `leased_at`) is fenced before the send: one statement.
        notification, jobs, _ = await opened_for(pool, dispatcher, opened, receiver.url("fenced-ok"))
        assert dispatcher.submit(jobs) == []
        async with asyncio.timeout(20):
            while (await delivery_row(pool, notification.notification_id))["status"] != "SENT":
                await asyncio.sleep(0.01)
        assert [[key for key, _ in sends] for sends in statements] == [[jobs[0].key]]
    finally:
        await dispatcher.close()


async def test_a_delivery_another_worker_leased_meanwhile_is_not_sent(pool, settings, receiver, opened, monkeypatch):
    from alerting_app.delivery.dispatcher import Dispatcher

    receiver.answer("fenced-taken-over", 200)
    dispatcher = Dispatcher(settings)
    try:
        notification, jobs, _ = await opened_for(pool, dispatcher, opened, receiver.url("fenced-taken-over"))
        # This worker stalled past its lease, and another worker's sweep leased the row.
        await pool.execute("UPDATE deliveries SET leased_by = 'other-worker', lease_until = now() + interval '1 minute'"
                           " WHERE notification_id = $1", notification.notification_id)
        assert dispatcher.submit(jobs) == []  # its lease not known here: fenced
        await dispatcher.drained()

        assert receiver.posts_to("fenced-taken-over") == []
        row = await pool.fetchrow("SELECT status, attempts, leased_by FROM deliveries WHERE notification_id = $1",
                                  notification.notification_id)
        # The new holder's to send and record: nothing written over it.
        assert (row["status"], row["attempts"], row["leased_by"]) == ("PENDING", 0, "other-worker")
    finally:
        await dispatcher.close()


async def test_a_stop_while_a_send_waits_for_its_fence_frees_the_sends_claim(pool, settings, receiver, opened):
    """A stop cancels what is not sending (Dispatcher.close), a send waiting for its fence included:
    it had its claim, and sent nothing. Left until its TTL (the send's timeout and margin), the
    claim made the worker that took the row up next hand it back to wait it out."""
    from alerting_app.delivery import claims
    from alerting_app.delivery.dispatcher import Dispatcher

    receiver.answer("fenced-stop", 200)
    dispatcher = Dispatcher(settings)
    notification, [job], _ = await opened_for(pool, dispatcher, opened, receiver.url("fenced-stop"))
    closing = None
    async with pool.acquire() as locker:
        transaction = locker.transaction()
        await transaction.start()
        try:
            # Its fence's statement waits for the row's lock: the send waits for its fence.
            await locker.execute("SELECT 1 FROM deliveries WHERE notification_id = $1 FOR UPDATE",
                                 notification.notification_id)
            assert dispatcher.submit([job]) == []  # its lease not known here: fenced
            async with asyncio.timeout(20):  # a guard against hanging, not a measurement
                while not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                              " AND query LIKE '%k.cover_s%'"):
                    await asyncio.sleep(0.01)
            closing = asyncio.ensure_future(dispatcher.close())
            async with asyncio.timeout(20):
                while dispatcher.held_keys():
                    await asyncio.sleep(0.01)
            claim = await claims.claim(dispatcher._context.redis, *job.key, ttl_s=5)
            await claims.release(dispatcher._context.redis, claim)
            assert claim.state is claims.ClaimState.CLAIMED
        finally:
            await transaction.rollback()
            if closing is not None:
                await asyncio.wait_for(closing, 30)
    assert receiver.posts_to("fenced-stop") == []
