"""The deliver agent through Faust's test driver, against the real Postgres, Redis and broker and
real local endpoints: every enabled endpoint gets the notification once, failures are retried or
dead-lettered, and one endpoint's trouble holds up nobody else's deliveries."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid

import pytest
import pytest_asyncio

from agents.deliver import deliver_notifications, sweep
from alerting_app.contracts import Alert, NotificationReady
from delivery_receivers import Answer, Receiver, SmtpServer
from postgres_waits import until_waiting_on_a_lock
from test_agent_support import (  # noqa: F401  (fixtures)
    AGENT_LOOP, DELETIONS, delete_client_as_the_api_does, insert_client, insert_endpoint, insert_rule, pipeline, pool,
    sent_to,
)

pytestmark = AGENT_LOOP


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dispatcher(pipeline):
    """This process's delivery dispatcher, as the agent uses it; closed after the module."""
    from alerting_app import redis_client
    from alerting_app.delivery.dispatcher import close_dispatcher, dispatcher

    yield dispatcher()
    await close_dispatcher()
    await redis_client.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "delivery_backoff_initial_s", 0.01)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 0.05)
    monkeypatch.setattr(settings, "delivery_max_attempts", 4)
    monkeypatch.setattr(settings, "delivery_record_interval_s", 0.01)
    return settings


@pytest.fixture
def alone_in_the_database(clean_db):
    """A sweep leases every due row of the database, and the session's database is shared: rows
    other test modules left due (retention's, a stop's hand-back) would be leased and started with
    this test's, or fail the sweep. Emptied first, what a sweep finds is this test's."""


@pytest_asyncio.fixture(loop_scope="session")
async def receiver():
    async with Receiver() as running:
        yield running


async def pending_notification(pool, client_id: str, rule_ids: list[str], **context: str) -> NotificationReady:
    """A notification as aggregate leaves it: a PENDING row, and its notifications.ready message."""
    alert = Alert(alert_id=str(uuid.uuid4()), event_ts=1_700_000_000.5, severity="HIGH", source="payments",
                  name="CheckoutLatency", context=context or {"region": "eu-west-1"})
    notification = NotificationReady(client_id=client_id, alerts=[alert], rule_ids=rule_ids,
                                     created_at=round(time.time(), 6))
    await pool.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, emitted)"
        " VALUES ($1, $2, $3, $4, $5, to_timestamp($6), true)",
        notification.notification_id, client_id, alert.alert_id, [alert.model_dump(mode="json")], rule_ids,
        notification.created_at)
    return notification


async def tenant_with_endpoint(pool, type_: str, value: str, **rule) -> tuple[str, str, str]:
    client = await insert_client(pool)
    rule_id = await insert_rule(pool, client, **rule)
    return client, rule_id, await insert_endpoint(pool, client, rule_id, type_, value)


async def put(*values: bytes, key: str = "client-key", partition: int = 0) -> list:
    """Each value is put on notifications.ready and taken in: one Intake per value."""
    async with deliver_notifications.test_context() as agent:
        for value in values:
            await agent.put(value, key=key.encode(), partition=partition)
        return [agent.results[i] for i in range(len(values))]


async def deliver(dispatcher, *values: bytes, **put_options) -> list:
    """Put the values on notifications.ready and wait until their deliveries are done and recorded."""
    intakes = await put(*values, **put_options)
    await dispatcher.drained()
    return intakes


async def deliveries(pool, notification_id: str) -> dict[str, tuple]:
    rows = await pool.fetch(
        "SELECT endpoint_id::text, channel, status, attempts, last_error,"
        " first_attempt_at IS NOT NULL AND last_attempt_at >= first_attempt_at AS attempted"
        " FROM deliveries WHERE notification_id = $1", notification_id)
    columns = ("channel", "status", "attempts", "last_error", "attempted")
    return {row["endpoint_id"]: tuple(row[c] for c in columns) for row in rows}


async def until_settled(pool, notification_id: str, timeout: float = 30.0) -> None:
    """Wait until the notification is no longer PENDING; a bound, not a measurement."""
    async with asyncio.timeout(timeout):
        while (await notification_state(pool, notification_id))[0] == "PENDING":
            await asyncio.sleep(0.01)


async def notification_state(pool, notification_id: str) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT status, detail FROM notifications WHERE notification_id = $1",
                              notification_id)
    return row["status"], row["detail"]


async def test_webhook_receives_the_signed_payload_once_and_is_recorded_sent(pool, dispatcher, receiver):
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    [intake] = await deliver(dispatcher, notification.encode())

    [post] = receiver.posts
    assert post.body["notification_id"] == notification.notification_id
    assert post.body["alerts"] == [notification.alerts[0].model_dump(mode="json")]
    secret = await pool.fetchval("SELECT secret FROM endpoints WHERE endpoint_id = $1", endpoint)
    assert post.headers["X-Alerting-Signature"] == "sha256=" + hmac.new(
        secret.encode(), post.raw, hashlib.sha256).hexdigest()
    assert post.headers["Idempotency-Key"] == f"{notification.notification_id}:{endpoint}"
    assert [job.endpoint_id for job in intake.started] == [endpoint] and intake.dead_letters == []
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 1, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_endpoint_answering_500_twice_then_200_is_sent_with_three_attempts(pool, dispatcher, receiver):
    receiver.answer("hook", 500, 500, 200)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())

    assert len(receiver.posts) == 3
    assert len(receiver.idempotency_keys()) == 1  # one key for every attempt
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 3, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_endpoint_answering_400_fails_after_one_attempt_and_is_dead_lettered(pool, dispatcher, receiver):
    receiver.answer("hook", 400)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())

    assert len(receiver.posts) == 1
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 1, "HTTP 400", True)}
    status, detail = await notification_state(pool, notification.notification_id)
    assert (status, detail) == ("FAILED", f"1 of 1 deliveries failed: {endpoint}: HTTP 400")
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"] == f"endpoint {endpoint} (webhook): HTTP 400; FAILED after 1 attempt(s)"
    assert NotificationReady.model_validate_json(letter["payload"]) == notification


