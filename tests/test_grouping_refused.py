"""A group Postgres refuses does not stop the others from closing (agents/close_groups.py).

The contracts refuse the known triggers at intake (a NUL character, an id that is no canonical
UUID), so the bad groups here are written into the table directly, as an older version of the app,
or a trigger nobody foresaw, may have left them in a changelog. Real Postgres and broker.
"""
from __future__ import annotations

import json
import time
import uuid


from agents.aggregate import aggregate_matches
from agents.close_groups import close_due_groups
from alerting_app.contracts import Alert, AlertMatched
from alerting_app.sending import partition_for
from tables import group_records, groups
from test_agent_support import AGENT_LOOP, insert_client, pipeline, pool, sent_to  # noqa: F401  (fixtures)
from test_grouping import closed_for

ALL_PARTITIONS = set(range(64))


def grouped(client_id: str, rule_id: str, window_s: int = 5, context: dict | None = None) -> AlertMatched:
    the_alert = Alert(alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                      name="CheckoutLatency", context=context or {"n": "1"})
    return AlertMatched(alert=the_alert, client_id=client_id, rule_ids=[rule_id], group_rule_id=rule_id,
                        group_window_s=window_s)


async def open_directly(pool, key: bytes, value: groups.ClientGroups) -> None:
    """Put a client's groups in the table (and their members in Postgres), as the agent would have."""
    await groups.prepare_writes()
    groups.write_value_of_partition(key, value, partition_for(key, tuple(range(64))))
    members = [(key.decode(), a["alert_id"], g["notification_id"], None) for g in value.values() for a in g["alerts"]]
    await group_records.record_memberships(pool, members)


def with_nul_in_context(value: groups.ClientGroups, rule_id: str) -> None:
    value[rule_id]["alerts"][0]["context"]["detail"] = "before\x00after"


@AGENT_LOOP
async def test_a_group_postgres_refuses_is_a_dead_letter_and_the_other_groups_close(pool):
    client, other_client = await insert_client(pool), await insert_client(pool)
    good_rule, bad_rule, slow_rule = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, good_rule)), groups.Join(grouped(client, bad_rule)),
                                  groups.Join(grouped(client, slow_rule, window_s=600)),
                                  groups.Join(grouped(other_client, good_rule))], set(), now, max_alerts=10)
    value = plan.values[client.encode()]
    with_nul_in_context(value, bad_rule)
    bad_group = value[bad_rule]
    for key, client_value in plan.values.items():
        await open_directly(pool, key, client_value)

    ready = await closed_for(pool, {client, other_client}, now + 5)

    assert sorted((r.client_id, r.group_rule_id) for r in ready) == sorted(
        [(client, good_rule), (other_client, good_rule)])
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert letter["topic"] == "alerts.matched"
    assert bad_group["notification_id"] in letter["reason"] and client in letter["reason"]
    assert "refused by Postgres" in letter["reason"] and bad_rule in letter["reason"]
    assert json.loads(letter["payload"]) == bad_group  # its content is kept, NUL included
    # Removed from the table; the client's group still open is kept.
    assert list(groups.open_groups.get(client.encode())) == [slow_rule]
    assert groups.open_groups.get(other_client.encode()) is None
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE notification_id = $1",
                               bad_group["notification_id"]) == 0

    # Closing again refuses nothing more: the bad group is gone, not retried for ever.
    assert await closed_for(pool, {client, other_client}, now + 6) == []
    assert len(await sent_to("alerts.matched.dlq", client)) == 1
    [slow] = await closed_for(pool, client, now + 600)
    assert slow.group_rule_id == slow_rule


@AGENT_LOOP
async def test_a_group_with_an_id_asyncpg_cannot_encode_does_not_stop_the_others(pool):
    client, other_client = await insert_client(pool), await insert_client(pool)
    rule = str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule)), groups.Join(grouped(other_client, rule))],
                             set(), now, max_alerts=10)
    value = plan.values[client.encode()]
    value[rule]["rule_ids"] = ["not-a-uuid"]  # asyncpg's encoding raises ValueError (or Postgres a DataError)
    for key, client_value in plan.values.items():
        await open_directly(pool, key, client_value)

    [ready] = await closed_for(pool, {client, other_client}, now + 5)

    assert ready.client_id == other_client
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert value[rule]["notification_id"] in letter["reason"]
    assert groups.open_groups.get(client.encode()) is None


