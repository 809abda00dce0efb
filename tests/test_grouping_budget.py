"""A client's table value stays under the broker's message size limit (tables/groups.py).

Faust's JSON codec escapes every non-ASCII character (an emoji is 12 bytes), and a client's value
holds all its open groups: the budget is on the whole value as the table encodes it, the first
alert of a group included. The plain functions, then the agent and closer against the real broker
and Postgres (a value over the limit is refused by the producer there).
"""
from __future__ import annotations

import json
import time
import uuid

import pytest


from agents import aggregate
from agents.aggregate import aggregate_matches
from agents.close_groups import close_due_groups
from alerting_app.contracts import MAX_CONTEXT_ENTRIES, Alert, AlertMatched, Silence, context_digests
from tables import groups
from test_agent_support import AGENT_LOOP, insert_client, pipeline, pool, sent_to  # noqa: F401  (fixtures)
from test_grouping import closed_for, insert_silence, rows_of

BROKER_MESSAGE_LIMIT = 1_000_000  # Faust's producer_max_request_size, the smaller of the two limits
EMOJI = "\U0001F525"


def emoji_alert() -> Alert:
    """The largest alert the contract accepts, as the table encodes it: about 1.7 MB."""
    return Alert(alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                 name="CheckoutLatency",
                 context={f"{n}{EMOJI * 190}": EMOJI * 2000 for n in range(MAX_CONTEXT_ENTRIES)})


def grouped(client_id: str, rule_id: str, the_alert: Alert) -> AlertMatched:
    return AlertMatched(alert=the_alert, client_id=client_id, rule_ids=[rule_id], group_rule_id=rule_id,
                        group_window_s=5)


def sized_alert(n: int) -> Alert:
    return Alert(alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                 name="CheckoutLatency", context={"n": str(n), "detail": "x" * 1900})


def test_an_alert_too_large_alone_opens_its_group_listed_without_its_context():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    big = emoji_alert()
    assert groups.encoded_size(big.model_dump(mode="json")) > BROKER_MESSAGE_LIMIT

    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule, big))], set(), now=1.0, max_alerts=100)

    value = plan.values[client.encode()]
    assert groups.encoded_size(value) <= groups.MAX_VALUE_BYTES
    [listed] = value[rule]["alerts"]
    assert (listed["alert_id"], listed["name"], listed["context"]) == (big.alert_id, big.name, {})
    assert [m[1] for m in plan.memberships] == [big.alert_id]


def test_many_groups_of_large_alerts_stay_within_the_value_budget_and_count_the_rest():
    client = str(uuid.uuid4())
    rules = [str(uuid.uuid4()) for _ in range(40)]
    joins = [groups.Join(grouped(client, rule, sized_alert(n))) for n in range(30) for rule in rules]

    plan = groups.plan_joins({}, joins, set(), now=1.0, max_alerts=1_000)

    value = plan.values[client.encode()]
    assert groups.encoded_size(value) <= groups.MAX_VALUE_BYTES
    assert sorted(value) == sorted(rules)  # every group exists, with at least one alert listed
    assert all(group["alerts"] for group in value.values())
    listed = sum(len(group["alerts"]) for group in value.values())
    assert listed < len(joins) and len(plan.memberships) == len(joins)  # the rest are counted as truncated


def test_a_value_near_its_budget_lists_a_new_groups_first_alert_without_context():
    client = str(uuid.uuid4())
    rules = [str(uuid.uuid4()) for _ in range(12)]
    full = groups.plan_joins({}, [groups.Join(grouped(client, rule, sized_alert(n)))
                                  for n in range(40) for rule in rules[:10]], set(), now=1.0, max_alerts=1_000)
    late_rule = rules[11]

    plan = groups.plan_joins(full.values, [groups.Join(grouped(client, late_rule, sized_alert(0)))], set(),
                             now=2.0, max_alerts=1_000)

    value = plan.values[client.encode()]
    assert groups.encoded_size(value) <= groups.MAX_VALUE_BYTES + 1_000
    [listed] = value[late_rule]["alerts"]
    assert listed["context"] == {}


def test_an_unlisted_member_too_large_for_a_listing_is_kept_in_postgres_without_its_context():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    small, big = sized_alert(0), emoji_alert()

    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule, small)), groups.Join(grouped(client, rule, big))],
                             set(), now=1.0, max_alerts=100)

    listed, unlisted = plan.memberships
    assert (listed[1], listed[3]) == (small.alert_id, None)  # its alert is in the table
    assert unlisted[1] == big.alert_id
    assert json.loads(unlisted[3]) == {**big.model_dump(mode="json"), "context": {},
                                       groups.CONTEXT_DIGESTS: context_digests(big.context)}
    assert groups.listing_size(json.loads(unlisted[3])) <= groups.MAX_LISTED_BYTES


