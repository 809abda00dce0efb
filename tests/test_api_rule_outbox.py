"""Every rule change reaches `rule.changed` through the outbox, in order, with its version.

The API writes the RuleChanged event in the change's own transaction; the relay sends it to the
real broker and deletes the row once the broker acknowledged it.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from alerting_app.contracts import Rule, RuleChanged
from kafka_probe import read_topic
from test_api_support import API_LOOP, api, broker, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def outbox_events(rule_id: str) -> list[RuleChanged]:
    from alerting_app import db

    pool = await db.pool()
    rows = await pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id", rule_id)
    return [RuleChanged.model_validate(row["payload"]) for row in rows]


async def published_events(broker: str, rule_id: str) -> list[RuleChanged]:
    return [RuleChanged.model_validate_json(value)
            for key, value in await read_topic(broker, "rule.changed") if key == rule_id.encode()]


def summary(events: list[RuleChanged]) -> list[tuple[str, int, bool | None]]:
    return [(e.action, e.version, e.rule.enabled if e.rule else None) for e in events]


async def test_creating_a_rule_writes_an_upsert_carrying_the_whole_rule(api, tenant):
    rule = await api.new_rule(tenant, "CRITICAL", "checkout", "Latency")
    [event] = await outbox_events(rule["rule_id"])
    assert (event.action, event.rule_id, event.client_id, event.version) == ("upsert", rule["rule_id"], tenant.client_id, 1)
    assert event.rule.model_dump() == {
        "rule_id": rule["rule_id"], "client_id": tenant.client_id, "severity": "CRITICAL",
        "source": "checkout", "name": "Latency", "enabled": True, "version": 1,
        "group_window_s": 0, "repeat_interval_s": 0, "fingerprint_keys": [],
    }


async def test_update_toggle_and_delete_each_write_an_event_with_the_next_version(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    replaced = await api.call("PUT", path, tenant.key,
                              {"version": 1, "severity": "HIGH", "source": "payments", "name": "Checkout", "enabled": True})
    assert replaced.status == 200
    assert (await api.call("PATCH", path, tenant.key, {"version": 2, "enabled": False})).status == 200
    assert (await api.call("PATCH", path, tenant.key, {"version": 3, "enabled": True})).status == 200
    assert (await api.call("DELETE", path, tenant.key)).status == 204
    events = await outbox_events(rule["rule_id"])
    assert summary(events) == [
        ("upsert", 1, True), ("upsert", 2, True), ("upsert", 3, False), ("upsert", 4, True), ("delete", 5, None),
    ]
    assert events[1].rule.name == "Checkout"


async def test_a_refused_change_writes_no_event(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    assert (await api.call("PATCH", path, tenant.key, {"version": 7, "enabled": False})).status == 409
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "severity": "*", "source": "*"})).status == 422
    again = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "payments", "name": "*"})
    assert again.status == 409
    assert summary(await outbox_events(rule["rule_id"])) == [("upsert", 1, True)]


async def test_deleting_a_client_writes_a_delete_event_for_each_of_its_rules(api, tenant, other_tenant):
    first = await api.new_rule(tenant, source="a")
    second = await api.new_rule(tenant, source="b")
    bystander = await api.new_rule(other_tenant)
    assert (await api.call("PATCH", f"/api/v1/rules/{second['rule_id']}", tenant.key,
                           {"version": 1, "enabled": False})).status == 200
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    assert summary(await outbox_events(first["rule_id"])) == [("upsert", 1, True), ("delete", 2, None)]
    assert summary(await outbox_events(second["rule_id"])) == [
        ("upsert", 1, True), ("upsert", 2, False), ("delete", 3, None),
    ]
    assert summary(await outbox_events(bystander["rule_id"])) == [("upsert", 1, True)]


async def test_deleting_a_client_queues_and_remembers_the_deletion_of_each_rule_and_silence_one_version_up(
        api, tenant, other_tenant):
    """Written for all of the client's rules (and silences) at once: each event is the contract's
    delete at the next version, after the key's earlier events, and remembered for republishing."""
    from alerting_app import db
    from alerting_app.contracts import SilenceChanged

    rules = [await api.new_rule(tenant, source=f"s{n}") for n in range(3)]
    for n, rule in enumerate(rules):  # held at versions 1, 2 and 3
        for version in range(1, n + 1):
            assert (await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                                   {"version": version, "enabled": version % 2 == 0})).status == 200
    silence_body = {"source": "payments", "ends_at": time.time() + 3600, "comment": "deploying",
                    "created_by": "ops@example.com"}
    silences = [(await api.call("POST", "/api/v1/silences", who.key, silence_body)).body
                for who in (tenant, tenant, other_tenant)]
    assert (await api.call("DELETE", f"/api/v1/silences/{silences[1]['silence_id']}", tenant.key)).status == 204
    bystander = await api.new_rule(other_tenant)

    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204

    def without_time(payload: dict) -> dict:
        return {name: value for name, value in payload.items() if name != "changed_at"}

    pool = await db.pool()
    clients = [tenant.client_id, other_tenant.client_id]
    for rule, held in zip(rules, (1, 2, 3)):
        events = await outbox_events(rule["rule_id"])
        assert [event.version for event in events] == list(range(1, held + 2))  # in outbox id order
        assert without_time(events[-1].model_dump(mode="json")) == without_time(RuleChanged(
            rule_id=rule["rule_id"], client_id=tenant.client_id, version=held + 1, action="delete").model_dump(mode="json"))
    for silence, held in zip(silences[:2], (1, 2)):
        rows = await pool.fetch("SELECT payload FROM silence_outbox WHERE silence_id = $1 ORDER BY outbox_id",
                                silence["silence_id"])
        assert [row["payload"]["version"] for row in rows] == list(range(1, held + 2))
        assert without_time(rows[-1]["payload"]) == without_time(SilenceChanged(
            silence_id=silence["silence_id"], client_id=tenant.client_id, version=held + 1,
            action="delete").model_dump(mode="json"))
    remembered = {str(row["rule_id"]): (str(row["client_id"]), row["version"])
                  for row in await pool.fetch("SELECT rule_id, client_id, version FROM deleted_rules"
                                             " WHERE client_id = ANY($1::uuid[])", clients)}
    assert remembered == {rule["rule_id"]: (tenant.client_id, held + 1) for rule, held in zip(rules, (1, 2, 3))}
    remembered = {str(row["silence_id"]): (str(row["client_id"]), row["version"])
                  for row in await pool.fetch("SELECT silence_id, client_id, version FROM deleted_silences"
                                             " WHERE client_id = ANY($1::uuid[])", clients)}
    assert remembered == {silence["silence_id"]: (tenant.client_id, held + 1)
                          for silence, held in zip(silences[:2], (1, 2))}
    assert summary(await outbox_events(bystander["rule_id"])) == [("upsert", 1, True)]


