"""How a worker's stop shares its time between the sends in flight and the broker
(alerting_app/stop_budget.py), on a clock the test moves. The stop itself, with real workers:
tests/test_e2e_rolling_deployment_stop.py."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from alerting_app.stop_budget import (GIVE_UP_BY_S, SENDS_END_BY_S, STOP_BUDGET_S, STOP_GRACE_S, WRITES_END_BY_S,
                                      StopBudget)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_before_the_stop_began_nothing_is_cut_short(clock):
    budget = StopBudget(clock)
    assert budget.broker_wait_left_s() == math.inf
    assert budget.for_sends_s(30.0) == 30.0
    assert budget.left_s() == STOP_BUDGET_S


def test_the_broker_waits_its_grace_when_no_send_is_waited_for(clock):
    budget = StopBudget(clock)
    budget.begin()
    clock.now += 5.0
    assert budget.broker_wait_left_s() == STOP_GRACE_S - 5.0


def test_the_time_spent_waiting_for_sends_is_not_the_brokers(clock):
    budget = StopBudget(clock)
    budget.begin()
    clock.now += 1.0
    with budget.waiting_for_sends():
        clock.now += 30.0  # an SMTP relay that stalls
        assert budget.broker_wait_left_s() == GIVE_UP_BY_S - 31.0  # only the cap counts meanwhile
    # 1 s of the broker's grace is spent; what is left of it is bounded by the cap.
    assert budget.broker_wait_left_s() == min(STOP_GRACE_S - 1.0, GIVE_UP_BY_S - 31.0)
    assert budget.broker_wait_left_s() > 0


def test_the_broker_is_given_up_on_by_the_cap_however_long_the_sends(clock):
    budget = StopBudget(clock)
    budget.begin()
    with budget.waiting_for_sends():
        clock.now += GIVE_UP_BY_S
        assert budget.broker_wait_left_s() <= 0


def test_the_sends_end_in_time_for_the_rest_of_the_stop(clock):
    budget = StopBudget(clock)
    budget.begin()
    clock.now += 20.0  # a stop that waited for an unreachable broker first
    assert budget.for_sends_s(30.0) == SENDS_END_BY_S - 20.0
    clock.now += SENDS_END_BY_S
    assert budget.for_sends_s(30.0) == 0.0


def test_the_budget_ends_within_ecs_stop_timeout():
    stop_timeout_s = float(re.search(r"stopTimeout\s*=\s*(\d+)",
                                     (Path(__file__).parents[1] / "infra/terraform/ecs.tf").read_text()).group(1))
    assert STOP_GRACE_S < SENDS_END_BY_S < GIVE_UP_BY_S < STOP_BUDGET_S < stop_timeout_s


def test_what_the_sends_left_to_write_is_waited_for_until_writes_end_by(clock):
    budget = StopBudget(clock)
    assert budget.for_writes_s(10.0) == 10.0  # before the stop began
    budget.begin()
    clock.now += SENDS_END_BY_S  # sends that ran as long as they may
    assert budget.for_writes_s(10.0) == WRITES_END_BY_S - SENDS_END_BY_S
    clock.now += 10.0
    assert budget.for_writes_s(10.0) == 0.0


def test_the_write_and_the_hand_back_after_it_end_before_the_backstop():
    from alerting_app.delivery.dispatcher import _CLOSE_HAND_BACK_MIN_S

    assert SENDS_END_BY_S < WRITES_END_BY_S <= GIVE_UP_BY_S
    assert WRITES_END_BY_S + _CLOSE_HAND_BACK_MIN_S < STOP_BUDGET_S
