"""One delivery: take the endpoint's send slot, wait for a token, take the client's and a worker's
send slots, claim the idempotency key, send, and retry what may succeed later.

Retries: exponential backoff with jitter for retryable failures (a 429's or 503's Retry-After is
waited when longer, up to DELIVERY_BACKOFF_MAX_S), at most DELIVERY_MAX_ATTEMPTS in all, counting
the attempts an earlier worker made. A retry due within HAND_BACK_AFTER_S is waited for here
unless the worker is crowded for its client; a later one is handed back to Postgres, for the sweep. Waiting for a retry holds no send slot;
waiting for the endpoint's token holds the endpoint's slot only; no token is waited for while
holding a worker slot.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import aiohttp
from redis import exceptions as redis_errors
from tenacity.wait import wait_exponential_jitter

from alerting_app import metrics
from alerting_app.channels.email import send_email
from alerting_app.channels.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError, recordable
from alerting_app.channels.slack import send_slack
from alerting_app.channels.webhook import send_webhook
from alerting_app.contracts import DeadLetter, NotificationReady
from alerting_app.delivery import claims
from alerting_app.delivery.jobs import DeliveryJob, Endpoint
from alerting_app.delivery.rate_limits import RateLimits, email_bucket, endpoint_bucket
from alerting_app.delivery.recorder import FAILED, PENDING, SENT, Recorder
from alerting_app.delivery.records import DeliveryChange
from alerting_app.delivery.relay_slots import ClientRelaySlot
from alerting_app.failure_streak import FailureStreak
from alerting_app.redis_pipelining import PipelinedRedis, refused_by_a_replica
from alerting_app.settings import CLAIM_MARGIN_S, Settings

log = logging.getLogger(__name__)

# A retry due later than this is not waited for in the worker: the delivery is handed back (its
# failed attempt, when the next is due and its lease given up, in one write) and the sweep of any
# worker takes it up when it is due. Waiting, it kept its place in the worker's bounds
# (DELIVERY_ENDPOINT_BACKLOG, DELIVERY_CLIENT_BACKLOG, DELIVERY_MAX_HELD) through its whole backoff,
# about 2 minutes under the default schedule: four tenants whose endpoints all failed held every
# place of a worker, and other tenants' notifications waited in Postgres for the few that freed up.
# Shorter waits are kept: handed back, a retry goes out up to a sweep late (DELIVERY_SWEEP_INTERVAL_S,
# 1 s) and costs a sweep's read of its row and notification, too much for a wait of a second or two.
HAND_BACK_AFTER_S = 10.0
# The longest wait after Redis trouble before the send (or DELIVERY_BACKOFF_MAX_S, if lower). The
# wait is as long as Redis has been failing this worker's calls so far (at least
# DELIVERY_BACKOFF_INITIAL_S), not a count of the delivery's attempts: a restart of a second costs
# the deliveries in hand a second or two, a long outage has each try again every 30 s, and a
# delivery waits no longer than this once Redis is back. (Not the count of the worker's failed
# calls either: a worker holding a thousand deliveries counts a thousand in the first second of a
# blip.) Before, each failure counted
# as one of the delivery's attempts and its backoff grew with them: after a Redis outage of a few
# minutes every delivery held waited up to DELIVERY_BACKOFF_MAX_S (5 minutes) more, with one try
# left for its endpoint.
REDIS_RETRY_MAX_S = 30.0
# While Redis stays away, every delivery in hand fails again within REDIS_RETRY_MAX_S (and a second
# of jitter), and the sweep takes up what waits in Postgres: a quiet of three times that means the
# outage ended, though no claim said so.
REDIS_QUIET_ENDS_STREAK_S = 3 * REDIS_RETRY_MAX_S


ENDPOINT_READ_TIMEOUT_S = 5.0
# A delivery whose endpoint was read longer ago than this reads it again once it holds its slots
# and tokens, before it sends: a tenant who disables or deletes an endpoint (a slow one, say, with
# a backlog waiting for its send slots, or for tokens too near to be read again while waited for)
# must not get what waited. Not every send: a delivery that did not wait was read a moment ago,
# when it was leased (and each read costs the worker CPU: delivery/endpoint_reads.py).
ENDPOINT_RECHECK_S = 1.0
# After a read of an endpoint failed (Postgres away or frozen), sends go on without reading it for
# this long: each would otherwise wait ENDPOINT_READ_TIMEOUT_S for a Postgres that just failed, and
# a worker's sends would slow to its slots every 5 s. Reads before a retry still happen.
ENDPOINT_READ_PAUSE_S = 10.0


class EndpointGone(PermanentDeliveryError):
    """Before a retry: the tenant disabled or deleted the endpoint since the delivery was taken up."""


async def _as_taken_up(job: DeliveryJob) -> Endpoint | None:
    return job.endpoint


async def _held_throughout(job: DeliveryJob, cover_s: float) -> bool:
    return True


def _known_throughout(job: DeliveryJob, cover_s: float) -> bool:
    return True


# How long a send waits at most for its lease fence; unanswered, it goes out on its Redis claim
# alone, as it did before the fence, and the next sends do not wait for the fence for
# LEASE_FENCE_PAUSE_S: a Postgres away must not hold back the sends in hand (docs/operations.md).
LEASE_FENCE_TIMEOUT_S = 5.0
LEASE_FENCE_PAUSE_S = 10.0


@dataclass
class DeliveryContext:
    """What a delivery uses of its worker."""

    settings: Settings
    session: aiohttp.ClientSession
    redis: PipelinedRedis
    rate_limits: RateLimits
    recorder: Recorder
    send_slots: Callable[[DeliveryJob], "SendSlots"]  # the slots a send of the job holds
    # (notification_id, endpoint_id) -> the span of a send, from its request to its sent mark: a
    # worker that stops lets a send in it finish (dispatcher.close), and cancels anything else.
    sending: Callable[[tuple[str, str]], AbstractContextManager] = lambda key: nullcontext()
    # Whether the worker is stopping: then no new send starts (a retry's, say, while the stop waits
    # for other sends in flight); the delivery is handed back instead.
    stopping: Callable[[], bool] = lambda: False
    # Whether the worker is crowded for this job's client (dispatcher.Dispatcher.crowded): then a
    # retry, however soon it is due, is handed back to Postgres rather than waited for here.
    crowded: Callable[[DeliveryJob], bool] = lambda job: False
    # The job's endpoint as it is now (None: deleted), read before each retry and before a send
    # that waited (ENDPOINT_RECHECK_S): the tenant may have fixed its URL, or disabled or deleted
    # it, since the delivery was taken up.
    endpoint_now: Callable[[DeliveryJob], Awaitable[Endpoint | None]] = _as_taken_up
    # Right before the send: whether the worker still holds the job's row, its lease in Postgres
    # now covering the send for the seconds given (lease_fences.py). False: another worker leased
    # it since, or it is settled: no send.
    lease_covers: Callable[[DeliveryJob, float], Awaitable[bool]] = _held_throughout
    # Whether the worker knows, without asking, that the job's lease covers the seconds given: then
    # no fence (with the default DELIVERY_LEASE_S, every send). Checked before `lease_covers` and its
    # timeout, which cost a tenth of a millisecond a send in the deliver stage's benchmark.
    lease_known: Callable[[DeliveryJob, float], bool] = _known_throughout
    # The runs of failed fences and failed reads of `endpoint_now`, logged once in full (while
    # Postgres is away nearly every send would log a traceback); each is skipped for a while after
    # its last failure (`FailureStreak.failed_within`).
    lease_fence_failures: FailureStreak = field(default_factory=lambda: FailureStreak(log, "fencing sends' leases"))
    endpoint_read_failures: FailureStreak = field(default_factory=lambda: FailureStreak(log, "reading endpoints again"))
    # The run of failed Redis calls (a token, a claim, a look for a sent mark), logged once in full:
    # while Redis is away every delivery held fails at each retry, and the sweep's take-up of each
    # looks for its mark first. Before, each logged a traceback: 66,000 lines of one worker's log
    # for a 12 s outage with 45 deliveries in hand.
    redis_failures: FailureStreak = field(default_factory=lambda: FailureStreak(log, "deliveries' Redis calls"))


@dataclass(frozen=True)
class SendSlots:
    """The semaphores a send holds: its endpoint's, taken first and held while it waits for its
    token, then its client's and the worker's, for the send itself.

    Endpoint first: a hanging endpoint's queue never holds a worker slot. Token inside the
    endpoint's slot: deliveries queued behind a hanging endpoint hold no tokens, so when it
    recovers they go out at its rate, not all at once. The client's slot: a tenant whose many
    endpoints hang fills its own share of the worker's slots, not all of them. The order of the
    tokens between them: `_send_slots_with_tokens`. An email takes the relay's slot after its
    client's: what waits for a hanging relay holds its own tenant's share, not others'.
    """

    worker: asyncio.Semaphore
    endpoint: asyncio.Semaphore
    client: asyncio.Semaphore
    # Email's only: the SMTP relay is one destination for every tenant's email, so its sends take
    # what one endpoint may take of the worker. Without it a relay that hangs filled the worker with
    # the sends of a few tenants' email, each within its client's share. Given in turn per tenant
    # (relay_slots.py).
    relay: ClientRelaySlot | None = None

    def before_the_shared_token(self) -> tuple[asyncio.Semaphore | ClientRelaySlot, ...]:
        return (self.client,) if self.relay is None else (self.client, self.relay)

    def for_the_send(self) -> tuple[asyncio.Semaphore | ClientRelaySlot, ...]:
        return *self.before_the_shared_token(), self.worker


class AlreadySent(Exception):
    """Redis says an earlier attempt, perhaps of a dead worker, delivered it."""

    def __init__(self, mark: claims.SentMark) -> None:
        super().__init__("marked sent")
        self.mark = mark


class LeaseLost(Exception):
    """Right before the send, the row is found another worker's (this one stalled past its lease),
    or settled: nothing was sent, and nothing is this worker's to record."""