async def test_a_failed_notification_retried_by_its_tenant_is_delivered_to_the_endpoint_that_failed(
        pool, dispatcher, alone_in_the_database, receiver):
    from alerting_app.delivery import records

    receiver.answer("hook", 400, 200)  # then the tenant fixes the endpoint
    client, rule, failing = await tenant_with_endpoint(pool, "webhook", receiver.url())
    working = await insert_endpoint(pool, client, rule, "webhook", receiver.url("other"))
    notification = await pending_notification(pool, client, [rule])
    await deliver(dispatcher, notification.encode())
    assert (await notification_state(pool, notification.notification_id))[0] == "FAILED"

    async with pool.acquire() as conn:
        assert await records.retry_failed(conn, notification.notification_id, client)
    assert await deliveries(pool, notification.notification_id) == {
        failing: ("webhook", "PENDING", 0, "HTTP 400", True), working: ("webhook", "SENT", 1, None, True)}
    async with asyncio.timeout(30):
        while not receiver.posts_to("hook")[1:]:
            await sweep(pool, dispatcher)
            await dispatcher.drained()
    await until_settled(pool, notification.notification_id)

    assert [len(receiver.posts_to(path)) for path in ("hook", "other")] == [2, 1]  # the SENT one is not sent again
    assert await deliveries(pool, notification.notification_id) == {
        failing: ("webhook", "SENT", 1, None, True), working: ("webhook", "SENT", 1, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_endpoint_failing_every_attempt_is_failed_after_the_last_and_dead_lettered(
        pool, dispatcher, receiver, quick_retries):
    receiver.answer("hook", 503)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())

    assert len(receiver.posts) == quick_retries.delivery_max_attempts == 4
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 4, "HTTP 503", True)}
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"].endswith("HTTP 503; FAILED after 4 attempt(s)")


async def test_a_delivery_handed_back_for_each_retry_is_sent_each_attempt_once_then_failed_and_dead_lettered(
        pool, dispatcher, receiver, quick_retries, alone_in_the_database, monkeypatch):
    """Every retry handed back (attempts.HAND_BACK_AFTER_S at 0 here): the sweep takes the delivery
    up again each time it is due, with its attempts counted, so the endpoint gets exactly
    DELIVERY_MAX_ATTEMPTS posts, one per attempt, and the last ends it FAILED and dead-lettered as if
    it had stayed in the worker."""
    from alerting_app.delivery import attempts

    monkeypatch.setattr(attempts, "HAND_BACK_AFTER_S", 0.0)
    receiver.answer("hook", 503)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())
    # Handed back after its first attempt, released, due after its backoff.
    assert await pool.fetchrow("SELECT status, attempts, lease_until IS NULL AS released FROM deliveries"
                               " WHERE notification_id = $1", notification.notification_id) == ("PENDING", 1, True)
    async with asyncio.timeout(30):  # a guard against hanging only
        while (await notification_state(pool, notification.notification_id))[0] == "PENDING":
            await sweep(pool, dispatcher)
            await dispatcher.drained()
            await asyncio.sleep(0.01)

    assert len(receiver.posts) == quick_retries.delivery_max_attempts == 4
    key = f"{notification.notification_id}:{endpoint}"
    assert {post.headers["Idempotency-Key"] for post in receiver.posts} == {key}
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 4, "HTTP 503", True)}
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"].endswith("HTTP 503; FAILED after 4 attempt(s)")


async def test_a_send_that_raises_unexpectedly_is_failed_once_with_its_reason_and_dead_lettered(
        pool, dispatcher, receiver, monkeypatch):
    from alerting_app.delivery import attempts

    async def broken_send(*args, **kwargs):
        raise RuntimeError("cannot format this notification")

    monkeypatch.setattr(attempts, "send_webhook", broken_send)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())

    reason = "RuntimeError: cannot format this notification"
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "FAILED", 1, reason, True)}
    assert await notification_state(pool, notification.notification_id) == (
        "FAILED", f"1 of 1 deliveries failed: {endpoint}: {reason}")
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"] == f"endpoint {endpoint} (webhook): {reason}; FAILED after 1 attempt(s)"


async def test_a_429_is_retried_no_sooner_than_its_retry_after(pool, dispatcher, receiver, monkeypatch,
                                                              quick_retries):
    # Retry-After is waited up to DELIVERY_BACKOFF_MAX_S; the backoff itself stays at 0.01-0.02 s.
    monkeypatch.setattr(quick_retries, "delivery_backoff_max_s", 2.0)
    receiver.answer("hook", Answer(429, {"Retry-After": "1"}), 200)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())

    first, second = receiver.posts
    # The backoff alone would have retried within 0.05 s.
    assert second.received_at - first.received_at >= 1.0
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 2, None, True)}


