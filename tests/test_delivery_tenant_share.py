"""One tenant's many hanging endpoints against another tenant's delivery, in one worker's
dispatcher, with the real Postgres, Redis and a real local endpoint: the first tenant fills its
own share of the worker's send slots (DELIVERY_CLIENT_CONCURRENCY), not all of them."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from alerting_app.delivery import records
from delivery_receivers import Receiver, SmtpServer
from name_servers import SilentNameServer
from test_agent_deliver import pending_notification, until_settled
from test_agent_support import AGENT_LOOP, insert_client, insert_endpoint, insert_rule, pipeline, pool  # noqa: F401

pytestmark = AGENT_LOOP

SILENT_DOMAIN = ".silent-dns.test"



async def other_tenants_notification(pool, receiver: Receiver):
    """Another tenant, whose one webhook endpoint answers at once (the receiver's path "other"),
    and a notification of it waiting to be delivered."""
    tenant = await insert_client(pool)
    rule = await insert_rule(pool, tenant)
    await insert_endpoint(pool, tenant, rule, "webhook", receiver.url("other"))
    return await pending_notification(pool, tenant, [rule])


def send_email_to(relay: SmtpServer, settings, monkeypatch, *, timeout_s: float | None = None) -> None:
    """The worker's email goes to this local relay, in clear (and within `timeout_s`, if given)."""
    monkeypatch.setattr(settings, "smtp_host", "127.0.0.1")
    monkeypatch.setattr(settings, "smtp_port", relay.port)
    monkeypatch.setattr(settings, "smtp_starttls", False)
    if timeout_s is not None:
        monkeypatch.setattr(settings, "smtp_timeout_s", timeout_s)


async def email_tenant(pool, address: str) -> tuple[str, str]:
    """A new tenant (client, rule) whose one endpoint mails `address`."""
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    await insert_endpoint(pool, client, rule, "email", address)
    return client, rule


async def email_tenants_notifications(pool, tenants: int) -> list:
    """As many tenants, each with one email endpoint, and a notification of each waiting to be delivered."""
    notifications = []
    for _ in range(tenants):
        tenant, rule = await email_tenant(pool, "oncall@example.com")
        notifications.append(await pending_notification(pool, tenant, [rule]))
    return notifications

@contextlib.asynccontextmanager
async def sweeping(pool, dispatcher) -> AsyncIterator[None]:
    """The worker's sweep loop, faster, while the block runs."""
    from agents.deliver import sweep

    async def sweep_for_ever() -> None:
        while True:
            await sweep(pool, dispatcher)
            await asyncio.sleep(0.05)

    sweeps = asyncio.ensure_future(sweep_for_ever())
    try:
        yield
    finally:
        sweeps.cancel()
        await asyncio.gather(sweeps, return_exceptions=True)


@pytest.fixture
def settings(monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "delivery_record_interval_s", 0.01)
    monkeypatch.setattr(settings, "webhook_timeout_s", 30.0)
    monkeypatch.setattr(settings, "delivery_concurrency", 4)
    monkeypatch.setattr(settings, "delivery_client_concurrency", 2)
    return settings


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def redis_closed_after_the_module(pipeline):
    from alerting_app import redis_client

    yield
    await redis_client.close()


async def test_a_tenant_whose_endpoints_all_hang_leaves_the_worker_room_for_another_tenant(pool, settings,
                                                                                          monkeypatch):
    from alerting_app.delivery.dispatcher import Dispatcher

    # The hanging sends hang for the whole test: none times out to make room for the others.
    monkeypatch.setattr(settings, "webhook_timeout_s", 300.0)

    async with Receiver() as receiver:
        hanging_tenant = await insert_client(pool)
        rule = await insert_rule(pool, hanging_tenant)
        hung = [receiver.hold(f"hanging-{n}") for n in range(4)]  # as many endpoints as the worker has slots
        for n in range(4):
            await insert_endpoint(pool, hanging_tenant, rule, "webhook", receiver.url(f"hanging-{n}"))
        notifications = [await pending_notification(pool, hanging_tenant, [rule]),
                         await other_tenants_notification(pool, receiver)]
        dispatcher = Dispatcher(settings)
        try:
            jobs = await records.open_deliveries(pool, notifications, dispatcher.owner, settings.delivery_lease_s, [])
            jobs.sort(key=lambda job: job.notification.client_id != hanging_tenant)  # the hanging ones first
            assert dispatcher.submit(jobs) == []

            def hanging_posts() -> int:
                return sum(len(receiver.posts_to(f"hanging-{n}")) for n in range(4))

            # The hanging tenant's share of the slots (2 of 4) is taken: both its sends are held.
            async with asyncio.timeout(60):  # a guard against hanging only
                while hanging_posts() < 2:
                    await asyncio.sleep(0.01)
            # The other tenant's post gets through while they hang (were the worker's slots all the
            # hanging tenant's, it would wait for good, and the guard fail) ...
            await receiver.wait_for_posts(1, "other", timeout=60)
            # ... and the hanging tenant's other deliveries still wait for its share: no more sent.
            assert hanging_posts() == 2
        finally:
            for held in hung:
                held.set()
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [n.notification_id for n in notifications])


async def test_a_tenant_holding_its_backlog_of_deliveries_gets_no_more_and_another_tenant_does(pool, settings,
                                                                                                 monkeypatch, clean_db):
    """DELIVERY_CLIENT_BACKLOG: a tenant whose many endpoints fail fills its own share of the
    deliveries a worker holds; its next deliveries wait in Postgres, unleased, and another tenant's
    are taken and delivered. (The sweep here leases every due row of the database: emptied first,
    clean_db, none is another module's.)"""
    from agents.deliver import start_deliveries
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_client_backlog", 3)
    async with Receiver() as receiver:
        failing_tenant = await insert_client(pool)
        rule = await insert_rule(pool, failing_tenant)
        hung = [receiver.hold(f"failing-{n}") for n in range(4)]
        for n in range(4):
            await insert_endpoint(pool, failing_tenant, rule, "webhook", receiver.url(f"failing-{n}"))
        first, later = (await pending_notification(pool, failing_tenant, [rule]),
                        await pending_notification(pool, failing_tenant, [rule]))
        other = await other_tenants_notification(pool, receiver)
        dispatcher = Dispatcher(settings)
        try:
            started = await start_deliveries(pool, dispatcher, [first])
            assert len(started) == 3  # of its 4 endpoints: its backlog; the 4th waits unleased
            started = await start_deliveries(pool, dispatcher, [later, other])

            assert [job.notification.notification_id for job in started] == [other.notification_id]
            await receiver.wait_for_posts(1, "other", timeout=10.0)
            unleased = await pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE notification_id = ANY($1::uuid[]) AND lease_until IS NULL",
                [first.notification_id, later.notification_id])
            assert unleased == 1 + 4
            jobs = await records.lease_due(pool, dispatcher.owner, settings.delivery_lease_s,
                                           dispatcher.held_per_endpoint(), settings.delivery_endpoint_backlog, 10,
                                           dispatcher.held_per_client(), settings.delivery_client_backlog)
            assert jobs == []  # the sweep takes none of them either
        finally:
            for held in hung:
                held.set()
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [n.notification_id for n in (first, later, other)])