class WorkerStopping(Exception):
    """The worker began to stop before this attempt's send: nothing was sent."""


class ChannelChanged(Exception):
    """Read again before the send, the endpoint has another type (PATCH): what the attempt holds was
    taken for the old channel. Nothing was sent."""

    def __init__(self, job: DeliveryJob) -> None:
        super().__init__(f"endpoint {job.endpoint_id} is now {job.endpoint.channel}")
        self.job = job  # with the endpoint as read


class ClaimedElsewhere(Exception):
    def __init__(self, busy_for_s: float) -> None:
        super().__init__(f"claimed by another attempt for {busy_for_s:.1f}s more")
        self.busy_for_s = busy_for_s


class Backoff:
    """Exponential backoff with jitter (tenacity's), or the endpoint's Retry-After when that is longer."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._backoff = wait_exponential_jitter(initial=initial_s, max=max_s, jitter=initial_s)
        self._max_s = max_s

    def after_attempt(self, attempt_number: int, failure: BaseException | None) -> float:
        """The wait after the delivery's attempt `attempt_number` (1: its first) failed with `failure`."""
        backoff = self._backoff(_AttemptNumber(attempt_number))
        asked = getattr(failure, "retry_after", None)
        if asked is None:
            return backoff
        # Capped like the backoff: a Retry-After of years (or '9' * 400, infinity) would park the
        # delivery for good.
        return min(max(backoff, asked), self._max_s)