def test_unlisted_alerts_fill_a_listing_only_within_its_byte_budget():
    listed = [sized_alert(n).model_dump(mode="json") for n in range(30)]
    candidates = [sized_alert(n).model_dump(mode="json") for n in range(30, 40)]

    left_out = groups.fill_listing(listed, candidates, places=100)

    assert 30 < len(listed) < 40 and listed[30:] == candidates[:len(listed) - 30]
    assert left_out == candidates[len(listed) - 30:]
    used = sum(groups.listing_size(alert) for alert in listed)
    assert used <= groups.MAX_LISTED_BYTES < used + groups.listing_size(left_out[0])


def test_an_unlisted_alert_too_large_for_an_emptied_listing_is_listed_without_its_context():
    big, small = emoji_alert().model_dump(mode="json"), sized_alert(0).model_dump(mode="json")
    listed: list[dict] = []

    left_out = groups.fill_listing(listed, [big, small], places=1)

    assert listed == [{**big, "context": {}, groups.CONTEXT_DIGESTS: context_digests(big["context"])}]
    assert left_out == [small]


def alert_of_listing_size(size: int) -> dict:
    """An alert (as listed) that takes exactly `size` bytes of a listing."""
    the_alert = sized_alert(0).model_dump(mode="json")
    context = the_alert["context"]
    while size - groups.listing_size(the_alert) > 1990:  # a context value holds 2,000 characters at most
        context[f"pad{len(context)}"] = "x" * 1900
    context["last"] = ""
    context["last"] = "x" * (size - groups.listing_size(the_alert))
    assert groups.listing_size(Alert.model_validate(the_alert).model_dump(mode="json")) == size
    return the_alert


def test_an_alert_that_fills_a_listing_to_its_last_byte_is_listed():
    # The budget is MAX_LISTED_BYTES inclusive: the tests' alerts never met it exactly, so listing
    # only below it went unnoticed, both as a member joins and as the closer fills freed places.
    first = sized_alert(1).model_dump(mode="json")
    last = alert_of_listing_size(groups.MAX_LISTED_BYTES - groups.listing_size(first))
    listed = [first]

    assert groups.fill_listing(listed, [last], places=100) == []
    assert listed == [first, last]

    group = groups.open_group(str(uuid.uuid4()), 5, time.time())
    group["alerts"] = [first]
    group["listed_bytes"] = groups.listing_size(first)
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    member = grouped(client, rule, Alert.model_validate(last))  # the alert exactly as it is listed

    added, is_listed = groups.add_member(group, member, max_alerts=100, value_room=groups.MAX_VALUE_BYTES)

    assert is_listed and group["alerts"] == [first, last]
    assert group["listed_bytes"] == groups.MAX_LISTED_BYTES
    assert added == groups.listing_size(last) + groups.encoded_size([rule]) - groups.encoded_size([])


# A silence matching the emoji alert on a context value it keeps only as digests, on a key's presence,
# or not at all (a value of the same length that differs in its last character; a key it lacks).
EMOJI_KEY = f"7{EMOJI * 190}"
CONTEXT_SILENCES = {
    "the value": ({EMOJI_KEY: EMOJI * 2000}, True),
    "the key's presence": ({EMOJI_KEY: "*"}, True),
    "another value": ({EMOJI_KEY: EMOJI * 1999 + "x"}, False),
    "a key it lacks": ({"region": "*"}, False),
}


@pytest.mark.parametrize("matchers, mutes", CONTEXT_SILENCES.values(), ids=CONTEXT_SILENCES.keys())
def test_an_alert_kept_without_its_context_is_silenced_as_the_whole_alert_is(matchers, mutes):
    big = emoji_alert()
    silence = Silence(silence_id="s", client_id="c", severity="*", source="*", name="*", context_matchers=matchers,
                      starts_at=1.0, ends_at=2.0, comment="maintenance", created_by="ops", version=1)
    kept = groups.without_context(big.model_dump(mode="json"))
    assert silence.matches(big) is mutes
    assert silence.matches(Alert.from_stored(kept), kept[groups.CONTEXT_DIGESTS]) is mutes
    # Within a listing's budget whatever the context: 64 entries of two digests.
    assert groups.listing_size(kept) <= groups.MAX_LISTED_BYTES // 4
    assert groups.as_listed(kept) == {**big.model_dump(mode="json"), "context": {}}