async def test_slack_and_email_endpoints_are_delivered(pool, dispatcher, receiver, monkeypatch, quick_retries):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    slack = await insert_endpoint(pool, client, rule, "slack", receiver.url("services/T0/B0/X"))
    email = await insert_endpoint(pool, client, rule, "email", "oncall@example.com")
    notification = await pending_notification(pool, client, [rule])
    with SmtpServer() as smtp:
        monkeypatch.setattr(quick_retries, "smtp_host", "127.0.0.1")
        monkeypatch.setattr(quick_retries, "smtp_port", smtp.port)

        await deliver(dispatcher, notification.encode())

        [message] = smtp.messages
    assert message["Subject"] == "[HIGH] payments: CheckoutLatency"
    [post] = receiver.posts_to("services/T0/B0/X")
    assert post.body["text"] == "[HIGH] payments: CheckoutLatency"
    assert await deliveries(pool, notification.notification_id) == {
        slack: ("slack", "SENT", 1, None, True), email: ("email", "SENT", 1, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_a_relay_refusing_in_bytes_postgres_cannot_hold_fails_the_delivery_and_its_neighbours_are_recorded(
        pool, dispatcher, receiver, monkeypatch, quick_retries):
    """A Latin-1 byte (a lone surrogate once aiosmtplib has decoded it) and a NUL in the relay's
    reply: recorded as U+FFFD. Postgres refusing the text would have held back, for ever, every
    outcome written in the same batch, the webhook's too."""
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    email = await insert_endpoint(pool, client, rule, "email", "gone@example.com")
    webhook = await insert_endpoint(pool, client, rule, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    with SmtpServer() as smtp:
        monkeypatch.setattr(quick_retries, "smtp_host", "127.0.0.1")
        monkeypatch.setattr(quick_retries, "smtp_port", smtp.port)
        smtp.refuse("gone@example.com", b"550 5.1.1 caf\xe9 \x00 unknown")

        await deliver(dispatcher, notification.encode())

    reason = "SMTP 550: 5.1.1 caf\ufffd \ufffd unknown"
    assert await deliveries(pool, notification.notification_id) == {
        email: ("email", "FAILED", 1, reason, True), webhook: ("webhook", "SENT", 1, None, True)}
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"] == f"endpoint {email} (email): {reason}; FAILED after 1 attempt(s)"


async def test_only_enabled_endpoints_of_the_notifications_rules_are_called(pool, dispatcher, receiver):
    client = await insert_client(pool)
    matched_rule = await insert_rule(pool, client)
    other_rule = await insert_rule(pool, client, source="search")
    await insert_endpoint(pool, client, matched_rule, "webhook", receiver.url("enabled"))
    await insert_endpoint(pool, client, matched_rule, "webhook", receiver.url("disabled"), enabled=False)
    await insert_endpoint(pool, client, other_rule, "webhook", receiver.url("other-rule"))
    notification = await pending_notification(pool, client, [matched_rule])

    await deliver(dispatcher, notification.encode())

    assert [post.path for post in receiver.posts] == ["enabled"]


async def test_notification_without_any_endpoint_is_failed(pool, dispatcher, receiver):
    client = await insert_client(pool)
    rule = await insert_rule(pool, client)
    notification = await pending_notification(pool, client, [rule])

    [intake] = await deliver(dispatcher, notification.encode())

    assert receiver.posts == [] and intake.started == []
    assert await notification_state(pool, notification.notification_id) == (
        "FAILED", "no enabled endpoint on the matched rules")


async def test_redelivered_notification_already_sent_posts_nothing(pool, dispatcher, receiver):
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    await deliver(dispatcher, notification.encode())
    [redelivered] = await deliver(dispatcher, notification.encode())

    assert len(receiver.posts) == 1
    assert redelivered.started == []
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 1, None, True)}


@pytest.mark.parametrize("first_answer", [200, 400], ids=["sent", "failed"])
async def test_a_settled_notification_replayed_sends_nothing_to_an_endpoint_added_since(
        pool, dispatcher, receiver, first_answer):
    # docs/operations.md, "Replay a topic": a replay notifies nobody again, new endpoints included.
    receiver.answer("hook", first_answer)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await deliver(dispatcher, notification.encode())
    settled = await notification_state(pool, notification.notification_id)
    assert settled[0] == ("SENT" if first_answer == 200 else "FAILED")

    await insert_endpoint(pool, client, rule, "webhook", receiver.url("added"))
    [replayed] = await deliver(dispatcher, notification.encode())

    assert replayed.started == [] and receiver.posts_to("added") == []
    assert set(await deliveries(pool, notification.notification_id)) == {endpoint}
    assert await notification_state(pool, notification.notification_id) == settled


async def test_a_settled_notification_gets_no_new_delivery_row_even_past_the_intake_check(pool):
    from alerting_app.delivery import records

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", "http://127.0.0.1:1/hook")
    notification = await pending_notification(pool, client, [rule])
    await pool.execute("UPDATE notifications SET status = 'SENT' WHERE notification_id = $1",
                       notification.notification_id)

    # Settled by another worker after this one's intake read it PENDING: _OPEN checks again.
    assert await records.open_deliveries(pool, [notification], "worker-a", 60.0, []) == []
    assert await deliveries(pool, notification.notification_id) == {}


async def test_a_retry_reopens_only_deliveries_whose_endpoint_is_still_there_and_enabled(pool, dispatcher, receiver):
    from alerting_app.delivery import records

    receiver.answer("gone", 400)
    receiver.answer("off", 400)
    client, rule, gone = await tenant_with_endpoint(pool, "webhook", receiver.url("gone"))
    off = await insert_endpoint(pool, client, rule, "webhook", receiver.url("off"))
    notification = await pending_notification(pool, client, [rule])
    await deliver(dispatcher, notification.encode())
    assert (await notification_state(pool, notification.notification_id))[0] == "FAILED"

    await pool.execute("DELETE FROM endpoints WHERE endpoint_id = $1", gone)
    await pool.execute("UPDATE endpoints SET enabled = false WHERE endpoint_id = $1", off)
    async with pool.acquire() as conn:
        with pytest.raises(records.NotRetryable, match="deleted or disabled"):
            await records.retry_failed(conn, notification.notification_id, client)
        assert (await notification_state(pool, notification.notification_id))[0] == "FAILED"

        await pool.execute("UPDATE endpoints SET enabled = true WHERE endpoint_id = $1", off)
        assert await records.retry_failed(conn, notification.notification_id, client)
    reopened = await deliveries(pool, notification.notification_id)
    assert (reopened[gone][1], reopened[off][1]) == ("FAILED", "PENDING")
    # Left due, it would be swept up by the tests that follow.
    await pool.execute("DELETE FROM deliveries WHERE notification_id = $1", notification.notification_id)


async def test_notification_redelivered_while_its_delivery_is_in_hand_is_posted_once(pool, dispatcher, receiver):
    release = receiver.hold("hook")
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])

    first, redelivered = await put(notification.encode(), notification.encode())
    await receiver.wait_for_posts(1)
    release.set()
    await dispatcher.drained()

    assert len(first.started) == 1 and redelivered.started == []
    assert len(receiver.posts) == 1
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 1, None, True)}


