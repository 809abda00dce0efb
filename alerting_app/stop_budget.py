"""How long a worker's stop may take, and how the two things it waits for share that time: the sends
in flight (delivery/dispatcher.py, `Dispatcher.close`) and the broker (broker_transport.py,
`Producer.give_up_on_the_broker`).

ECS kills a task `stopTimeout` (60 s, infra/terraform/ecs.tf) after its SIGTERM. A stop has
STOP_BUDGET_S from its start: once it gave up on the broker, a stop still going then ends the process
(status 1, a backstop). Within that budget the broker is waited for STOP_GRACE_S of the stop's time
spent on anything but the sends in flight, and given up on GIVE_UP_BY_S into the stop at the latest;
the sends in flight are waited for until SENDS_END_BY_S into the stop at the latest, and what they
leave to write (their outcomes, a FAILED one's dead letter) until WRITES_END_BY_S. Before, the
broker's STOP_GRACE_S ran while the stop waited for the sends: a stop whose sends took longer (an
SMTP relay that stalls: SMTP_TIMEOUT_S, 30 s) gave up on a broker that answered, skipped its last
offset commit and failed the dead letters due after that.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# From the start of the stop to the backstop's exit: below ECS's stopTimeout (60 s).
STOP_BUDGET_S = 45.0
# How long a stopping worker waits for the broker (the acknowledgement of what it sent, its offset
# commits), not counting the wait for sends in flight. A reachable broker answers in milliseconds; an
# unreachable one made the stop wait for the producer's request timeout (20 minutes) or for ever
# (aiokafka's commit waits for the group coordinator without a bound).
STOP_GRACE_S = 15.0
# The sends in flight end by then (cancelled if they have not): what is left of the budget records
# them, sends their dead letters and hands back what the worker held.
SENDS_END_BY_S = 35.0
# What the sends in flight left to write (their outcomes) is waited for until then, and the stop then
# hands back what the worker held (its own floor: _CLOSE_HAND_BACK_MIN_S in delivery/dispatcher.py).
# Before, that write had 10 s of its own whatever was left: with the broker away and sends that ran
# until SENDS_END_BY_S, a FAILED delivery waiting for its dead letter held the stop until the backstop
# (status 1).
WRITES_END_BY_S = 40.0
# The broker is given up on by then whatever the sends took: what is left of the stop after giving up
# took about 2 s with the broker's address refusing connections.
GIVE_UP_BY_S = 40.0


class StopBudget:
    """One worker's stop: when it began, and how long it has waited for sends in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.began_at: float | None = None  # on `clock`
        self._sends_since: float | None = None
        self._sends_waited_s = 0.0
        # Set whenever a wait for sends begins or ends: the broker's wait counts again, or stops counting.
        self.changed = asyncio.Event()

    def begin(self) -> None:
        if self.began_at is None:
            self.began_at = self._clock()

    def elapsed_s(self) -> float:
        return 0.0 if self.began_at is None else self._clock() - self.began_at

    def left_s(self) -> float:
        """What is left of STOP_BUDGET_S (all of it before the stop began)."""
        return STOP_BUDGET_S - self.elapsed_s()

    def for_sends_s(self, grace_s: float) -> float:
        """How long the stop may wait now for its sends in flight: `grace_s`, ending by SENDS_END_BY_S."""
        if self.began_at is None:
            return grace_s
        return max(0.0, min(grace_s, SENDS_END_BY_S - self.elapsed_s()))

    def for_writes_s(self, limit_s: float) -> float:
        """How long the stop may wait now for what its sends left to write: `limit_s`, ending by
        WRITES_END_BY_S."""
        if self.began_at is None:
            return limit_s
        return max(0.0, min(limit_s, WRITES_END_BY_S - self.elapsed_s()))

    @contextmanager
    def waiting_for_sends(self) -> Iterator[None]:
        """The stop waits for sends in flight meanwhile: that time is not the broker's."""
        self._sends_since = self._clock()
        self.changed.set()
        try:
            yield
        finally:
            self._sends_waited_s += self._clock() - self._sends_since
            self._sends_since = None
            self.changed.set()

    def broker_wait_left_s(self) -> float:
        """How long from now the stop still waits for the broker before giving up on it, as long as
        it does not begin or end a wait for sends meanwhile (`changed`)."""
        if self.began_at is None:
            return math.inf
        now = self._clock()
        by_the_cap = self.began_at + GIVE_UP_BY_S - now
        if self._sends_since is not None:
            return by_the_cap
        broker_waited = (now - self.began_at) - self._sends_waited_s
        return min(STOP_GRACE_S - broker_waited, by_the_cap)


# This worker's stop (a worker stops once).
worker_stop = StopBudget()