async def test_a_hanging_smtp_relay_leaves_the_worker_room_for_another_tenants_webhook(pool, settings, monkeypatch):
    """The relay is one destination for every tenant's email: it takes what one endpoint may take
    of a worker (DELIVERY_ENDPOINT_CONCURRENCY), not every slot. Before, each tenant's email could
    take its client's share, so a relay that hangs (ours, not a tenant's) filled the worker with
    email sends of a few tenants, and every other tenant's webhook waited SMTP_TIMEOUT_S for a slot."""
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_concurrency", 2)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    async with Receiver() as receiver:
        with SmtpServer() as relay:
            relay.stall(300)  # the sends hang for the whole test
            send_email_to(relay, settings, monkeypatch, timeout_s=300.0)
            # Two tenants' email: each within its own share of the worker.
            notifications = await email_tenants_notifications(pool, 2)
            webhook_notification = await other_tenants_notification(pool, receiver)
            dispatcher = Dispatcher(settings)
            try:
                emails = await records.open_deliveries(pool, notifications, dispatcher.owner,
                                                       settings.delivery_lease_s, [])
                assert dispatcher.submit(emails) == []
                async with asyncio.timeout(60):  # a guard against hanging only
                    while relay.envelopes_begun < 1:
                        await asyncio.sleep(0.01)
                webhook_jobs = await records.open_deliveries(pool, [webhook_notification], dispatcher.owner,
                                                             settings.delivery_lease_s, [])
                assert dispatcher.submit(webhook_jobs) == []
                # The webhook gets the worker's other slot (were both the relay's, it would wait for
                # good, and the guard fail) ...
                await receiver.wait_for_posts(1, "other", timeout=60)
                # ... and the second email waits for the relay's slot, not at the relay.
                assert relay.envelopes_begun == 1
            finally:
                await dispatcher.close()
                await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                                   [n.notification_id for n in [*notifications, webhook_notification]])


async def test_a_slow_endpoints_backlog_waits_in_postgres_leaving_the_worker_room_for_other_tenants(
        pool, settings, monkeypatch, clean_db):
    """A rate-limited endpoint is held no more than its rate sends in ENDPOINT_HELD_RATE_S (at least
    its send slots): the rest of its backlog waits in Postgres, unleased, not in the worker. Before,
    an endpoint at 0.001/s held DELIVERY_ENDPOINT_BACKLOG (1,000) deliveries, each waiting up to
    11 days for its token; four tenants with five such endpoints held all 20,000 places of every
    worker, and every other tenant's notifications waited in Postgres for days. (Here: two slow
    tenants, a worker of four places.)"""
    from agents.deliver import start_deliveries
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_max_held", 4)
    monkeypatch.setattr(settings, "delivery_client_backlog", 2)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    async with Receiver() as receiver:
        # The first send of each slow endpoint hangs for the whole test: each holds one delivery
        # in flight, and its next waits 1,000 s for its token.
        hung = [receiver.hold(f"slow-{n}") for n in range(2)]
        slow = []
        for n in range(2):
            tenant = await insert_client(pool)
            rule = await insert_rule(pool, tenant)
            endpoint = await insert_endpoint(pool, tenant, rule, "webhook", receiver.url(f"slow-{n}"))
            await pool.execute("UPDATE endpoints SET rate_limit_per_s = 0.001 WHERE endpoint_id = $1", endpoint)
            slow += [await pending_notification(pool, tenant, [rule]) for _ in range(2)]
        other = await other_tenants_notification(pool, receiver)
        dispatcher = Dispatcher(settings)
        try:
            started = await start_deliveries(pool, dispatcher, slow)
            # One of each slow endpoint: 0.001/s sends none in 10 s, and its one send slot is the least.
            assert len(started) == 2
            async with asyncio.timeout(60):  # a guard against hanging only
                while sum(len(receiver.posts_to(f"slow-{n}")) for n in range(2)) < 2:
                    await asyncio.sleep(0.01)
            started = await start_deliveries(pool, dispatcher, [other])

            assert [job.notification.notification_id for job in started] == [other.notification_id]
            await receiver.wait_for_posts(1, "other", timeout=10.0)
            unleased = await pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE notification_id = ANY($1::uuid[]) AND lease_until IS NULL",
                [n.notification_id for n in slow])
            assert unleased == 2
            jobs = await records.lease_due(pool, dispatcher.owner, settings.delivery_lease_s,
                                           dispatcher.held_per_endpoint(), settings.delivery_endpoint_backlog, 10,
                                           dispatcher.held_per_client(), settings.delivery_client_backlog)
            assert jobs == []  # nor does the sweep take them while their endpoints hold their share
        finally:
            for held in hung:
                held.set()
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [n.notification_id for n in (*slow, other)])


async def test_deliveries_whose_retry_is_due_later_wait_in_postgres_leaving_the_worker_room_for_another_tenant(
        pool, settings, monkeypatch, clean_db):
    """A delivery whose next retry is due later than HAND_BACK_AFTER_S waits for it in Postgres, not in
    the worker: its failed attempt, when the next is due and its lease given up are written together,
    and its place is free. Before, it held its place through its whole backoff (about 2 minutes by
    default): four tenants whose many endpoints all answered 500 held every place of a worker
    (DELIVERY_CLIENT_BACKLOG each, DELIVERY_MAX_HELD in all), and every other tenant's notifications
    waited in Postgres for the few places that freed up. (Here: a worker of four places, two failing
    tenants of two places each, each with more failing deliveries than that, every retry due 300 s
    later.)"""
    from agents.deliver import start_deliveries
    from alerting_app.delivery.attempts import HAND_BACK_AFTER_S
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_max_held", 4)
    monkeypatch.setattr(settings, "delivery_client_backlog", 2)
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", HAND_BACK_AFTER_S * 30)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", HAND_BACK_AFTER_S * 30)
    async with Receiver() as receiver:
        failing, failing_paths = [], []
        for n in range(2):
            tenant = await insert_client(pool)
            rule = await insert_rule(pool, tenant)
            for m in range(2):
                failing_paths.append(f"failing-{n}-{m}")
                receiver.answer(failing_paths[-1], 500)
                await insert_endpoint(pool, tenant, rule, "webhook", receiver.url(failing_paths[-1]))
            failing += [await pending_notification(pool, tenant, [rule]) for _ in range(3)]
        other = await other_tenants_notification(pool, receiver)
        dispatcher = Dispatcher(settings)
        try:
            # The failing tenants fill the worker: two places each, four in all.
            assert len(await start_deliveries(pool, dispatcher, failing)) == 4
            await start_deliveries(pool, dispatcher, [other])
            async with sweeping(pool, dispatcher):
                # The other tenant's notification is delivered (were the failing deliveries held
                # through their retries, no place would free up for 300 s, and the guard fail) ...
                await receiver.wait_for_posts(1, "other", timeout=60)
                # ... and every failing delivery made its first attempt, each handed back after it.
                await receiver.wait_for_posts(len(failing) * 2 + 1, timeout=60)
            await dispatcher.drained()

            rows = await pool.fetch(
                "SELECT status, attempts, lease_until IS NULL AS released,"
                " next_attempt_at > now() + make_interval(secs => $2) AS retry_later"
                " FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                [n.notification_id for n in failing], HAND_BACK_AFTER_S * 20)
            # Each waits for its retry where the sweep finds it when due: its attempt counted, its
            # backoff kept, its lease given up; no retry was sent early.
            assert [tuple(row) for row in rows] == [("PENDING", 1, True, True)] * len(failing) * 2
            assert [len(receiver.posts_to(path)) for path in failing_paths] == [3] * 4
            assert await records.lease_due(pool, dispatcher.owner, settings.delivery_lease_s, {},
                                           settings.delivery_endpoint_backlog, 10) == []
        finally:
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [n.notification_id for n in (*failing, other)])