async def test_a_hanging_endpoint_does_not_hold_up_another_tenants_notification_on_the_same_partition(
        pool, dispatcher, receiver):
    release_slow = receiver.hold("slow")
    slow_client, slow_rule, slow_endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url("slow"))
    fast_client, fast_rule, fast_endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url("fast"))
    slow = await pending_notification(pool, slow_client, [slow_rule])
    fast = await pending_notification(pool, fast_client, [fast_rule])

    # Same partition, the hanging tenant's notification first.
    await put(slow.encode(), fast.encode(), partition=3)
    await until_settled(pool, fast.notification_id)

    # The fast tenant is delivered and recorded while the slow one's request still hangs.
    assert receiver.in_flight["slow"] == 1
    assert await deliveries(pool, fast.notification_id) == {fast_endpoint: ("webhook", "SENT", 1, None, True)}
    assert (await deliveries(pool, slow.notification_id))[slow_endpoint][1] == "PENDING"
    release_slow.set()
    await dispatcher.drained()
    assert await deliveries(pool, slow.notification_id) == {slow_endpoint: ("webhook", "SENT", 1, None, True)}


async def test_deliveries_beyond_an_endpoints_backlog_wait_in_postgres_and_are_swept_up_later(
        pool, dispatcher, alone_in_the_database, receiver, monkeypatch, quick_retries):
    monkeypatch.setattr(quick_retries, "delivery_endpoint_backlog", 1)
    release = receiver.hold("hook")
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(3)]

    intakes = await put(*(n.encode() for n in notifications))
    await receiver.wait_for_posts(1)

    assert [len(intake.started) for intake in intakes] == [1, 0, 0]
    waiting = await pool.fetchval("SELECT count(*) FROM deliveries WHERE endpoint_id = $1"
                                  " AND status = 'PENDING' AND lease_until IS NULL", endpoint)
    assert waiting == 2
    assert await sweep(pool, dispatcher) == []  # the endpoint is still full here
    release.set()
    while len(receiver.posts) < 3:
        await dispatcher.drained()
        await sweep(pool, dispatcher)
    await dispatcher.drained()
    assert sorted(post.body["notification_id"] for post in receiver.posts) == sorted(
        n.notification_id for n in notifications)


async def open_abandoned_delivery(pool, notification: NotificationReady, endpoint: str, attempts: int = 0) -> None:
    """The row a worker killed mid-delivery leaves: PENDING, leased by it, the lease run out."""
    await pool.execute(
        "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts, leased_by, lease_until)"
        " VALUES ($1, $2, 'webhook', 'PENDING', $3, 'dead-worker', now() - interval '1 second')",
        notification.notification_id, endpoint, attempts)


async def test_sweep_resumes_a_delivery_whose_worker_died_counting_its_attempts(pool, dispatcher, receiver,
                                                                               alone_in_the_database):
    receiver.answer("hook", 503, 200)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, notification, endpoint, attempts=2)

    [job] = await sweep(pool, dispatcher)
    await dispatcher.drained()

    assert job.key == (notification.notification_id, endpoint)
    assert [post.body["notification_id"] for post in receiver.posts] == [notification.notification_id] * 2
    assert await deliveries(pool, notification.notification_id) == {endpoint: ("webhook", "SENT", 4, None, True)}
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_a_resumed_delivery_fails_after_the_attempts_its_dead_worker_left_it(pool, dispatcher, receiver,
                                                                                    quick_retries,
                                                                                    alone_in_the_database):
    # DELIVERY_MAX_ATTEMPTS counts the whole delivery: with 2 of 4 made, a failing endpoint gets 2 more, not 4.
    receiver.answer("hook", 503)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, notification, endpoint, attempts=2)

    await sweep(pool, dispatcher)
    await dispatcher.drained()

    assert len(receiver.posts) == quick_retries.delivery_max_attempts - 2 == 2
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 4, "HTTP 503", True)}
    [letter] = await sent_to("notifications.ready.dlq", client)
    assert letter["reason"].endswith("HTTP 503; FAILED after 4 attempt(s)")


