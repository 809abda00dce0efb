"""The evaluate agent through Faust's test driver: rules arrive through the real rule.changed topic
and the worker's rule replica, alerts are matched and one `alerts.matched` per client reaches the
real broker.

The rules table and index are process-wide, so every test uses its own clients, rules and alert
source: no test can match another test's rules.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from agents.evaluate import match_alerts, oversized
from alerting_app.contracts import Alert, AlertMatched, Rule, RuleChanged
from kafka_probe import produce
from tables.rules import rule_index, rule_replica
from tables.silences import silence_replica
from test_agent_support import AGENT_LOOP, pipeline, sent_to  # noqa: F401  (fixtures)

pytestmark = AGENT_LOOP


def new_id() -> str:
    return str(uuid.uuid4())


def upsert(rule_id: str, client_id: str, version: int = 1, *, severity: str = "HIGH", source: str,
           name: str = "*", enabled: bool = True):
    rule = Rule(rule_id=rule_id, client_id=client_id, version=version, severity=severity, source=source,
                name=name, enabled=enabled)
    return RuleChanged(rule_id=rule_id, client_id=client_id, version=version, action="upsert", rule=rule)


def delete(rule_id: str, client_id: str, version: int):
    return RuleChanged(rule_id=rule_id, client_id=client_id, version=version, action="delete")


def alert(source: str, severity: str = "HIGH", name: str = "CheckoutLatency", alert_id: str | None = None):
    return Alert(alert_id=alert_id or new_id(), event_ts=time.time(), severity=severity, source=source,
                 name=name)


async def apply_changes(*changes: RuleChanged) -> None:
    """Publish the changes on the real rule.changed topic; return once the replica has read them."""
    from alerting_app.app import settings

    await produce(settings.kafka_bootstrap_servers, "rule.changed",
                  [(change.rule_id.encode(), change.encode()) for change in changes])
    newest = {}
    for change in changes:
        newest[change.rule_id] = max(newest.get(change.rule_id, 0), change.version)
    deadline = time.monotonic() + 30
    while any(rule_index.held_version(rule_id) != version for rule_id, version in newest.items()):
        assert time.monotonic() < deadline, "the rule replica did not read the changes"
        await asyncio.sleep(0.05)


async def evaluate(*values: bytes, key: str = "alert-key", partition: int = 0) -> list:
    """Each value is put on alerts.new and waited for: one Evaluation per value."""
    async with match_alerts.test_context() as agent:
        for value in values:
            await agent.put(value, key=key.encode(), partition=partition)
        return [agent.results[i] for i in range(len(values))]


def matches(evaluation) -> list[tuple[str, list[str]]]:
    return [(m.client_id, m.rule_ids) for m in evaluation.matched]


async def test_matching_alert_emits_one_alerts_matched_to_the_broker(pipeline):
    client, rule, source = new_id(), new_id(), f"payments-{new_id()}"
    await apply_changes(upsert(rule, client, source=source))
    the_alert = alert(source)

    [evaluation] = await evaluate(the_alert.encode())

    assert matches(evaluation) == [(client, [rule])]
    assert evaluation.matched[0].alert == the_alert
    assert evaluation.dead_letters == []
    [on_broker] = await sent_to("alerts.matched", client)
    assert on_broker["client_id"] == client
    assert on_broker["rule_ids"] == [rule]
    assert on_broker["alert"]["alert_id"] == the_alert.alert_id


async def test_alert_matching_several_rules_emits_one_message_per_client(pipeline):
    source = f"payments-{new_id()}"
    client_a, client_b = new_id(), new_id()
    a1, a2, b1, b_other = new_id(), new_id(), new_id(), new_id()
    await apply_changes(
        upsert(a1, client_a, source=source),
        upsert(a2, client_a, severity="*", source=source, name="CheckoutLatency"),
        upsert(b1, client_b, source=source, name="CheckoutLatency"),
        upsert(b_other, client_b, source=source, name="DiskFull"),
    )

    [evaluation] = await evaluate(alert(source).encode())

    assert sorted(matches(evaluation)) == sorted([(client_a, sorted([a1, a2])), (client_b, [b1])])
    assert len(await sent_to("alerts.matched", client_a)) == 1
    assert len(await sent_to("alerts.matched", client_b)) == 1


async def test_alert_matching_no_rule_emits_nothing(pipeline):
    client, source = new_id(), f"payments-{new_id()}"
    await apply_changes(upsert(new_id(), client, source=source))

    [evaluation] = await evaluate(alert(source, severity="LOW").encode())

    assert evaluation.matched == [] and evaluation.dead_letters == []
    assert await sent_to("alerts.matched", client) == []


async def test_disabled_rule_no_longer_matches(pipeline):
    client, rule, source = new_id(), new_id(), f"payments-{new_id()}"
    await apply_changes(upsert(rule, client, 1, source=source), upsert(rule, client, 2, source=source, enabled=False))

    [evaluation] = await evaluate(alert(source).encode())

    assert evaluation.matched == []


async def test_deleted_rule_no_longer_matches(pipeline):
    client, rule, source = new_id(), new_id(), f"payments-{new_id()}"
    await apply_changes(upsert(rule, client, 1, source=source), delete(rule, client, 2))

    [evaluation] = await evaluate(alert(source).encode())

    assert evaluation.matched == []



@pytest.mark.parametrize("replica", ["rules", "silences"])
async def test_no_alert_is_matched_until_the_rule_and_silence_replicas_have_caught_up(pipeline, replica):
    # After a restart, matching against rules or silences not read yet would drop notifications, or
    # deliver what a tenant silenced.
    client, rule, source = new_id(), new_id(), f"payments-{new_id()}"
    await apply_changes(upsert(rule, client, source=source))
    reading = {"rules": rule_replica, "silences": silence_replica}[replica]
    reading._caught_up.clear()  # as a worker that has just started
    try:
        async with match_alerts.test_context() as agent:
            await agent.put(alert(source).encode(), key=b"alert-key", wait=False)
            for _ in range(50):  # many turns of the loop: time enough to match, were it not waiting
                await asyncio.sleep(0.01)
            assert agent.results == {}
            reading._caught_up.set()
            deadline = time.monotonic() + 30
            while not agent.results:
                assert time.monotonic() < deadline, "the alert was not matched once the replica caught up"
                await asyncio.sleep(0.05)
            assert matches(agent.results[0]) == [(client, [rule])]
    finally:
        reading._caught_up.set()

@pytest.mark.parametrize(("value", "reason_names"), [
    (b"this is not json", "Invalid JSON"),
    (b'{"alert_id": "a-1", "event_ts": 1700000000, "severity": "URGENT", "source": "s", "name": "n"}',
     "severity: Input should be 'LOW', 'MEDIUM', 'HIGH' or 'CRITICAL'"),
    (b'{"alert_id": "a-1", "event_ts": 1700000000, "severity": "HIGH", "source": "s"}',
     "name: Field required"),
    # An alert must fit in a message however it is grouped: context is bounded.
    (b'{"alert_id": "a-1", "event_ts": 1700000000, "severity": "HIGH", "source": "s", "name": "n", '
     b'"context": {"k": "' + b"x" * 2001 + b'"}}', "context.k: String should have at most 2000 characters"),
    (b'{"alert_id": "a-1", "event_ts": 1700000000, "severity": "HIGH", "source": "s", "name": "n", "context": {'
     + b",".join(b'"k%d": "v"' % i for i in range(65)) + b'}}', "context: Dictionary should have at most 64 items"),
])
async def test_undecodable_alert_goes_to_the_dead_letter_topic_and_the_next_alert_is_matched(
        pipeline, value, reason_names):
    client, rule, source, key = new_id(), new_id(), f"payments-{new_id()}", f"alert-{new_id()}"
    await apply_changes(upsert(rule, client, source=source))

    bad, good = await evaluate(value, alert(source).encode(), key=key, partition=4)

    [letter] = bad.dead_letters
    assert reason_names in letter.reason
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.payload) == (
        "alerts.new", 4, 0, key, value.decode())
    assert bad.matched == []
    assert matches(good) == [(client, [rule])]
    [on_broker] = await sent_to("alerts.new.dlq", key)
    assert (on_broker["reason"], on_broker["payload"]) == (letter.reason, value.decode())


async def test_a_match_too_large_for_one_message_is_a_dead_letter_and_other_clients_still_match(pipeline):
    # A large alert (64 context values of 2,000 control characters, each escaped to 6 bytes: about
    # 770 KB) matched by 6,000 rules of one client (234 KB of rule ids) makes an alerts.matched message
    # of about 1,003,000 bytes, over what this app's producer sends (1,000,000 less 1 KB of framing;
    # the test broker would take it). A few thousand more rules and a broker's default 1,048,588 refuses
    # it on every redelivery, which would stop the partition.
    source, key = f"payments-{new_id()}", f"alert-{new_id()}"
    crowded, other, other_rule = new_id(), new_id(), new_id()
    await apply_changes(*(upsert(new_id(), crowded, source=source) for _ in range(6000)),
                        upsert(other_rule, other, source=source))
    huge = Alert(alert_id=new_id(), event_ts=time.time(), severity="HIGH", source=source, name="CheckoutLatency",
                 context={f"k{i}": "\x01" * 2000 for i in range(64)})

    [evaluation] = await evaluate(huge.encode(), key=key)

    assert matches(evaluation) == [(other, [other_rule])]
    [letter] = evaluation.dead_letters
    assert f"client {crowded}" in letter.reason and "6000 matching rules" in letter.reason
    assert letter.payload == huge.encode().decode()
    assert len(await sent_to("alerts.matched", other)) == 1
    assert await sent_to("alerts.matched", crowded) == []
    [on_broker] = await sent_to("alerts.new.dlq", key)
    assert on_broker["reason"] == letter.reason


async def test_a_match_is_oversized_from_one_byte_over_the_limit_key_included():
    client = new_id()
    matched = AlertMatched(alert=alert(f"payments-{new_id()}"), client_id=client, rule_ids=[new_id() for _ in range(7)])
    record_bytes = len(matched.encode()) + len(client.encode())  # value and key, as the producer counts them
    alert_bytes = len(matched.alert.encode())

    assert oversized(matched, alert_bytes, record_bytes) is None
    reason = oversized(matched, alert_bytes, record_bytes - 1)
    assert reason == (f"alerts.matched: the match for client {client} (7 matching rules) would be {record_bytes} "
                      f"bytes, more than the {record_bytes - 1} one message may hold")
