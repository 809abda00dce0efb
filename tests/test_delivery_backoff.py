"""The wait between attempts: exponential with jitter, Retry-After when longer, and the same schedule
whether tenacity or the first-attempt fast path counts the attempt."""
from __future__ import annotations

import pytest
from tenacity import RetryCallState

from alerting_app.channels.errors import RetryableDeliveryError
from alerting_app.delivery.attempts import wait_backoff_or_retry_after


@pytest.mark.parametrize("attempt, low, high", [(1, 1, 2), (2, 2, 3), (3, 4, 5), (4, 8, 9), (12, 300, 300)])
def test_the_wait_doubles_per_attempt_with_up_to_initial_jitter_and_a_cap(attempt, low, high):
    wait = wait_backoff_or_retry_after(1.0, 300.0)
    for _ in range(50):
        assert low <= wait.after_attempt(attempt, None) <= high


def test_a_longer_retry_after_wins_and_a_shorter_one_does_not():
    wait = wait_backoff_or_retry_after(1.0, 300.0)
    assert wait.after_attempt(1, RetryableDeliveryError("HTTP 429", 30.0)) == 30.0
    assert 4 <= wait.after_attempt(3, RetryableDeliveryError("HTTP 429", 0.5)) <= 5


def test_tenacitys_count_continues_after_the_attempts_made_before_it():
    # The first attempt runs outside tenacity, so tenacity's attempt 1 is the delivery's attempt 2.
    wait = wait_backoff_or_retry_after(1.0, 300.0, earlier_attempts=1)
    state = RetryCallState(None, None, (), {})
    state.attempt_number = 2  # tenacity's second attempt: the delivery's third
    for _ in range(50):
        assert 4 <= wait(state) <= 5


@pytest.mark.parametrize("asked", [301.0, float("inf")])
def test_a_retry_after_beyond_the_longest_backoff_waits_the_longest_backoff(asked):
    # A Retry-After of '9' * 400 is infinity: waiting it would park the delivery for good.
    wait = wait_backoff_or_retry_after(1.0, 300.0)
    assert wait.after_attempt(1, RetryableDeliveryError("HTTP 429", asked)) == 300.0
