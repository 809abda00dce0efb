"""A loop retrying while what it needs is away logs the first failure in full, then at most one
short line per interval, then one line when it recovers.

Before, every retry logged a traceback: during a 20 s Postgres outage one worker wrote 6,172 lines
(the outbox relay every 0.5 s, the delivery sweep and the recorder every second, group closing...).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import asyncpg

from alerting_app.db import init_connection
from alerting_app.failure_streak import FailureStreak

log = logging.getLogger("tests.failure_streak")


class Clock:
    """A test's own time: the summary interval passes when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(streak: FailureStreak, exc: Exception) -> None:
    try:
        raise exc
    except Exception:
        streak.failed("the relay failed; retrying")


def test_a_streak_logs_its_first_failure_in_full_then_one_short_line_per_interval_then_its_recovery(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    streak = FailureStreak(log, "the relay", summary_interval_s=30, clock=clock)

    fail(streak, ConnectionRefusedError("connection refused"))
    [first] = caplog.records
    assert first.getMessage() == "the relay failed; retrying" and first.exc_info is not None

    for _ in range(10):  # retries within the interval: silent
        clock.now += 1
        fail(streak, ConnectionRefusedError("connection refused"))
    assert len(caplog.records) == 1

    clock.now += 30
    fail(streak, OSError("no route to host"))
    summary = caplog.records[-1]
    assert len(caplog.records) == 2 and summary.exc_info is None
    assert summary.getMessage().startswith("the relay still failing (12 times since ")
    assert summary.getMessage().endswith(" UTC): OSError: no route to host")

    streak.succeeded()
    streak.succeeded()  # success after success: nothing more
    assert len(caplog.records) == 3
    assert caplog.records[-1].getMessage() == "the relay recovered after 12 failures"

    fail(streak, ConnectionRefusedError("connection refused"))  # a new streak: in full again
    assert len(caplog.records) == 4 and caplog.records[-1].exc_info is not None


def test_the_backoff_doubles_with_each_failure_up_to_its_cap_and_resets_on_success():
    streak = FailureStreak(log, "the relay")
    assert streak.backoff_s(0.5, 5.0) == 0.5
    waits = []
    for _ in range(2000):  # a long outage: no float overflow
        try:
            raise ConnectionRefusedError()
        except Exception:
            streak.failed("the relay failed")
        waits.append(streak.backoff_s(0.5, 5.0))
    assert waits[:6] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0] and waits[-1] == 5.0
    streak.succeeded()
    assert streak.backoff_s(0.5, 5.0) == 0.5


def test_a_streak_lasts_from_its_first_failure_and_not_past_its_recovery():
    clock = Clock()
    streak = FailureStreak(log, "the relay", clock=clock)
    assert streak.failing_for_s() == 0.0

    fail(streak, ConnectionRefusedError("connection refused"))
    clock.now += 5
    fail(streak, ConnectionRefusedError("connection refused"))
    clock.now += 2
    assert streak.failing_for_s() == 7.0  # from the first failure, not the latest

    streak.succeeded()
    assert streak.failing_for_s() == 0.0


def test_a_failure_is_within_the_seconds_asked_until_they_have_passed_whatever_succeeded_since():
    clock = Clock()
    streak = FailureStreak(log, "the relay", clock=clock)
    assert not streak.failed_within(10)  # never failed

    fail(streak, ConnectionRefusedError("connection refused"))
    streak.succeeded()
    clock.now += 9.5
    assert streak.failed_within(10)
    clock.now += 0.5
    assert not streak.failed_within(10)  # 10 s ago is no longer within 10 s


async def test_the_recorder_logs_one_traceback_while_postgres_is_away_not_one_per_retry(private_postgres, caplog):
    from alerting_app.delivery.recorder import Recorder, log as recorder_log
    from alerting_app.delivery.records import DeliveryChange

    postgres = private_postgres.embedded  # the session's is never stopped
    pool = recorder = None
    try:
        pool = await asyncpg.create_pool(private_postgres.database_url, min_size=1, max_size=2, init=init_connection)
        attempts = 0

        async def own_pool() -> asyncpg.Pool:
            nonlocal attempts
            attempts += 1  # one per write the recorder tries
            return pool
        recorder = Recorder("test-recorder", lambda: 0.01, own_pool)
        caplog.set_level(logging.INFO, logger=recorder_log.name)

        await asyncio.to_thread(postgres.stop_postgres)
        recorder.record(DeliveryChange(str(uuid.uuid4()), str(uuid.uuid4()), "SENT", attempts=1), "webhook")
        async with asyncio.timeout(120):  # bounds a hang only
            while attempts < 5:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(postgres.start_postgres_again)
        await asyncio.wait_for(recorder.written(), 120)

        logged = [record for record in caplog.records if record.name == recorder_log.name]
        assert [record.getMessage() for record in logged if record.exc_info] == [
            "recording 1 delivery outcomes failed; retrying"]
        recovered = logged[-1].getMessage()
        assert recovered.startswith("recording delivery outcomes recovered after "), recovered
        assert int(recovered.split()[-2]) >= 5
        assert all(" still failing (" in record.getMessage() for record in logged[1:-1])  # short lines only
    finally:
        if recorder is not None:
            await recorder.close()
        if pool is not None:
            pool.terminate()


def test_after_a_summary_line_the_next_waits_a_whole_interval_again(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    streak = FailureStreak(log, "the relay", summary_interval_s=30, clock=clock)
    fail(streak, ConnectionRefusedError("connection refused"))
    clock.now += 30
    fail(streak, ConnectionRefusedError("connection refused"))
    assert len(caplog.records) == 2  # the first in full, then the first summary

    for _ in range(29):  # every second of the next interval: silent, not a line per retry
        clock.now += 1
        fail(streak, ConnectionRefusedError("connection refused"))
    assert len(caplog.records) == 2

    clock.now += 1
    fail(streak, ConnectionRefusedError("connection refused"))
    assert len(caplog.records) == 3
    assert caplog.records[-1].getMessage().startswith("the relay still failing (32 times since ")


def test_a_summary_line_gives_the_wall_clock_time_the_streak_began(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()  # the interval's: not the time of day the line shows
    streak = FailureStreak(log, "the relay", summary_interval_s=30, clock=clock)
    began = time.time()
    fail(streak, ConnectionRefusedError("connection refused"))
    first_logged = caplog.records[0].created
    clock.now += 30
    fail(streak, ConnectionRefusedError("connection refused"))

    since = caplog.records[-1].getMessage().partition(" since ")[2].partition(" UTC")[0]
    assert since in {time.strftime("%H:%M:%S", time.gmtime(at)) for at in (began, first_logged)}, since
