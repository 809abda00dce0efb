"""One delivery: take the endpoint's send slot, wait for a token, take a worker send slot, claim the
idempotency key, send, and retry what may succeed later.

Retries follow tenacity: exponential backoff with jitter for retryable failures (a 429's
Retry-After is waited when longer, up to DELIVERY_BACKOFF_MAX_S), at most DELIVERY_MAX_ATTEMPTS
in all, counting the attempts an earlier worker made. Waiting for a retry holds no send slot;
waiting for a token holds the endpoint's slot only, never a worker slot.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential_jitter

from alerting_app import metrics
from alerting_app.channels.email import send_email
from alerting_app.channels.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError, recordable
from alerting_app.channels.slack import send_slack
from alerting_app.channels.webhook import send_webhook
from alerting_app.contracts import DeadLetter
from alerting_app.delivery import claims
from alerting_app.delivery.jobs import DeliveryJob
from alerting_app.delivery.rate_limits import EMAIL_BUCKET, RateLimits
from alerting_app.delivery.recorder import FAILED, PENDING, SENT, Recorder
from alerting_app.delivery.records import DeliveryChange
from alerting_app.redis_pipelining import PipelinedRedis
from alerting_app.settings import Settings

log = logging.getLogger(__name__)

# A claim outlives its send by this much, so that only a dead holder's claim ever expires.
_CLAIM_MARGIN_S = 5.0


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


@dataclass(frozen=True)
class SendSlots:
    """The semaphores a send holds: its endpoint's, taken first and held while it waits for its
    token, then its client's and the worker's, for the send itself.

    Endpoint first: a hanging endpoint's queue never holds a worker slot. Token inside the
    endpoint's slot: deliveries queued behind a hanging endpoint hold no tokens, so when it
    recovers they go out at its rate, not all at once. The client's slot: a tenant whose many
    endpoints hang fills its own share of the worker's slots, not all of them. Tokens between the
    client's slot and the worker's (`_send_slots_with_tokens`): the same, for a full worker.
    """

    worker: asyncio.Semaphore
    endpoint: asyncio.Semaphore
    client: asyncio.Semaphore

    def for_the_send(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        return self.client, self.worker


class AlreadySent(Exception):
    """Redis says an earlier attempt, perhaps of a dead worker, delivered it."""


class WorkerStopping(Exception):
    """The worker began to stop before this attempt's send: nothing was sent."""


class ClaimedElsewhere(Exception):
    def __init__(self, busy_for_s: float) -> None:
        super().__init__(f"claimed by another attempt for {busy_for_s:.1f}s more")
        self.busy_for_s = busy_for_s