@AGENT_LOOP
@pytest.mark.parametrize("matcher", ["the value", "the key's presence"])
async def test_a_silence_on_the_context_an_unlisted_member_lost_mutes_it_at_close(pool, matcher):
    """An unlisted member over a listing's budget is kept without its context; a silence created while
    its group is open that matches that context mutes it at close, as it would the whole alert."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    small, big = sized_alert(0), emoji_alert()
    async with aggregate_matches.test_context() as agent:
        for match in (grouped(client, rule, small), grouped(client, rule, big)):
            await agent.put(match.encode(), key=client.encode())
    await groups.wait_until_written()
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, **CONTEXT_SILENCES[matcher][0])

    [ready] = await closed_for(pool, client, opened + 5)

    assert [a.alert_id for a in ready.alerts] == [small.alert_id]
    assert ready.truncated_alerts == 0  # muted, not counted
    [row] = await rows_of(pool, client)
    assert [a["alert_id"] for a in row["alerts"]] == [small.alert_id]


@AGENT_LOOP
async def test_a_silence_on_the_context_a_groups_first_alert_lost_mutes_it_at_close(pool):
    """A group's first alert too large for its listing is listed without its context, and checked at
    close as the whole alert is: a silence on that context records the group silenced. Its
    notification does not carry the digests."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    big = emoji_alert()
    async with aggregate_matches.test_context() as agent:
        await agent.put(grouped(client, rule, big).encode(), key=client.encode())
    await groups.wait_until_written()
    opened = time.time()
    silence = await insert_silence(pool, client, opened - 60, opened + 3600, **CONTEXT_SILENCES["the value"][0])

    assert await closed_for(pool, client, opened + 5) == []

    [row] = await rows_of(pool, client)
    assert (row["status"], row["detail"]) == ("SILENCED", f"silenced by {silence}")
    assert row["alerts"] == [{**big.model_dump(mode="json"), "context": {}}]