async def test_a_tenant_holding_half_its_backlog_waits_for_its_retries_in_postgres_leaving_room_for_its_other_deliveries(
        pool, settings, monkeypatch, clean_db):
    """A retry due soon (within HAND_BACK_AFTER_S) is handed back to Postgres all the same when its
    client holds half its DELIVERY_CLIENT_BACKLOG in the worker: its place goes to a delivery that
    can be sent now. Before, a delivery to a failing endpoint held its place for its first five
    attempts (about 17 s with the default backoff): a tenant putting more than its backlog into
    failing endpoints per 17 s held its whole share, and its deliveries to a healthy endpoint waited
    in Postgres until the failing ones ran out of attempts. (Here: a backlog of four, four deliveries
    to an endpoint answering 500, every retry due in 2-3 s, three attempts each.)"""
    from agents.deliver import start_deliveries
    from alerting_app.delivery.attempts import HAND_BACK_AFTER_S
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_client_backlog", 4)
    monkeypatch.setattr(settings, "delivery_client_concurrency", 4)
    monkeypatch.setattr(settings, "delivery_max_attempts", 3)
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", 2.0)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 3.0)
    assert settings.delivery_backoff_max_s + 1 < HAND_BACK_AFTER_S  # every wait is one the worker would keep
    async with Receiver() as receiver:
        receiver.answer("failing", 500)
        tenant = await insert_client(pool)
        failing_rule, healthy_rule = await insert_rule(pool, tenant), await insert_rule(pool, tenant, source="billing")
        await insert_endpoint(pool, tenant, failing_rule, "webhook", receiver.url("failing"))
        await insert_endpoint(pool, tenant, healthy_rule, "webhook", receiver.url("healthy"))
        failing = [await pending_notification(pool, tenant, [failing_rule]) for _ in range(4)]
        healthy = await pending_notification(pool, tenant, [healthy_rule])
        dispatcher = Dispatcher(settings)
        try:
            # The failing deliveries take the tenant's whole backlog; the healthy one waits in Postgres.
            assert len(await start_deliveries(pool, dispatcher, failing)) == 4
            await start_deliveries(pool, dispatcher, [healthy])
            async with sweeping(pool, dispatcher):
                await receiver.wait_for_posts(1, "healthy", timeout=60)
                # It went out while the failing deliveries still had retries to make: their places
                # were given up after their first attempt, not kept through their whole schedule.
                # Before any of their retries (due 2-3 s after their first attempts; the sweep runs
                # every 50 ms). Their rows alone can still say PENDING a moment after their last
                # attempts, before these are recorded.
                assert len(receiver.posts_to("failing")) <= 4
                rows = await pool.fetch("SELECT status, attempts FROM deliveries"
                                        " WHERE notification_id = ANY($1::uuid[])", [n.notification_id for n in failing])
                assert sorted(row["status"] for row in rows) == ["PENDING"] * 4
                assert all(row["attempts"] < settings.delivery_max_attempts for row in rows)
                # Handed back, each still makes its three attempts, each once, then fails.
                for notification in failing:
                    await until_settled(pool, notification.notification_id)
            assert len(receiver.posts_to("failing")) == 4 * 3
            assert sorted(receiver.idempotency_keys().values()) == [1] + [3] * 4
        finally:
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [n.notification_id for n in (*failing, healthy)])


async def test_a_tenants_endpoints_under_a_silent_name_server_hold_no_thread_nor_another_tenants_delivery(
        pool, settings, monkeypatch):
    """A tenant's endpoints whose names its name server never answers. aiohttp looked a host up
    with the system's getaddrinfo on the event loop's default executor (its ThreadedResolver): each
    lookup held its thread until the system's resolver gave up, long after the send's timeout had
    freed the send's slots, so a tenant naming more hosts than there were threads held them all,
    and another tenant's delivery to a name waited for one. Looked up by c-ares, a hanging lookup
    holds no thread: each of the tenant's sends ends in a retryable timeout, and the other
    tenant's delivery to localhost (/etc/hosts) goes out."""
    from agents.deliver import start_deliveries
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "webhook_timeout_s", 0.3)
    monkeypatch.setattr(settings, "delivery_max_attempts", 1)  # one attempt each, ended by the send's timeout
    monkeypatch.setattr(settings, "delivery_client_concurrency", 3)  # of the worker's 4: one left for the other
    async with Receiver() as receiver, SilentNameServer() as name_server:
        name_server.resolving_here(monkeypatch, SILENT_DOMAIN)
        tenant = await insert_client(pool)
        rule = await insert_rule(pool, tenant)
        # More names than the threads the dispatcher gave the loop for lookups (DELIVERY_CONCURRENCY
        # + 16), when they were threads.
        names = [f"n{n}{SILENT_DOMAIN}" for n in range(24)]
        for name in names:
            await insert_endpoint(pool, tenant, rule, "webhook", f"http://{name}:{receiver.port}/hook")
        unanswered = await pending_notification(pool, tenant, [rule])
        other_tenant = await insert_client(pool)
        other_rule = await insert_rule(pool, other_tenant)
        await insert_endpoint(pool, other_tenant, other_rule, "webhook", f"http://localhost:{receiver.port}/other")
        other = await pending_notification(pool, other_tenant, [other_rule])
        dispatcher = Dispatcher(settings)
        try:
            assert len(await start_deliveries(pool, dispatcher, [unanswered])) == len(names)
            await until_settled(pool, unanswered.notification_id, timeout=60)
            await start_deliveries(pool, dispatcher, [other])
            # Bounds a hang only: were the lookups held on threads, it would wait until the server closed.
            await receiver.wait_for_posts(1, "other", timeout=30)
            rows = await pool.fetch("SELECT status, last_error FROM deliveries WHERE notification_id = $1",
                                    unanswered.notification_id)
            assert {(row["status"], row["last_error"]) for row in rows} == {("FAILED", "timed out after 0.3s")}
            assert set(names) <= set(name_server.asked)  # the lookups were made, and went unanswered
            assert name_server.threads_held == 0 and receiver.posts_to("hook") == []
        finally:
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                               [unanswered.notification_id, other.notification_id])