async def test_a_delivery_sent_but_not_recorded_is_recorded_sent_without_posting_again(pool, dispatcher, receiver,
                                                                                       alone_in_the_database):
    from alerting_app import redis_client
    from alerting_app.delivery.claims import SENT_MARK, claim_key

    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    # The dead worker got its answer and marked the key, but died before recording it.
    await open_abandoned_delivery(pool, notification, endpoint, attempts=0)
    await redis_client.redis().set(claim_key(notification.notification_id, endpoint), SENT_MARK, ex=60)

    await sweep(pool, dispatcher)
    [redelivered] = await deliver(dispatcher, notification.encode())

    assert receiver.posts == [] and redelivered.started == []
    [(channel, status, _, error, _)] = (await deliveries(pool, notification.notification_id)).values()
    assert (channel, status, error) == ("webhook", "SENT", None)
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_a_delivery_its_dead_worker_sent_is_recorded_with_that_attempt_dated_when_it_was_sent(
        pool, dispatcher, receiver, alone_in_the_database):
    """The worker that sent it marked it sent in Redis and was killed before its outcome reached
    Postgres. The worker that takes the row over records it SENT without sending, with that send
    among its attempts, dated when it was sent, not when it was found. Before, the tenant read a
    SENT delivery with `attempts: 0` and no attempt time: sent, and never tried."""
    import aiohttp

    from alerting_app import metrics, redis_client
    from alerting_app.app import settings
    from alerting_app.delivery import claims, records
    from alerting_app.delivery.attempts import DeliveryContext, SendSlots, attempt
    from alerting_app.delivery.jobs import DeliveryJob
    from alerting_app.delivery.rate_limits import RateLimits
    from alerting_app.redis_pipelining import PipelinedRedis

    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, notification, endpoint, attempts=1)  # a failed attempt recorded before
    await pool.execute("UPDATE deliveries SET first_attempt_at = now() - interval '1 hour',"
                       " last_attempt_at = now() - interval '1 hour' WHERE notification_id = $1",
                       notification.notification_id)
    # The dead worker's next attempt, as its deliveries make it (claim, send, sent mark); its
    # outcome never reached Postgres.
    redis = PipelinedRedis(redis_client.redis())
    slots = SendSlots(asyncio.Semaphore(1), asyncio.Semaphore(1), asyncio.Semaphore(1))
    job = DeliveryJob(notification, endpoint, (await records.endpoints_now(pool, [endpoint]))[endpoint], 1)
    async with aiohttp.ClientSession() as session:
        before = time.time()
        await attempt(job, DeliveryContext(settings, session, redis, RateLimits(redis, 1.0), None,
                                           lambda job: slots))
        after = time.time()
    assert len(receiver.posts) == 1
    # The worker that takes it over comes a lease or more later: the mark has aged as Redis ages it.
    aged_s = 30
    key = claims.claim_key(notification.notification_id, endpoint)
    await redis_client.redis().pexpire(key, await redis_client.redis().pttl(key) - aged_s * 1000)

    sends_counted = metrics.notifications_sent.labels(channel="webhook")._value.get()

    [taken_over] = await sweep(pool, dispatcher)
    await dispatcher.drained()

    assert taken_over.resumed and len(receiver.posts) == 1  # not sent again
    # Counted by the worker that sent it (in its metrics, gone with it), not again by this one.
    assert metrics.notifications_sent.labels(channel="webhook")._value.get() == sends_counted
    row = await pool.fetchrow(
        "SELECT status, attempts, extract(epoch FROM first_attempt_at) AS first_at,"
        " extract(epoch FROM last_attempt_at) AS last_at FROM deliveries WHERE notification_id = $1",
        notification.notification_id)
    assert (row["status"], row["attempts"]) == ("SENT", 2)
    assert row["first_at"] < before - 3000  # the failed attempt's, kept
    # When its mark was written, read off the mark's TTL (a few milliseconds off at most; the
    # upper bound leaves the take-over's own delays room).
    assert before - aged_s - 1 <= float(row["last_at"]) <= after - aged_s + 5
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)


async def test_a_delivery_taken_over_is_found_sent_before_it_waits_for_its_endpoints_token(pool, dispatcher,
                                                                                            receiver,
                                                                                            alone_in_the_database):
    # Its sent mark lasts DELIVERY_SENT_MARKER_TTL_S; the token of a slow endpoint can take longer.
    # Looked for only after that wait, the mark would be gone, and the claim would send it again.
    from alerting_app import redis_client
    from alerting_app.delivery.claims import SENT_MARK, claim_key

    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    await pool.execute("UPDATE endpoints SET rate_limit_per_s = 0.001 WHERE endpoint_id = $1", endpoint)  # 1 in 1,000 s
    first = await pending_notification(pool, client, [rule])
    await deliver(dispatcher, first.encode())  # takes the endpoint's one token
    taken_over = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, taken_over, endpoint, attempts=0)
    await redis_client.redis().set(claim_key(taken_over.notification_id, endpoint), SENT_MARK, ex=60)

    async with asyncio.timeout(30):  # a guard: waiting for the token would take 1,000 s
        [job] = await sweep(pool, dispatcher)
        await dispatcher.drained()
        await until_settled(pool, taken_over.notification_id)

    assert job.resumed
    assert [post.body["notification_id"] for post in receiver.posts] == [first.notification_id]
    assert await notification_state(pool, taken_over.notification_id) == ("SENT", None)


async def test_a_row_a_redelivered_message_finds_is_resumed_and_a_new_one_is_not(pool):
    from alerting_app.delivery import records

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", "http://127.0.0.1:1/hook")
    notification = await pending_notification(pool, client, [rule])
    [opened] = await records.open_deliveries(pool, [notification], "worker-a", 60.0, [])
    await pool.execute("UPDATE deliveries SET lease_until = now() - interval '1 second'"
                       " WHERE notification_id = $1", notification.notification_id)
    [found] = await records.open_deliveries(pool, [notification], "worker-b", 60.0, [])

    assert (opened.resumed, found.resumed) == (False, True)
    await pool.execute("DELETE FROM deliveries WHERE notification_id = $1", notification.notification_id)


async def test_a_redelivered_message_leaves_a_row_whose_retry_is_not_due_yet_to_wait(pool):
    from alerting_app.delivery import records

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", "http://127.0.0.1:1/hook")
    notification = await pending_notification(pool, client, [rule])
    await records.open_deliveries(pool, [notification], "worker-a", 60.0, [])
    # Handed back, its next attempt due in a minute (its backoff, or the endpoint's Retry-After).
    await pool.execute("UPDATE deliveries SET lease_until = NULL, next_attempt_at = now() + interval '1 minute'"
                       " WHERE notification_id = $1", notification.notification_id)

    assert await records.open_deliveries(pool, [notification], "worker-b", 60.0, []) == []
    await pool.execute("DELETE FROM deliveries WHERE notification_id = $1", notification.notification_id)


