"""A worker that stops mid-delivery (Dispatcher.close), against the real Postgres, Redis and a real
local endpoint: a send already on the wire finishes and is recorded, so it is never sent again;
what has sent nothing (a delivery waiting for its retry) is handed back at once."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import pytest_asyncio

from alerting_app.delivery import records
from delivery_receivers import Answer, Receiver
from test_agent_deliver import pending_notification, tenant_with_endpoint
from test_agent_support import AGENT_LOOP, pipeline, pool  # noqa: F401  (fixtures)

pytestmark = AGENT_LOOP


@pytest.fixture
def settings(monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "delivery_record_interval_s", 0.01)
    monkeypatch.setattr(settings, "webhook_timeout_s", 10.0)
    return settings


@pytest_asyncio.fixture(loop_scope="session")
async def receiver():
    async with Receiver() as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def redis_closed_after_the_module(pipeline):
    from alerting_app import redis_client

    yield
    await redis_client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def opened(pool):
    """Notifications a test delivers; their rows are deleted after it, or a later module's sweeps
    would take up a delivery left PENDING here once it comes due."""
    notification_ids: list[str] = []
    yield notification_ids
    await pool.execute("DELETE FROM deliveries WHERE notification_id = ANY($1::uuid[])", notification_ids)


async def delivering(pool, settings, opened, url: str, attempts_before: int = 0):
    """A worker's dispatcher delivering one new notification to `url` (as a delivery taken up again
    after `attempts_before` recorded attempts, if any); returns both."""
    from alerting_app.delivery.dispatcher import Dispatcher

    client, rule, _ = await tenant_with_endpoint(pool, "webhook", url)
    notification = await pending_notification(pool, client, [rule])
    opened.append(notification.notification_id)
    dispatcher = Dispatcher(settings)
    jobs = await records.open_deliveries(pool, [notification], dispatcher.owner, settings.delivery_lease_s, [])
    if attempts_before:
        await pool.execute("UPDATE deliveries SET attempts = $2 WHERE notification_id = $1",
                           notification.notification_id, attempts_before)
        jobs = [dataclasses.replace(job, attempts=attempts_before) for job in jobs]
    assert dispatcher.submit(jobs) == []
    return dispatcher, notification


async def delivery_row(pool, notification_id: str):
    return await pool.fetchrow("SELECT status, attempts, lease_until IS NOT NULL AS leased FROM deliveries"
                               " WHERE notification_id = $1", notification_id)


async def test_a_stop_during_a_slow_post_records_it_sent_and_does_not_send_it_again(pool, settings, receiver, opened):
    answer = receiver.hold("slow")
    dispatcher, notification = await delivering(pool, settings, opened, receiver.url("slow"))
    await receiver.wait_for_posts(1, "slow")

    closing = asyncio.ensure_future(dispatcher.close())
    await asyncio.sleep(0.5)
    assert not closing.done()  # the stop waits for the request the receiver already has
    answer.set()
    await asyncio.wait_for(closing, 20)

    row = await delivery_row(pool, notification.notification_id)
    assert (row["status"], row["attempts"]) == ("SENT", 1)
    # A SENT row is never leased again: no worker sends it a second time, even once the claim expires.
    assert await pool.fetchval("SELECT status FROM notifications WHERE notification_id = $1",
                               notification.notification_id) == "SENT"
    assert len(receiver.posts_to("slow")) == 1


async def test_a_stop_hands_a_delivery_waiting_for_its_retry_back_at_once(pool, settings, receiver, opened, monkeypatch,
                                                                         caplog):
    from alerting_app.delivery.attempts import HAND_BACK_AFTER_S

    # A retry due within HAND_BACK_AFTER_S (here half of it, plus up to as much jitter) is waited
    # for in the worker; a later one the delivery hands back itself, before any stop.
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", HAND_BACK_AFTER_S / 2)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 60.0)
    receiver.answer("failing", 503)
    dispatcher, notification = await delivering(pool, settings, opened, receiver.url("failing"))
    async with asyncio.timeout(20):  # the failed attempt recorded: the delivery waits for its retry
        while (await delivery_row(pool, notification.notification_id))["attempts"] == 0:
            await asyncio.sleep(0.01)
    [key] = dispatcher.held_keys()
    waiting = dispatcher._held[key]

    await asyncio.wait_for(dispatcher.close(), 60)  # a guard against hanging, not a measurement

    # A retry's wait has sent nothing: it is cancelled, not taken for a send in flight, which the
    # stop would let run for up to its timeout and then log as cancelled after that grace.
    assert waiting.cancelled()
    assert "sends still in flight" not in caplog.text

    row = await delivery_row(pool, notification.notification_id)
    # Handed back (its lease let go, records.release): the next worker takes it up once its retry is due,
    assert (row["status"], row["attempts"], row["leased"]) == ("PENDING", 1, False)
    # not before.
    assert await pool.fetchval("SELECT next_attempt_at > now() FROM deliveries WHERE notification_id = $1",
                               notification.notification_id)


async def stopped_while_waiting_for_a_retry(pool, dispatcher, notification_id: str, attempts: int) -> float:
    """Stop `dispatcher` once the delivery's failed attempt is recorded; the seconds from the stop
    until the row says the next attempt is due."""
    async with asyncio.timeout(20):
        while (await delivery_row(pool, notification_id))["attempts"] < attempts:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(dispatcher.close(), 20)
    row = await pool.fetchrow("SELECT status, lease_until IS NULL AS released,"
                              " extract(epoch FROM next_attempt_at - now())::float8 AS due_in_s"
                              " FROM deliveries WHERE notification_id = $1", notification_id)
    assert (row["status"], row["released"]) == ("PENDING", True)
    return row["due_in_s"]


@pytest.mark.parametrize("answer, backoff_initial_s, retry_wait_s", [
    (503, 30.0, (30.0, 60.0)),  # the backoff: DELIVERY_BACKOFF_INITIAL_S plus up to as much jitter
    (Answer(429, {"Retry-After": "45"}), 1.0, (45.0, 45.0)),  # longer than the backoff: it wins
])
async def test_a_delivery_handed_back_at_a_stop_waits_out_its_retry_with_the_next_worker(
        pool, settings, receiver, opened, monkeypatch, answer, backoff_initial_s, retry_wait_s):
    """Handed back, it is anyone's, but only once its retry is due: not at once (the next worker's
    sweep within a second, a Retry-After ignored across every rolling deploy). (A retry due this
    late, beyond attempts.HAND_BACK_AFTER_S, is handed back by the delivery itself, before the stop;
    one due sooner is handed back by the stop: the test above.)"""
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", backoff_initial_s)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 60.0)
    receiver.answer("failing", answer)
    dispatcher, notification = await delivering(pool, settings, opened, receiver.url("failing"))

    due_in_s = await stopped_while_waiting_for_a_retry(pool, dispatcher, notification.notification_id, 1)

    low, high = retry_wait_s
    assert low - 5 < due_in_s <= high


async def test_a_delivery_taken_up_again_goes_on_with_its_backoff_schedule(pool, settings, receiver, opened,
                                                                           monkeypatch):
    """Its 6th attempt failing waits as a 6th attempt's backoff does (32-33 s here), not a first's (1-2 s)."""
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", 1.0)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 300.0)
    monkeypatch.setattr(settings, "delivery_max_attempts", 8)
    receiver.answer("failing", 503)
    dispatcher, notification = await delivering(pool, settings, opened, receiver.url("failing"), attempts_before=5)

    due_in_s = await stopped_while_waiting_for_a_retry(pool, dispatcher, notification.notification_id, 6)

    assert 27 < due_in_s <= 33


async def test_a_send_failing_during_a_stop_is_not_retried_while_the_stop_waits_for_another(
        pool, settings, receiver, opened, monkeypatch):
    """The stop lets sends in flight finish. One of them failing must not start its retry (and
    perhaps be cut off in the middle of it) while the stop still waits for the other."""
    monkeypatch.setattr(settings, "delivery_backoff_initial_s", 0.05)
    monkeypatch.setattr(settings, "delivery_backoff_max_s", 0.1)
    slow_answer, failing_answer = receiver.hold("slow"), receiver.hold("failing")
    receiver.answer("failing", 503, 503, 503)
    from alerting_app.delivery.dispatcher import Dispatcher

    dispatcher = Dispatcher(settings)
    notifications = []
    for path in ("slow", "failing"):
        client, rule, _ = await tenant_with_endpoint(pool, "webhook", receiver.url(path))
        notifications.append(await pending_notification(pool, client, [rule]))
        opened.append(notifications[-1].notification_id)
    jobs = await records.open_deliveries(pool, notifications, dispatcher.owner, settings.delivery_lease_s, [])
    assert dispatcher.submit(jobs) == []
    await receiver.wait_for_posts(2)

    closing = asyncio.ensure_future(dispatcher.close())
    await asyncio.sleep(0.2)
    failing_answer.set()  # 503: retryable, and its retry would be due in 0.05-0.1 s
    await asyncio.sleep(1.0)
    assert not closing.done()  # still waiting for the slow send
    assert len(receiver.posts_to("failing")) == 1
    slow_answer.set()
    await asyncio.wait_for(closing, 20)

    row = await pool.fetchrow("SELECT status, attempts, lease_until IS NULL AS released FROM deliveries"
                              " WHERE notification_id = $1", notifications[1].notification_id)
    assert (row["status"], row["attempts"], row["released"]) == ("PENDING", 1, True)
    assert len(receiver.posts_to("failing")) == 1


async def opened_by_one_dispatcher(pool, settings, opened, urls: list[str]):
    """One worker's dispatcher delivering a new notification to each of `urls`; returns both."""
    from alerting_app.delivery.dispatcher import Dispatcher

    dispatcher = Dispatcher(settings)
    notifications = []
    for url in urls:
        client, rule, _ = await tenant_with_endpoint(pool, "webhook", url)
        notifications.append(await pending_notification(pool, client, [rule]))
        opened.append(notifications[-1].notification_id)
    jobs = await records.open_deliveries(pool, notifications, dispatcher.owner, settings.delivery_lease_s, [])
    assert dispatcher.submit(jobs) == []
    return dispatcher, notifications