@dataclass(frozen=True)
class _AttemptNumber:
    """All of a tenacity RetryCallState that its exponential wait reads."""

    attempt_number: int


@functools.lru_cache(maxsize=64)
def _backoff(initial_s: float, max_s: float) -> Backoff:
    # Built once per setting: building it per delivery cost more than the rest of the retry logic.
    return Backoff(initial_s, max_s)


async def send_to(endpoint: Endpoint, notification: NotificationReady, session: aiohttp.ClientSession,
                  settings: Settings) -> None:
    """Send `notification` to `endpoint` by its channel, once (a delivery's attempt, and an API test)."""
    if endpoint.channel == "webhook":
        await send_webhook(session, endpoint.value, endpoint.secret, endpoint.endpoint_id, notification,
                           settings.webhook_timeout_s)
    elif endpoint.channel == "slack":
        await send_slack(session, endpoint.value, notification, settings.webhook_timeout_s)
    elif endpoint.channel == "email":
        await send_email(settings, endpoint.value, notification)
    else:
        raise PermanentDeliveryError(f"unknown channel {endpoint.channel!r}")


def _send_timeout_s(job: DeliveryJob, settings: Settings) -> float:
    return settings.smtp_timeout_s if job.endpoint.channel == "email" else settings.webhook_timeout_s


def _no_note() -> None:
    pass