@AGENT_LOOP
async def test_a_group_whose_key_is_no_uuid_is_a_dead_letter_and_the_others_close(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    now = time.time()
    good = groups.plan_joins({}, [groups.Join(grouped(client, rule))], set(), now, max_alerts=10)
    bad_key = b"not-a-client-" + uuid.uuid4().hex.encode()
    bad_value = {rule: good.values[client.encode()][rule] | {"notification_id": str(uuid.uuid4())}}
    await open_directly(pool, client.encode(), good.values[client.encode()])
    await groups.prepare_writes()
    groups.write_value_of_partition(bad_key, bad_value, partition_for(bad_key, tuple(range(64))))

    [ready] = await closed_for(pool, {client, bad_key.decode()}, now + 5)

    assert ready.client_id == client
    [letter] = await sent_to("alerts.matched.dlq", bad_key.decode())
    assert "not a UUID" in letter["reason"] and bad_value[rule]["notification_id"] in letter["reason"]
    assert groups.open_groups.get(bad_key) is None


@AGENT_LOOP
async def test_a_group_postgres_refuses_as_the_agent_closes_it_early_is_a_dead_letter_and_the_match_goes_on(
        pool, monkeypatch):
    client = await insert_client(pool)
    bad_rule, good_rules, new_rule = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(3)], str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule, window_s=600)) for rule in [bad_rule, *good_rules]],
                             set(), now, max_alerts=10)
    value = plan.values[client.encode()]
    with_nul_in_context(value, bad_rule)
    value[bad_rule]["opened_at"] = now - 10  # the oldest: closed first
    await open_directly(pool, client.encode(), value)
    # Budgets such that the next alert makes the agent close the oldest groups at once.
    monkeypatch.setattr(groups, "CLOSE_EARLY_BYTES", groups.encoded_size(value))
    monkeypatch.setattr(groups, "MAX_VALUE_BYTES", groups.encoded_size(value) // 3)

    [aggregation] = await aggregate(grouped(client, new_rule, window_s=600))

    assert aggregation.dead_letters == []  # the match itself is recorded
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert value[bad_rule]["notification_id"] in letter["reason"] and "refused by Postgres" in letter["reason"]
    closed_early = await pool.fetch("SELECT group_rule_id::text, emitted FROM notifications WHERE client_id = $1",
                                    client)
    assert closed_early and all(row["emitted"] for row in closed_early)
    assert {row["group_rule_id"] for row in closed_early} <= set(good_rules)
    held = groups.open_groups.get(client.encode())
    assert bad_rule not in held and new_rule in held
    await close_due_groups(pool, time.time() + 600, ALL_PARTITIONS)  # leave no group open


async def aggregate(*matches: AlertMatched) -> list:
    async with aggregate_matches.test_context() as agent:
        for match in matches:
            await agent.put(match.encode(), key=match.client_id.encode())
        return [agent.results[i] for i in range(len(matches))]


@AGENT_LOOP
async def test_values_the_table_holds_in_another_shape_are_dead_letters_and_the_other_groups_close(pool):
    # JSON of another shape, recovered from the changelog: the closer failed every round on it
    # ('list' object has no attribute 'items'), closing no group of any client.
    client, other_client, listed_client = (await insert_client(pool), await insert_client(pool),
                                           await insert_client(pool))
    rule, bad_rule = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule)), groups.Join(grouped(other_client, rule))],
                             set(), now, max_alerts=10)
    for key, value in plan.values.items():
        await open_directly(pool, key, value)
    no_opened_at = {k: v for k, v in plan.values[client.encode()][rule].items() if k != "opened_at"}
    with_bad_group = {**plan.values[client.encode()], bad_rule: no_opened_at}
    await groups.prepare_writes()
    for key, value in [(listed_client.encode(), [1, 2]), (client.encode(), with_bad_group)]:
        groups.write_value_of_partition(key, value, partition_for(key, tuple(range(64))))

    ready = await closed_for(pool, {client, other_client, listed_client}, now + 5)

    assert sorted(r.client_id for r in ready) == sorted([client, other_client])
    [group_letter] = await sent_to("alerts.matched.dlq", client)
    assert f"group of rule {bad_rule}" in group_letter["reason"] and "opened_at" in group_letter["reason"]
    assert json.loads(group_letter["payload"]) == no_opened_at
    [value_letter] = await sent_to("alerts.matched.dlq", listed_client)
    assert "not an object of groups" in value_letter["reason"] and json.loads(value_letter["payload"]) == [1, 2]
    assert groups.open_groups.get(client.encode()) is None
    assert groups.open_groups.get(listed_client.encode()) is None
    # Taken out of the table: closing again sends nothing more.
    assert await closed_for(pool, {client, other_client, listed_client}, now + 6) == []
    assert len(await sent_to("alerts.matched.dlq", client)) == 1
    assert len(await sent_to("alerts.matched.dlq", listed_client)) == 1


@AGENT_LOOP
async def test_a_group_the_table_holds_in_another_shape_is_a_dead_letter_and_the_match_joins_its_group(pool):
    client = await insert_client(pool)
    bad_rule, rule = str(uuid.uuid4()), str(uuid.uuid4())
    bad_group = {"notification_id": str(uuid.uuid4()), "opened_at": "yesterday", "window_s": 5, "alerts": [],
                 "rule_ids": [bad_rule]}
    await groups.prepare_writes()
    groups.write_value_of_partition(client.encode(), {bad_rule: bad_group},
                                    partition_for(client.encode(), tuple(range(64))))

    [aggregation] = await aggregate(grouped(client, rule, window_s=600))

    assert aggregation.dead_letters == []  # the match itself is recorded
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert f"group of rule {bad_rule}" in letter["reason"] and "opened_at" in letter["reason"]
    assert json.loads(letter["payload"]) == bad_group
    assert list(groups.open_groups.get(client.encode())) == [rule]
    await close_due_groups(pool, time.time() + 600, ALL_PARTITIONS)  # leave no group open