@AGENT_LOOP
async def test_the_agent_groups_and_the_closer_notifies_an_alert_too_large_for_a_message(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    big = emoji_alert()
    match = grouped(client, rule, big)

    async with aggregate_matches.test_context() as agent:
        # Sent as the broker would deliver it: the evaluator's message is compact UTF-8, under the limit.
        await agent.put(match.encode(), key=client.encode())
        [aggregation] = [agent.results[0]]
    assert aggregation.dead_letters == []
    await groups.wait_until_written()  # the changelog write was accepted by the producer and broker

    [ready] = await closed_for(pool, client, time.time() + 5)

    assert [a.alert_id for a in ready.alerts] == [big.alert_id] and ready.truncated_alerts == 0
    [row] = await rows_of(pool, client)
    assert row["alerts"] == [{**big.model_dump(mode="json"), "context": {}}]  # the digests are not notified
    assert groups.open_groups.get(client.encode()) is None


def crowded_alert(n: int) -> Alert:
    """An alert with no context whose texts are all emoji: about 7.3 KB as the table encodes it, so
    about 135 groups opened by such alerts fill a changelog message."""
    return Alert(alert_id=(f"{n}-" + EMOJI * 200)[:200], event_ts=time.time(), severity="HIGH",
                 source=EMOJI * 200, name=EMOJI * 200)


def test_a_value_too_large_for_a_message_gives_up_its_oldest_groups_and_no_more():
    client = str(uuid.uuid4())
    rules = [str(uuid.uuid4()) for _ in range(150)]
    plan = groups.JoinPlan({}, [])
    for n, rule in enumerate(rules):  # one group opened per second, the first the oldest
        plan = groups.plan_joins(plan.values, [groups.Join(grouped(client, rule, crowded_alert(n)))], set(),
                                 now=float(n), max_alerts=100)
    value = plan.values[client.encode()]
    assert groups.encoded_size(value) > BROKER_MESSAGE_LIMIT
    assert abs(plan.sizes[client.encode()] - groups.encoded_size(value)) <= len(rules)  # kept up to date

    taken = groups.close_early(plan)

    assert groups.encoded_size(value) <= groups.MAX_VALUE_BYTES
    assert [d.group_rule_id for d in taken] == rules[:len(taken)]
    assert sorted(value) == sorted(rules[len(taken):])
    # No more than needed: with the last group taken back, the value would be over its budget.
    assert groups.encoded_size({**value, taken[-1].group_rule_id: taken[-1].group}) > groups.MAX_VALUE_BYTES


def test_one_group_too_large_for_a_message_through_its_rule_ids_is_closed_at_once():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    every_rule = sorted(str(uuid.uuid4()) for _ in range(25_000))
    match = AlertMatched(alert=sized_alert(0), client_id=client, rule_ids=every_rule, group_rule_id=rule,
                         group_window_s=5)
    plan = groups.plan_joins({}, [groups.Join(match)], set(), now=1.0, max_alerts=100)
    assert groups.encoded_size(plan.values[client.encode()]) > groups.CLOSE_EARLY_BYTES

    [taken] = groups.close_early(plan)

    assert (taken.group_rule_id, taken.group["rule_ids"]) == (rule, every_rule)
    assert plan.values[client.encode()] == {}  # the key is deleted when written


def test_a_value_within_a_message_keeps_all_its_groups():
    client = str(uuid.uuid4())
    rules = [str(uuid.uuid4()) for _ in range(90)]
    plan = groups.plan_joins({}, [groups.Join(grouped(client, rule, crowded_alert(n))) for n, rule in enumerate(rules)],
                             set(), now=1.0, max_alerts=100)
    assert groups.MAX_VALUE_BYTES < groups.encoded_size(plan.values[client.encode()]) <= groups.CLOSE_EARLY_BYTES

    assert groups.close_early(plan) == []
    assert sorted(plan.values[client.encode()]) == sorted(rules)


@AGENT_LOOP
async def test_a_client_whose_open_groups_outgrow_a_message_has_the_oldest_notified_early_and_loses_no_alert(
        pool):
    client = await insert_client(pool)
    rules = [str(uuid.uuid4()) for _ in range(150)]
    alerts = [crowded_alert(n) for n in range(len(rules))]

    async with aggregate_matches.test_context() as agent:
        for rule, the_alert in zip(rules, alerts):
            await agent.put(grouped(client, rule, the_alert).encode(), key=client.encode())
        aggregations = [agent.results[i] for i in range(len(rules))]
    assert [letter for a in aggregations for letter in a.dead_letters] == []
    # Emitted by the agent as it closed them (emit_now), before the batch's own notifications.
    early = await pool.fetch("SELECT group_rule_id::text, alerts, emitted FROM notifications WHERE client_id = $1 "
                             "ORDER BY created_at, group_rule_id", client)
    assert early, "no group was closed early"
    assert all(row["emitted"] for row in early)
    assert sorted(row["group_rule_id"] for row in early) == sorted(rules[:len(early)])  # the oldest
    value = groups.open_groups[client.encode()]
    assert groups.encoded_size(value) <= groups.CLOSE_EARLY_BYTES
    assert sorted(value) == sorted(rules[len(early):])

    closed = await closed_for(pool, client, time.time() + 5)

    notified = [a["alert_id"] for row in early for a in row["alerts"]] + [a.alert_id for r in closed for a in r.alerts]
    assert sorted(notified) == sorted(a.alert_id for a in alerts)  # each alert once, none lost
    emitted = await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1 AND emitted", client)
    assert emitted == len(rules)


@AGENT_LOOP
async def test_groups_closed_early_whose_emit_never_happened_are_emitted_by_the_clients_next_batch(
        pool, monkeypatch):
    client = await insert_client(pool)
    # Small budgets, so that a few dozen groups of ordinary alerts outgrow them.
    monkeypatch.setattr(groups, "MAX_VALUE_BYTES", 16 * 1024)
    monkeypatch.setattr(groups, "CLOSE_EARLY_BYTES", 24 * 1024)

    async def worker_dies(ready, dead_letters):
        raise RuntimeError("the worker died after the commit, before emitting")
    monkeypatch.setattr(aggregate, "emit_now", worker_dies)
    died = False
    async with aggregate_matches.test_context() as agent:
        for n in range(200):
            try:
                await agent.put(grouped(client, str(uuid.uuid4()), sized_alert(n)).encode(), key=client.encode())
            except RuntimeError:
                died = True
                break
    assert died, "no group was closed early"
    closed = {row[0] for row in await pool.fetch(
        "SELECT notification_id::text FROM notifications WHERE client_id = $1 AND NOT emitted", client)}
    assert closed, "the early close was not committed"
    # The table forgets a group only once it is emitted: it still holds these.
    assert closed <= {group["notification_id"] for group in groups.open_groups[client.encode()].values()}

    monkeypatch.undo()
    # The client's next batch (after a restart, the same batch again; here another alert will do).
    async with aggregate_matches.test_context() as agent:
        await agent.put(grouped(client, str(uuid.uuid4()), sized_alert(999)).encode(), key=client.encode())

    assert closed <= {m["notification_id"] for m in await sent_to("notifications.ready", client)}
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE notification_id = ANY($1::uuid[]) "
                               "AND emitted", list(closed)) == len(closed)
    assert not closed & {group["notification_id"] for group in groups.open_groups[client.encode()].values()}
    await close_due_groups(pool, time.time() + 5, set(range(64)))  # leave no group open