class wait_backoff_or_retry_after(wait_base):  # noqa: N801  (tenacity's naming of wait strategies)
    """Exponential backoff with jitter, or the endpoint's Retry-After when that is longer.

    `earlier_attempts` failed before tenacity took over (the first attempt runs without it), so
    tenacity's attempt n is the delivery's attempt n + earlier_attempts.
    """

    def __init__(self, initial_s: float, max_s: float, earlier_attempts: int = 0) -> None:
        self._backoff = wait_exponential_jitter(initial=initial_s, max=max_s, jitter=initial_s)
        self._max_s = max_s
        self._earlier = earlier_attempts

    def after_attempt(self, attempt_number: int, failure: BaseException | None) -> float:
        backoff = self._backoff(_AttemptNumber(attempt_number))
        asked = getattr(failure, "retry_after", None)
        if asked is None:
            return backoff
        # Capped like the backoff: a Retry-After of years (or '9' * 400, infinity) would park the
        # delivery, and its place in the endpoint's backlog, for good.
        return min(max(backoff, asked), self._max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return self.after_attempt(retry_state.attempt_number + self._earlier, exc)


@dataclass(frozen=True)
class _AttemptNumber:
    """All of a RetryCallState that tenacity's exponential wait reads."""

    attempt_number: int


@functools.lru_cache(maxsize=64)
def _backoff(initial_s: float, max_s: float, earlier_attempts: int) -> wait_backoff_or_retry_after:
    # Built once per setting and attempt count: building it per delivery cost more than the rest of
    # the retry logic.
    return wait_backoff_or_retry_after(initial_s, max_s, earlier_attempts=earlier_attempts)


async def send(job: DeliveryJob, ctx: DeliveryContext) -> None:
    endpoint, settings = job.endpoint, ctx.settings
    if endpoint.channel == "webhook":
        await send_webhook(ctx.session, endpoint.value, endpoint.secret, endpoint.endpoint_id, job.notification,
                           settings.webhook_timeout_s)
    elif endpoint.channel == "slack":
        await send_slack(ctx.session, endpoint.value, job.notification, settings.webhook_timeout_s)
    elif endpoint.channel == "email":
        await send_email(settings, endpoint.value, job.notification)
    else:
        raise PermanentDeliveryError(f"unknown channel {endpoint.channel!r}")


def _send_timeout_s(job: DeliveryJob, settings: Settings) -> float:
    return settings.smtp_timeout_s if job.endpoint.channel == "email" else settings.webhook_timeout_s


async def attempt(job: DeliveryJob, ctx: DeliveryContext) -> None:
    """One attempt; raises AlreadySent, ClaimedElsewhere, WorkerStopping or a DeliveryError when it did not send.

    Any other exception of the send is a PermanentDeliveryError naming it: a message the code
    cannot format or send fails the same way on every retry. Exceptions before the send (Redis
    trouble taking the token or the claim) pass through, for `deliver` to retry later.
    """
    endpoint, settings = job.endpoint, ctx.settings
    rate = endpoint.rate_limit_per_s if endpoint.rate_limit_per_s is not None else settings.endpoint_rate_limit_per_s
    buckets = [(f"endpoint:{endpoint.endpoint_id}", rate)]
    if endpoint.channel == "email":
        buckets.append((EMAIL_BUCKET, settings.email_rate_limit_per_s))
    slots = ctx.send_slots(job)
    async with slots.endpoint:
        await _send_slots_with_tokens(slots, ctx.rate_limits, [b for b in buckets if b[1] > 0])
        try:
            claim = await claims.claim(ctx.redis, *job.key, ttl_s=_send_timeout_s(job, settings) + _CLAIM_MARGIN_S)
            if claim.state is claims.ClaimState.SENT:
                raise AlreadySent()
            if claim.state is claims.ClaimState.BUSY:
                raise ClaimedElsewhere(claim.busy_for_s)
            if ctx.stopping():
                # Checked with nothing awaited before the send begins: no send starts once a stop has.
                await _release(ctx, claim)
                raise WorkerStopping()
            with ctx.sending(job.key):
                await _send_claimed(job, ctx, claim)
        finally:
            for slot in slots.for_the_send():
                slot.release()


async def _send_slots_with_tokens(slots: SendSlots, rate_limits: RateLimits, buckets: list[tuple[str, float]]) -> None:
    """Return holding the client's and the worker's send slots, with a token of each bucket taken
    for this send.

    The client's slot first, without any bucket's turn: a tenant whose share is full keeps only its
    own deliveries waiting, not other tenants' email. Then, in each bucket's turn, the token, then
    the worker's slot: a delivery waiting for a full worker holds its endpoint's turn, so the next
    delivery of that endpoint takes no token meanwhile; tokens taken while the worker was full
    would otherwise all be spent the moment slots freed up, a burst over the endpoint's rate. The
    token is dated when it was taken, not when it is spent: one that waited longer than the
    bucket's interval for the worker's slot is dated again by taking another now, if there is one
    (the first is wasted: the endpoint goes slower than its rate while the worker is full, never
    faster). Never a wait while holding the worker's slot.
    """
    await slots.client.acquire()
    try:
        if not buckets:  # no rate limit
            await _tokens_then_worker_slot(slots.worker, rate_limits, buckets)
        elif len(buckets) == 1:  # nearly every delivery: no exit stack (a third of this function's cost)
            async with rate_limits.turn(buckets[0][0]):
                await _tokens_then_worker_slot(slots.worker, rate_limits, buckets)
        else:
            async with AsyncExitStack() as turns:
                for bucket, _ in sorted(buckets):  # one order everywhere: no two deliveries wait on each other
                    await turns.enter_async_context(rate_limits.turn(bucket))
                await _tokens_then_worker_slot(slots.worker, rate_limits, buckets)
    except BaseException:
        slots.client.release()
        raise


async def _tokens_then_worker_slot(worker_slots: asyncio.Semaphore, rate_limits: RateLimits,
                                   buckets: list[tuple[str, float]]) -> None:
    """In the buckets' turns: their tokens, then the worker's slot, held on return."""
    for bucket, rate in buckets:
        await rate_limits.take_in_turn(bucket, rate)
    taken_at = time.monotonic()
    await worker_slots.acquire()
    try:
        waited_s = time.monotonic() - taken_at
        for bucket, rate in buckets:
            if waited_s > 1 / rate:
                await rate_limits.try_take(bucket, rate)
    except BaseException:
        worker_slots.release()
        raise


async def _send_claimed(job: DeliveryJob, ctx: DeliveryContext, claim: claims.Claim) -> None:
    try:
        await send(job, ctx)
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
    channel = job.endpoint.channel if job.endpoint else "unknown"

    def record(status: str, attempts: int = 0, error: str | None = None, at: float | None = None, **extra) -> None:
        error = None if error is None else recordable(error)
        change = DeliveryChange(*job.key, status, attempts, error, at, at, **extra)
        letter = _failure_letter(job, error or "", job.attempts + attempts_made) if status == FAILED else None
        recorder.record(change, channel, letter)

    attempts_made = 0
    if job.endpoint is None or not job.endpoint.enabled:
        record(FAILED, error="endpoint was deleted" if job.endpoint is None else "endpoint was disabled")
        return

    def failed_attempt(failure: BaseException, wait_s: float) -> None:
        metrics.notifications_retried.labels(channel=channel).inc()
        # The retry's time goes into the row: a worker that stops (handing the delivery back) or
        # dies before it retries leaves the next one to wait for it too, Retry-After included.
        record(PENDING, 1, str(failure), started, next_attempt_at=time.time() + wait_s)

    async def attempt_once() -> None:
        nonlocal attempts_made, started
        attempts_made += 1
        started = time.time()
        await attempt(job, ctx)

    allowed = max(1, settings.delivery_max_attempts - job.attempts)
    # A delivery taken up again (by a sweep) goes on with its schedule: its first attempt here is
    # its attempt job.attempts + 1, and tenacity's attempt n is its attempt n + job.attempts + 1.
    backoff = _backoff(settings.delivery_backoff_initial_s, settings.delivery_backoff_max_s, job.attempts + 1)
    started = time.time()
    try:
        try:
            # The first attempt without the retry machinery: nearly every delivery needs no more,
            # and a tenacity loop per delivery was a tenth of the worker's CPU.
            await attempt_once()
        except RetryableDeliveryError as failure:
            if allowed == 1:
                raise
            wait_s = backoff.after_attempt(job.attempts + 1, failure)
            failed_attempt(failure, wait_s)
            await asyncio.sleep(wait_s)
            async for retry in AsyncRetrying(
                stop=stop_after_attempt(allowed - 1),
                wait=backoff,
                retry=retry_if_exception_type(RetryableDeliveryError),
                before_sleep=lambda state: failed_attempt(state.outcome.exception(), state.next_action.sleep),
                reraise=True,
            ):
                with retry:
                    await attempt_once()
        record(SENT, 1, None, started)
    except WorkerStopping:
        pass  # the stop hands it back (Dispatcher.close), due when its last failed attempt said
    except AlreadySent:
        record(SENT)
    except ClaimedElsewhere as busy:
        record(PENDING, next_attempt_at=time.time() + busy.busy_for_s, release=True)
    except DeliveryError as exc:
        record(FAILED, 1, str(exc), started)
    except Exception as exc:
        # Redis trouble before the send (the token, the claim), not the endpoint's: nothing was sent
        # and no claim is left held (the claim is the last step before the send). Counted as an
        # attempt, with its reason, and retried after that attempt's backoff by any worker: trouble
        # that lasts shows in the delivery's record and backs off instead of spinning. It never
        # fails the delivery by itself.
        log.exception("delivery %s to %s interrupted; retrying later", *job.key)
        wait_s = backoff.after_attempt(max(1, job.attempts + attempts_made), None)
        record(PENDING, 1, f"before sending: {type(exc).__name__}: {exc}", started,
               next_attempt_at=time.time() + wait_s, release=True)