async def test_a_disabled_endpoint_of_the_notifications_rule_gets_no_delivery_row(pool):
    from alerting_app.delivery import records

    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", "http://127.0.0.1:1/hook")
    await pool.execute("UPDATE endpoints SET enabled = false WHERE endpoint_id = $1", endpoint)
    notification = await pending_notification(pool, client, [rule])

    assert await records.open_deliveries(pool, [notification], "worker-a", 60.0, []) == []
    assert await pool.fetchval("SELECT count(*) FROM deliveries WHERE notification_id = $1",
                               notification.notification_id) == 0

async def test_a_retry_of_a_notification_that_is_not_failed_is_refused_saying_what_it_is(pool):
    from alerting_app.delivery import records

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", "http://127.0.0.1:1/hook")
    notification = await pending_notification(pool, client, [rule])
    await pool.execute("UPDATE notifications SET status = 'SENT' WHERE notification_id = $1",
                       notification.notification_id)

    async with pool.acquire() as conn:
        with pytest.raises(records.NotRetryable, match="the notification is SENT; only a FAILED one can be retried"):
            await records.retry_failed(conn, notification.notification_id, client)

async def test_a_rate_the_tenant_raises_reaches_a_delivery_already_waiting_for_its_token(pool, dispatcher, receiver,
                                                                                          monkeypatch):
    from alerting_app.delivery import rate_limits

    monkeypatch.setattr(rate_limits, "RATE_RECHECK_S", 0.2)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    await pool.execute("UPDATE endpoints SET rate_limit_per_s = 0.001 WHERE endpoint_id = $1", endpoint)  # 1 in 1,000 s
    first, second = [await pending_notification(pool, client, [rule]) for _ in range(2)]
    await put(first.encode(), second.encode())
    await receiver.wait_for_posts(1)  # the first took the one token; the second waits 1,000 s for the next

    await pool.execute("UPDATE endpoints SET rate_limit_per_s = 100 WHERE endpoint_id = $1", endpoint)  # PATCHed
    async with asyncio.timeout(30):
        await until_settled(pool, second.notification_id)

    assert sorted(post.body["notification_id"] for post in receiver.posts) == sorted(
        [first.notification_id, second.notification_id])


async def test_an_endpoint_disabled_while_a_delivery_waits_for_its_token_gets_no_send(pool, dispatcher, receiver,
                                                                                     monkeypatch):
    from alerting_app.delivery import rate_limits

    monkeypatch.setattr(rate_limits, "RATE_RECHECK_S", 0.2)
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    await pool.execute("UPDATE endpoints SET rate_limit_per_s = 0.001 WHERE endpoint_id = $1", endpoint)
    first, second = [await pending_notification(pool, client, [rule]) for _ in range(2)]
    await put(first.encode(), second.encode())
    await receiver.wait_for_posts(1)  # the second waits 1,000 s for its token

    await pool.execute("UPDATE endpoints SET enabled = false WHERE endpoint_id = $1", endpoint)
    async with asyncio.timeout(30):
        await until_settled(pool, second.notification_id)

    assert [post.body["notification_id"] for post in receiver.posts] == [first.notification_id]
    assert await deliveries(pool, second.notification_id) == {
        endpoint: ("webhook", "FAILED", 0, "endpoint was disabled", False)}
    # The tenant's choice, not a failure for the operators' dead-letter alarm: the row says why.
    assert await sent_to("notifications.ready.dlq", client) == []


@pytest.mark.parametrize("change", ["UPDATE endpoints SET enabled = false WHERE endpoint_id = $1",
                                    "DELETE FROM endpoints WHERE endpoint_id = $1"])
async def test_an_endpoint_disabled_or_deleted_while_a_delivery_waits_for_its_send_slot_gets_no_send(
        pool, dispatcher, receiver, quick_retries, monkeypatch, change):
    # A backlog behind a slow endpoint: the tenant turns it off, and what waits must not go out.
    from alerting_app.delivery import attempts

    monkeypatch.setattr(attempts, "ENDPOINT_RECHECK_S", 0.0)  # the wait here lasts as long as the test takes
    release = receiver.hold("busy")
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url("busy"))
    slots = quick_retries.delivery_endpoint_concurrency
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(slots + 1)]
    await put(*(n.encode() for n in notifications))
    await receiver.wait_for_posts(slots, "busy")  # every send slot of the endpoint is taken: one delivery waits

    await pool.execute(change, endpoint)
    release.set()
    for notification in notifications:
        await until_settled(pool, notification.notification_id)

    posted = {post.body["notification_id"] for post in receiver.posts_to("busy")}
    assert len(receiver.posts_to("busy")) == len(posted) == slots
    [waited] = [n for n in notifications if n.notification_id not in posted]
    reason = "endpoint was disabled" if change.startswith("UPDATE") else "endpoint was deleted"
    assert await deliveries(pool, waited.notification_id) == {endpoint: ("webhook", "FAILED", 0, reason, False)}
    assert await sent_to("notifications.ready.dlq", client) == []


