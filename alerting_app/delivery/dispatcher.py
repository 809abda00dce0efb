"""The deliveries one worker holds, each run as a background task, within bounds.

A delivery is held from its lease until its outcome is recorded, or until it is handed back to
wait in Postgres for a retry due later than attempts.HAND_BACK_AFTER_S. Bounds, all per worker:
sends in flight (DELIVERY_CONCURRENCY), sends in flight per endpoint and to the SMTP relay (every
email) (DELIVERY_ENDPOINT_CONCURRENCY) and per client (DELIVERY_CLIENT_CONCURRENCY), and deliveries held
per endpoint (DELIVERY_ENDPOINT_BACKLOG, fewer for a slow rate: ENDPOINT_HELD_RATE_S), per client
(DELIVERY_CLIENT_BACKLOG), as email (the all-email rate's: ENDPOINT_HELD_RATE_S) and in all
(DELIVERY_MAX_HELD). An endpoint that hangs or fails fills its
own share only, a tenant whose endpoints all do its own: other deliveries start at once.
What does not fit waits in Postgres, unleased, for the sweep.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from alerting_app import db, metrics, redis_client
from alerting_app.channels.http import endpoint_session
from alerting_app.delivery import records
from alerting_app.delivery.attempts import DeliveryContext, SendSlots, deliver
from alerting_app.delivery.endpoint_reads import EndpointReads
from alerting_app.delivery.jobs import DeliveryJob
from alerting_app.delivery.lease_fences import LeaseFences
from alerting_app.delivery.rate_limits import RateLimits
from alerting_app.delivery.recorder import Recorder
from alerting_app.delivery.relay_slots import RelaySlots
from alerting_app.redis_pipelining import PipelinedRedis
from alerting_app.settings import Settings
from alerting_app.stop_budget import worker_stop

log = logging.getLogger(__name__)

# A rate-limited endpoint is held no more than its rate sends in this many seconds (at least its
# send slots, at most DELIVERY_ENDPOINT_BACKLOG); the rest of its backlog waits in Postgres. Held, a
# delivery only waits for its token: at 0.001/s, 1,000 held deliveries held their places in the
# worker for up to 11 days, and four tenants with five such endpoints held all of them.
ENDPOINT_HELD_RATE_S = 10.0
_CLOSE_WRITE_TIMEOUT_S = 10.0
_CLOSE_HAND_BACK_MIN_S = 2.0
# How long a stop waits at most for sends in flight: their own timeout, but not past this.
_CLOSE_SEND_GRACE_MAX_S = 30.0


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Names this worker's leases; unique per process, so a restarted worker is a new owner.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._held: dict[tuple[str, str], asyncio.Task] = {}
        self._worker_slots = asyncio.Semaphore(settings.delivery_concurrency)
        self._per_endpoint = _SlotsPerKey(settings.delivery_endpoint_concurrency)
        # How many deliveries of each endpoint held here it may have (`held_at_most`), as its latest
        # job read its rate; kept while any is held.
        self._endpoint_held_at_most: dict[str, int] = {}
        self._per_client = _SlotsPerKey(settings.delivery_client_concurrency)
        # Every email goes to the one SMTP relay: it is one endpoint's worth of the worker's slots,
        # given to the tenants waiting in turn.
        self._relay_slots = RelaySlots(settings.delivery_endpoint_concurrency)
        # The deliveries held here as email (`email_held_at_most`).
        self._email_held: set[tuple[str, str]] = set()
        # Whether email may be waiting in Postgres for its turn, as this worker last saw
        # (`email_to_the_sweep`).
        self._email_waiting = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._sending: set[tuple[str, str]] = set()  # deliveries whose request may be on the wire
        self._send_ended = asyncio.Event()
        self._stopping = False
        self.recorder = Recorder(self.owner, lambda: settings.delivery_record_interval_s)
        # One connection pool for every HTTP delivery of this worker: connections are reused.
        self._session = endpoint_session(concurrency=settings.delivery_concurrency,
                                         allow_private=settings.allow_private_endpoints)
        # Tokens, claims and sent marks of concurrent deliveries share Redis round trips.
        redis = PipelinedRedis(redis_client.redis())
        # A job's endpoint as it is in Postgres now (attempts.DeliveryContext.endpoint_now).
        endpoint_reads = EndpointReads(db.pool)
        self._lease_fences = LeaseFences(self.owner, db.pool)
        # How long each held delivery's lease runs at least, as this worker knows it (time.monotonic(),
        # taken before the statement that leased, renewed or fenced it): a send it covers needs no
        # fence. Unknown (a job submitted without `leased_at`): fenced.
        self._lease_known_until: dict[tuple[str, str], float] = {}
        self._context = DeliveryContext(settings, self._session, redis,
                                        RateLimits(redis, settings.endpoint_rate_burst_s),
                                        self.recorder, self._send_slots, self._in_send,
                                        lambda: self._stopping, self.crowded,
                                        lambda job: endpoint_reads.read(job.endpoint_id),
                                        self._lease_covers, lease_known=self._lease_known)

    def _lease_known(self, job: DeliveryJob, cover_s: float) -> bool:
        """Whether this worker knows the job's lease covers `cover_s` more at least
        (attempts.DeliveryContext.lease_known). With the default DELIVERY_LEASE_S (60 s) renewed
        every 20 s, a lease always covers a send of the default timeouts: the fence's statement
        (`_lease_covers`) is for short leases, or renewals failing."""
        return self._lease_known_until.get(job.key, float("-inf")) - time.monotonic() >= cover_s

    async def _lease_covers(self, job: DeliveryJob, cover_s: float) -> bool:
        """Whether the job's row is still this worker's, its lease now covering `cover_s` more at
        least, fenced in Postgres (attempts.DeliveryContext.lease_covers, lease_fences.py)."""
        asked_at = time.monotonic()
        held = await self._lease_fences.fence(job.key, cover_s)
        if held and job.key in self._held:
            self._lease_known_until[job.key] = max(self._lease_known_until.get(job.key, float("-inf")),
                                                   asked_at + cover_s)
        return held

    def renewed(self, keys: Iterable[tuple[str, str]], asked_at: float) -> None:
        """`keys`' leases were renewed by a statement sent at `asked_at` (time.monotonic()): only
        those the statement said it renewed, never one taken over meanwhile."""
        until = asked_at + self.settings.delivery_lease_s
        for key in keys:
            if key in self._held:
                self._lease_known_until[key] = max(self._lease_known_until.get(key, float("-inf")), until)

    def _send_slots(self, job: DeliveryJob) -> SendSlots:
        email = job.endpoint is not None and job.endpoint.channel == "email"
        return SendSlots(self._worker_slots, self._per_endpoint.slots(job.endpoint_id),
                         self._per_client.slots(job.notification.client_id),
                         self._relay_slots.of(job.notification.client_id) if email else None)

    @contextmanager
    def _in_send(self, key: tuple[str, str]) -> Iterator[None]:
        self._sending.add(key)
        try:
            yield
        finally:
            self._sending.discard(key)
            self._send_ended.set()

    @property
    def room(self) -> int:
        """How many more deliveries this worker takes now."""
        return max(0, self.settings.delivery_max_held - len(self._held))

    def held_at_most(self, job: DeliveryJob) -> int:
        """How many deliveries of `job`'s endpoint this worker may hold: DELIVERY_ENDPOINT_BACKLOG, or
        for a rate-limited endpoint what its rate sends in ENDPOINT_HELD_RATE_S, if fewer (at least
        its send slots). (Email is bounded in all, too: `email_held_at_most`.)"""
        default = self.settings.endpoint_rate_limit_per_s
        return self._held_for_rate(job.endpoint.rate_per_s(default) if job.endpoint is not None else default)

    def email_held_at_most(self) -> int:
        """How many email deliveries, every tenant's, this worker may hold: every email waits for the
        all-email bucket's token, so what EMAIL_RATE_LIMIT_PER_S sends in ENDPOINT_HELD_RATE_S (at
        least the relay's send slots, at most DELIVERY_ENDPOINT_BACKLOG: the relay is one destination)."""
        return self._held_for_rate(self.settings.email_rate_limit_per_s)

    def _held_for_rate(self, rate_per_s: float) -> int:
        """What a rate (0: none) sends in ENDPOINT_HELD_RATE_S, at least one destination's send slots
        (DELIVERY_ENDPOINT_CONCURRENCY), at most DELIVERY_ENDPOINT_BACKLOG."""
        settings = self.settings
        if rate_per_s <= 0:
            return settings.delivery_endpoint_backlog
        return min(settings.delivery_endpoint_backlog,
                   max(settings.delivery_endpoint_concurrency, math.ceil(rate_per_s * ENDPOINT_HELD_RATE_S)))

    def email_full(self) -> bool:
        """Whether this worker holds as much email as it may: lease no more."""
        return not self.email_room()

    def email_room(self) -> int:
        """How many more email deliveries, every tenant's, this worker takes now."""
        return max(0, self.email_held_at_most() - len(self._email_held))

    def email_to_the_sweep(self) -> bool:
        """Whether the intake leaves new email to the sweep: this worker has no room for email, or
        email may be waiting in Postgres (this worker refused some, or its last sweep took all the
        email room it had). The sweep takes email round-robin per client; taken at the intake, a
        tenant's storm arriving went before every other tenant's email waiting for its turn."""
        return self._email_waiting or self.email_full()

    def swept_email(self, room: int, leased: int) -> None:
        """A sweep with `room` for email leased `leased` of it: fewer, and no email was left waiting."""
        if room:
            self._email_waiting = leased >= room

    def full_endpoints(self) -> list[str]:
        """Endpoints this worker holds as many deliveries of as it may: lease no more of them."""
        return [endpoint_id for endpoint_id, held in self._per_endpoint.held.items()
                if held >= self._endpoint_held_at_most[endpoint_id]]

    def crowded(self, job: DeliveryJob) -> bool:
        """Whether the job's client holds half its DELIVERY_CLIENT_BACKLOG here, or the worker half its
        DELIVERY_MAX_HELD: then its retries wait in Postgres, however soon they are due, and their
        places go to deliveries that can be sent now. Before, a delivery to a failing endpoint held
        its place for its first five attempts (about 17 s): a tenant putting more than its backlog
        into failing endpoints per 17 s held its whole share (its own healthy endpoints' deliveries
        waiting in Postgres behind its retries), and four such tenants the worker."""
        return (self._per_client.held.get(job.notification.client_id, 0) * 2 >= self.settings.delivery_client_backlog
                or len(self._held) * 2 >= self.settings.delivery_max_held)

    def full_clients(self) -> list[str]:
        """Clients (tenants) this worker holds as many deliveries of as it may: lease no more of them."""
        return self._per_client.holding_at_least(self.settings.delivery_client_backlog)

    def held_per_client(self) -> dict[str, int]:
        """How many deliveries this worker holds per client (only clients it holds any of)."""
        return dict(self._per_client.held)

    def held_per_endpoint(self) -> dict[str, int]:
        """How many deliveries this worker holds per endpoint (only endpoints it holds any of), as
        the sweep counts them against DELIVERY_ENDPOINT_BACKLOG: a rate-limited endpoint's places
        that its rate does not give it count as held, so the sweep leases no more than its room."""
        backlog = self.settings.delivery_endpoint_backlog
        return {endpoint_id: held + backlog - self._endpoint_held_at_most[endpoint_id]
                for endpoint_id, held in self._per_endpoint.held.items()}

    def held_keys(self) -> list[tuple[str, str]]:
        """The deliveries whose leases this worker renews: those in hand, and those whose outcome
        the recorder has not written yet (a FAILED one waits for its dead letter while the broker
        is down)."""
        return list(dict.fromkeys([*self._held, *self.recorder.pending_keys()]))

    def submit(self, jobs: Iterable[DeliveryJob], leased_at: float | None = None) -> list[DeliveryJob]:
        """Start delivering `jobs`; return those refused for lack of room (their leases are to be released).
        `leased_at`: when (time.monotonic()) the statement that leased them was sent, if known."""
        if self._stopping:
            return [job for job in jobs if job.key not in self._held]
        refused = []
        for job in jobs:
            if job.key in self._held:
                continue  # already in hand here (a redelivered message)
            held_at_most = self.held_at_most(job)
            email = job.endpoint is not None and job.endpoint.channel == "email"
            if (len(self._held) >= self.settings.delivery_max_held
                    or self._per_endpoint.held.get(job.endpoint_id, 0) >= held_at_most
                    or self._per_client.held.get(job.notification.client_id, 0) >= self.settings.delivery_client_backlog
                    or (email and self.email_full())):
                refused.append(job)
                self._email_waiting = self._email_waiting or email
                continue
            if email:
                self._email_held.add(job.key)
            self._endpoint_held_at_most[job.endpoint_id] = held_at_most
            self._per_endpoint.hold(job.endpoint_id)
            self._per_client.hold(job.notification.client_id)
            if leased_at is not None:
                self._lease_known_until[job.key] = leased_at + self.settings.delivery_lease_s
            self._held[job.key] = asyncio.ensure_future(self._run(job))
            self._idle.clear()
        return refused

    async def _run(self, job: DeliveryJob) -> None:
        try:
            with metrics.labelled(metrics.stage_seconds, "deliver").time():
                await deliver(job, self._context)
        finally:
            del self._held[job.key]
            self._lease_known_until.pop(job.key, None)
            self._email_held.discard(job.key)
            self._per_endpoint.let_go(job.endpoint_id)
            if job.endpoint_id not in self._per_endpoint.held:
                del self._endpoint_held_at_most[job.endpoint_id]
            self._per_client.let_go(job.notification.client_id)
            if not self._held:
                self._idle.set()

    async def drained(self) -> None:
        """Return once every held delivery has finished and its outcome is in Postgres."""
        await self._idle.wait()
        await self.recorder.written()

    async def close(self) -> None:
        """Stop: sends in flight finish and are recorded, what is recorded is written, and what is
        held is handed back to the other workers.

        A send is let finish (up to its own timeout): cancelling it would leave its request
        perhaps received, its claim to expire, and the delivery to be sent again. Everything else
        (waiting for a slot, a token or a retry) is cancelled at once, none of it having sent
        anything, and handed back at once too, while the sends in flight finish: held until then
        (up to SMTP_TIMEOUT_S, 30 s), its lease kept every other worker's sweep from taking it up.
        """
        self._stopping = True
        interrupted = self.held_keys()
        waiting = {key: task for key, task in self._held.items() if key not in self._sending}
        for task in waiting.values():
            task.cancel()
        handing_back = asyncio.ensure_future(self._hand_back_once_ended(waiting))
        if self._sending:
            # The stop's time spent here is not the broker's, and the sends end in time for what
            # the stop does after them (alerting_app/stop_budget.py).
            grace_s = worker_stop.for_sends_s(self._send_grace_s())
            log.info("stopping: waiting up to %.0fs for %d sends in flight", grace_s, len(self._sending))
            with worker_stop.waiting_for_sends():
                await self._sends_finished(grace_s)
            log.info("stopping: done waiting for the sends in flight")
        tasks = list(self._held.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, handing_back, return_exceptions=True)
        loop = asyncio.get_running_loop()
        # Up to _CLOSE_WRITE_TIMEOUT_S, but within what is left of the stop's budget: sends that ran
        # until SENDS_END_BY_S leave it 5 s (alerting_app/stop_budget.py, WRITES_END_BY_S).
        write_s = worker_stop.for_writes_s(_CLOSE_WRITE_TIMEOUT_S)
        write_by = loop.time() + write_s
        try:
            async with asyncio.timeout_at(write_by):  # not wait_for: see agents/rule_outbox.py
                await self.recorder.written()
        except TimeoutError:
            log.warning("stopping: delivery outcomes not written after %.0fs; handing back the others", write_s)
        # What is left of that time, or a moment when the write took it all: a hand-back is always
        # tried, and the stop ends before its budget's backstop (STOP_BUDGET_S) all the same.
        await self._hand_back(interrupted, max(write_by - loop.time(), _CLOSE_HAND_BACK_MIN_S))
        await self.recorder.close()
        await self._session.close()

    async def _hand_back_once_ended(self, cancelled: dict[tuple[str, str], asyncio.Task]) -> None:
        await asyncio.gather(*cancelled.values(), return_exceptions=True)
        await self._hand_back(list(cancelled),
                              max(worker_stop.for_writes_s(_CLOSE_WRITE_TIMEOUT_S), _CLOSE_HAND_BACK_MIN_S))

    async def _hand_back(self, keys: list[tuple[str, str]], within_s: float) -> None:
        """Let go of the leases of `keys`, but not of one whose outcome is still to be written: that
        outcome (a retry's due time, a SENT, a FAILED waiting for its dead letter while the broker is
        away) would not hold once another worker had taken the row up. Its lease then runs out on its
        own. Before, one such outcome (the write waited for it in vain) kept every lease this worker
        held: all waited for DELIVERY_LEASE_S."""
        unwritten = set(self.recorder.pending_keys())
        keys = [key for key in keys if key not in unwritten]
        try:
            async with asyncio.timeout(within_s):
                await records.release(await db.pool(), self.owner, keys)
        except Exception:
            # Their leases then expire on their own, after DELIVERY_LEASE_S.
            log.exception("could not hand back %d deliveries on close", len(keys))

    def _send_grace_s(self) -> float:
        longest = max(self.settings.webhook_timeout_s, self.settings.smtp_timeout_s)
        return min(longest, _CLOSE_SEND_GRACE_MAX_S)

    async def _sends_finished(self, timeout_s: float) -> None:
        """Wait until no send is in flight, or `timeout_s`.

        A delivery whose send ends records its outcome before it next waits (for a retry's
        backoff, say), so when this returns every finished send is recorded, and what its task
        does next is cancelled by the caller.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while self._sending:
                    self._send_ended.clear()
                    await self._send_ended.wait()
        except TimeoutError:
            log.warning("stopping: %d sends still in flight after %.0fs are cancelled", len(self._sending), timeout_s)


class _SlotsPerKey:
    """How many deliveries this worker holds per key (an endpoint, a client), and a semaphore of
    `size` send slots per key, both kept only while it holds any: none kept per key ever seen."""

    def __init__(self, size: int) -> None:
        self._size = size
        self.held: dict[str, int] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    def hold(self, key: str) -> None:
        self.held[key] = self.held.get(key, 0) + 1

    def let_go(self, key: str) -> None:
        if self.held[key] > 1:
            self.held[key] -= 1
        else:
            del self.held[key]
            self._slots.pop(key, None)

    def holding_at_least(self, count: int) -> list[str]:
        return [key for key, held in self.held.items() if held >= count]

    def slots(self, key: str) -> asyncio.Semaphore:
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self._size)
        return self._slots[key]


_dispatcher: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    """This worker's dispatcher, created on first use inside the running event loop."""
    global _dispatcher
    if _dispatcher is None:
        from alerting_app.app import settings

        _dispatcher = Dispatcher(settings)
    return _dispatcher


async def close_dispatcher() -> None:
    global _dispatcher
    if _dispatcher is not None:
        await _dispatcher.close()
        _dispatcher = None
