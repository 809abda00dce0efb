"""The wait between attempts: exponential with jitter, Retry-After when longer, both capped. (That a
delivery taken up again goes on with its schedule: tests/test_delivery_stop.py.)"""
from __future__ import annotations

import pytest

from alerting_app.channels.errors import RetryableDeliveryError
from alerting_app.delivery.attempts import Backoff


@pytest.mark.parametrize("attempt, low, high", [(1, 1, 2), (2, 2, 3), (3, 4, 5), (4, 8, 9), (12, 300, 300)])
def test_the_wait_doubles_per_attempt_with_up_to_initial_jitter_and_a_cap(attempt, low, high):
    wait = Backoff(1.0, 300.0)
    for _ in range(50):
        assert low <= wait.after_attempt(attempt, None) <= high


def test_deliveries_failing_together_do_not_all_retry_together():
    # The jitter spreads the waits over DELIVERY_BACKOFF_INITIAL_S: without it, every delivery that
    # failed on an endpoint's outage would retry at one instant, a burst at the endpoint as it
    # comes back. (Of 200 waits, all within half the jitter of each other by chance: about 2**-199.)
    wait = Backoff(1.0, 300.0)
    waits = [wait.after_attempt(2, None) for _ in range(200)]
    assert max(waits) - min(waits) > 0.5

def test_a_longer_retry_after_wins_and_a_shorter_one_does_not():
    wait = Backoff(1.0, 300.0)
    assert wait.after_attempt(1, RetryableDeliveryError("HTTP 429", 30.0)) == 30.0
    assert 4 <= wait.after_attempt(3, RetryableDeliveryError("HTTP 429", 0.5)) <= 5


@pytest.mark.parametrize("asked", [301.0, float("inf")])
def test_a_retry_after_beyond_the_longest_backoff_waits_the_longest_backoff(asked):
    # A Retry-After of '9' * 400 is infinity: waiting it would park the delivery for good.
    wait = Backoff(1.0, 300.0)
    assert wait.after_attempt(1, RetryableDeliveryError("HTTP 429", asked)) == 300.0