async def attempt(job: DeliveryJob, ctx: DeliveryContext, sending: Callable[[], None] = _no_note) -> None:
    """One attempt; raises AlreadySent, ClaimedElsewhere, ChannelChanged, WorkerStopping or a DeliveryError
    when it did not send. `sending` is called as the send begins, once the slots, tokens, claim and
    fence are held: the moment the endpoint is tried.

    Any other exception of the send is a PermanentDeliveryError naming it: a message the code
    cannot format or send fails the same way on every retry. Exceptions before the send (Redis
    trouble taking the token or the claim) pass through, for `deliver` to retry later.
    """
    endpoint, settings = job.endpoint, ctx.settings
    rate = endpoint.rate_per_s(settings.endpoint_rate_limit_per_s)
    own = (endpoint_bucket(settings.app_id, endpoint.endpoint_id), rate) if rate > 0 else None
    email_rate = settings.email_rate_limit_per_s
    shared = (email_bucket(settings.app_id), email_rate) if endpoint.channel == "email" and email_rate > 0 else None
    slots = ctx.send_slots(job)
    async with slots.endpoint:
        await _send_slots_with_tokens(slots, ctx.rate_limits, own, shared, lambda: _rate_now(job, ctx), job.read_at)
        try:
            read_again = await _endpoint_before_send(job, ctx)
            if read_again.endpoint.channel != endpoint.channel:
                # The tenant changed the endpoint's type while this waited: an email takes the relay's
                # slot and the all-email token, a webhook neither, so the attempt begins again.
                raise ChannelChanged(read_again)
            job = read_again
            # The claim outlives the send by CLAIM_MARGIN_S, so that only a dead holder's claim ever
            # expires; the lease fence below makes the row's lease cover as much.
            claim_span_s = _send_timeout_s(job, settings) + CLAIM_MARGIN_S
            claim = await claims.claim(ctx.redis, *job.key, ttl_s=claim_span_s)
            ctx.redis_failures.succeeded()
            if claim.state is claims.ClaimState.SENT:
                raise AlreadySent(claim.mark)
            if claim.state is claims.ClaimState.BUSY:
                raise ClaimedElsewhere(claim.busy_for_s)
            try:
                covered = ctx.lease_known(job, claim_span_s) or await _lease_covers(job, ctx, claim_span_s)
            except asyncio.CancelledError:
                # A stop (Dispatcher.close cancels what is not sending) while the fence's statement
                # was out: nothing was sent, so the claim goes now. Left until its TTL, it made the
                # worker that took the row up next hand it back to wait it out.
                await _release(ctx, claim)
                raise
            if not covered:
                await _release(ctx, claim)
                raise LeaseLost()
            if ctx.stopping():
                # Checked with nothing awaited before the send begins: no send starts once a stop has.
                await _release(ctx, claim)
                raise WorkerStopping()
            sending()
            with ctx.sending(job.key):
                await _send_claimed(job, ctx, claim)
        finally:
            for slot in slots.for_the_send():
                slot.release()


Bucket = tuple[str, float]  # a rate limit's Redis bucket and its rate per second


async def _endpoint_read_again(job: DeliveryJob, ctx: DeliveryContext) -> Endpoint | None:
    """The endpoint as the tenant has it now; None if it could not be read (go on as it was).

    Raises EndpointGone once the tenant deleted or disabled it: the delivery then fails, and no
    attempt is counted. Bounded: a delivery did not need Postgres before, and must not stall on it.
    """
    try:
        async with asyncio.timeout(ENDPOINT_READ_TIMEOUT_S):  # not wait_for: see agents/rule_outbox.py
            endpoint = await ctx.endpoint_now(job)
    except Exception:
        ctx.endpoint_read_failures.failed("could not read endpoint %s again; going on with it as it was",
                                          job.endpoint_id)
        return None
    ctx.endpoint_read_failures.succeeded()
    if endpoint is None:
        raise EndpointGone("endpoint was deleted")
    if not endpoint.enabled:
        raise EndpointGone("endpoint was disabled")
    return endpoint