async def test_a_delivery_whose_endpoint_becomes_email_while_it_waits_takes_the_relays_slot(pool, settings,
                                                                                            monkeypatch):
    """The tenant changes a webhook endpoint to email (PATCH) while a delivery waits for its send
    slot: read again before the send, the endpoint is email, and the attempt begins again as an
    email's, taking the SMTP relay's slot (and the all-email token), not sending past them; the
    row's channel is the one it went by. Before, what it held had been taken for a webhook, and the
    email went to the relay beside the relay's full share of sends."""
    from alerting_app.delivery import attempts
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    monkeypatch.setattr(attempts, "ENDPOINT_RECHECK_S", 0.0)  # read again before every send, however short the wait
    async with Receiver() as receiver:
        with SmtpServer() as relay:
            send_email_to(relay, settings, monkeypatch)
            answer = receiver.hold("hook")
            tenant = await insert_client(pool)
            rule = await insert_rule(pool, tenant)
            endpoint = await insert_endpoint(pool, tenant, rule, "webhook", receiver.url("hook"))
            notifications = [await pending_notification(pool, tenant, [rule]) for _ in range(2)]
            dispatcher = Dispatcher(settings)
            relay_slot_taken = False
            try:
                jobs = await records.open_deliveries(pool, notifications, dispatcher.owner,
                                                     settings.delivery_lease_s, [])
                assert dispatcher.submit(jobs) == []
                # One sends, held by the endpoint; the other waits for the endpoint's one send slot.
                await receiver.wait_for_posts(1, "hook", timeout=60)
                # The relay's one slot is taken, as another tenant's email in flight takes it.
                await dispatcher._relay_slots.acquire("another tenant")
                relay_slot_taken = True
                await pool.execute("UPDATE endpoints SET type = 'email', value = 'ops@example.com'"
                                   " WHERE endpoint_id = $1", endpoint)
                answer.set()

                def waiting_for_the_relay() -> bool:
                    return bool(dispatcher._relay_slots.waiting())

                async with asyncio.timeout(60):  # a guard against hanging only
                    while not waiting_for_the_relay() and relay.envelopes_begun == 0:
                        await asyncio.sleep(0.01)
                assert relay.envelopes_begun == 0  # it waits for the relay's slot, not at the relay
                dispatcher._relay_slots.release()
                relay_slot_taken = False
                await dispatcher.drained()

                assert len(relay.messages) == 1 and len(receiver.posts_to("hook")) == 1
                channels = await pool.fetch("SELECT channel, status FROM deliveries WHERE endpoint_id = $1"
                                            " ORDER BY channel", endpoint)
                assert [tuple(row) for row in channels] == [("email", "SENT"), ("webhook", "SENT")]
            finally:
                answer.set()
                if relay_slot_taken:
                    dispatcher._relay_slots.release()
                await dispatcher.close()
                await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                                   [n.notification_id for n in notifications])


async def test_email_held_in_all_is_what_the_all_email_rate_sends_in_10_s_leaving_the_worker_room_for_others(
        pool, settings, monkeypatch, clean_db):
    """The all-email bucket is one for every tenant's email endpoints: together they send no faster
    than EMAIL_RATE_LIMIT_PER_S, so a worker holds no more email than that rate sends in
    ENDPOINT_HELD_RATE_S (at least the relay's send slots), and the sweep leases none while it holds
    that. Before, each email endpoint had a share of its own: endpoints are per rule, and a tenant
    with fifty rules mailing held its whole client backlog (5,000) for over 8 minutes at the default
    10/s, four such tenants every place of a worker. (Here: an all-email rate sending none in 10 s,
    two tenants' email endpoints, a worker of four places.)"""
    from agents.deliver import start_deliveries, sweep
    from alerting_app.delivery import dispatcher as dispatcher_module
    from alerting_app.delivery.dispatcher import Dispatcher

    # The stop at the end cancels the hanging send at once, instead of giving it 30 s to finish.
    monkeypatch.setattr(dispatcher_module, "_CLOSE_SEND_GRACE_MAX_S", 0.0)
    monkeypatch.setattr(settings, "delivery_max_held", 4)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    monkeypatch.setattr(settings, "email_rate_limit_per_s", 0.001)
    async with Receiver() as receiver:
        with SmtpServer() as relay:
            relay.stall(300)  # what is sent hangs for the whole test
            send_email_to(relay, settings, monkeypatch, timeout_s=300.0)
            emails = await email_tenants_notifications(pool, 2)
            other = await other_tenants_notification(pool, receiver)
            dispatcher = Dispatcher(settings)
            try:
                started = await start_deliveries(pool, dispatcher, emails)
                # One email in all: 0.001/s sends none in 10 s, and the relay's one send slot is the least.
                assert len(started) == 1
                [waiting] = [n for n in emails if n.notification_id != started[0].notification.notification_id]
                version = "SELECT xmin::text FROM deliveries WHERE notification_id = $1"
                before = await pool.fetchval(version, waiting.notification_id)
                assert await sweep(pool, dispatcher) == []
                # Nor does the sweep lease the other (leased, refused and released, its row would
                # be written twice: an email backlog older than other rows took every sweep's batch).
                assert await pool.fetchval(version, waiting.notification_id) == before
                started = await start_deliveries(pool, dispatcher, [other])

                assert [job.notification.notification_id for job in started] == [other.notification_id]
                await receiver.wait_for_posts(1, "other", timeout=10.0)
            finally:
                await dispatcher.close()
                await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                                   [n.notification_id for n in (*emails, other)])



def recipients(relay: SmtpServer) -> list[str]:
    """Whom the messages the relay took were for, in the order it took them."""
    return [str(message["To"]) for message in relay.messages]


async def storm_before(relay: SmtpServer, pool, dispatcher, address: str) -> int:
    """With the worker sweeping, wait until the relay takes a message for `address`: how many
    it took before."""
    async with sweeping(pool, dispatcher), asyncio.timeout(60):  # a guard against hanging only
        while address not in recipients(relay):
            await asyncio.sleep(0.01)
    return recipients(relay).index(address)


@contextlib.asynccontextmanager
async def storm_beside_another_tenant(pool, settings, notifications: int, more_endpoints: int = 0):
    """A flooding tenant's `notifications` (to flood@example.com, on one email endpoint and
    `more_endpoints` more), then another tenant's one (to other@example.com), all PENDING with no
    delivery opened, and a worker's dispatcher: (storm, other, dispatcher). Their deliveries go
    with the block."""
    from alerting_app.delivery.dispatcher import Dispatcher

    flooding_tenant, rule = await email_tenant(pool, "flood@example.com")
    for _ in range(more_endpoints):
        await insert_endpoint(pool, flooding_tenant, rule, "email", "flood@example.com")
    storm = [await pending_notification(pool, flooding_tenant, [rule]) for _ in range(notifications)]
    other_tenant, other_rule = await email_tenant(pool, "other@example.com")
    other = await pending_notification(pool, other_tenant, [other_rule])
    dispatcher = Dispatcher(settings)
    try:
        yield storm, other, dispatcher
    finally:
        await dispatcher.close()
        await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                           [n.notification_id for n in (*storm, other)])


@pytest.fixture
def four_emails_held(settings, monkeypatch):
    """A worker holding four emails at most (and nothing else), sending one at a time."""
    monkeypatch.setattr(settings, "delivery_max_held", 4)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    monkeypatch.setattr(settings, "delivery_endpoint_backlog", 4)
    monkeypatch.setattr(settings, "email_rate_limit_per_s", 1_000.0)
    return settings