async def test_a_stop_hands_what_waits_for_a_send_slot_back_while_a_send_is_still_in_flight(
        pool, settings, receiver, opened, monkeypatch):
    """A rolling deployment's stop lets a send in flight run up to its timeout (up to 30 s, an
    email's); a delivery that has sent nothing, here one waiting for its endpoint's send slot behind
    it, goes back to the other workers at once. Before, it was handed back only once the send had
    ended, its lease keeping every other worker's sweep from taking it up until then."""
    from alerting_app.delivery import dispatcher as dispatcher_module

    monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
    # The send in flight ends when the receiver answers, and not before.
    monkeypatch.setattr(settings, "webhook_timeout_s", 300.0)
    monkeypatch.setattr(dispatcher_module, "_CLOSE_SEND_GRACE_MAX_S", 300.0)
    answer = receiver.hold("one-slot")
    url = receiver.url("one-slot")
    client, rule, _ = await tenant_with_endpoint(pool, "webhook", url)
    notifications = [await pending_notification(pool, client, [rule]) for _ in range(2)]
    opened.extend(n.notification_id for n in notifications)
    dispatcher = dispatcher_module.Dispatcher(settings)
    jobs = await records.open_deliveries(pool, notifications, dispatcher.owner, settings.delivery_lease_s, [])
    assert dispatcher.submit(jobs) == []
    [in_flight] = await receiver.wait_for_posts(1, "one-slot")
    [waiting] = [n.notification_id for n in notifications
                 if not in_flight.headers["Idempotency-Key"].startswith(n.notification_id)]

    closing = asyncio.ensure_future(dispatcher.close())
    async with asyncio.timeout(20):  # a guard against waiting for ever, not a measurement
        while (await delivery_row(pool, waiting))["leased"]:
            await asyncio.sleep(0.01)
    assert not closing.done()  # the send in flight still holds the stop
    assert (await delivery_row(pool, waiting))["status"] == "PENDING"
    answer.set()
    await asyncio.wait_for(closing, 20)

    assert [tuple(await delivery_row(pool, n.notification_id)) for n in notifications] == [
        ("PENDING", 0, False) if n.notification_id == waiting else ("SENT", 1, False) for n in notifications]
    assert len(receiver.posts_to("one-slot")) == 1