@DELETIONS
async def test_a_delivery_in_hand_when_its_client_is_deleted_gets_no_send_and_no_dead_letter(
        pool, dispatcher, receiver, quick_retries, monkeypatch, finished):
    # Its endpoint went with its client's rules (and its row with its client's notification, once
    # the client is gone): nobody is left to tell that it failed.
    from alerting_app.delivery import attempts

    monkeypatch.setattr(attempts, "ENDPOINT_RECHECK_S", 0.0)  # the wait here lasts as long as the test takes
    release = receiver.hold("leaving")
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url("leaving"))
    slots = quick_retries.delivery_endpoint_concurrency
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(slots + 1)]
    await put(*(n.encode() for n in notifications))
    await receiver.wait_for_posts(slots, "leaving")  # one delivery waits for a send slot

    await delete_client_as_the_api_does(pool, client, [rule], finished=finished)
    release.set()
    await dispatcher.drained()

    assert len(receiver.posts_to("leaving")) == slots
    assert await sent_to("notifications.ready.dlq", client) == []


async def test_a_sent_mark_redis_cannot_be_asked_for_is_no_attempt_and_no_error():
    from alerting_app.delivery.attempts import DeliveryContext, _marked_sent
    from alerting_app.delivery.jobs import DeliveryJob
    from alerting_app.embedded import free_port
    from alerting_app.redis_pipelining import PipelinedRedis
    from redis.asyncio import Redis

    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    ctx = DeliveryContext(settings=None, session=None, redis=PipelinedRedis(unreachable), rate_limits=None,
                          recorder=None, send_slots=None)
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000.5, severity="HIGH", source="payments", name="n")
    notification = NotificationReady(client_id=str(uuid.uuid4()), alerts=[alert], rule_ids=[str(uuid.uuid4())])
    job = DeliveryJob(notification=notification, endpoint_id=str(uuid.uuid4()), endpoint=None, attempts=0,
                      resumed=True)
    try:
        assert await _marked_sent(job, ctx) is None
    finally:
        await unreachable.aclose()


async def test_a_delivery_whose_endpoint_was_deleted_meanwhile_is_failed_without_a_dead_letter(
        pool, dispatcher, receiver, alone_in_the_database):
    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, notification, endpoint)
    await pool.execute("DELETE FROM endpoints WHERE endpoint_id = $1", endpoint)

    await sweep(pool, dispatcher)
    await dispatcher.drained()

    assert receiver.posts == []
    assert await deliveries(pool, notification.notification_id) == {
        endpoint: ("webhook", "FAILED", 0, "endpoint was deleted", False)}
    # The tenant's choice, found as the delivery is taken up: not a failure for the operators' alarm.
    assert await sent_to("notifications.ready.dlq", client) == []


@DELETIONS
async def test_a_notification_of_a_client_deleted_while_it_was_in_flight_is_dropped_not_dead_lettered(
        pool, dispatcher, receiver, finished):
    # Its client is being deleted, or gone with its notification: nothing to deliver, and nothing
    # wrong with the message.
    from alerting_app import metrics

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url())
    gone = await pending_notification(pool, client, [rule])
    await delete_client_as_the_api_does(pool, client, [rule], finished=finished)
    other_client, other_rule, other_endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    other = await pending_notification(pool, other_client, [other_rule])
    dropped = metrics.messages_of_deleted_clients.labels(topic="notifications.ready")
    dropped_before = dropped._value.get()

    intakes = await deliver(dispatcher, gone.encode(), other.encode())

    assert [intake.dead_letters for intake in intakes] == [[], []]
    assert dropped._value.get() - dropped_before == 1
    assert [post.body["notification_id"] for post in receiver.posts] == [other.notification_id]
    assert await deliveries(pool, other.notification_id) == {other_endpoint: ("webhook", "SENT", 1, None, True)}
    assert await deliveries(pool, gone.notification_id) == {}


async def test_a_notification_whose_client_is_deleted_while_its_deliveries_are_opened_is_dropped(
        pool, dispatcher, receiver):
    # The deletion commits while the insert of the notification's deliveries waits for its row,
    # which the insert found (its statement began before): the foreign key then fails the insert.
    client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url("deleted-meanwhile"))
    notification = await pending_notification(pool, client, [rule])

    async with pool.acquire() as deleting:
        async with deleting.transaction():
            await deleting.execute("INSERT INTO deleted_rules (rule_id, client_id, version) VALUES ($1, $2, 2)",
                                   rule, client)
            await deleting.execute("DELETE FROM clients WHERE client_id = $1", client)
            taking_in = asyncio.ensure_future(put(notification.encode()))
            await until_waiting_on_a_lock(pool)
    async with asyncio.timeout(30):  # a bound: an agent that raised would never answer
        [intake] = await taking_in
    await dispatcher.drained()

    assert (intake.started, intake.dead_letters) == ([], [])
    assert receiver.posts_to("deleted-meanwhile") == []


async def test_a_batch_taken_in_again_counts_each_dropped_notification_once(pool, dispatcher, receiver):
    # One notification of a client deleted before the batch, one of a client deleted while the
    # batch's deliveries are opened: the batch is taken in again, and each is dropped once.
    from types import SimpleNamespace

    from agents.deliver import take_in
    from alerting_app import metrics

    earlier_client, earlier_rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url("deleted-earlier"))
    earlier = await pending_notification(pool, earlier_client, [earlier_rule])
    await delete_client_as_the_api_does(pool, earlier_client, [earlier_rule])
    client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url("deleted-meanwhile"))
    notification = await pending_notification(pool, client, [rule])
    dropped = metrics.messages_of_deleted_clients.labels(topic="notifications.ready")
    dropped_before = dropped._value.get()
    events = [SimpleNamespace(message=SimpleNamespace(value=n.encode())) for n in (earlier, notification)]

    async with pool.acquire() as deleting:
        async with deleting.transaction():
            await deleting.execute("INSERT INTO deleted_rules (rule_id, client_id, version) VALUES ($1, $2, 2)",
                                   rule, client)
            await deleting.execute("DELETE FROM clients WHERE client_id = $1", client)
            taking_in = asyncio.ensure_future(take_in(pool, dispatcher, events))
            await until_waiting_on_a_lock(pool)
    async with asyncio.timeout(30):
        intake = await taking_in

    assert (intake.started, intake.dead_letters) == ([], [])
    assert dropped._value.get() - dropped_before == 2


