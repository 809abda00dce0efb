"""Alerts produced before any worker runs (the start-up order the Go system got wrong) are all
evaluated once a worker of a new group starts: none is skipped by the group's first assignment.

Why it can fail: a worker that starts reading at the end of the topic, or that drops records handed
over while its first rebalance ends (alerting_app/broker_transport.py, `_held_during_rebalance`),
evaluates fewer alerts than the topic holds, while its commits still reach the end: lag cannot show
it, the worker's own count of evaluated alerts can. (The rebalance race itself shows after a
restart with a table to recover: tests/test_e2e_grouping_crash.py.)
"""
from __future__ import annotations

import secrets

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from delivery_platform import produce_alerts
from kafka_probe import wait_until_consumed
from operations_support import alerts_consumed

pytestmark = pytest.mark.e2e

BACKLOG = 300


async def messages_on(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        starts, ends = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()



async def test_a_new_group_evaluates_every_alert_already_waiting_for_it(services, start_worker):
    bootstrap = services.kafka_bootstrap_servers
    # Every partition has alerts waiting before the worker (and its group) exists.
    await produce_alerts(bootstrap, [f"backlog-{secrets.token_hex(4)}-{n}" for n in range(BACKLOG)])
    group = f"backlog-{secrets.token_hex(4)}"

    worker = start_worker(APP_ID=group, ROLES="evaluate")
    await wait_until_consumed(bootstrap, group, ["alerts.new"])

    # At least once each (a record may be handed over twice around a rebalance, never zero times).
    assert await alerts_consumed(worker.url) >= await messages_on(bootstrap, "alerts.new")