async def test_a_tenants_email_storm_queued_in_postgres_keeps_no_other_tenants_email_waiting_behind_it(
        pool, four_emails_held, monkeypatch, clean_db):
    """Every tenant's email waits for the one all-email rate, and a worker holds only what that rate
    sends in 10 s: the rest waits in Postgres. Leased from there oldest first, one tenant's storm
    (thousands of emails queued) kept every other tenant's first email waiting behind all of it,
    minutes at the default 10/s. The sweep now leases email round-robin per tenant: the other
    tenant's one email is among the first at the relay, whatever the storm queued before it.
    (Here: a worker holding four emails, a storm of forty, counted by their order at the relay.)"""
    settings = four_emails_held
    with SmtpServer() as relay:
        send_email_to(relay, settings, monkeypatch)
        async with storm_beside_another_tenant(pool, settings, 40) as (storm, other, dispatcher):
            # Opened as a full worker opens them, none leased: the storm's rows first, the other's after.
            assert await records.open_deliveries(pool, storm, None, settings.delivery_lease_s, []) == []
            assert await records.open_deliveries(pool, [other], None, settings.delivery_lease_s, []) == []
            # The storm's oldest only, whose turn came first: before, all forty (its rows were older).
            assert await storm_before(relay, pool, dispatcher, "other@example.com") <= 1, recipients(relay)


async def test_a_tenants_email_arriving_while_another_tenants_waits_for_its_turn_is_left_to_the_sweep_behind_it(
        pool, four_emails_held, monkeypatch, clean_db):
    """Taken in as it arrived, a storm's new email took every place an email sent freed up in the
    worker before the sweep could give it to another tenant's email waiting in Postgres: the other
    tenant waited as long as the storm went on. Once this worker has refused email (or its sweep
    took all the email room it had), new email is left to the sweep, which takes it in turn."""
    from agents.deliver import start_deliveries

    settings = four_emails_held
    with SmtpServer() as relay:
        relay.stall(0.05)  # the first four are still held when the other tenant's email arrives
        send_email_to(relay, settings, monkeypatch)
        async with storm_beside_another_tenant(pool, settings, 16) as (storm, other, dispatcher):
            assert len(await start_deliveries(pool, dispatcher, storm[:8])) == 4
            assert await start_deliveries(pool, dispatcher, [other]) == []
            await dispatcher.drained()  # the four sent: the worker has room for four emails again
            # The storm goes on: none of it before the other tenant's, waiting (before, four of it).
            assert await start_deliveries(pool, dispatcher, storm[8:]) == []
            # The four held before, then the storm's oldest waiting, whose turn came first.
            assert await storm_before(relay, pool, dispatcher, "other@example.com") <= 5, recipients(relay)


async def test_a_tenants_email_queued_in_the_worker_for_the_relay_keeps_no_other_tenants_email_behind_it(
        pool, settings, monkeypatch, clean_db):
    """Every tenant's email takes one of the SMTP relay's send slots. Given to whoever had waited
    longest, a slot freed went to a tenant whose many email endpoints had queued their emails for
    the relay, one after another, and another tenant's email held in the same worker waited behind
    all of them (up to what the worker holds of email: 10 s at the default all-email rate). A slot
    freed now goes to the tenants waiting in turn. (Here: the relay's one slot, a tenant with eight
    email endpoints and two notifications, sixteen emails held before the other tenant's one.)"""
    monkeypatch.setattr(settings, "delivery_concurrency", 32)
    monkeypatch.setattr(settings, "delivery_client_concurrency", 16)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    monkeypatch.setattr(settings, "email_rate_limit_per_s", 1_000.0)
    with SmtpServer() as relay:
        send_email_to(relay, settings, monkeypatch)
        async with storm_beside_another_tenant(pool, settings, 2, more_endpoints=7) as (storm, other, dispatcher):
            jobs = [*await records.open_deliveries(pool, storm, dispatcher.owner, settings.delivery_lease_s, []),
                    *await records.open_deliveries(pool, [other], dispatcher.owner, settings.delivery_lease_s, [])]
            assert len(jobs) == 17 and dispatcher.submit(jobs) == []
            await dispatcher.drained()

            # The storm's email holding the slot and the next of the storm waiting, whose turn came
            # first: before, the eight of its endpoints waiting for the slot before the other's.
            assert recipients(relay).index("other@example.com") <= 2, recipients(relay)


async def retyped_as_the_api_does(endpoint_id: str, client_id: str, type_: str, value: str) -> None:
    """The tenant's PATCH /api/v1/endpoints/{endpoint_id} with a new type and value."""
    from uuid import UUID

    from web.auth import Caller
    from web.endpoints import change_endpoint

    await change_endpoint(UUID(endpoint_id), Caller(UUID(client_id)), {"type": type_, "value": value})


async def retyped_and_its_waiting_deliveries(endpoint_id: str, client_id: str, type_: str, value: str) -> None:
    """The PATCH, and the retyping of its waiting deliveries that it starts after its commit."""
    from web.endpoints import retyping_finished

    await retyped_as_the_api_does(endpoint_id, client_id, type_, value)
    await retyping_finished()


async def test_a_waiting_delivery_whose_endpoint_becomes_email_is_mailed_in_its_tenants_email_turn(
        pool, four_emails_held, monkeypatch, clean_db):
    """The other tenant's delivery was opened for a webhook endpoint and waits in Postgres; the
    tenant makes the endpoint an email (PATCH) while another tenant's storm of email is queued. The
    delivery goes by the endpoint as it is now, so it is an email, mailed in its tenant's email
    turn: among the first at the relay. Before, its row kept the webhook's channel: the sweep took it
    among the webhooks, after every email turn, and the worker, finding it an email with its email
    room taken, handed it back, sweep after sweep, until the storm had drained."""
    settings = four_emails_held
    with SmtpServer() as relay:
        send_email_to(relay, settings, monkeypatch)
        async with storm_beside_another_tenant(pool, settings, 40) as (storm, _, dispatcher):
            tenant = await insert_client(pool)
            rule = await insert_rule(pool, tenant)
            endpoint = await insert_endpoint(pool, tenant, rule, "webhook", "https://hooks.example.com/x")
            other = await pending_notification(pool, tenant, [rule])
            try:
                # Opened as a full worker opens them, none leased: the storm's rows first, the other's after.
                assert await records.open_deliveries(pool, storm, None, settings.delivery_lease_s, []) == []
                assert await records.open_deliveries(pool, [other], None, settings.delivery_lease_s, []) == []
                await retyped_and_its_waiting_deliveries(endpoint, tenant, "email", "retyped@example.com")

                assert await pool.fetchval("SELECT channel FROM deliveries WHERE endpoint_id = $1", endpoint) == "email"
                # The storm's oldest only, whose turn came first: before, the whole storm.
                assert await storm_before(relay, pool, dispatcher, "retyped@example.com") <= 1, recipients(relay)
            finally:
                await pool.execute("DELETE FROM deliveries WHERE notification_id = $1", other.notification_id)


