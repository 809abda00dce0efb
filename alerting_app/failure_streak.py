"""A retrying loop's run of consecutive failures, logged once in full rather than once per retry.

While Postgres or the broker is away, the background loops (outbox relay, delivery sweep, recorder,
group closing, retention) fail on every tick; a traceback per tick was thousands of lines a minute
per worker, paid for in the log collector and burying the first message, the one that says why.
Now: the first failure of a streak with its traceback, then at most one short line per
SUMMARY_INTERVAL_S while it goes on, and one line when the loop succeeds again.

Neither `logging` nor our dependencies have this (tenacity's `before_sleep_log` logs every attempt),
hence this small class.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

SUMMARY_INTERVAL_S = 30.0


class FailureStreak:
    def __init__(self, log: logging.Logger, what: str, *, summary_interval_s: float = SUMMARY_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # names the loop in the short lines: "outbox relay"
        self.failures = 0  # of the current streak; 0 while the loop succeeds
        self._log = log
        self._summary_interval_s = summary_interval_s
        self._clock = clock  # a test's own, so no test waits for the interval
        self._started_at = 0.0  # wall clock, for the operator
        self._began = 0.0  # self._clock's time of the streak's first failure
        self._logged_at = 0.0  # self._clock's time of the last line
        self._last_failed_at = float("-inf")  # self._clock's time of the last failure, kept past a success

    def failed(self, message: str, *args: object) -> None:
        """Call in the `except` block: the first failure is logged as `log.exception(message, *args)`,
        later ones as one short line per interval (the exception being handled, without traceback)."""
        self.failures += 1
        now = self._last_failed_at = self._clock()
        if self.failures == 1:
            self._started_at = time.time()
            self._began = self._logged_at = now
            self._log.exception(message, *args)
            return
        if now - self._logged_at < self._summary_interval_s:
            return
        self._logged_at = now
        exc = sys.exc_info()[1]
        self._log.error("%s still failing (%d times since %s UTC): %s: %s", self.what, self.failures,
                        time.strftime("%H:%M:%S", time.gmtime(self._started_at)), type(exc).__name__, exc)

    def succeeded(self) -> None:
        if self.failures:
            self._log.info("%s recovered after %d failures", self.what, self.failures)
        self.failures = 0

    def failed_within(self, seconds: float) -> bool:
        """Whether the last failure was less than `seconds` ago, whatever succeeded since: a call
        skipped for a while after it fails (one waiting on a Postgres that is away) asks this."""
        return self._clock() - self._last_failed_at < seconds

    def failing_for_s(self) -> float:
        """How long the current streak has lasted, from its first failure; 0 while none."""
        return self._clock() - self._began if self.failures else 0.0

    def backoff_s(self, interval_s: float, max_s: float) -> float:
        """How long a loop that runs every `interval_s` waits now: doubling with each failure of
        the streak, up to `max_s`, so a loop on a short timer does not hammer what is away."""
        if not self.failures:
            return interval_s
        return min(interval_s * 2 ** min(self.failures - 1, 30), max_s)  # 2**30: no float overflow in a long outage