async def test_events_recorded_together_keep_their_order_and_a_key_deleted_twice_keeps_its_greater_version(api):
    from agents.rule_outbox import record_rule_changes
    from alerting_app import db

    first, second, client_id = (str(uuid.uuid4()) for _ in range(3))
    rule = Rule(rule_id=first, client_id=client_id, severity="HIGH", source="payments", name="*", version=1)
    events = [RuleChanged.upsert(rule),
              RuleChanged(rule_id=first, client_id=client_id, version=2, action="delete"),
              RuleChanged(rule_id=second, client_id=client_id, version=4, action="delete"),
              RuleChanged(rule_id=first, client_id=client_id, version=3, action="delete")]
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        await record_rule_changes(conn, events)

    rows = await pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = ANY($1::uuid[]) ORDER BY outbox_id",
                            [first, second])
    assert [RuleChanged.model_validate(row["payload"]) for row in rows] == events
    remembered = await pool.fetch("SELECT rule_id, version FROM deleted_rules WHERE rule_id = ANY($1::uuid[])",
                                  [first, second])
    assert {str(row["rule_id"]): row["version"] for row in remembered} == {first: 3, second: 4}


async def test_the_relay_sends_events_to_rule_changed_in_order_then_deletes_them(api, tenant, broker):
    from agents.rule_outbox import relay_pending
    from alerting_app import db

    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})).status == 200
    assert (await api.call("DELETE", path, tenant.key)).status == 204
    written = await outbox_events(rule["rule_id"])

    pool = await db.pool()
    while await relay_pending(pool, batch_size=2):
        pass

    assert await outbox_events(rule["rule_id"]) == []
    assert await published_events(broker, rule["rule_id"]) == written
    assert summary(written) == [("upsert", 1, True), ("upsert", 2, False), ("delete", 3, None)]


async def test_the_running_relay_publishes_a_change_made_through_the_api(api, tenant, broker):
    from agents.rule_outbox import relay_rule_outbox

    relay = asyncio.create_task(relay_rule_outbox())
    try:
        rule = await api.new_rule(tenant)
        await wait_until_relayed(rule["rule_id"])
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    # Rows are deleted only after the broker acknowledged them, so the event is there by now.
    [event] = await published_events(broker, rule["rule_id"])
    assert (event.action, event.version, event.client_id) == ("upsert", 1, tenant.client_id)


async def test_the_relay_cancelled_as_it_is_woken_up_stops(api, tenant, broker):
    """Python 3.11's asyncio.wait_for returns the result of what it waits for when that finished as
    the task was cancelled, dropping the cancellation: the relay, waiting for its wake-up, then went
    on relaying for ever (this module's previous test hung the suite when a wake-up met its cancel).
    Here the wake-up and the cancel come together on purpose."""
    from agents import rule_outbox

    relay = asyncio.create_task(rule_outbox.relay_rule_outbox())
    try:
        rule = await api.new_rule(tenant)  # a change: the relay sends it, then waits to be woken up
        await wait_until_relayed(rule["rule_id"])
        await asyncio.sleep(0.2)
        rule_outbox._wake_up.set()
        await asyncio.sleep(0)  # the wake-up's wait ends ...
        relay.cancel()  # ... and the cancel arrives before the relay resumes
        async with asyncio.timeout(30):  # a bound only: before the fix the relay never ended
            await asyncio.gather(relay, return_exceptions=True)
        assert relay.cancelled()
    finally:
        relay.cancel()


async def wait_until_relayed(rule_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pending := await outbox_events(rule_id):
        assert time.monotonic() < deadline, f"{len(pending)} events for {rule_id} still in the outbox"
        await asyncio.sleep(0.1)