async def test_a_waiting_delivery_whose_endpoint_becomes_a_webhook_waits_for_no_email_room(
        pool, settings, monkeypatch, clean_db):
    """The tenant makes an email endpoint a webhook (PATCH) while its delivery waits in Postgres
    and the worker holds all the email it may (a relay that hangs, the all-email rate slow): the
    delivery is a webhook's now, leased and sent by the next sweep. Before, its row kept the email's
    channel, and the sweep leased it only within the worker's email room: it waited for another
    tenant's email to get through the relay."""
    from agents.deliver import start_deliveries, sweep
    from alerting_app.delivery import dispatcher as dispatcher_module
    from alerting_app.delivery.dispatcher import Dispatcher

    # The stop at the end cancels the hanging send at once, instead of giving it 30 s to finish.
    monkeypatch.setattr(dispatcher_module, "_CLOSE_SEND_GRACE_MAX_S", 0.0)
    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    monkeypatch.setattr(settings, "email_rate_limit_per_s", 0.001)  # one email held, the relay's one slot
    async with Receiver() as receiver:
        with SmtpServer() as relay:
            relay.stall(300)  # what is sent hangs for the whole test
            send_email_to(relay, settings, monkeypatch, timeout_s=300.0)
            [hanging] = await email_tenants_notifications(pool, 1)
            tenant = await insert_client(pool)
            rule = await insert_rule(pool, tenant)
            endpoint = await insert_endpoint(pool, tenant, rule, "email", "ops@example.com")
            waiting = await pending_notification(pool, tenant, [rule])
            dispatcher = Dispatcher(settings)
            try:
                assert len(await start_deliveries(pool, dispatcher, [hanging])) == 1
                assert dispatcher.email_full()
                assert await start_deliveries(pool, dispatcher, [waiting]) == []  # no email room: left to the sweep
                await retyped_and_its_waiting_deliveries(endpoint, tenant, "webhook", receiver.url("retyped"))

                assert [job.notification.notification_id for job in await sweep(pool, dispatcher)] == [
                    waiting.notification_id]
                await receiver.wait_for_posts(1, "retyped", timeout=10.0)
            finally:
                await dispatcher.close()
                await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])",
                                   [hanging.notification_id, waiting.notification_id])


async def test_an_attempt_made_by_the_old_type_leaves_a_waiting_delivery_the_new_type_as_its_channel(
        pool, settings, monkeypatch):
    """A webhook's attempt is under way when the tenant makes the endpoint an email (PATCH); it
    fails and the delivery waits in Postgres for its retry. Its row keeps the new type as its
    channel, so the sweep takes it up as the email it now is. Before, the failed attempt wrote its
    own channel back, webhook, and the delivery waited for its retry among the webhooks."""
    from alerting_app.delivery.dispatcher import Dispatcher

    monkeypatch.setattr(settings, "delivery_backoff_initial_s", 20.0)  # the retry is handed back to Postgres
    async with Receiver() as receiver:
        receiver.answer("hook", 500)
        answer = receiver.hold("hook")
        tenant = await insert_client(pool)
        rule = await insert_rule(pool, tenant)
        endpoint = await insert_endpoint(pool, tenant, rule, "webhook", receiver.url("hook"))
        notification = await pending_notification(pool, tenant, [rule])
        dispatcher = Dispatcher(settings)
        try:
            jobs = await records.open_deliveries(pool, [notification], dispatcher.owner, settings.delivery_lease_s, [])
            assert dispatcher.submit(jobs) == []
            await receiver.wait_for_posts(1, "hook", timeout=60)
            await retyped_and_its_waiting_deliveries(endpoint, tenant, "email", "ops@example.com")
            answer.set()
            await dispatcher.drained()

            row = await pool.fetchrow("SELECT status, channel, attempts, last_error, client_id::text FROM deliveries"
                                      " WHERE endpoint_id = $1", endpoint)
            # The webhook's attempt counted, and its error kept; the email's turn is its tenant's.
            assert tuple(row) == ("PENDING", "email", 1, "HTTP 500", tenant)
        finally:
            answer.set()
            await dispatcher.close()
            await pool.execute("DELETE FROM deliveries WHERE notification_id = $1", notification.notification_id)


async def until_done_or_a_statement_waits_for_a_lock(pool, done: asyncio.Future, statement_start: str) -> None:
    """Until `done` is, or a session runs a statement beginning `statement_start` and waits for a row lock."""
    for _ in range(600):
        if done.done():
            return
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND ltrim(query, E' \\n') LIKE $1 || '%'", statement_start)
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"neither done nor a statement {statement_start!r} waiting for a lock")


def failed_attempt(notification, endpoint: str):
    """A webhook's attempt at `notification` that failed and is to be retried (the row stays PENDING)."""
    return records.DeliveryChange(notification.notification_id, endpoint, "PENDING", attempts=1,
                                  last_error="HTTP 503", channel="webhook")


async def waiting_webhook_deliveries(pool, client: str, rule: str, endpoint: str, count: int) -> list:
    """`count` notifications each with a delivery to the webhook `endpoint`, PENDING and leased by
    w1, due one a minute apart: the oldest first in the retyping's scan."""
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(count)]
    for nth, notification in enumerate(notifications):
        await pool.execute(
            "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at, leased_by,"
            " lease_until) VALUES ($1, $2, 'webhook', 'PENDING', now() - make_interval(mins => $3), 'w1',"
            " now() + interval '1 min')",
            notification.notification_id, endpoint, count - nth)
    return notifications


async def test_a_patch_of_the_type_deadlocked_with_the_recorder_is_done_not_answered_503(pool, clean_db):
    """Retyping the endpoint's waiting deliveries in the PATCH's transaction locked them in the
    order of its scan, while the recorder wrote a batch's outcomes in the batch's: each holding a
    row the other wanted next, Postgres ended one of them, and the tenant got 503
    database_unavailable for the PATCH (made again up to 3 times since, for that). The PATCH now
    touches no delivery, and the retyping after it waits for no row: it skips the recorder's and
    takes them in a later pass. The PATCH answers, the recorder's write goes through, and every
    waiting row ends up email."""
    from web.endpoints import retyping_finished

    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", "https://hooks.example.com/ops")
    first, second = await waiting_webhook_deliveries(pool, client, rule, endpoint, 2)

    async with pool.acquire() as recorder:
        await recorder.execute("SET deadlock_timeout = '30s'")  # a retyping waiting for a row is the one ended
        async with recorder.transaction():
            await records.write_changes(recorder, "w1", [failed_attempt(second, endpoint)])
            patch = asyncio.ensure_future(retyped_as_the_api_does(endpoint, client, "email", "ops@example.com"))
            await until_done_or_a_statement_waits_for_a_lock(pool, patch, "UPDATE deliveries SET channel")
            await records.write_changes(recorder, "w1", [failed_attempt(first, endpoint)])
        await recorder.execute("RESET deadlock_timeout")
    await patch
    await retyping_finished()

    assert await pool.fetchval("SELECT type FROM endpoints WHERE endpoint_id = $1", endpoint) == "email"
    rows = await pool.fetch("SELECT channel, attempts FROM deliveries WHERE endpoint_id = $1", endpoint)
    assert [(row["channel"], row["attempts"]) for row in rows] == [("email", 1), ("email", 1)]


