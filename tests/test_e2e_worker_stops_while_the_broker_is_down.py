"""A worker told to stop (SIGTERM) while its broker is unreachable, with sends still waiting in its
producer, finishes stopping by itself, and loses nothing: the next worker does what it had not.

The stop used to wait for the broker: Faust waits for every message in process to be acknowledged
(the sinks wait for their sends) and flushes the producer, up to the producer's request timeout (20
minutes), and commits, waiting for the group coordinator for ever. ECS killed such a worker after its
stopTimeout (60 s). Now it gives up on the broker STOP_GRACE_S into the stop
(alerting_app/broker_transport.py, `Producer.give_up_on_the_broker`): it commits nothing more and
fails what was not acknowledged.

The work in its producer: a backlog of alerts the worker is evaluating and aggregating when the
broker goes (the sinks' sends), and a rule change made through its API during the outage (the outbox
relay's send). With nothing to send, a stop still waited for ever to commit what it had processed.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from test_e2e_outbox_broker_down import (  # noqa: F401  (private_broker: a fixture)
    Api, outbox_events, private_broker, wait_until_matched, wait_until_outbox_is_empty)
from operations_support import alerts_consumed
from worker_probe import wait_until_workers_hold_postgres_rules

pytestmark = pytest.mark.e2e

# Only a stop that hangs reaches this (it ends by itself in 15-20 s). Before the fix the stop waited
# for the producer's request timeout, 20 minutes.
STOP_CEILING_S = 90.0
BACKLOG = 20_000


async def produce_alerts(bootstrap: str, alerts: list[dict]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send("alerts.new", json.dumps(alert).encode(), key=alert["alert_id"].encode())
                for alert in alerts]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()



async def test_a_worker_stopped_while_the_broker_is_down_stops_and_the_next_one_does_its_work(
        services, clean_db, private_broker, start_worker):  # noqa: F811
    admin = services.admin_token
    group = f"stop-broker-down-{secrets.token_hex(4)}"
    worker = start_worker(KAFKA_BOOTSTRAP_SERVERS=private_broker.address, APP_ID=group)

    async with aiohttp.ClientSession() as http:
        api = Api(http, worker.url)
        status, client = await api.call("POST", "/api/v1/clients", admin, {"name": "Stopped"})
        assert status == 201, client
        key = client["api_key"]
        status, rule = await api.call("POST", "/api/v1/rules", key,
                                      {"severity": "CRITICAL", "source": "checkout", "name": "Latency"})
        assert status == 201, rule
        await wait_until_workers_hold_postgres_rules(http, admin, [worker.url], services.database_url)
        await wait_until_outbox_is_empty(services.database_url)
        alerts = [{"alert_id": f"stopped-{n}", "event_ts": time.time(), "severity": "CRITICAL",
                   "source": "checkout", "name": "Latency"} for n in range(BACKLOG)]
        await produce_alerts(private_broker.address, alerts)

        with private_broker.down():
            status, late_rule = await api.call("POST", "/api/v1/rules", key,
                                               {"severity": "HIGH", "source": "payments", "name": "*"})
            assert status == 201, late_rule
            worker.child.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.child.process.wait, STOP_CEILING_S)
            assert worker.child.process.returncode == 0, worker.log()[-5000:]
            assert "giving up on the broker" in worker.log()  # the stop did wait for it
            # The agents whose sends that failed stopped; they did not crash (alerting_app/broker_transport.py, Agent).
            assert "an agent crashed" not in worker.log() and "Crashed reason" not in worker.log()
            assert await outbox_events(services.database_url) == [(late_rule["rule_id"], "upsert", 1)]

        successor = start_worker(KAFKA_BOOTSTRAP_SERVERS=private_broker.address, APP_ID=group)
        await wait_until_outbox_is_empty(services.database_url)
        await wait_until_workers_hold_postgres_rules(http, admin, [successor.url], services.database_url)
        matched = await wait_until_matched(private_broker.address, {alert["alert_id"] for alert in alerts})
        assert {client_id for _, client_id, _ in matched} == {client["client_id"]}


async def test_a_worker_stopped_while_the_broker_is_down_with_offsets_to_commit_stops(
        private_broker, start_worker):  # noqa: F811
    # Alerts no rule matches: evaluated and acknowledged at once, nothing sent. Their offsets wait
    # for the next commit (every 2.8 s), which finds the broker gone: aiokafka's commit waits for the
    # group coordinator for ever, and the stop waited for it.
    worker = start_worker(KAFKA_BOOTSTRAP_SERVERS=private_broker.address,
                          APP_ID=f"stop-commit-broker-down-{secrets.token_hex(4)}")
    alerts = [{"alert_id": f"unmatched-{n}", "event_ts": time.time(), "severity": "LOW",
               "source": "nobody", "name": "Nothing"} for n in range(200)]
    await produce_alerts(private_broker.address, alerts)
    deadline = time.monotonic() + STOP_CEILING_S
    while await alerts_consumed(worker.url) < len(alerts):
        assert time.monotonic() < deadline, "the worker did not evaluate the alerts"
        await asyncio.sleep(0.05)

    with private_broker.down():
        worker.child.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.child.process.wait, STOP_CEILING_S)
        assert worker.child.process.returncode == 0, worker.log()[-5000:]
