"""POST /api/v1/alerts answers 503 when the broker is down, in time for a client to retry.

The producer's own request timeout is Faust's default, 20 minutes: without a bound of ours the
request hung until the client gave up, with no answer saying that nothing was acknowledged.
The broker is this test's own, behind a proxy that the test cuts (test_e2e_outbox_broker_down.py).
"""
from __future__ import annotations

import time
import uuid

import aiohttp
import pytest

from test_e2e_outbox_broker_down import private_broker  # noqa: F401  (fixture)
from web.alerts import ACK_TIMEOUT_S

pytestmark = pytest.mark.e2e


def an_alert() -> dict:
    return {"alert_id": f"broker-down-{uuid.uuid4()}", "event_ts": time.time(), "severity": "LOW",
            "source": "alerts-broker-down-test", "name": "Probe"}


async def post_alert(http: aiohttp.ClientSession, url: str, token: str, timeout: float) -> tuple[int, dict]:
    async with http.post(f"{url}/api/v1/alerts", json=an_alert(), headers={"Authorization": f"Bearer {token}"},
                         timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        return response.status, await response.json()


async def test_an_alert_sent_while_the_broker_is_down_answers_503_within_the_ack_timeout(
        services, private_broker, start_worker):  # noqa: F811
    worker = start_worker(KAFKA_BOOTSTRAP_SERVERS=private_broker.address, APP_ID=f"alerts-down-{uuid.uuid4().hex[:8]}")
    async with aiohttp.ClientSession() as http:
        status, body = await post_alert(http, worker.url, services.admin_token, timeout=30)
        assert status == 202, body
        with private_broker.down():
            started = time.monotonic()
            # Well past ACK_TIMEOUT_S, far short of the producer's 20 minutes.
            status, body = await post_alert(http, worker.url, services.admin_token, timeout=ACK_TIMEOUT_S + 30)
            waited = time.monotonic() - started
        assert status == 503, body
        assert body["error"] == "broker_unavailable"
        assert waited < ACK_TIMEOUT_S + 5