async def test_a_type_change_over_a_backlog_of_many_batches_answers_at_once_and_retypes_every_waiting_row(
        pool, monkeypatch, caplog, clean_db):
    """A dead webhook's backlog made email (here eleven waiting deliveries, batches of three), while
    a worker's recorder holds two of them in its write, mid-scan. Retyped in the PATCH's
    transaction, the backlog took the PATCH's time (half a million rows passed
    API_DATABASE_TIMEOUT_S: 503 on every try), and it waited for the recorder's rows. The PATCH
    answers with the recorder's transaction still open, and one pass of the retyping takes every
    waiting row, batch after batch, but the two it skipped, waiting for neither: they are left,
    logged, for a later pass (test_a_patch_of_the_type_deadlocked_with_the_recorder_is_done_not_answered_503),
    which finds them once the recorder let them go. The settled one keeps its attempt's channel."""
    from web.endpoints import retyping_finished

    monkeypatch.setattr(records, "RETYPE_BATCH_ROWS", 3)
    monkeypatch.setattr(records, "RETYPE_PASSES", 1)
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", "https://hooks.example.com/dead")
    waiting = await waiting_webhook_deliveries(pool, client, rule, endpoint, 12)
    sent = waiting.pop(0)
    await pool.execute("UPDATE deliveries SET status = 'SENT' WHERE notification_id = $1", sent.notification_id)
    held = {waiting[4].notification_id, waiting[7].notification_id}

    async def channels() -> list[tuple[str, str]]:
        rows = await pool.fetch("SELECT notification_id::text, status, channel FROM deliveries"
                                " WHERE endpoint_id = $1 ORDER BY next_attempt_at", endpoint)
        return [(row["status"], row["channel"] if row["notification_id"] not in held else "held: " + row["channel"])
                for row in rows]

    async with pool.acquire() as recorder, recorder.transaction():
        await records.write_changes(recorder, "w1", [failed_attempt(waiting[4], endpoint),
                                                     failed_attempt(waiting[7], endpoint)])
        # Answered, and retyped, while the recorder holds its rows: before, the PATCH waited for
        # them (and with no end to the recorder's transaction, until API_DATABASE_TIMEOUT_S: 503).
        await retyped_as_the_api_does(endpoint, client, "email", "ops@example.com")
        await retyping_finished()
        assert await channels() == [("SENT", "webhook")] + [("PENDING", "email")] * 4 + [
            ("PENDING", "held: webhook")] + [("PENDING", "email")] * 2 + [("PENDING", "held: webhook")] + [
            ("PENDING", "email")] * 3
        assert "2 waiting deliveries of endpoint" in caplog.text

    assert await records.retype_waiting(pool, endpoint, client, "webhook") == 0
    assert await channels() == [("SENT", "webhook")] + [("PENDING", "email")] * 4 + [
        ("PENDING", "held: email")] + [("PENDING", "email")] * 2 + [("PENDING", "held: email")] + [
        ("PENDING", "email")] * 3


async def test_waiting_deliveries_due_at_one_instant_across_batches_are_all_retyped_in_one_pass(
        pool, monkeypatch, clean_db):
    """Deliveries inserted in one transaction are due at one instant (its now()): a backlog of them
    spans batches with a single next_attempt_at. Each batch goes on from the last one's latest time,
    that time included (the rows it retyped are no longer found), so one pass retypes them all; from
    after it, the rest of the instant was left to later passes, a batch a pass."""
    monkeypatch.setattr(records, "RETYPE_BATCH_ROWS", 2)
    monkeypatch.setattr(records, "RETYPE_PASSES", 1)
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", "https://hooks.example.com/instant")
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(5)]
    await pool.execute(
        "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
        " SELECT n, $2, 'webhook', 'PENDING', '2026-01-01T00:00:00Z' FROM unnest($1::uuid[]) AS n",
        [notification.notification_id for notification in notifications], endpoint)
    await pool.execute("UPDATE endpoints SET type = 'email', value = 'ops@example.com' WHERE endpoint_id = $1",
                       endpoint)

    assert await records.retype_waiting(pool, endpoint, client, "webhook") == 0
    assert await pool.fetchval("SELECT array_agg(DISTINCT channel) FROM deliveries WHERE endpoint_id = $1",
                               endpoint) == ["email"]


@contextlib.asynccontextmanager
async def retyping_paused(pool, endpoint: str) -> AsyncIterator[asyncpg.Connection]:
    """While the block runs, a statement rewriting a channel of `endpoint`'s deliveries waits at its
    first row (for an advisory lock the block holds), its snapshot taken: the moment of a batch in
    which another change of type can commit. A trigger of this test's own, dropped afterwards."""
    key = 7_202_611
    await pool.execute(f"""
        CREATE FUNCTION paused_retyping() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared({key}); RETURN NEW; END $$;
        CREATE TRIGGER paused_retyping BEFORE UPDATE OF channel ON deliveries FOR EACH ROW
            WHEN (OLD.endpoint_id = '{endpoint}' AND NEW.channel <> OLD.channel) EXECUTE FUNCTION paused_retyping();
    """)
    try:
        async with pool.acquire() as holder:
            await holder.execute("SELECT pg_advisory_lock($1)", key)
            try:
                yield holder
            finally:
                await holder.execute("SELECT pg_advisory_unlock($1)", key)
    finally:
        await pool.execute("DROP TRIGGER paused_retyping ON deliveries; DROP FUNCTION paused_retyping()")


async def test_two_type_changes_in_quick_succession_leave_every_waiting_row_on_the_last_type(
        pool, monkeypatch, clean_db):
    """The tenant makes its webhook an email, then a Slack endpoint, while the first change's
    retyping is in the middle of a batch (here seven waiting deliveries, batches of three). That
    batch's statement had read the endpoint's type, email, before the second change committed, and
    wrote it after the second change's retyping had looked for email (finding none yet) and ended;
    the first one's later batches read Slack but seek only the rows that were not email: the batch
    was left email for good, leased in the tenant's email turn. A batch now reads the type under a
    lock held until it commits: the second change waits for the batch, and its retyping finds it."""
    monkeypatch.setattr(records, "RETYPE_BATCH_ROWS", 3)
    monkeypatch.setattr(records, "RETYPE_PASSES", 1)
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "webhook", "https://hooks.example.com/moved")
    await waiting_webhook_deliveries(pool, client, rule, endpoint, 7)
    await pool.execute("UPDATE endpoints SET type = 'email', value = 'ops@example.com' WHERE endpoint_id = $1",
                       endpoint)

    async with retyping_paused(pool, endpoint):
        first = asyncio.ensure_future(records.retype_waiting(pool, endpoint, client, "webhook"))
        await until_done_or_a_statement_waits_for_a_lock(pool, first, "WITH batch")
        assert not first.done()
        # The second PATCH, and the retyping it starts (awaited: the first one's is no task of the API).
        second = asyncio.ensure_future(retyped_and_its_waiting_deliveries(endpoint, client, "slack",
                                                                          "http://127.0.0.1:9/slack"))
        await until_done_or_a_statement_waits_for_a_lock(pool, second, "SELECT endpoint_id, rule_id")
    await second
    await first

    assert await pool.fetchval("SELECT type FROM endpoints WHERE endpoint_id = $1", endpoint) == "slack"
    rows = await pool.fetch("SELECT channel FROM deliveries WHERE endpoint_id = $1 ORDER BY next_attempt_at", endpoint)
    assert [row["channel"] for row in rows] == ["slack"] * 7


async def delivery_left_on_its_old_channel(pool) -> tuple[str, str, object]:
    """A tenant's webhook made email, and a delivery of it, due and nobody's, still on the webhook's
    channel: a retyping that did not reach it (its process stopped part-way, the row held through
    every pass). Returns (client, endpoint, notification)."""
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    endpoint = await insert_endpoint(pool, client, rule, "email", "ops@example.com")
    notification = await pending_notification(pool, client, [rule])
    await pool.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, next_attempt_at)"
                       " VALUES ($1, $2, 'webhook', 'PENDING', now() - interval '1 min')",
                       notification.notification_id, endpoint)
    return client, endpoint, notification