@AGENT_LOOP
async def test_a_group_listing_an_alert_that_is_not_one_is_a_dead_letter_and_the_other_groups_close(pool):
    # Inserted, then read back to be emitted: Alert.from_stored raised KeyError on the missing
    # severity, which is no refusal, and every round of the closer failed on it.
    client, other_client = await insert_client(pool), await insert_client(pool)
    rule, bad_rule = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, bad_rule)), groups.Join(grouped(other_client, rule))],
                             set(), now, max_alerts=10)
    bad_group = plan.values[client.encode()][bad_rule]
    del bad_group["alerts"][0]["severity"]
    for key, value in plan.values.items():
        await open_directly(pool, key, value)

    [ready] = await closed_for(pool, {client, other_client}, now + 5)

    assert ready.client_id == other_client
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert bad_group["notification_id"] in letter["reason"] and "severity" in letter["reason"]
    assert json.loads(letter["payload"]) == bad_group
    assert groups.open_groups.get(client.encode()) is None
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE notification_id = $1",
                               bad_group["notification_id"]) == 0


@AGENT_LOOP
async def test_a_group_listing_no_alert_is_a_dead_letter_and_its_unlisted_members_stay_in_postgres(pool):
    # Every group this release writes lists its first alert; one listing none (an older release's,
    # or written by hand) was never due, never a dead letter, and its client's key never deleted.
    client, other_client = await insert_client(pool), await insert_client(pool)
    rule, bad_rule = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, bad_rule)), groups.Join(grouped(client, bad_rule)),
                                  groups.Join(grouped(other_client, rule))], set(), now, max_alerts=1)
    await group_records.record_memberships(pool, plan.memberships)
    bad_group = plan.values[client.encode()][bad_rule]
    bad_group["alerts"] = []  # its first member listed no more; the second one is unlisted in Postgres
    for key, value in plan.values.items():
        await groups.prepare_writes()
        groups.write_value_of_partition(key, value, partition_for(key, tuple(range(64))))

    [ready] = await closed_for(pool, {client, other_client}, now + 5)

    assert ready.client_id == other_client
    [letter] = await sent_to("alerts.matched.dlq", client)
    assert bad_group["notification_id"] in letter["reason"] and "alerts" in letter["reason"]
    assert json.loads(letter["payload"]) == bad_group
    assert groups.open_groups.get(client.encode()) is None
    # Nothing is notified for it, and nothing of it deleted: its members, the unlisted one with its
    # alert, stay under the notification_id the letter names (docs/grouping.md).
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE notification_id = $1",
                               bad_group["notification_id"]) == 0
    assert await pool.fetchval("SELECT count(*) FROM notification_alerts WHERE notification_id = $1 "
                               "AND unlisted_alert IS NOT NULL", bad_group["notification_id"]) == 1
    assert await closed_for(pool, {client, other_client}, now + 6) == []
    assert len(await sent_to("alerts.matched.dlq", client)) == 1


@AGENT_LOOP
async def test_a_malformed_group_beside_a_group_still_open_is_taken_out_once_and_the_open_one_kept(pool):
    # The value must be written back without it even though no group of the client closed: left
    # in, it was a dead letter again every round of the closer.
    client = await insert_client(pool)
    rule, bad_rule = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule, window_s=600))], set(), now, max_alerts=10)
    value = plan.values[client.encode()]
    await open_directly(pool, client.encode(), value)
    bad_group = {"notification_id": str(uuid.uuid4()), "opened_at": now, "window_s": 5, "alerts": [],
                 "rule_ids": [bad_rule]}
    await groups.prepare_writes()
    groups.write_value_of_partition(client.encode(), {**value, bad_rule: bad_group},
                                    partition_for(client.encode(), tuple(range(64))))

    assert await closed_for(pool, client, now + 5) == []
    assert await closed_for(pool, client, now + 6) == []

    [letter] = await sent_to("alerts.matched.dlq", client)
    assert json.loads(letter["payload"]) == bad_group
    assert groups.open_groups.get(client.encode()) == value
    [ready] = await closed_for(pool, client, now + 600)  # leave no group open
    assert ready.group_rule_id == rule


def test_a_line_break_in_what_the_groups_table_held_is_logged_escaped(caplog):
    # The key and the reason quote what the table held: a line break in them began a log line of
    # its own, which read as one of ours.
    malformed = groups.Malformed(key=b"client\n[ERROR] forged", rule_id=None, content="x",
                                 reason="not an object:\n[ERROR] forged")
    letter = groups.malformed_letter(malformed)
    [record] = [r for r in caplog.records if r.name == groups.log.name]
    assert "\n" not in record.getMessage() and "\\n[ERROR] forged" in record.getMessage()
    assert "\n[ERROR] forged" in letter.reason  # the letter itself keeps it as it was