async def _endpoint_before_send(job: DeliveryJob, ctx: DeliveryContext) -> DeliveryJob:
    """`job`, with its endpoint read again if that was longer than ENDPOINT_RECHECK_S ago.

    Raises EndpointGone once the tenant deleted or disabled it meanwhile (see _endpoint_read_again).
    """
    now = time.monotonic()
    if now - job.read_at <= ENDPOINT_RECHECK_S or ctx.endpoint_read_failures.failed_within(ENDPOINT_READ_PAUSE_S):
        return job
    endpoint = await _endpoint_read_again(job, ctx)
    return job if endpoint is None else replace(job, endpoint=endpoint, read_at=time.monotonic())


async def _lease_covers(job: DeliveryJob, ctx: DeliveryContext, cover_s: float) -> bool:
    """Whether the send may go: its row still this worker's, its lease covering `cover_s`; True
    when Postgres cannot say (the claim alone then decides, as before the fence)."""
    if ctx.lease_fence_failures.failed_within(LEASE_FENCE_PAUSE_S):
        return True
    try:
        async with asyncio.timeout(LEASE_FENCE_TIMEOUT_S):  # not wait_for: see agents/rule_outbox.py
            held = await ctx.lease_covers(job, cover_s)
    except Exception:
        ctx.lease_fence_failures.failed("could not fence delivery %s to %s's lease; sending on its claim", *job.key)
        return True
    ctx.lease_fence_failures.succeeded()
    return held


async def _marked_sent(job: DeliveryJob, ctx: DeliveryContext) -> claims.SentMark | None:
    """The delivery's sent mark in Redis; None when there is none, or Redis cannot say (the claim,
    which comes later, is what decides: a look that failed is no attempt).

    A look that succeeds does not end a run of Redis failures: a Redis that became a replica (READONLY)
    answers it and refuses every token and claim, and ended there, the run restarted at each take-up
    of a dead worker's delivery (a traceback logged again, and every delivery's next wait back to a
    second, REDIS_RETRY_MAX_S). The claim, a write, ends it."""
    try:
        return await claims.sent_mark(ctx.redis, *job.key)
    except Exception:
        ctx.redis_failures.failed("could not look for delivery %s to %s's sent mark; the claim will", *job.key)
        return None


async def _rate_now(job: DeliveryJob, ctx: DeliveryContext) -> float | None:
    """The endpoint's rate as the tenant has it now (read while a token is far off); None if unknown.
    Raises EndpointGone if it was deleted or disabled meanwhile: no send after the wait."""
    endpoint = await _endpoint_read_again(job, ctx)
    if endpoint is None:
        return None
    return endpoint.rate_per_s(ctx.settings.endpoint_rate_limit_per_s)


async def _send_slots_with_tokens(slots: SendSlots, rate_limits: RateLimits, own: Bucket | None,
                                  shared: Bucket | None,
                                  own_rate_now: Callable[[], Awaitable[float | None]] | None = None,
                                  read_at: float = 0.0) -> None:
    """Return holding the client's and the worker's send slots, with a token of the endpoint's own
    bucket and of the shared one (all email), where there are limits, taken for this send.

    In this order, each waited for while holding what comes before it: the endpoint's token (in
    its turn: one delivery of the endpoint at a time takes one), the client's slot, for email the
    relay's slot, the shared token (in its turn), the worker's slot. So waiting for an endpoint's
    token holds nothing of its client's or of anyone's (a tenant's slow endpoint does not keep its
    own other endpoints, nor other tenants' email, waiting), and a tenant whose share is full does
    not hold the shared turn. The turns are kept until the worker's slot is held: the next delivery of the endpoint
    takes no token while this one waits for a full worker, or the tokens taken meanwhile would
    all be spent the moment slots freed up, a burst over the rate.
    """
    taken: list[tuple[str, float, float]] = []  # bucket, rate, when its token was taken
    if own is None:
        await _client_then_shared(slots, rate_limits, shared, taken)
        return
    async with rate_limits.turn(own[0]):
        rate = await rate_limits.take_in_turn(*own, own_rate_now, read_at)
        if rate > 0:  # 0: the tenant lifted the limit while this delivery waited
            taken.append((own[0], rate, time.monotonic()))
        await _client_then_shared(slots, rate_limits, shared, taken)