async def test_a_message_naming_a_notification_with_another_client_does_not_take_the_place_of_the_true_one(
        pool, dispatcher, receiver):
    # Both in one batch, the bad one first: the batch kept one message per notification_id, the bad
    # one, which became a dead letter, and the true one was acknowledged unread: never delivered.
    from types import SimpleNamespace

    from agents.deliver import take_in

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url("true-one"))
    notification = await pending_notification(pool, client, [rule])
    other_client, other_rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url("other-client"))
    posing = notification.model_copy(update={"client_id": other_client, "rule_ids": [other_rule]})
    events = [SimpleNamespace(message=SimpleNamespace(topic="notifications.ready", partition=0, offset=n, key=None,
                                                      value=value.encode()))
              for n, value in enumerate([posing, notification])]

    intake = await take_in(pool, dispatcher, events)
    await dispatcher.drained()

    [letter] = intake.dead_letters
    assert (letter.offset, letter.reason) == (0, f"notification_id: no such notification {notification.notification_id}")
    assert [job.notification.client_id for job in intake.started] == [client]
    assert [post.body["client_id"] for post in receiver.posts_to("true-one")] == [client]
    assert receiver.posts_to("other-client") == []


def _ready(**fields) -> bytes:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    return NotificationReady(**{"client_id": str(uuid.uuid4()), "alerts": [alert],
                                "rule_ids": [str(uuid.uuid4())], **fields}).encode()


@pytest.mark.parametrize(("value", "reason_names"), [
    (b"<html>not json</html>", "Invalid JSON"),
    (b'{"notification_id": "n", "client_id": "c", "alerts": []}', "alerts: List should have at least 1 item"),
    (b'{"notification_id": "n", "client_id": "c", "alerts": []}', "rule_ids: Field required"),
    (_ready(notification_id="n-1"), "notification_id: not a UUID"),
    (_ready(rule_ids=["r-1"]), "rule_ids: not a UUID"),
    (_ready(), "notification_id: no such notification"),
    # Not a fresh id of the contract's default, which the reason would then name as unknown.
    (json.dumps({"client_id": str(uuid.uuid4()), "rule_ids": [str(uuid.uuid4())], "alerts": [json.loads(
        Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout").encode())]}
                ).encode(), "notification_id: Field required"),
])
async def test_undecodable_notification_goes_to_the_dead_letter_topic(pool, dispatcher, receiver, value,
                                                                      reason_names):
    client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url())
    valid = await pending_notification(pool, client, [rule])
    key = f"dlq-{uuid.uuid4()}"

    bad, good = await deliver(dispatcher, value, valid.encode(), key=key, partition=7)

    [letter] = bad.dead_letters
    assert reason_names in letter.reason
    assert (letter.topic, letter.partition, letter.offset, letter.payload) == (
        "notifications.ready", 7, 0, value.decode())
    assert len(good.started) == 1
    assert [post.body["notification_id"] for post in receiver.posts] == [valid.notification_id]
    [on_broker] = await sent_to("notifications.ready.dlq", key)
    assert on_broker["reason"] == letter.reason


async def test_a_delivery_sent_by_a_dead_worker_stays_sent_though_its_endpoint_was_disabled_since(
        pool, dispatcher, alone_in_the_database, receiver):
    # The dead worker had the 2xx and its sent mark in Redis, not yet the SENT row; the tenant then
    # disabled the endpoint. It was delivered: not FAILED, and no dead letter saying so.
    from alerting_app import redis_client
    from alerting_app.delivery.claims import SENT_MARK, claim_key

    client, rule, endpoint = await tenant_with_endpoint(pool, "webhook", receiver.url())
    notification = await pending_notification(pool, client, [rule])
    await open_abandoned_delivery(pool, notification, endpoint, attempts=0)
    await redis_client.redis().set(claim_key(notification.notification_id, endpoint), SENT_MARK, ex=60)
    await pool.execute("UPDATE endpoints SET enabled = false WHERE endpoint_id = $1", endpoint)

    await sweep(pool, dispatcher)
    await dispatcher.drained()

    [(_, status, _, error, _)] = (await deliveries(pool, notification.notification_id)).values()
    assert (status, error) == ("SENT", None)
    assert receiver.posts == []  # not sent again
    assert await notification_state(pool, notification.notification_id) == ("SENT", None)
    assert not [letter for letter in await sent_to("notifications.ready.dlq", client)
                if notification.notification_id in letter["payload"]]


async def test_a_missing_notification_is_dead_lettered_unless_its_own_client_was_deleted(pool, dispatcher, receiver):
    # A deleted rule alone explains nothing: a live client deletes its rules too, and a message may
    # name a client that never existed beside a rule another, deleted, client had.
    live_client, deleted_rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url())
    await pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version) VALUES ($1, $2, 2)", deleted_rule,
                       live_client)
    await pool.execute("DELETE FROM rules WHERE rule_id = $1", deleted_rule)
    gone_client, gone_rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url())
    await delete_client_as_the_api_does(pool, gone_client, [gone_rule], finished=True)
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    strays = [NotificationReady(client_id=live_client, alerts=[alert], rule_ids=[deleted_rule]),
              NotificationReady(client_id=str(uuid.uuid4()), alerts=[alert], rule_ids=[gone_rule])]

    intakes = await deliver(dispatcher, *(stray.encode() for stray in strays))

    assert [[letter.reason for letter in intake.dead_letters] for intake in intakes] == [
        [f"notification_id: no such notification {stray.notification_id}"] for stray in strays]
    assert receiver.posts == []