async def test_a_delivery_a_retyping_did_not_reach_is_leased_by_its_old_channel_once(pool, clean_db):
    """A worker with no email room left sweeps: the row, still a webhook's by its channel, is
    leased among the webhooks, found an email, and handed back. Before, it kept the webhook's
    channel until an attempt settled it, so every sweep of every such worker leased it and handed it
    back, and it waited outside its tenant's email turns. Leased, it takes its endpoint's type: the
    next sweep without email room leaves it, and it waits among its tenant's email."""
    owner = "w-retype-lease"
    client, endpoint, notification = await delivery_left_on_its_old_channel(pool)

    [job] = await records.lease_due(pool, owner, 60, {}, 100, 10, email_room=0)
    assert job.endpoint.channel == "email"
    await records.release(pool, owner, [job.key])

    row = await pool.fetchrow("SELECT channel, client_id::text FROM deliveries WHERE endpoint_id = $1", endpoint)
    assert tuple(row) == ("email", client)
    assert await records.lease_due(pool, owner, 60, {}, 100, 10, email_room=0) == []
    [again] = await records.lease_due(pool, owner, 60, {}, 100, 10, email_room=1)
    assert again.key == job.key


async def test_a_delivery_a_retyping_did_not_reach_takes_its_endpoints_type_when_a_redelivery_resumes_it(
        pool, clean_db):
    """A redelivered notifications.ready resumes the waiting row (a dead worker's): leased so, it
    takes its endpoint's type as its channel, as a row the sweep leases does."""
    client, endpoint, notification = await delivery_left_on_its_old_channel(pool)

    [job] = await records.open_deliveries(pool, [notification], "w-retype-open", 60, [])
    assert job.resumed and job.endpoint.channel == "email"
    assert await pool.fetchval("SELECT channel FROM deliveries WHERE endpoint_id = $1", endpoint) == "email"


async def test_a_worker_holds_what_a_rate_sends_in_10_s_at_least_one_destinations_send_slots_at_most_its_backlog(
        settings, monkeypatch):
    """dispatcher.ENDPOINT_HELD_RATE_S, as docs/delivery.md's table of bounds says it."""
    from alerting_app.delivery.dispatcher import Dispatcher
    from alerting_app.delivery.jobs import DeliveryJob, Endpoint

    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 16)
    monkeypatch.setattr(settings, "delivery_endpoint_backlog", 1_000)
    monkeypatch.setattr(settings, "endpoint_rate_limit_per_s", 100.0)
    monkeypatch.setattr(settings, "email_rate_limit_per_s", 10.0)
    dispatcher = Dispatcher(settings)
    try:
        def held_at_most(rate_limit_per_s: float | None) -> int:
            endpoint = Endpoint("e", "webhook", "https://hooks.example.com/x", "secret", rate_limit_per_s)
            return dispatcher.held_at_most(DeliveryJob(None, endpoint.endpoint_id, endpoint, 0))

        assert held_at_most(None) == 1_000  # ENDPOINT_RATE_LIMIT_PER_S: 100/s sends 1,000 in 10 s
        assert held_at_most(50.0) == 500
        assert held_at_most(0.1) == 16  # one in 10 s: held as many as it has send slots
        assert held_at_most(0) == 1_000  # no limit: its backlog
        assert dispatcher.email_held_at_most() == 100
    finally:
        await dispatcher.close()


async def test_a_sweep_that_took_all_its_email_room_leaves_new_email_to_the_sweep_and_one_that_did_not_does_not(
        settings):
    from alerting_app.delivery.dispatcher import Dispatcher

    dispatcher = Dispatcher(settings)
    try:
        dispatcher.swept_email(room=5, leased=5)  # more may wait in Postgres for its turn
        assert dispatcher.email_to_the_sweep()
        dispatcher.swept_email(room=5, leased=4)  # none left waiting
        assert not dispatcher.email_to_the_sweep()
    finally:
        await dispatcher.close()


async def test_email_refused_for_lack_of_room_is_still_waiting_after_a_webhook_is_refused_too(settings, monkeypatch):
    """Refused email waits in Postgres for its turn, so new email is left to the sweep behind it;
    a refused webhook says nothing about email."""
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.dispatcher import Dispatcher
    from alerting_app.delivery.jobs import DeliveryJob, Endpoint

    monkeypatch.setattr(settings, "delivery_max_held", 0)  # a full worker: every job is refused
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    notification = NotificationReady(client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=[alert],
                                     rule_ids=["1d2e3f40-0000-4000-8000-000000000004"])

    def job(channel: str, value: str) -> DeliveryJob:
        endpoint = Endpoint(f"{channel}-endpoint", channel, value, "secret", None)
        return DeliveryJob(notification, endpoint.endpoint_id, endpoint, 0)

    dispatcher = Dispatcher(settings)
    try:
        assert len(dispatcher.submit([job("email", "oncall@example.com")])) == 1
        assert len(dispatcher.submit([job("webhook", "https://hooks.example.com/x")])) == 1
        assert dispatcher.email_to_the_sweep()
    finally:
        await dispatcher.close()


async def test_a_worker_that_has_stopped_takes_no_more_deliveries(settings):
    """What comes after the stop (a batch taken in as the agent stops) is refused, to be handed back:
    nothing is started that the stop would not wait for nor hand back."""
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.dispatcher import Dispatcher
    from alerting_app.delivery.jobs import DeliveryJob, Endpoint

    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    notification = NotificationReady(client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=[alert],
                                     rule_ids=["1d2e3f40-0000-4000-8000-000000000004"])
    endpoint = Endpoint("webhook-endpoint", "webhook", "https://hooks.example.com/x", "secret", None)
    job = DeliveryJob(notification, endpoint.endpoint_id, endpoint, 0)
    dispatcher = Dispatcher(settings)
    await dispatcher.close()

    assert dispatcher.submit([job]) == [job]
    assert dispatcher.held_keys() == []


async def test_a_worker_holding_an_endpoints_backlog_refuses_the_next_delivery_of_it(settings, monkeypatch):
    from alerting_app.contracts import Alert, NotificationReady
    from alerting_app.delivery.dispatcher import Dispatcher
    from alerting_app.delivery.jobs import DeliveryJob, Endpoint

    monkeypatch.setattr(settings, "delivery_endpoint_backlog", 2)
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    async with Receiver() as receiver:
        release = receiver.hold("hanging")
        endpoint = Endpoint("7a1b4c9e-0000-4000-8000-000000000009", "webhook", receiver.url("hanging"), "secret", None)
        jobs = [DeliveryJob(NotificationReady(client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=[alert],
                                              rule_ids=["1d2e3f40-0000-4000-8000-000000000004"]),
                            endpoint.endpoint_id, endpoint, 0) for _ in range(3)]
        dispatcher = Dispatcher(settings)
        try:
            refused = dispatcher.submit(jobs)

            assert refused == jobs[2:] and dispatcher.held_per_endpoint() == {endpoint.endpoint_id: 2}
        finally:
            release.set()
            await dispatcher.close()