async def test_a_stop_hands_back_what_is_written_when_a_dead_letter_holds_up_the_write(
        pool, settings, receiver, opened):
    """A delivery that failed for good is written FAILED only once its dead letter is acknowledged
    (recorder.py). A stop whose write waited for such a letter in vain (the broker away, or given up
    on: broker_transport.STOP_GRACE_S) used to hand nothing back: every delivery it held waited for
    its lease to run out (DELIVERY_LEASE_S). Now only the one whose outcome is not written does.
    (The stop waits for the write up to _CLOSE_WRITE_TIMEOUT_S, 10 s, meanwhile writing the other
    outcomes: recorder.py writes them first.)"""
    receiver.answer("refusing", 400)
    retry_answer = receiver.hold("retried")
    receiver.answer("retried", 503)
    dispatcher, (failed, retried) = await opened_by_one_dispatcher(
        pool, settings, opened, [receiver.url("refusing"), receiver.url("retried")])

    async def never_acknowledged(letters) -> None:
        await asyncio.Event().wait()

    dispatcher.recorder._send_letters = never_acknowledged
    await receiver.wait_for_posts(1, "retried")
    async with asyncio.timeout(20):  # the refused one recorded FAILED, its letter not acknowledged
        while not any(key[0] == failed.notification_id for key in dispatcher.recorder.pending_keys()):
            await asyncio.sleep(0.01)

    closing = asyncio.ensure_future(dispatcher.close())
    await asyncio.sleep(0.2)
    retry_answer.set()  # 503 while stopping: handed back, due when that failure said
    await asyncio.wait_for(closing, 20)

    assert tuple(await delivery_row(pool, retried.notification_id)) == ("PENDING", 1, False)
    # Its FAILED not written, the refused one keeps its lease: taken over, it would not hold.
    assert tuple(await delivery_row(pool, failed.notification_id)) == ("PENDING", 0, True)