@AGENT_LOOP
async def test_a_group_closed_early_leaves_out_the_alerts_silenced_by_then(pool, monkeypatch):
    client = await insert_client(pool)
    # Small budgets, so that a few dozen groups of ordinary alerts outgrow them.
    monkeypatch.setattr(groups, "MAX_VALUE_BYTES", 16 * 1024)
    monkeypatch.setattr(groups, "CLOSE_EARLY_BYTES", 24 * 1024)
    rules = [str(uuid.uuid4()) for _ in range(40)]
    # Created after the evaluator matched the first alert (its match carries no silenced_by).
    silence_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO silences (silence_id, client_id, severity, source, name, context_matchers, starts_at, ends_at,"
        " comment, created_by) VALUES ($1, $2, '*', 'payments', '*', $3::jsonb, now() - interval '1 minute',"
        " now() + interval '1 hour', 'maintenance', 'ops')", silence_id, client, {"n": "0"})

    async with aggregate_matches.test_context() as agent:
        for n, rule in enumerate(rules):
            await agent.put(grouped(client, rule, sized_alert(n)).encode(), key=client.encode())
        emitted = [ready for i in range(len(rules)) for ready in agent.results[i].ready]

    rows = {row["group_rule_id"]: row for row in await pool.fetch(
        "SELECT group_rule_id::text, status, detail, emitted FROM notifications WHERE client_id = $1", client)}
    assert rules[0] in rows, "the oldest group was not closed early"
    assert (rows[rules[0]]["status"], rows[rules[0]]["detail"], rows[rules[0]]["emitted"]) == (
        "SILENCED", f"silenced by {silence_id}", True)
    assert rules[0] not in {ready.group_rule_id for ready in emitted}
    assert {row["status"] for rule, row in rows.items() if rule != rules[0]} == {"PENDING"}
    await close_due_groups(pool, time.time() + 5, set(range(64)))  # leave no group open


def group_listing(opened_at: float, pad: int) -> groups.Group:
    """A group opened at `opened_at` listing one alert of `pad` bytes of padding (close_early reads sizes only)."""
    group = groups.open_group(str(uuid.uuid4()), 5, opened_at)
    group["alerts"] = [{"alert_id": str(uuid.uuid4()), "pad": "x" * pad}]
    return group


def padded_to(value: groups.ClientGroups, rule_id: str, size: int) -> groups.ClientGroups:
    """`value`, its group `rule_id` padded so that the value encodes to exactly `size` bytes."""
    value[rule_id]["alerts"][0]["pad"] += "x" * (size - groups.encoded_size(value))
    assert groups.encoded_size(value) == size
    return value


def test_closing_early_takes_the_oldest_groups_until_the_value_is_within_max_value_bytes_to_the_byte():
    # Its size kept up to date as groups are taken, not measured again: one byte off per group taken,
    # it stopped with the value one byte over MAX_VALUE_BYTES.
    key = str(uuid.uuid4()).encode()
    rest = padded_to({"r1": group_listing(2.0, 100_000), "r2": group_listing(3.0, 400_000)}, "r2",
                     groups.MAX_VALUE_BYTES + 1)
    value = {"r0": group_listing(1.0, 300_000), **rest}
    plan = groups.JoinPlan(values={key: value}, memberships=[])

    taken = groups.close_early(plan)

    assert [d.group_rule_id for d in taken] == ["r0", "r1"]
    assert list(plan.values[key]) == ["r2"]


def test_a_value_of_close_early_bytes_exactly_closes_no_group_early():
    key = str(uuid.uuid4()).encode()
    value = padded_to({"r0": group_listing(1.0, 300_000), "r1": group_listing(2.0, 400_000)}, "r1",
                      groups.CLOSE_EARLY_BYTES)
    plan = groups.JoinPlan(values={key: value}, memberships=[])

    assert groups.close_early(plan) == []
    assert list(plan.values[key]) == ["r0", "r1"]
