"""The aggregate agent through Faust's test driver, against the real Postgres and broker: one
notification per (client, alert), emitted once, re-emitted unchanged if it was never sent."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka.errors import KafkaError

from agents import aggregate as aggregate_module
from agents.aggregate import Aggregation, aggregate_matches, mark_emitted, publish_aggregation, record_first_match
from alerting_app.contracts import Alert, AlertMatched
from broker_front import OutageFront
from private_brokers import app_sending_behind
from test_agent_support import AGENT_LOOP, insert_client, pipeline, pool, sent_to  # noqa: F401  (fixtures)

pytestmark = AGENT_LOOP


def matched(client_id: str, rule_ids: list[str], alert_id: str | None = None) -> AlertMatched:
    alert = Alert(alert_id=alert_id or str(uuid.uuid4()), event_ts=time.time(), severity="HIGH",
                  source="payments", name="CheckoutLatency", context={"region": "eu-west-1"})
    return AlertMatched(alert=alert, client_id=client_id, rule_ids=rule_ids)


async def aggregate(*values: bytes, key: str = "client-key", partition: int = 0) -> list:
    """Each value is put on alerts.matched and waited for: one Aggregation per value."""
    async with aggregate_matches.test_context() as agent:
        for value in values:
            await agent.put(value, key=key.encode(), partition=partition)
        return [agent.results[i] for i in range(len(values))]


async def notification_rows(pool, client_id: str) -> list:
    return await pool.fetch(
        "SELECT notification_id::text, alert_id, alerts, rule_ids::text[], status, emitted "
        "FROM notifications WHERE client_id = $1", client_id)


async def test_first_match_emits_one_notification_and_marks_it_emitted(pool):
    client = await insert_client(pool)
    rules = sorted([str(uuid.uuid4()), str(uuid.uuid4())])
    match = matched(client, rules)

    [aggregation] = await aggregate(match.encode(), key=client)

    [ready] = aggregation.ready
    assert (ready.client_id, ready.alerts, ready.rule_ids) == (client, [match.alert], rules)
    [row] = await notification_rows(pool, client)
    assert (row["notification_id"], row["alert_id"], row["rule_ids"]) == (
        ready.notification_id, match.alert.alert_id, rules)
    assert row["alerts"] == [match.alert.model_dump(mode="json")]
    assert (row["status"], row["emitted"]) == ("PENDING", True)
    [on_broker] = await sent_to("notifications.ready", client)
    assert on_broker == ready.model_dump(mode="json")


async def test_redelivered_alerts_matched_emits_nothing_more(pool):
    client = await insert_client(pool)
    match = matched(client, [str(uuid.uuid4())])

    first, redelivered = await aggregate(match.encode(), match.encode(), key=client)

    assert len(first.ready) == 1
    assert redelivered.ready == [] and redelivered.dead_letters == []
    assert len(await notification_rows(pool, client)) == 1
    assert len(await sent_to("notifications.ready", client)) == 1


async def test_same_alert_matched_for_another_rule_set_later_is_still_notified_once(pool):
    client = await insert_client(pool)
    first_match = matched(client, [str(uuid.uuid4())])
    later_match = AlertMatched(alert=first_match.alert, client_id=client, rule_ids=[str(uuid.uuid4())])

    first, later = await aggregate(first_match.encode(), later_match.encode(), key=client)

    assert len(first.ready) == 1 and later.ready == []


async def test_same_alert_for_two_clients_gives_each_its_notification(pool):
    client_a, client_b = await insert_client(pool), await insert_client(pool)
    match_a = matched(client_a, [str(uuid.uuid4())])
    match_b = AlertMatched(alert=match_a.alert, client_id=client_b, rule_ids=[str(uuid.uuid4())])

    for_a, for_b = await aggregate(match_a.encode(), match_b.encode())

    assert [r.client_id for r in for_a.ready + for_b.ready] == [client_a, client_b]
    assert for_a.ready[0].notification_id != for_b.ready[0].notification_id


async def test_notification_left_unemitted_is_emitted_again_with_the_same_notification_id(pool):
    client = await insert_client(pool)
    match = matched(client, [str(uuid.uuid4())])
    # A worker inserted the row and died before notifications.ready was acknowledged.
    first_built = await record_first_match(pool, match)
    [row] = await notification_rows(pool, client)
    assert row["emitted"] is False

    [aggregation] = await aggregate(match.encode(), key=client)

    assert aggregation.ready == [first_built]
    [row] = await notification_rows(pool, client)
    assert row["emitted"] is True
    assert [m["notification_id"] for m in await sent_to("notifications.ready", client)] == [
        first_built.notification_id]


async def test_record_first_match_returns_the_notification_until_it_is_emitted(pool):
    client = await insert_client(pool)
    match = matched(client, [str(uuid.uuid4())])

    first = await record_first_match(pool, match)
    retried = await record_first_match(pool, match)
    await mark_emitted(pool, [first.notification_id])
    after_emission = await record_first_match(pool, match)

    assert retried == first
    assert after_emission is None


@pytest.mark.parametrize(("make_value", "reason_names"), [
    (lambda client: b"{not json", "Invalid JSON"),
    (lambda client: matched(client, ["r"]).encode().replace(b'"rule_ids":["r"]', b'"rule_ids":[]'),
     "rule_ids: List should have at least 1 item"),
    (lambda client: matched(client, ["r"]).encode().replace(b',"rule_ids":["r"]', b""),
     "rule_ids: Field required"),
    (lambda client: matched(client, ["not-a-uuid"]).encode(), "rule_ids: not a UUID"),
    (lambda client: matched("client-x", [str(uuid.uuid4())]).encode(), "client_id: not a UUID"),
    (lambda client: matched(str(uuid.uuid4()), [str(uuid.uuid4())]).encode(), "client_id: no such client"),
])
async def test_undecodable_alerts_matched_goes_to_the_dead_letter_topic(pool, make_value, reason_names):
    client = await insert_client(pool)
    value = make_value(client)
    key = f"dlq-{uuid.uuid4()}"
    valid = matched(client, [str(uuid.uuid4())])

    bad, good = await aggregate(value, valid.encode(), key=key, partition=5)

    [letter] = bad.dead_letters
    assert reason_names in letter.reason
    assert (letter.topic, letter.partition, letter.offset, letter.payload) == (
        "alerts.matched", 5, 0, value.decode())
    assert bad.ready == []
    assert len(good.ready) == 1
    [on_broker] = await sent_to("alerts.matched.dlq", key)
    assert on_broker["reason"] == letter.reason


async def test_a_notification_the_broker_never_acknowledged_is_not_marked_emitted(pool, tmp_path, monkeypatch):
    """Marked emitted only once the broker holds it: marked before, a broker that then refuses it
    loses it for good, as the redelivered match finds it emitted and sends nothing."""
    client = await insert_client(pool)
    ready = await record_first_match(pool, matched(client, [str(uuid.uuid4())]))
    async with app_sending_behind(OutageFront, tmp_path, f"never-acknowledged-{uuid.uuid4()}", "notifications.ready",
                                  producer_request_timeout=1.0) as (front, topic):
        monkeypatch.setattr(aggregate_module, "notifications_ready", topic)
        front.refuse()
        try:
            with pytest.raises(KafkaError):
                async with asyncio.timeout(60):  # a send that never fails would otherwise hang the test
                    await publish_aggregation(Aggregation(ready=[ready]))
        finally:
            front.let_through()

    [row] = await notification_rows(pool, client)
    assert row["emitted"] is False
    assert await record_first_match(pool, matched(client, ready.rule_ids, ready.alerts[0].alert_id)) == ready
