"""A worker's log while Postgres is away: each retrying loop's first failure with its traceback,
then one short line per interval, then one line when it recovers.

Before, every retry logged a full traceback: during a 20 s outage one worker wrote 6,172 lines
(the outbox relay every 0.5 s, the delivery sweep every second, group closing every 0.5 s), a
flood paid for in the log collector that buried the first, useful message.
The worker's Postgres is a private embedded one (the session's is never stopped).
"""
from __future__ import annotations

import secrets

import pytest

from operations_support import wait_until

pytestmark = pytest.mark.e2e

LOOPS = {  # each retrying loop's first failure, and the name its later lines give
    "outbox relay failed; retrying": "outbox relay",
    "delivery sweep failed; trying again": "delivery sweep",
}


def test_a_worker_logs_one_traceback_per_retrying_loop_while_postgres_is_away(private_postgres, start_worker):
    postgres = private_postgres.embedded
    worker = start_worker(DATABASE_URL=private_postgres.database_url, LOG_LEVEL="info",
                          APP_ID=f"pg-logs-{secrets.token_hex(4)}")
    before = len(worker.log())

    postgres.stop_postgres()
    # Retrying for a while: until the relay's first summary line (one interval after its first failure).
    wait_until(lambda: "outbox relay still failing (" in worker.log()[before:],
               "the relay's summary line, not a traceback per retry")
    postgres.start_postgres_again()
    wait_until(lambda: all(f"{name} recovered after " in worker.log()[before:] for name in LOOPS.values()),
               "every loop recovered")

    during = worker.log()[before:]
    for first, name in LOOPS.items():
        assert during.count(first) == 1, (first, during.count(first))
        failures = int(during.split(f"{name} recovered after ")[1].split()[0])
        assert failures > 1, (name, failures)  # it did retry: quietly