async def _client_then_shared(slots: SendSlots, rate_limits: RateLimits, shared: Bucket | None,
                              taken: list[tuple[str, float, float]]) -> None:
    acquired: list[asyncio.Semaphore | ClientRelaySlot] = []
    try:
        for slot in slots.before_the_shared_token():
            await slot.acquire()
            acquired.append(slot)
        if shared is None:
            await _worker_slot_with_fresh_tokens(slots.worker, rate_limits, taken)
        else:
            async with rate_limits.turn(shared[0]):
                await rate_limits.take_in_turn(*shared)
                taken.append((*shared, time.monotonic()))
                await _worker_slot_with_fresh_tokens(slots.worker, rate_limits, taken)
    except BaseException:
        for slot in acquired:
            slot.release()
        raise


async def _worker_slot_with_fresh_tokens(worker_slots: asyncio.Semaphore, rate_limits: RateLimits,
                                         taken: list[tuple[str, float, float]]) -> None:
    """The worker's slot, with the tokens that waited longer than their bucket's interval for it
    dated again (still in their turns).

    A token dated when it was taken, spent much later, lets the bucket hand out the next at once:
    two sends closer than the rate. So one that waited longer than its interval is dated again by
    taking another now (the first is wasted: the endpoint goes slower than its rate while the
    worker is full, never faster). When there is none now (another worker took it), the send goes
    ahead all the same: waiting for one again would hold what this delivery holds (its client's
    slot, the all-email turn) for an interval, and could starve it while the worker stays full. The
    bound that leaves: one send per worker sooner than the rate, each time its slots were full.
    """
    await worker_slots.acquire()
    try:
        for bucket, rate, taken_at in taken:
            if time.monotonic() - taken_at > 1 / rate:
                await rate_limits.try_take(bucket, rate)
    except BaseException:
        worker_slots.release()
        raise


async def _send_claimed(job: DeliveryJob, ctx: DeliveryContext, claim: claims.Claim) -> None:
    try:
        await send_to(job.endpoint, job.notification, ctx.session, ctx.settings)
    except asyncio.CancelledError:
        # The worker is stopping: the request may have left, so the claim stays until its TTL, as a
        # dead worker's would, and the resend (if any) carries the same Idempotency-Key.
        raise
    except DeliveryError:
        await _release(ctx, claim)
        raise
    except Exception as exc:
        await _release(ctx, claim)
        log.exception("delivery %s to %s: the send raised %s", *job.key, type(exc).__name__)
        raise PermanentDeliveryError(f"{type(exc).__name__}: {exc}") from exc
    try:
        await claims.mark_sent(ctx.redis, claim, ctx.settings.delivery_sent_marker_ttl_s)
    except Exception:
        # It is sent whatever Redis says: recording it PENDING would send it again. Postgres records
        # SENT in a moment; only a worker dying within that moment could send it twice now.
        log.warning("delivery %s to %s sent, but marking it sent in Redis failed", *job.key, exc_info=True)


async def _release(ctx: DeliveryContext, claim: claims.Claim) -> None:
    """Free the claim of an attempt that sent nothing, so that the next attempt need not wait for its TTL."""
    try:
        await claims.release(ctx.redis, claim)
    except Exception:
        # Redis trouble: the claim then expires on its own, and the failure itself is what to report.
        log.warning("could not release the claim %s; it expires by itself", claim.key, exc_info=True)


# Redis refusing every write, whatever the key: full (maxmemory with noeviction, the policy
# docs/delivery.md asks for) or unable to save its snapshot (stop-writes-on-bgsave-error, the
# default). A command's refusal is an OutOfMemoryError, or a ResponseError saying MISCONF; the
# tokens' script's is a ResponseError quoting the refusal of its write.
_REFUSING_EVERY_WRITE = ("OOM command not allowed", "MISCONF ")


def redis_away(exc: BaseException) -> bool:
    """Redis unreachable, not answering, loading its data after a restart, a replica now (a
    failover), or refusing every write (full, or unable to save): trouble that passes, whatever the
    delivery. Not a command refused for the delivery's own key (WRONGTYPE)."""
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.OutOfMemoryError)):
        return True
    if refused_by_a_replica(exc):
        return True
    return isinstance(exc, redis_errors.ResponseError) and any(refusal in str(exc) for refusal in _REFUSING_EVERY_WRITE)


def _failure_letter(job: DeliveryJob, reason: str, attempts: int) -> DeadLetter:
    return DeadLetter(
        topic="notifications.ready",
        key=job.notification.client_id,
        reason=f"endpoint {job.endpoint_id} ({job.endpoint.channel if job.endpoint else 'deleted'}): {reason};"
               f" FAILED after {attempts} attempt(s)",
        payload=job.notification.encode().decode(),
    )