async def test_a_stop_late_in_its_budget_waits_for_a_dead_letter_only_until_writes_end_by(
        pool, settings, receiver, opened, monkeypatch):
    """With the broker away and sends that ran until SENDS_END_BY_S (35 s into the stop), the write
    of a FAILED delivery waiting for its dead letter had its own 10 s: the stop ran into the budget's
    backstop (STOP_BUDGET_S, 45 s: status 1). Now that write ends by WRITES_END_BY_S and the hand-back
    after it takes its floor at most, so the stop ends by itself first."""
    from alerting_app.delivery import dispatcher as dispatcher_module
    from alerting_app.stop_budget import STOP_BUDGET_S, WRITES_END_BY_S, StopBudget

    receiver.answer("refused-late", 400)
    dispatcher, (failed,) = await opened_by_one_dispatcher(pool, settings, opened, [receiver.url("refused-late")])

    async def never_acknowledged(letters) -> None:
        await asyncio.Event().wait()

    dispatcher.recorder._send_letters = never_acknowledged
    async with asyncio.timeout(20):  # the refused one recorded FAILED, its letter not acknowledged
        while not any(key[0] == failed.notification_id for key in dispatcher.recorder.pending_keys()):
            await asyncio.sleep(0.01)

    # A stop 1 s short of WRITES_END_BY_S, as one whose sends ran until SENDS_END_BY_S and more.
    skipped_s = WRITES_END_BY_S - 1.0
    stop = StopBudget(lambda: time.monotonic() + skipped_s)
    stop.began_at = time.monotonic()
    monkeypatch.setattr(dispatcher_module, "worker_stop", stop)
    await asyncio.wait_for(dispatcher.close(), 30)

    # The documented bound: the write by WRITES_END_BY_S, then the hand-back's floor.
    assert stop.elapsed_s() <= WRITES_END_BY_S + dispatcher_module._CLOSE_HAND_BACK_MIN_S < STOP_BUDGET_S
    # Its FAILED not written, it keeps its lease, to run out: nothing is lost.
    assert tuple(await delivery_row(pool, failed.notification_id)) == ("PENDING", 0, True)
