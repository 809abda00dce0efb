"""Delivery outcomes, written to Postgres in batches; final failures go to notifications.ready.dlq.

Recording is a moment behind sending: the Redis mark (claims.py) covers that moment. A batch
that cannot be written (Postgres away) is kept and tried again, merged with what came since.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from alerting_app import db, metrics
from alerting_app.contracts import DeadLetter
from alerting_app.dead_letters import send_dead_letters
from alerting_app.delivery import records
from alerting_app.delivery.records import DeliveryChange, write_outcomes
from alerting_app.failure_streak import FailureStreak

log = logging.getLogger(__name__)

SENT, FAILED, PENDING = "SENT", "FAILED", "PENDING"
_RETRY_WRITE_S = 1.0
# How long a batch waits for its dead letters' acknowledgement before the loop goes on (writing
# what was recorded since) and looks again: a broker answers in milliseconds, or not for as long
# as it is down (the producer waits up to its request timeout, 20 minutes).
_LETTERS_WAIT_S = 1.0
_GONE_LOOKUP_TIMEOUT_S = 5.0


def merge(earlier: DeliveryChange, later: DeliveryChange) -> DeliveryChange:
    """Two changes of one delivery as one: attempts add up, the later state and error win, except
    that a PENDING without an error keeps the earlier one, as its write would (records._WRITE)."""
    return DeliveryChange(
        later.notification_id, later.endpoint_id, later.status,
        attempts=earlier.attempts + later.attempts,
        # A hand-back that met another attempt's claim tried nothing: the earlier failure is still
        # why the delivery is not sent. Merged away, the row lost it (kept only when written apart).
        last_error=earlier.last_error if later.status == PENDING and later.last_error is None else later.last_error,
        first_attempt_at=earlier.first_attempt_at or later.first_attempt_at,
        last_attempt_at=later.last_attempt_at or earlier.last_attempt_at,
        next_attempt_at=later.next_attempt_at,
        release=later.release,
        channel=later.channel or earlier.channel,
    )


class Recorder:
    def __init__(self, owner: str, interval_s: Callable[[], float],
                 get_pool: Callable[[], Awaitable[asyncpg.Pool]] = db.pool,
                 send_letters: Callable[[list[DeadLetter]], Awaitable[None]] = send_dead_letters) -> None:
        self.owner = owner  # the worker whose leases the outcomes may change (records._WRITE)
        self._interval_s = interval_s  # read at each batch, so a test may change it
        self._get_pool = get_pool  # the worker's pool unless a test passes its own
        # The worker's producer unless a test passes its own sending, to a broker it can make refuse or hang.
        self._send_letters = send_letters
        self._changes: dict[tuple[str, str], DeliveryChange] = {}
        # The dead letter of each delivery that failed, by delivery: its FAILED outcome is written
        # only once the letter is acknowledged (a crash in between sends it again, never loses it).
        self._letters: dict[tuple[str, str], DeadLetter] = {}
        self._in_hand: dict[tuple[str, str], DeliveryChange] = {}  # the batch being written
        # The dead letters on their way to the broker (their deliveries, and the send), kept across
        # batches: sent once, and waited for a moment per batch, not for as long as the broker is down.
        self._sending: tuple[list[tuple[str, str]], asyncio.Future] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._write_failures = FailureStreak(log, "recording delivery outcomes")
        self._letter_failures = FailureStreak(log, "sending dead letters")

    def record(self, change: DeliveryChange, channel: str, dead_letter: DeadLetter | None = None,
               already_counted: bool = False) -> None:
        """`already_counted`: a delivery found sent already (its Redis mark: a sweep after a crash, a
        redelivered notification), its send recorded here as an attempt, and counted in the metrics
        when it was sent, not again."""
        key = (change.notification_id, change.endpoint_id)
        earlier = self._changes.get(key)
        self._changes[key] = change if earlier is None else merge(earlier, change)
        if dead_letter is not None:
            self._letters[key] = dead_letter
        counted_attempts = 0 if already_counted else change.attempts
        if change.status == SENT and counted_attempts:
            metrics.labelled(metrics.notifications_sent, channel).inc()
        elif change.status == FAILED:
            metrics.labelled(metrics.notifications_failed, channel).inc()
        if counted_attempts or change.status == FAILED:
            metrics.labelled(metrics.deliveries, channel, change.status).inc()
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def pending_keys(self) -> list[tuple[str, str]]:
        """The deliveries whose outcome is not written yet (being written included): their leases
        must stay renewed, or another worker's sweep would take them up again (and send again)."""
        return list(dict.fromkeys([*self._in_hand, *self._changes]))

    async def written(self) -> None:
        """Return once everything recorded so far is in Postgres (and its dead letters sent)."""
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sending is not None:
            _, sending = self._sending
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            self._sending = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._interval_s())
            self._wake.clear()
            changes, self._changes = self._changes, {}
            letters, self._letters = self._letters, {}
            self._in_hand = changes  # pending_keys() reports them until they are written
            try:
                put_back, letters = await self._write_batch(changes, letters)
            finally:
                self._in_hand = {}
            if put_back or letters:
                for key, change in put_back.items():
                    newer = self._changes.get(key)
                    self._changes[key] = change if newer is None else merge(change, newer)
                self._letters = {**letters, **self._letters}
                self._wake.set()
                await asyncio.sleep(_RETRY_WRITE_S)
                continue
            if not self._changes and not self._letters:
                self._idle.set()

    async def _write_batch(self, changes: dict[tuple[str, str], DeliveryChange],
                           letters: dict[tuple[str, str], DeadLetter]
                           ) -> tuple[dict[tuple[str, str], DeliveryChange], dict[tuple[str, str], DeadLetter]]:
        """Write a batch; what is left to write again, and the letters left to send.

        The outcomes without a dead letter are written first: while the broker is down (refusing,
        or slow to answer for as long as the producer's request timeout), SENT and PENDING outcomes
        must still reach Postgres. A FAILED outcome only once its letter is acknowledged: a crash
        in between sends the letter again rather than losing it.
        """
        ready = [change for key, change in changes.items() if key not in letters]
        try:
            if ready:
                await self._write(ready)
                self._write_failures.succeeded()
        except Exception:
            self._write_failures.failed("recording %d delivery outcomes failed; retrying", len(changes))
            return changes, letters
        failed = {key: change for key, change in changes.items() if key in letters}
        self._in_hand = failed  # the others are written
        if not letters:
            return {}, {}
        acknowledged = await self._letters_acknowledged(letters)
        unsent = {key: letter for key, letter in letters.items() if key not in acknowledged}
        waiting = {key: change for key, change in failed.items() if key not in acknowledged}
        done = [change for key, change in failed.items() if key in acknowledged]
        try:
            if done:
                await self._write(done)
                self._write_failures.succeeded()
        except Exception:
            self._write_failures.failed("recording %d delivery outcomes failed; retrying", len(done))
            return failed, unsent  # the acknowledged letters are sent: not again
        return waiting, unsent

    async def _letters_acknowledged(self, letters: dict[tuple[str, str], DeadLetter]) -> set[tuple[str, str]]:
        """The deliveries whose dead letters the broker has acknowledged: none while their send is
        still on its way after _LETTERS_WAIT_S (the caller writes the other outcomes meanwhile, and
        asks again), or failed (sent again next time). With them, those that need no letter: their
        row is gone with their client (`_of_deleted_clients`).

        A send in flight is not started again: waiting on it again does not queue the letters twice.
        Letters recorded since it started go with the next one.
        """
        unneeded: set[tuple[str, str]] = set()
        if self._sending is None:
            unneeded = await self._of_deleted_clients(letters)
            keys = [key for key in letters if key not in unneeded]
            if keys:
                self._sending = keys, asyncio.ensure_future(self._send_letters([letters[key] for key in keys]))
        if self._sending is None:
            return unneeded
        keys, sending = self._sending
        done, _ = await asyncio.wait({sending}, timeout=_LETTERS_WAIT_S)
        if not done:
            return unneeded
        self._sending = None
        try:
            sending.result()
        except Exception:
            self._letter_failures.failed("sending %d dead letters failed; their FAILED outcomes wait for them",
                                        len(keys))
            return unneeded
        self._letter_failures.succeeded()
        return set(keys) | unneeded

    async def _of_deleted_clients(self, letters: dict[tuple[str, str], DeadLetter]) -> set[tuple[str, str]]:
        """The deliveries whose row is gone with their client (deleted while they were in hand): their
        failure is nobody's to look at, and their letter would be a false alarm. None when Postgres
        cannot say: then the letters are sent."""
        try:
            # Bounded: a frozen Postgres must not hold back letters the broker could take.
            async with asyncio.timeout(_GONE_LOOKUP_TIMEOUT_S):  # not wait_for: see agents/rule_outbox.py
                gone = await records.gone(await self._get_pool(), list(letters))
        except Exception:
            log.warning("could not look for the deliveries of deleted clients among %d dead letters; sending them",
                        len(letters), exc_info=True)
            return set()
        if gone:
            log.info("no dead letter for %d failed deliveries of clients deleted while they were in hand", len(gone))
        return gone

    async def _write(self, changes: list[DeliveryChange]) -> None:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            await write_outcomes(conn, self.owner, changes)