async def deliver(job: DeliveryJob, ctx: DeliveryContext) -> None:
    """Deliver `job`, retrying as the settings say, and record every attempt and the outcome."""
    settings, recorder = ctx.settings, ctx.recorder

    def channel() -> str:
        """The endpoint's type as last read: the tenant may change it (PATCH) while the delivery waits."""
        return job.endpoint.channel if job.endpoint else "unknown"

    def record(status: str, attempts: int = 0, error: str | None = None, at: float | None = None,
               dead_letter: bool = True, found_sent: bool = False, **extra) -> None:
        error = None if error is None else recordable(error)
        # The row's channel is its latest attempt's, and so are its times: a change counting no
        # attempt (Redis's trouble before the send) leaves first_attempt_at and last_attempt_at as
        # they were. Before, such a hand-back showed the tenant `attempts: 0` with a first_attempt_at,
        # and moved last_attempt_at of a delivery already tried to a moment nothing was tried. A
        # send found sent was made by the endpoint as it was then: the row's channel stays.
        attempted_by = job.endpoint.channel if attempts and job.endpoint and not found_sent else None
        at = at if attempts else None
        change = DeliveryChange(*job.key, status, attempts, error, at, at, channel=attempted_by, **extra)
        letter = (_failure_letter(job, error or "", job.attempts + attempts_made)
                  if status == FAILED and dead_letter else None)
        recorder.record(change, channel(), letter, already_counted=found_sent)

    def sent_before(mark: claims.SentMark) -> None:
        # An earlier attempt sent it, and its worker died (or stalled) before recording it: SENT,
        # with that send counted as one more attempt than the row has, dated when its mark was
        # written. Before, the tenant read a SENT delivery with `attempts: 0` and no attempt time.
        # Its worker counted the send in its metrics as it made it.
        record(SENT, 1, at=mark.marked_at(settings.delivery_sent_marker_ttl_s, time.time()), found_sent=True)

    def endpoint_gone(reason: str) -> None:
        # The tenant disabled or deleted the endpoint: its choice, not a failure for the operators'
        # dead-letter alarm. The row says why, and POST .../retry sends it once the endpoint is
        # enabled again (records.retry_failed). Counted in notifications_failed all the same.
        record(FAILED, error=reason, dead_letter=False)

    attempts_made = 0
    if job.resumed and (mark := await _marked_sent(job, ctx)) is not None:
        # Sent by the row's earlier holder, which died before recording it: SENT, even if the
        # tenant disabled or deleted the endpoint since. Looked for before the wait for slots and
        # tokens too: the claim after that wait (a rate-limited backlog can take hours) may find
        # the mark expired, and send again.
        sent_before(mark)
        return
    if job.endpoint is None or not job.endpoint.enabled:
        endpoint_gone("endpoint was deleted" if job.endpoint is None else "endpoint was disabled")
        return

    def failed_attempt(failure: BaseException, wait_s: float, hand_back: bool = False) -> None:
        metrics.notifications_retried.labels(channel=channel()).inc()
        # The retry's time goes into the row: a worker that stops (handing the delivery back) or
        # dies before it retries leaves the next one to wait for it too, Retry-After included.
        # Handed back (HAND_BACK_AFTER_S), the lease is given up with it, in the same write.
        record(PENDING, 1, str(failure), started, next_attempt_at=time.time() + wait_s, release=hand_back)

    def sending() -> None:
        # The attempt's time is when its request goes out, not when it began to wait for its slots
        # and tokens (behind a slow rate, hours before): the tenant reads it as when we tried.
        nonlocal started
        started = time.time()

    async def attempt_once() -> None:
        nonlocal attempts_made, started, job
        attempts_made += 1
        started = time.time()  # an attempt ended before its send (our own error) is dated when it began
        try:
            while True:
                try:
                    await attempt(job, ctx, sending)
                    return
                except ChannelChanged as changed:
                    job = changed.job  # nothing was sent: again, taking what the new channel takes
        except EndpointGone:
            attempts_made -= 1  # found gone while it waited for its token, or before its send: nothing was sent
            raise

    async def endpoint_as_it_is_now() -> None:
        """Before a retry: the endpoint as the tenant has it now, or no retry if it is gone."""
        nonlocal job
        endpoint = await _endpoint_read_again(job, ctx)
        if endpoint is not None:
            job = replace(job, endpoint=endpoint, read_at=time.monotonic())

    allowed = max(1, settings.delivery_max_attempts - job.attempts)
    backoff = _backoff(settings.delivery_backoff_initial_s, settings.delivery_backoff_max_s)
    started = time.time()
    try:
        # The schedule is a durable one, not an in-process retry loop: each failed attempt and when
        # the next is due go into the row, a later retry leaves the worker (HAND_BACK_AFTER_S) and
        # any worker's sweep continues it. tenacity computes the waits (Backoff); its retry loop
        # keeps the attempt count in memory, while here the row's count is the one that holds.
        while True:
            try:
                await attempt_once()
                break
            except RetryableDeliveryError as failure:
                if attempts_made >= allowed:
                    raise
                # A delivery taken up again goes on with its schedule: its attempts here follow
                # the job.attempts recorded before.
                wait_s = backoff.after_attempt(job.attempts + attempts_made, failure)
                if wait_s > HAND_BACK_AFTER_S or ctx.crowded(job):
                    failed_attempt(failure, wait_s, hand_back=True)
                    return
                failed_attempt(failure, wait_s)
                await asyncio.sleep(wait_s)
                await endpoint_as_it_is_now()
        record(SENT, 1, None, started)
    except WorkerStopping:
        pass  # the stop hands it back (Dispatcher.close), due when its last failed attempt said
    except LeaseLost:
        # Its row is another worker's now (or settled): that worker's to record. Attempts made
        # here before are recorded already (failed_attempt).
        log.info("delivery %s to %s: its row was taken over (this worker stalled past its lease); not sending",
                 *job.key)
    except AlreadySent as sent:
        sent_before(sent.mark)
    except ClaimedElsewhere as busy:
        record(PENDING, next_attempt_at=time.time() + busy.busy_for_s, release=True)
    except EndpointGone as gone:
        endpoint_gone(str(gone))  # no attempt was made
    except DeliveryError as exc:
        record(FAILED, 1, str(exc), started)
    except Exception as exc:
        # Trouble before the send (Redis's, taking the token or the claim), not the endpoint's:
        # nothing was sent and no claim is left held (the claim is the last step before the send).
        # Recorded with its reason and retried later by any worker, handed back; it never fails
        # the delivery by itself. The record says only what kind of trouble: the tenant reads it
        # (GET /api/v1/notifications), and Redis's message names our host and port ("Error 111
        # connecting to 10.0.3.4:6379"); the log line has the whole of it.
        metrics.notifications_retried.labels(channel=channel()).inc()
        if redis_away(exc):
            # Redis's trouble is no attempt to reach the endpoint: the delivery keeps its attempts
            # for the endpoint. How long Redis has been failing sets the wait (REDIS_RETRY_MAX_S):
            # backing off while it stays away, and going on soon once it is back.
            if ctx.redis_failures.failures and not ctx.redis_failures.failed_within(REDIS_QUIET_ENDS_STREAK_S):
                # An outage that ended unseen (no claim since: its deliveries went to other workers,
                # or there were none) is over: timed from its start, this blip's first deliveries
                # waited REDIS_RETRY_MAX_S instead of a second.
                ctx.redis_failures.succeeded()
            ctx.redis_failures.failed("delivery %s to %s interrupted by Redis; retrying later", *job.key)
            counted = 0
            wait_s = min(max(settings.delivery_backoff_initial_s, ctx.redis_failures.failing_for_s()),
                         REDIS_RETRY_MAX_S, settings.delivery_backoff_max_s)
            wait_s += random.uniform(0, settings.delivery_backoff_initial_s)  # not all due at once
        else:
            # Our own code failing before the send, or Redis refusing a command for this delivery's
            # key (WRONGTYPE, say): not trouble that passes by itself. Counted, so that it backs off
            # as the delivery's attempts grow rather than trying again every few seconds for ever.
            log.exception("delivery %s to %s interrupted; retrying later", *job.key)
            counted = 1
            wait_s = backoff.after_attempt(max(1, job.attempts + attempts_made), None)
        record(PENDING, counted,
               f"before sending: {type(exc).__name__} (the platform's trouble, not the endpoint's)",
               started, next_attempt_at=time.time() + wait_s, release=True)
