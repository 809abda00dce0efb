"""The aggregate stage's issue-5 decisions: silenced, suppressed, grouped (and closed once).

The plain functions directly; the agent through Faust's test driver against the real Postgres and
broker, with the group table in memory and the closer called directly (tests/test_grouping_worker.py
runs both in a real worker, and kills it).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
import uuid
from types import SimpleNamespace

import asyncpg
import pytest

from agents import aggregate as aggregate_module
from agents.aggregate import aggregate_matches, record_first_match, record_first_matches
from agents import match_outcomes
from agents.close_groups import close_due_groups
from agents.match_outcomes import Recorded, closed_here, decide, prune_fingerprints
from alerting_app import metrics
from alerting_app.app import settings
from alerting_app.contracts import Alert, AlertMatched, fingerprint_of
from alerting_app.delivery.records import open_deliveries
from alerting_app.sending import partition_for
from alerting_app.silencing import SilenceIndex, active_silences
from kafka_probe import read_topic
from postgres_waits import until_waiting_on_a_lock
from tables import group_records, groups
from web.notifications import notification_out
from test_agent_support import (  # noqa: F401  (fixtures)
    AGENT_LOOP, DELETIONS, delete_client_as_the_api_does, insert_client, insert_endpoint, insert_rule, pipeline, pool,
    sent_to,
)

# The group table's changelog is created by the `pipeline` fixture (test_agent_support.py).
ALL_PARTITIONS = set(range(64))


async def closed_with_peak_memory(pool, client: str, at: float):
    """The one notification `closed_for` closes at `at`, and the peak of Python's memory meanwhile."""
    tracemalloc.start()
    try:
        [ready] = await closed_for(pool, client, at)
        return ready, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def closed_for(pool, clients: str | set[str], now: float, partitions: set[int] = ALL_PARTITIONS,
                     **options) -> list:
    """Close the due groups, as the closer does; return what was emitted for these clients. The
    group table is this process's, shared by every test module: a group another module left open
    (a failed test's, say) is closed too, and is not this test's to count."""
    clients = {clients} if isinstance(clients, str) else clients
    return [ready for ready in await close_due_groups(pool, now, partitions, **options) if ready.client_id in clients]


def alert(n: int = 0, alert_id: str | None = None) -> Alert:
    return Alert(alert_id=alert_id or str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                 name="CheckoutLatency", context={"n": str(n)})


def matched(client_id: str, rule_ids: list[str], the_alert: Alert | None = None, **fields) -> AlertMatched:
    return AlertMatched(alert=the_alert or alert(), client_id=client_id, rule_ids=rule_ids, **fields)


def grouped(client_id: str, rule_id: str, window_s: int = 5, the_alert: Alert | None = None,
            rule_ids: list[str] | None = None) -> AlertMatched:
    return matched(client_id, rule_ids or [rule_id], the_alert, group_rule_id=rule_id, group_window_s=window_s)


def repeating(client_id: str, rule_id: str, interval_s: int = 60, the_alert: Alert | None = None,
              **fields) -> AlertMatched:
    the_alert = the_alert or alert()
    return matched(client_id, [rule_id], the_alert, group_rule_id=rule_id, repeat_interval_s=interval_s,
                   fingerprint=fingerprint_of(client_id, the_alert, []), **fields)


async def aggregate(*matches: AlertMatched) -> list:
    async with aggregate_matches.test_context() as agent:
        for match in matches:
            await agent.put(match.encode(), key=match.client_id.encode())
        return [agent.results[i] for i in range(len(matches))]


async def open_group(pool, members: int) -> tuple[str, str, list]:
    """A new client's group of `members` alerts (alert(0), alert(1), ...), open for 5 s: (client,
    group rule, matches)."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    matches = [grouped(client, rule, window_s=5, the_alert=alert(n)) for n in range(members)]
    await aggregate(*matches)
    return client, rule, matches


async def rows_of(pool, client_id: str) -> list:
    return await pool.fetch(
        "SELECT notification_id::text, alert_id, alerts, rule_ids::text[], status, detail, emitted, "
        "truncated_alerts, group_rule_id::text FROM notifications WHERE client_id = $1 ORDER BY created_at",
        client_id)


# --- plain functions -------------------------------------------------------------------------------

def test_plan_joins_opens_one_group_per_client_and_rule_and_lists_up_to_the_maximum():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    joins = [groups.Join(grouped(client, rule, the_alert=alert(n))) for n in range(5)]

    plan = groups.plan_joins({}, joins, set(), now=100.0, max_alerts=3)

    [(key, value)] = plan.values.items()
    assert key == client.encode() and list(value) == [rule]
    group = value[rule]
    assert (group["opened_at"], group["window_s"], groups.deadline(group)) == (100.0, 5, 105.0)
    assert [a["alert_id"] for a in group["alerts"]] == [j.matched.alert.alert_id for j in joins[:3]]
    # Every member is recorded, listed or not: the truncated count comes from these.
    assert [m[1] for m in plan.memberships] == [j.matched.alert.alert_id for j in joins]
    assert {m[2] for m in plan.memberships} == {group["notification_id"]}


def test_a_group_lists_alerts_only_up_to_its_byte_budget_and_counts_the_rest():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    big = {"detail": "x" * 1900}
    joins = [groups.Join(grouped(client, rule, the_alert=alert(n).model_copy(update={"context": big})))
             for n in range(100)]

    plan = groups.plan_joins({}, joins, set(), now=100.0, max_alerts=1_000)

    [group] = plan.values[client.encode()].values()
    listed = len(group["alerts"])
    assert 1 < listed < 100
    assert len(json.dumps(group["alerts"])) <= groups.MAX_LISTED_BYTES + 2 * listed  # json.dumps adds spaces
    assert len(plan.memberships) == 100  # every member recorded: the rest are counted as truncated


def test_plan_joins_is_idempotent_per_alert_and_collects_every_rule():
    client, rule, other_rule = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    first = grouped(client, rule)
    plan = groups.plan_joins({}, [groups.Join(first)], set(), now=1.0, max_alerts=10)
    again = grouped(client, rule, the_alert=first.alert, rule_ids=sorted([rule, other_rule]))

    replan = groups.plan_joins(plan.values, [groups.Join(again)], set(), now=2.0, max_alerts=10)

    group = replan.values[client.encode()][rule]
    assert len(group["alerts"]) == 1 and group["opened_at"] == 1.0
    assert group["rule_ids"] == sorted([rule, other_rule])
    assert plan.values[client.encode()][rule]["rule_ids"] == [rule]  # the current value is not changed


def test_plan_joins_drops_closed_groups_and_reopens_a_lost_group_with_its_notification_id():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    closed = groups.plan_joins({}, [groups.Join(grouped(client, rule))], set(), now=1.0, max_alerts=10)
    closed_id = closed.values[client.encode()][rule]["notification_id"]
    lost_id = str(uuid.uuid4())

    plan = groups.plan_joins(closed.values, [groups.Join(grouped(client, rule), member_of=lost_id)], {closed_id},
                             now=9.0, max_alerts=10)

    group = plan.values[client.encode()][rule]
    assert group["notification_id"] == lost_id and group["opened_at"] == 9.0


@pytest.mark.parametrize("new_group_rule, its_group_open", [
    ("another grouping rule", True),  # moved there, it was notified by both groups
    ("another grouping rule", False),  # its group reopened under that rule: two groups of one id
    ("no grouping rule any more", False),
])
def test_a_member_of_an_open_group_stays_in_it_when_its_clients_rules_changed(new_group_rule, its_group_open):
    """Re-sent after its client added or changed a rule, an alert keeps its first group."""
    client, first_rule, new_rule = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    members = [grouped(client, first_rule, window_s=300) for _ in range(2)]
    joins = [groups.Join(m) for m in members]
    if its_group_open:
        joins.append(groups.Join(grouped(client, new_rule, window_s=60)))  # another alert opens that group
    plan = groups.plan_joins({}, joins, set(), now=1.0, max_alerts=10)
    first_group = plan.values[client.encode()][first_rule]
    resent = (grouped(client, new_rule, window_s=60, the_alert=members[0].alert)
              if new_group_rule == "another grouping rule" else matched(client, [new_rule], members[0].alert))

    replan = groups.plan_joins(plan.values, [groups.Join(resent, member_of=first_group["notification_id"])],
                               set(), now=2.0, max_alerts=10)

    assert replan.memberships == [(client, members[0].alert.alert_id, first_group["notification_id"], None)]
    value = replan.values[client.encode()]
    assert [a["alert_id"] for a in value[first_rule]["alerts"]] == [m.alert.alert_id for m in members]
    listed = [a["alert_id"] for group in value.values() for a in group["alerts"]]
    assert listed.count(members[0].alert.alert_id) == 1
    assert len({group["notification_id"] for group in value.values()}) == len(value)  # no id twice
    assert len(value) == (2 if its_group_open else 1)


def test_due_groups_are_those_whose_window_has_passed():
    client, fast, slow = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    plan = groups.plan_joins({}, [groups.Join(grouped(client, fast, window_s=5)),
                                  groups.Join(grouped(client, slow, window_s=60))], set(), now=0.0, max_alerts=10)
    items = list(plan.values.items())

    assert groups.due_groups(items, 4.9, set()) == []
    assert [d.group_rule_id for d in groups.due_groups(items, 5.0, set())] == [fast]
    fast_id = plan.values[client.encode()][fast]["notification_id"]
    assert groups.due_groups(items, 5.0, {fast_id}) == []


def test_decide_silence_wins_then_repeats_are_suppressed_then_grouped_or_at_once():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    silenced = repeating(client, rule, silenced_by="s-1")
    first = repeating(client, rule)
    repeat = repeating(client, rule, the_alert=alert())  # same fingerprint: n=0 like the first
    grouped_one = grouped(client, rule)
    matches = [silenced, first, repeat, grouped_one, first]  # the first again: decided once

    outcome = decide(matches, [Recorded()] * len(matches), {}, now=1000.0)

    assert [(m.alert.alert_id, status) for m, status, _ in outcome.rows] == [
        (silenced.alert.alert_id, "SILENCED"), (first.alert.alert_id, "PENDING"),
        (repeat.alert.alert_id, "SUPPRESSED")]
    assert [j.matched for j in outcome.joins] == [grouped_one]
    assert outcome.notified_fingerprints == {(client, first.fingerprint): 1000.0}


def test_decide_suppresses_only_within_the_repeat_interval():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    match = repeating(client, rule, interval_s=60)
    last = {(client, match.fingerprint): 1000.0}

    within = decide([match], [Recorded()], dict(last), now=1059.0)
    after = decide([match], [Recorded()], dict(last), now=1060.0)

    assert [status for _, status, _ in within.rows] == ["SUPPRESSED"]
    assert [status for _, status, _ in after.rows] == ["PENDING"]


def test_decide_keeps_what_was_recorded_before():
    client, rule = str(uuid.uuid4()), str(uuid.uuid4())
    member, closed_member, notified = grouped(client, rule), grouped(client, rule), repeating(client, rule)

    outcome = decide([member, closed_member, notified],
                     [Recorded(member_of="g-1"), Recorded(member_of="g-0", member_closed=True),
                      Recorded(notified=True)],
                     {}, now=1.0)

    assert [(j.matched, j.member_of) for j in outcome.joins] == [(member, "g-1")]
    assert outcome.rows == [] and outcome.seen_before == [notified]
    assert outcome.closed_groups == {"g-0"}  # its notification may never have been emitted


# --- the agent, with the real Postgres and broker ------------------------------------------------------

@AGENT_LOOP
async def test_silenced_match_is_recorded_silenced_and_not_emitted(pool):
    client = await insert_client(pool)
    silence_id = str(uuid.uuid4())
    before = metrics.notifications_silenced._value.get()

    [aggregation] = await aggregate(matched(client, [str(uuid.uuid4())], silenced_by=silence_id))

    assert aggregation.ready == []
    [row] = await rows_of(pool, client)
    assert (row["status"], row["emitted"], row["detail"]) == ("SILENCED", True, f"silenced by {silence_id}")
    assert metrics.notifications_silenced._value.get() == before + 1
    assert await sent_to("notifications.ready", client) == []


@AGENT_LOOP
async def test_same_fingerprint_ten_times_is_notified_once_and_suppressed_nine_times(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    before = metrics.notifications_suppressed._value.get()

    aggregations = await aggregate(*[repeating(client, rule, interval_s=60) for _ in range(10)])

    assert sum(len(a.ready) for a in aggregations) == 1
    statuses = [row["status"] for row in await rows_of(pool, client)]
    assert sorted(statuses) == ["PENDING"] + ["SUPPRESSED"] * 9
    assert metrics.notifications_suppressed._value.get() == before + 9
    assert len(await sent_to("notifications.ready", client)) == 1


@AGENT_LOOP
async def test_redelivered_repeat_checked_match_is_neither_suppressed_nor_notified_again(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    match = repeating(client, rule)

    first, redelivered = await aggregate(match, match)

    assert len(first.ready) == 1 and redelivered.ready == []
    assert [row["status"] for row in await rows_of(pool, client)] == ["PENDING"]


@AGENT_LOOP
async def test_grouped_matches_become_one_notification_when_the_window_closes(pool):
    client, rule, other_rule = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    matches = [grouped(client, rule, window_s=5, the_alert=alert(n)) for n in range(4)]
    matches.append(grouped(client, rule, window_s=5, rule_ids=sorted([rule, other_rule])))

    aggregations = await aggregate(*matches)
    opened = time.time()

    assert [a.ready for a in aggregations] == [[]] * 5
    assert await rows_of(pool, client) == []
    assert await closed_for(pool, client, opened) == []  # not due yet
    [ready] = await closed_for(pool, client, opened + 5)
    assert ready.alerts == [m.alert for m in matches]
    assert (ready.rule_ids, ready.group_rule_id, ready.truncated_alerts) == (sorted([rule, other_rule]), rule, 0)
    [row] = await rows_of(pool, client)
    assert (row["notification_id"], row["status"], row["emitted"], row["group_rule_id"]) == (
        ready.notification_id, "PENDING", True, rule)
    assert [m["notification_id"] for m in await sent_to("notifications.ready", client)] == [ready.notification_id]
    assert groups.open_groups.get(client.encode()) is None
    assert await closed_for(pool, client, opened + 10) == []


@AGENT_LOOP
async def test_an_alert_arriving_as_the_window_ends_joins_the_group_until_it_is_closed(pool, monkeypatch):
    # A group takes what arrives before the closer closes it, window end included (as Alertmanager's
    # flush takes what arrived before it); the closer runs every GROUP_CLOSE_INTERVAL_S.
    client, rule = await insert_client(pool), str(uuid.uuid4())
    first, at_the_end, after_closing = (grouped(client, rule, window_s=5, the_alert=alert(n)) for n in range(3))
    opened = time.time()
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened))
    await aggregate(first)
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened + 5))

    await aggregate(at_the_end)
    [closed] = await closed_for(pool, client, opened + 5)
    await aggregate(after_closing)

    assert closed.alerts == [first.alert, at_the_end.alert]
    assert await closed_for(pool, client, opened + 9.9) == []  # a new group, opened at the window's end
    [next_group] = await closed_for(pool, client, opened + 10)
    assert next_group.alerts == [after_closing.alert]


@AGENT_LOOP
async def test_an_alert_resent_after_its_client_added_a_grouping_rule_is_notified_once(pool):
    client, first_rule, new_rule = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    members = [grouped(client, first_rule, window_s=300, the_alert=alert(n)) for n in range(2)]
    other = grouped(client, new_rule, window_s=60)
    await aggregate(*members)
    await aggregate(other)  # the client's new rule groups too, shorter
    opened = time.time()

    await aggregate(grouped(client, new_rule, window_s=60, the_alert=members[0].alert))  # the source sends it again

    [sooner] = await closed_for(pool, client, opened + 60)
    [later] = await closed_for(pool, client, opened + 300)
    assert sooner.alerts == [other.alert]
    assert later.alerts == [m.alert for m in members]


@AGENT_LOOP
async def test_a_group_lists_at_most_the_maximum_and_counts_the_rest_as_truncated(pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 20)
    client, rule = await insert_client(pool), str(uuid.uuid4())
    matches = [grouped(client, rule, the_alert=alert(n)) for n in range(50)]

    await aggregate(*matches)
    [ready] = await closed_for(pool, client, time.time() + 5)

    assert ready.alerts == [m.alert for m in matches[:20]]
    assert ready.truncated_alerts == 30
    [row] = await rows_of(pool, client)
    assert (len(row["alerts"]), row["truncated_alerts"]) == (20, 30)


async def insert_silence(pool, client_id: str, starts_at: float, ends_at: float, source: str = "payments",
                         **matchers) -> str:
    """A silence as the API stores it (the closer reads them from Postgres); `matchers`: context."""
    silence_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO silences (silence_id, client_id, severity, source, name, context_matchers, starts_at, ends_at,"
        " comment, created_by) VALUES ($1, $2, '*', $3, '*', $4::jsonb, to_timestamp($5), to_timestamp($6),"
        " 'maintenance', 'ops')",
        silence_id, client_id, source, matchers, starts_at, ends_at)
    return silence_id



@AGENT_LOOP
async def test_the_closer_reads_the_silences_in_force_from_their_first_second_and_leaves_out_one_it_cannot_read(pool):
    client = await insert_client(pool)
    at = float(int(time.time()))  # whole seconds: to_timestamp and back keep them exactly
    starting_now = await insert_silence(pool, client, at, at + 60, source="starting")
    await insert_silence(pool, client, at - 60, at, source="ended")
    await insert_silence(pool, client, at + 1, at + 60, source="later")
    # Postgres holds any JSON object; the contract wants text values: this row must not stop the close.
    await insert_silence(pool, client, at - 60, at + 60, source="unreadable", n=5)

    silences = await active_silences(pool, {client}, at)

    assert set(silences.versions()) == {starting_now}
    from_there = Alert(alert_id=str(uuid.uuid4()), event_ts=at, severity="HIGH", source="starting",
                       name="CheckoutLatency")
    assert silences.silencing(client, from_there, at=at) == starting_now

@AGENT_LOOP
async def test_a_silence_created_while_a_group_is_open_leaves_its_matching_members_out_at_close(pool):
    client, rule, matches = await open_group(pool, 4)
    opened = time.time()
    # Created while the group is open: one mutes alert 1 until well after the close; the other would
    # mute alert 2 but ends before the group closes, so it mutes nothing there.
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")
    await insert_silence(pool, client, opened - 60, opened + 2, n="2")

    [ready] = await closed_for(pool, client, opened + 5)

    assert ready.alerts == [matches[0].alert, matches[2].alert, matches[3].alert]
    assert ready.truncated_alerts == 0  # a silenced member is left out, not counted
    [row] = await rows_of(pool, client)
    assert (row["status"], row["emitted"], len(row["alerts"])) == ("PENDING", True, 3)
    [sent] = await sent_to("notifications.ready", client)
    assert [a["alert_id"] for a in sent["alerts"]] == [m.alert.alert_id for m in (matches[0], matches[2], matches[3])]


async def shown(pool, client: str, notification_id: str) -> dict:
    """The notification as GET /api/v1/notifications/{id} answers the client."""
    return await notification_out(pool, uuid.UUID(notification_id), uuid.UUID(client))


@AGENT_LOOP
async def test_a_groups_notification_shows_each_member_a_silence_left_out_at_close_with_its_silence(
        pool, monkeypatch):
    """Notified to nobody, a muted member of a group notified PENDING was found nowhere: not in its
    group's notification, not among the SILENCED ones. Listed (1) or not (3), it is shown there."""
    monkeypatch.setattr(settings, "group_max_alerts", 2)
    client, rule, matches = await open_group(pool, 4)
    opened = time.time()
    muting = {n: await insert_silence(pool, client, opened - 60, opened + 3600, n=str(n)) for n in (1, 3)}

    [ready] = await closed_for(pool, client, opened + 5)

    # The unmuted members are notified as before: 2 takes the place 1 freed.
    assert (ready.alerts, ready.truncated_alerts) == ([matches[0].alert, matches[2].alert], 0)
    [sent] = await sent_to("notifications.ready", client)
    assert [a["alert_id"] for a in sent["alerts"]] == [matches[0].alert.alert_id, matches[2].alert.alert_id]
    assert "silenced_alerts" not in sent  # the payload's contract stays
    notification = await shown(pool, client, ready.notification_id)
    assert (notification["status"], [a["alert_id"] for a in notification["alerts"]]) == (
        "PENDING", [matches[0].alert.alert_id, matches[2].alert.alert_id])
    assert notification["silenced_alerts"] == [{"alert_id": matches[n].alert.alert_id, "silence_id": muting[n]}
                                               for n in (1, 3)]
    assert notification["truncated_silenced_alerts"] == 0


@AGENT_LOOP
async def test_the_silenced_members_a_group_shows_are_bounded_by_group_max_alerts_and_the_rest_counted(
        pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 1)
    client, rule, matches = await open_group(pool, 4)
    opened = time.time()
    silence_id = await insert_silence(pool, client, opened - 60, opened + 3600)  # every member

    assert await closed_for(pool, client, opened + 5) == []

    # Recorded SILENCED, listing its listed member; the unlisted ones are shown as silenced.
    [row] = await rows_of(pool, client)
    notification = await shown(pool, client, row["notification_id"])
    assert (notification["status"], [a["alert_id"] for a in notification["alerts"]]) == (
        "SILENCED", [matches[0].alert.alert_id])
    assert (notification["silenced_alerts"], notification["truncated_silenced_alerts"]) == (
        [{"alert_id": matches[1].alert.alert_id, "silence_id": silence_id}], 2)


@AGENT_LOOP
async def test_a_group_whose_members_are_all_silenced_at_close_is_recorded_silenced_and_not_emitted(pool):
    client, rule, matches = await open_group(pool, 3)
    opened = time.time()
    silences = [await insert_silence(pool, client, opened - 60, opened + 3600, n=str(n)) for n in range(3)]
    before = metrics.notifications_silenced._value.get()

    assert await closed_for(pool, client, opened + 5) == []

    [row] = await rows_of(pool, client)
    assert (row["status"], row["emitted"], row["group_rule_id"]) == ("SILENCED", True, rule)
    assert row["detail"] == "silenced by " + ", ".join(sorted(silences))
    assert [a["alert_id"] for a in row["alerts"]] == [m.alert.alert_id for m in matches]
    assert metrics.notifications_silenced._value.get() == before + 1
    assert await sent_to("notifications.ready", client) == []
    assert groups.open_groups.get(client.encode()) is None
    assert await closed_for(pool, client, opened + 10) == []  # closed: nothing more


@AGENT_LOOP
@pytest.mark.parametrize("muted", ["listed", "unlisted"])
async def test_a_rule_only_members_silenced_at_close_matched_is_left_out_of_the_groups_notification(
        pool, monkeypatch, muted):
    """The notification goes to the endpoints of its rule_ids: a rule that only members muted at close
    matched has nothing to notify, so neither its rule nor its endpoints get the group's notification."""
    monkeypatch.setattr(settings, "group_max_alerts", 1 if muted == "unlisted" else 100)
    client = await insert_client(pool)
    digest, checkout = await insert_rule(pool, client), await insert_rule(pool, client, name="CheckoutLatency")
    endpoints = {rule: await insert_endpoint(pool, client, rule, "webhook", f"https://hooks.example/{rule}")
                 for rule in (digest, checkout)}
    # Alert 0 matches the grouping rule only; alert 1 that rule and another, whose endpoint it alone
    # would reach (listed, or unlisted past GROUP_MAX_ALERTS).
    notified = grouped(client, digest, the_alert=alert(0))
    muted_match = grouped(client, digest, the_alert=alert(1), rule_ids=sorted([digest, checkout]))
    await aggregate(notified, muted_match)
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    assert (ready.alerts, ready.rule_ids) == ([notified.alert], [digest])
    [row] = await rows_of(pool, client)
    assert (row["status"], row["rule_ids"]) == ("PENDING", [digest])
    jobs = await open_deliveries(pool, [ready], owner=None, lease_s=30, unleased_endpoints=[])
    assert jobs == []  # no owner: every row left for the sweep
    assert await pool.fetchval("SELECT array_agg(endpoint_id::text) FROM deliveries WHERE notification_id = $1",
                               ready.notification_id) == [endpoints[digest]]


@AGENT_LOOP
async def test_a_rule_a_member_no_silence_muted_matched_keeps_the_groups_notification(pool):
    """A rule some muted member matched is still notified when a member no silence muted matched it too."""
    client = await insert_client(pool)
    digest, checkout = await insert_rule(pool, client), await insert_rule(pool, client, name="CheckoutLatency")
    both = sorted([digest, checkout])
    notified = grouped(client, digest, the_alert=alert(0), rule_ids=both)
    await aggregate(notified, grouped(client, digest, the_alert=alert(1), rule_ids=both))
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    assert (ready.alerts, ready.rule_ids) == ([notified.alert], both)


@AGENT_LOOP
async def test_a_member_whose_rules_are_not_kept_counts_as_matching_every_rule_of_its_group(pool):
    """A member that joined before migrations/016 has no rules kept: notified, it may have matched any
    rule of its group, so none is left out."""
    client, digest, checkout = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    both = sorted([digest, checkout])
    older, newer = grouped(client, digest, the_alert=alert(0)), grouped(client, digest, the_alert=alert(2))
    await aggregate(older, grouped(client, digest, the_alert=alert(1), rule_ids=both), newer)
    await pool.execute("UPDATE notification_alerts SET rule_ids = NULL WHERE client_id = $1 AND alert_id = $2",
                       client, older.alert.alert_id)
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    assert (ready.alerts, ready.rule_ids) == ([older.alert, newer.alert], both)


def grouped_repeating(client_id: str, rule_id: str, the_alert: Alert, window_s: int = 5,
                      interval_s: int = 3600) -> AlertMatched:
    """A match of a rule that groups and suppresses repeats (the fingerprint: client, severity, source, name)."""
    return matched(client_id, [rule_id], the_alert, group_rule_id=rule_id, group_window_s=window_s,
                   repeat_interval_s=interval_s, fingerprint=fingerprint_of(client_id, the_alert, []))


@AGENT_LOOP
@pytest.mark.parametrize("others", ["alone", "with a member notified"])
async def test_an_alert_silenced_as_its_group_closes_does_not_suppress_its_repeats_once_the_silence_ended(
        pool, monkeypatch, others):
    """An alert silenced when it is matched is notified to nobody, and suppresses no repeat: once the
    silence ended, the next alert of its fingerprint is notified. So must one silenced when its group
    closes (a silence created while the group was open), whether the whole group is silenced or not:
    as Alertmanager records in its notification log only what it notified."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    opened = time.time()
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened))
    muted = grouped_repeating(client, rule, alert(1))
    notified = grouped_repeating(client, rule, alert(2).model_copy(update={"name": "OtherCheck"}))
    await aggregate(muted, *([notified] if others == "with a member notified" else []))
    await insert_silence(pool, client, opened - 60, opened + 10, n="1")
    assert [ready.alerts for ready in await closed_for(pool, client, opened + 5)] == (
        [[notified.alert]] if others == "with a member notified" else [])

    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened + 20))  # the silence ended
    repeat_of_muted = grouped_repeating(client, rule, alert(3))
    repeat_of_notified = grouped_repeating(client, rule, alert(4).model_copy(update={"name": "OtherCheck"}))
    await aggregate(repeat_of_muted, repeat_of_notified)

    [ready] = await closed_for(pool, client, opened + 25)
    assert ready.alerts == [repeat_of_muted.alert] + ([] if others == "with a member notified"
                                                      else [repeat_of_notified.alert])
    assert [row["status"] for row in await rows_of(pool, client) if row["alert_id"] == repeat_of_notified.alert.alert_id
            ] == (["SUPPRESSED"] if others == "with a member notified" else [])


@AGENT_LOOP
@pytest.mark.parametrize("repeats_come", ["in the member's batch", "in later batches"])
async def test_the_repeats_a_member_silenced_at_close_suppressed_are_not_lost(pool, monkeypatch, repeats_come):
    """A member counts its fingerprint as notified when it joins, so its repeats are suppressed; if a
    silence then mutes it at close, it was notified to nobody. As if it had been silenced when it was
    matched, the first of its repeats no silence mutes is notified (with its group), and the later
    ones stay suppressed by that one; one the silence mutes too stays suppressed, notified to nobody."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    opened = time.time()
    # One fingerprint (client, severity, source, name); the silence mutes context n=1.
    member, muted_repeat, repeat, later_repeat = (grouped_repeating(client, rule, alert(n)) for n in (1, 1, 2, 3))
    if repeats_come == "in the member's batch":
        monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened))
        await aggregate(member, muted_repeat, repeat, later_repeat)
    else:
        for seconds, match in enumerate((member, muted_repeat, repeat, later_repeat)):
            monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened + seconds))
            await aggregate(match)
    assert [row["status"] for row in await rows_of(pool, client)] == ["SUPPRESSED"] * 3
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    # Repeats of one batch came at the same time, as far as the stage knows: either is the first.
    first, then = (repeat, later_repeat) if repeats_come == "in later batches" or (
        ready.alerts[0].alert_id == repeat.alert.alert_id) else (later_repeat, repeat)
    assert (ready.alerts, ready.truncated_alerts, ready.rule_ids) == ([first.alert], 0, [rule])
    rows = {row["alert_id"]: row for row in await rows_of(pool, client)}
    assert {alert_id: row["status"] for alert_id, row in rows.items()} == {
        first.alert.alert_id: "PENDING", muted_repeat.alert.alert_id: "SUPPRESSED", then.alert.alert_id: "SUPPRESSED"}
    # The group's row (named by its first listed alert): the repeat's own SUPPRESSED row is gone.
    assert rows[first.alert.alert_id]["notification_id"] == ready.notification_id
    # The repeat notified its fingerprint: the next one within the interval is suppressed.
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened + 20))
    next_repeat = grouped_repeating(client, rule, alert(4))
    await aggregate(next_repeat)
    assert [row["status"] for row in await rows_of(pool, client)
            if row["alert_id"] == next_repeat.alert.alert_id] == ["SUPPRESSED"]
    assert await closed_for(pool, client, opened + 30) == []


@AGENT_LOOP
async def test_a_repeat_suppressed_by_a_member_notified_at_close_stays_suppressed(pool, monkeypatch):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    opened = time.time()
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: opened))
    member, repeat = (grouped_repeating(client, rule, alert(n)) for n in (1, 2))
    await aggregate(member, repeat, grouped_repeating(client, rule, alert(3).model_copy(update={"name": "Other"})))
    await insert_silence(pool, client, opened - 60, opened + 3600, n="3")  # mutes another member only

    [ready] = await closed_for(pool, client, opened + 5)

    assert ready.alerts == [member.alert]
    assert [row["status"] for row in await rows_of(pool, client) if row["alert_id"] == repeat.alert.alert_id
            ] == ["SUPPRESSED"]


def notified_at_once(client_id: str, rule_id: str, the_alert: Alert, interval_s: int) -> AlertMatched:
    """A match of a rule that suppresses repeats and does not group (the fingerprint as grouped_repeating's)."""
    return matched(client_id, [rule_id], the_alert, group_rule_id=rule_id, repeat_interval_s=interval_s,
                   fingerprint=fingerprint_of(client_id, the_alert, []))


async def aggregate_at(monkeypatch, at: float, *matches: AlertMatched) -> None:
    monkeypatch.setattr(match_outcomes, "time", SimpleNamespace(time=lambda: at))
    await aggregate(*matches)


# What a release before migrations/018 leaves NULL, in a rolling deployment or a rollback.
WRITTEN_BEFORE_018 = {
    "the notification before the member": "UPDATE fingerprints SET notified_as_of = NULL WHERE client_id = $1",
    "the member": "UPDATE notification_alerts SET fingerprint_previous_at = NULL, fingerprint_previous_final = NULL"
                  " WHERE client_id = $1",
    "the repeats": "UPDATE notifications SET repeat_interval_s = NULL WHERE client_id = $1 AND status = 'SUPPRESSED'",
}


@AGENT_LOOP
@pytest.mark.parametrize("written_before_018", ["nothing", *WRITTEN_BEFORE_018])
async def test_a_repeat_the_notification_before_a_member_muted_at_close_suppresses_stays_suppressed(
        pool, monkeypatch, written_before_018):
    """Rules with different repeat intervals share a fingerprint. An hourly rule's alert is notified;
    100 s later a minutely rule's alert joins a group (its interval has passed), suppressing the
    repeats that follow, and a silence mutes it at close. As if it had been silenced when matched, its
    repeats are decided again against the hourly alert's notification, each within its own interval,
    as the agent decides any repeat: the hourly rule's repeat stays suppressed, the minutely rule's is
    notified. What a release before migrations/018 wrote is decided as that release did: the first
    repeat no silence mutes is notified."""
    client, hourly, minutely = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    opened = time.time()
    before = notified_at_once(client, hourly, alert(0), 3600)
    await aggregate_at(monkeypatch, opened - 100, before)
    if written_before_018 == "the notification before the member":
        await pool.execute(WRITTEN_BEFORE_018[written_before_018], client)
    member = grouped_repeating(client, minutely, alert(1), interval_s=60)
    hourly_repeat = notified_at_once(client, hourly, alert(2), 3600)
    minutely_repeat = grouped_repeating(client, minutely, alert(3), interval_s=60)
    for seconds, match in enumerate((member, hourly_repeat, minutely_repeat)):
        await aggregate_at(monkeypatch, opened + seconds, match)
    if written_before_018 in ("the member", "the repeats"):
        await pool.execute(WRITTEN_BEFORE_018[written_before_018], client)
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    notified, suppressed = ((minutely_repeat, hourly_repeat) if written_before_018 == "nothing"
                            else (hourly_repeat, minutely_repeat))
    assert ready.alerts == [notified.alert]
    assert {row["alert_id"]: row["status"] for row in await rows_of(pool, client)} == {
        before.alert.alert_id: "PENDING", notified.alert.alert_id: "PENDING", suppressed.alert.alert_id: "SUPPRESSED"}


@AGENT_LOOP
@pytest.mark.parametrize("muted_members", ["one", "two in one group"])
async def test_the_notification_before_a_member_muted_at_close_suppresses_the_next_alert_within_its_interval(
        pool, monkeypatch, muted_members):
    """A member muted at close takes its notification back, and the fingerprint's notification before
    it is the last one again: an hourly rule's alert 20 s after the close is suppressed by the hourly
    alert notified 100 s before the member, as it would have been had the member been silenced when
    matched; a minutely rule's is notified. So too when the minutely rule's group (its window longer
    than its interval) collected the fingerprint twice, both muted."""
    client, hourly, minutely = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    opened = time.time()
    await aggregate_at(monkeypatch, opened - 100, notified_at_once(client, hourly, alert(0), 3600))
    await aggregate_at(monkeypatch, opened, grouped_repeating(client, minutely, alert(1), window_s=100, interval_s=60))
    if muted_members == "two in one group":
        await aggregate_at(monkeypatch, opened + 70,
                           grouped_repeating(client, minutely, alert(1), window_s=100, interval_s=60))
    await insert_silence(pool, client, opened - 60, opened + 110, n="1")
    assert await closed_for(pool, client, opened + 100) == []

    hourly_alert = notified_at_once(client, hourly, alert(2), 3600)
    await aggregate_at(monkeypatch, opened + 120, hourly_alert)
    minutely_alert = notified_at_once(client, minutely, alert(3), 60)
    await aggregate_at(monkeypatch, opened + 121, minutely_alert)

    statuses = {row["alert_id"]: row["status"] for row in await rows_of(pool, client)}
    assert (statuses[hourly_alert.alert.alert_id], statuses[minutely_alert.alert.alert_id]) == ("SUPPRESSED", "PENDING")


@AGENT_LOOP
async def test_a_member_before_a_member_muted_at_close_that_may_yet_be_muted_suppresses_none_of_its_repeats(
        pool, monkeypatch):
    """The notification before the muted member is a member of a group still open, which a silence
    may yet mute at its own close: it is not taken as notified, and the first repeat no silence mutes
    is notified (one more, should that member be notified after all; never one lost)."""
    client, hourly, minutely = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    opened = time.time()
    await aggregate_at(monkeypatch, opened - 100,
                       grouped_repeating(client, hourly, alert(1), window_s=300, interval_s=3600))
    await aggregate_at(monkeypatch, opened, grouped_repeating(client, minutely, alert(1), interval_s=60))
    hourly_repeat = notified_at_once(client, hourly, alert(2), 3600)
    await aggregate_at(monkeypatch, opened + 1, hourly_repeat)
    await insert_silence(pool, client, opened - 200, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)
    assert ready.alerts == [hourly_repeat.alert]
    # The hourly group's member is muted too: the repeat was rightly notified.
    assert await closed_for(pool, client, opened + 200) == []


@AGENT_LOOP
async def test_the_repeats_of_members_of_one_fingerprint_all_muted_at_close_are_decided_again_together(
        pool, monkeypatch):
    """A group window longer than the repeat interval collects a fingerprint twice: a member at 0 s,
    and one at 70 s (60 s interval). A silence mutes both at close: neither reached the client. As if
    both had been silenced when matched, the repeats since the first are decided again in order: the
    one at 30 s is notified, the one at 80 s is suppressed by it (50 s later), the one at 100 s is
    notified (70 s later), and the fingerprint is last notified at 100 s."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    opened = time.time()
    first, second = (grouped_repeating(client, rule, alert(1), window_s=300, interval_s=60) for _ in range(2))
    at_30, at_80, at_100 = (grouped_repeating(client, rule, alert(n), window_s=300, interval_s=60) for n in (2, 3, 4))
    for seconds, match in ((0, first), (30, at_30), (70, second), (80, at_80), (100, at_100)):
        await aggregate_at(monkeypatch, opened + seconds, match)
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 305)

    # Revived in one statement, they joined at once: listed in the order of their alert_ids.
    assert sorted(ready.alerts, key=lambda a: a.context["n"]) == [at_30.alert, at_100.alert]
    assert [row["alert_id"] for row in await rows_of(pool, client) if row["status"] == "SUPPRESSED"
            ] == [at_80.alert.alert_id]
    last = await pool.fetchval("SELECT extract(epoch FROM last_notified_at)::float8 FROM fingerprints"
                               " WHERE client_id = $1", client)
    assert last == pytest.approx(opened + 100, abs=1e-3)


def test_a_silenced_member_its_notification_lists_all_the_same_keeps_its_fingerprint():
    """A group whose checked members are all silenced is notified when it has a member that could not
    be checked, listing its silenced alerts: those are notified, the unlisted silenced ones are not."""
    listing = group_records.Listing([{"alert_id": "a"}], accounted=2, silenced_by="silenced by s",
                                    silenced={"a": "s", "b": "s"})

    assert listing.notified_to_nobody("SILENCED") == ["a", "b"]
    assert listing.notified_to_nobody("PENDING") == ["b"]


@AGENT_LOOP
async def test_a_closed_groups_row_is_never_updated_before_it_was_created(pool):
    """created_at is the closing worker's clock (here 5 s ahead of Postgres's, as the closer's `now`
    past a window is); updated_at, set at the insert and by the emitted mark, must not read earlier."""
    silenced_client, notified_client, rule = await insert_client(pool), await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(silenced_client, rule, window_s=5, the_alert=alert(0)),
                    grouped(notified_client, rule, window_s=5, the_alert=alert(1)))
    opened = time.time()
    await insert_silence(pool, silenced_client, opened - 60, opened + 3600, n="0")

    await closed_for(pool, {silenced_client, notified_client}, opened + 5)

    rows = await pool.fetch("SELECT status, emitted, created_at, updated_at FROM notifications"
                            " WHERE client_id = ANY($1::uuid[]) ORDER BY status", [silenced_client, notified_client])
    assert [(row["status"], row["emitted"]) for row in rows] == [("PENDING", True), ("SILENCED", True)]
    assert all(row["updated_at"] >= row["created_at"] for row in rows), [dict(row) for row in rows]


async def unlisted_alerts(pool, client_id: str) -> dict[str, dict | None]:
    """alert_id -> the alert Postgres keeps of each of the client's members (None: a listed member)."""
    return {row["alert_id"]: row["unlisted_alert"] for row in await pool.fetch(
        "SELECT alert_id, unlisted_alert FROM notification_alerts WHERE client_id = $1", client_id)}


@AGENT_LOOP
async def test_postgres_keeps_the_alerts_of_the_unlisted_members_only(pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 2)
    client, rule, matches = await open_group(pool, 4)

    kept = await unlisted_alerts(pool, client)
    assert kept == {matches[0].alert.alert_id: None, matches[1].alert.alert_id: None,
                    **{m.alert.alert_id: m.alert.model_dump(mode="json") for m in matches[2:]}}
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # leave none open


@AGENT_LOOP
async def test_a_group_whose_listed_and_unlisted_members_are_all_silenced_is_recorded_silenced_and_not_emitted(
        pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 2)
    client, rule, matches = await open_group(pool, 4)
    opened = time.time()
    # Created while the group is open: each mutes one member, listed (0, 1) or not (2, 3).
    silences = [await insert_silence(pool, client, opened - 60, opened + 3600, n=str(n)) for n in range(4)]
    before = metrics.notifications_silenced._value.get()

    assert await closed_for(pool, client, opened + 5) == []

    [row] = await rows_of(pool, client)
    assert (row["status"], row["emitted"], row["truncated_alerts"]) == ("SILENCED", True, 0)
    assert row["detail"] == "silenced by " + ", ".join(sorted(silences))
    assert [a["alert_id"] for a in row["alerts"]] == [m.alert.alert_id for m in matches[:2]]
    assert metrics.notifications_silenced._value.get() == before + 1
    assert await sent_to("notifications.ready", client) == []
    assert await closed_for(pool, client, opened + 10) == []  # closed: nothing more


@AGENT_LOOP
async def test_an_unlisted_member_no_silence_mutes_is_listed_when_the_listed_ones_are_silenced(pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 2)
    client, rule, matches = await open_group(pool, 4)
    opened = time.time()
    for n in (0, 1, 3):  # both listed members and one of the two unlisted
        await insert_silence(pool, client, opened - 60, opened + 3600, n=str(n))

    [ready] = await closed_for(pool, client, opened + 5)

    assert (ready.alerts, ready.truncated_alerts) == ([matches[2].alert], 0)
    [row] = await rows_of(pool, client)
    assert (row["status"], row["detail"], row["alert_id"], row["truncated_alerts"]) == (
        "PENDING", None, matches[2].alert.alert_id, 0)
    [sent] = await sent_to("notifications.ready", client)
    assert ([a["alert_id"] for a in sent["alerts"]], sent["truncated_alerts"]) == ([matches[2].alert.alert_id], 0)


@AGENT_LOOP
async def test_unlisted_members_take_the_places_silenced_ones_freed_and_only_the_unsilenced_rest_is_counted(
        pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 2)
    client, rule = await insert_client(pool), str(uuid.uuid4())
    other_client, other_rule = await insert_client(pool), str(uuid.uuid4())
    matches = [grouped(client, rule, window_s=5, the_alert=alert(n)) for n in range(6)]
    others = [grouped(other_client, other_rule, window_s=5, the_alert=alert(n)) for n in range(4)]
    await aggregate(*matches, *others)
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="0")  # listed
    await insert_silence(pool, client, opened - 60, opened + 3600, n="3")  # unlisted

    closed = await closed_for(pool, {client, other_client}, opened + 5)

    # Alert 1 stays listed, alert 2 takes alert 0's place; of 4 and 5, neither silenced, no place: counted.
    [ready] = [r for r in closed if r.client_id == client]
    assert (ready.alerts, ready.truncated_alerts) == ([matches[1].alert, matches[2].alert], 2)
    # A client without a silence in force: listed and counted as the table holds them.
    [other] = [r for r in closed if r.client_id == other_client]
    assert (other.alerts, other.truncated_alerts) == ([m.alert for m in others[:2]], 2)


@AGENT_LOOP
async def test_a_group_closed_again_after_a_crash_keeps_the_listing_its_first_close_built(pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 1)
    client, rule, matches = await open_group(pool, 3)
    opened = time.time()
    silence_id = await insert_silence(pool, client, opened - 60, opened + 3600, n="0")
    [due] = groups.due_groups([(client.encode(), groups.open_groups.get(client.encode()))], opened + 5, set())
    # The closer inserted the notification and died before it was sent; the silence is deleted since.
    [first_built] = await group_records.record_closed_groups(
        pool, [due], opened + 5, await active_silences(pool, {client}, opened + 5))
    await pool.execute("DELETE FROM silences WHERE silence_id = $1", silence_id)

    [ready] = await closed_for(pool, client, opened + 6)

    assert ready == first_built
    assert (ready.alerts, ready.truncated_alerts) == ([matches[1].alert], 1)


@AGENT_LOOP
async def test_a_member_moved_to_another_group_is_checked_against_the_silences_there(pool, monkeypatch):
    monkeypatch.setattr(settings, "group_max_alerts", 1)
    client, rule = await insert_client(pool), str(uuid.uuid4())
    moved, newcomer = (grouped(client, rule, window_s=5, the_alert=alert(n)) for n in range(2))
    await aggregate(moved)  # listed in its group, so Postgres keeps no alert of it
    key = client.encode()
    groups.write_value_of_partition(key, {}, partition_for(key, tuple(range(settings.topic_partitions))))  # lost
    await aggregate(newcomer)  # opens the rule's group anew, listed there
    [new_group] = groups.open_groups.get(key).values()

    await aggregate(moved)  # delivered again: joins the group open now, with no place left to list it

    assert await pool.fetchval("SELECT notification_id::text FROM notification_alerts WHERE alert_id = $1",
                               moved.alert.alert_id) == new_group["notification_id"]
    assert (await unlisted_alerts(pool, client))[moved.alert.alert_id] == moved.alert.model_dump(mode="json")
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="0")
    [ready] = await closed_for(pool, client, opened + 5)
    assert (ready.alerts, ready.truncated_alerts) == ([newcomer.alert], 0)


@AGENT_LOOP
async def test_the_closer_reads_a_large_groups_unlisted_members_a_page_at_a_time(pool, monkeypatch):
    """A storm can leave a group any number of unlisted members, each kept up to MAX_LISTED_BYTES:
    read all at once, a client's single silence had the closer hold them all in memory."""
    monkeypatch.setattr(settings, "group_max_alerts", 1)
    client, rule = await insert_client(pool), str(uuid.uuid4())
    first = grouped(client, rule, window_s=5, the_alert=alert(0))
    await aggregate(first)
    [group] = groups.open_groups.get(client.encode()).values()
    padding = {f"pad{i}": "x" * 2000 for i in range(10)}  # about 20 KB an alert
    storm = [grouped(client, rule, window_s=5, the_alert=Alert(
        alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
        name="CheckoutLatency", context={"n": "muted" if n % 2 else "kept", **padding})) for n in range(1000)]
    await group_records.record_memberships(pool, [(m.client_id, m.alert.alert_id, group["notification_id"],
                                                   groups.unlisted_record(m)) for m in storm])
    opened = time.time()
    await insert_silence(pool, client, opened - 60, opened + 3600, n="muted")
    ready, peak = await closed_with_peak_memory(pool, client, opened + 5)

    assert (ready.alerts, ready.truncated_alerts) == ([first.alert], 500)
    stored = await pool.fetchval("SELECT sum(octet_length(unlisted_alert::text)) FROM notification_alerts"
                                 " WHERE notification_id = $1", group["notification_id"])
    assert peak < stored / 2, (peak, stored)  # a page of 100 at a time: about 5 MB here, whatever the count


@AGENT_LOOP
async def test_grouped_alert_already_notified_at_once_does_not_join_and_the_reverse(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    at_once = matched(client, [rule])
    member = grouped(client, rule)

    await aggregate(at_once, grouped(client, rule, the_alert=at_once.alert), member,
                    matched(client, [rule], the_alert=member.alert))
    [ready] = await closed_for(pool, client, time.time() + 5)

    assert ready.alerts == [member.alert]
    assert sorted(row["alert_id"] for row in await rows_of(pool, client)) == sorted(
        [at_once.alert.alert_id, member.alert.alert_id])


async def a_lock_is_awaited(observer: asyncpg.Connection, condition: str) -> bool:
    # pg_locks is the whole server's: another session's database may be on it (DATABASE_URL given).
    return await observer.fetchval(f"SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND {condition}"
                                   " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")


@contextlib.asynccontextmanager
async def membership_write_held(services, member: AlertMatched):
    """Aggregate `member` (a new group member) until its membership write, inside the transaction
    that holds its client's lock, and hold it there until the block ends: (the observer connection
    holding it, the aggregation's task)."""
    observer = await asyncpg.connect(services.database_url)
    await observer.execute("SET lock_timeout = '60s'")  # a broken test fails rather than hangs
    holder = observer.transaction()
    await holder.start()
    try:
        await observer.execute("LOCK TABLE notification_alerts IN EXCLUSIVE MODE")
        joining = asyncio.ensure_future(aggregate(member))
        async with asyncio.timeout(30):
            while not await a_lock_is_awaited(observer, "relation = 'notification_alerts'::regclass"):
                await asyncio.sleep(0.01)
        yield observer, joining
    finally:
        await holder.commit()
        await observer.close()


@AGENT_LOOP
async def test_an_alert_one_worker_adds_to_a_group_is_not_notified_at_once_by_another(pool, services):
    """A rebalance overlap: the partition's new owner adds an alert to a group (its client has a
    grouping rule now) while the old owner, with the rules of before, notifies it at once."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    member = grouped(client, rule)
    at_once = matched(client, [str(uuid.uuid4())], the_alert=member.alert)
    async with membership_write_held(services, member) as (observer, joining):
        notifying = asyncio.ensure_future(record_first_matches(pool, [at_once]))
        async with asyncio.timeout(30):
            while not (notifying.done()
                       or await a_lock_is_awaited(observer, "locktype = 'advisory' AND mode = 'ShareLock'")):
                await asyncio.sleep(0.01)
    await joining

    assert await notifying == []
    [ready] = await closed_for(pool, client, time.time() + 5)
    assert ready.alerts == [member.alert]
    assert [row["notification_id"] for row in await rows_of(pool, client)] == [ready.notification_id]


@AGENT_LOOP
async def test_an_alert_joining_a_group_while_another_worker_closes_it_is_counted_or_grouped_again(pool, services):
    """A rebalance overlap: the new owner adds an alert to a group while the old owner's closer
    closes it. The closer takes the client's lock as the agent does, so the alert is either counted
    in the closed group or finds it closed and opens a new one: never a member of a closed group
    that neither lists nor counts it (and, that group closed, never notified)."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    first, second = grouped(client, rule, the_alert=alert(1)), grouped(client, rule, the_alert=alert(2))
    await aggregate(first)
    async with membership_write_held(services, second) as (observer, joining):
        closing = asyncio.ensure_future(close_due_groups(pool, time.time() + 5, ALL_PARTITIONS))
        async with asyncio.timeout(30):
            while not (closing.done() or await a_lock_is_awaited(observer, "locktype = 'advisory'")):
                await asyncio.sleep(0.01)
    await joining
    await closing
    await close_due_groups(pool, time.time() + 3600, ALL_PARTITIONS)  # whatever is still open

    rows = await rows_of(pool, client)
    assert sum(len(row["alerts"]) + row["truncated_alerts"] for row in rows) == 2, [dict(row) for row in rows]


@AGENT_LOOP
async def test_a_member_delivered_again_writes_its_clients_groups_to_the_changelog_again(pool, services):
    """The worker wrote its table and died before the broker had the changelog write: restarted, its
    local store (RocksDB) holds the value, the changelog does not. The redelivered member rebuilds the
    same value, which must still reach the changelog, or the partition's next owner loses the group."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    member = grouped(client, rule)
    await aggregate(member)
    changelog = groups.open_groups.changelog_topic.get_topic_name()

    async def changelog_values() -> list:
        return [json.loads(value) for key, value in await read_topic(services.kafka_bootstrap_servers, changelog)
                if key == client.encode()]
    before = await changelog_values()

    await aggregate(member)

    after = await changelog_values()
    assert len(after) == len(before) + 1 and after[-1] == groups.open_groups.get(client.encode())
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # leave none open


@AGENT_LOOP
async def test_a_group_closed_again_after_a_crash_sends_the_same_notification(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule))
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    # The closer inserted the notification and died before it was sent.
    first_built = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())

    [ready] = await closed_for(pool, client, time.time() + 6)

    assert [ready] == first_built
    assert len(await rows_of(pool, client)) == 1


@AGENT_LOOP
async def test_a_member_sent_again_ungrouped_leaves_its_closed_groups_notification_to_the_closer(pool, monkeypatch):
    """The group's row carries its first member's alert_id: the plain path must not take it for that
    alert's own unemitted notification and emit it rebuilt from the row, without its truncated count."""
    monkeypatch.setattr(settings, "group_max_alerts", 1)
    client, rule = await insert_client(pool), str(uuid.uuid4())
    members = [grouped(client, rule, the_alert=alert(n)) for n in range(3)]
    await aggregate(*members)
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    # The closer inserted the notification and died before it was sent.
    [first_built] = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())
    # The client's rule no longer groups: the source sends the first member again, down the plain path.
    again = matched(client, [rule], members[0].alert)

    assert await record_first_matches(pool, [again]) == []
    # One by one too, as the plain path records a batch Postgres refused (record_one_by_one).
    assert await record_first_match(pool, again) is None
    [ready] = await closed_for(pool, client, time.time() + 6)
    assert ready == first_built and ready.truncated_alerts == 2


@AGENT_LOOP
async def test_a_group_closed_but_not_emitted_is_emitted_by_the_agent_that_drops_it(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule, the_alert=alert(1)))
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    # The closer inserted the notification and died before it was sent; after the restart the agent
    # sees a new alert of the client before any closer runs, and drops the closed group.
    [first_built] = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())

    await aggregate(grouped(client, rule, the_alert=alert(2)))

    assert first_built.notification_id in [m["notification_id"] for m in await sent_to("notifications.ready", client)]
    [row] = [r for r in await rows_of(pool, client) if r["notification_id"] == first_built.notification_id]
    assert row["emitted"]
    assert first_built.notification_id not in {
        group["notification_id"] for group in (groups.open_groups.get(client.encode()) or {}).values()}
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # the second alert's group: leave none open


@AGENT_LOOP
async def test_a_closed_group_the_agent_drops_is_emitted_before_the_table_forgets_it(pool, monkeypatch):
    """The agent drops a closed, never emitted group from its client's value (as above), and the
    worker dies once that value is in the changelog. The batch delivered again holds no member of
    that group and finds no trace of it in the table: had it been left to the batch's sink, which
    never ran, the group would never be notified."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule, the_alert=alert(1)))
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    [first_built] = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())
    next_alert = grouped(client, rule, the_alert=alert(2))
    written = groups.wait_until_written

    async def dies_once_written() -> None:
        await written()
        raise RuntimeError("the worker died once the table was written, before its sink ran")
    monkeypatch.setattr(groups, "wait_until_written", dies_once_written)
    with pytest.raises(RuntimeError, match="the worker died"):
        await aggregate(next_alert)
    monkeypatch.undo()
    assert first_built.notification_id not in {
        group["notification_id"] for group in (groups.open_groups.get(client.encode()) or {}).values()}

    await aggregate(next_alert)  # the batch, delivered again after the restart
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # the second alert's group: leave none open

    [row] = [r for r in await rows_of(pool, client) if r["notification_id"] == first_built.notification_id]
    assert row["emitted"]
    assert first_built.notification_id in [m["notification_id"] for m in await sent_to("notifications.ready", client)]


@AGENT_LOOP
async def test_a_closed_group_the_agent_drops_is_emitted_when_its_batch_is_recorded_again(pool, monkeypatch):
    """A transient Postgres error once the table was written has the whole batch recorded again
    (db.retry_transient), into a new aggregation: the closed group it dropped from the table was
    not emitted by the first attempt's, and the second no longer finds it there."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule, the_alert=alert(1)))
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    [first_built] = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())
    dropping = aggregate_module.drop_matches_of_deleted_clients
    failures = [ConnectionResetError("Postgres went away")]

    async def fails_once(conn, aggregation) -> None:
        if failures:
            raise failures.pop()
        await dropping(conn, aggregation)
    monkeypatch.setattr(aggregate_module, "drop_matches_of_deleted_clients", fails_once)

    await aggregate(grouped(client, rule, the_alert=alert(2)))
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # the second alert's group: leave none open

    assert not failures
    [row] = [r for r in await rows_of(pool, client) if r["notification_id"] == first_built.notification_id]
    assert row["emitted"]
    assert first_built.notification_id in [m["notification_id"] for m in await sent_to("notifications.ready", client)]


@AGENT_LOOP
async def test_a_member_delivered_again_emits_its_closed_group_if_it_never_was(pool):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    member = grouped(client, rule, the_alert=alert(1))
    await aggregate(member)
    value = groups.open_groups.get(client.encode())
    [due] = groups.due_groups([(client.encode(), value)], time.time() + 5, set())
    # Closed (by the closer, or early by the agent) and not sent; then the table lost the group (the
    # agent closing it early had not written its value yet) and the member's message comes again.
    [first_built] = await group_records.record_closed_groups(pool, [due], time.time() + 5, SilenceIndex())
    groups.write_value_of_partition(client.encode(), {}, partition_for(client.encode(), tuple(range(settings.topic_partitions))))

    [aggregation] = await aggregate(member)

    assert aggregation.ready == []  # emitted at once, not by the batch's sink
    assert [m["notification_id"] for m in await sent_to("notifications.ready", client)] == [first_built.notification_id]
    [row] = await rows_of(pool, client)
    assert row["emitted"]
    [again] = await aggregate(member)  # emitted now: nothing more
    assert again.ready == []


@AGENT_LOOP
@pytest.mark.parametrize("kind", ["grouped", "silenced member of an open group"])
async def test_a_stateful_match_keyed_by_something_else_is_a_dead_letter(pool, kind):
    """A silenced match can join a group too (its alert is a member of an open one): keyed by anything
    but its client, its client's table value has no event to be written under."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    member = grouped(client, rule)
    if kind == "grouped":
        match = member
    else:
        await aggregate(member)
        match = matched(client, [rule], member.alert, silenced_by=str(uuid.uuid4()))
    async with aggregate_matches.test_context() as agent:
        await agent.put(match.encode(), key=b"not-the-client")
        [aggregation] = [agent.results[0]]

    [letter] = aggregation.dead_letters
    assert "key: a match must be keyed by its client_id" in letter.reason
    await close_due_groups(pool, time.time() + 5, ALL_PARTITIONS)  # the member's group: no other test's


@AGENT_LOOP
@pytest.mark.parametrize(("field", "value", "reason"), [
    ("fingerprint", "x" * 5000, "fingerprint: String should match pattern"),
    ("silenced_by", "not-a-silence", "silenced_by: not a UUID"),
    ("group_rule_id", "not-a-rule", "group_rule_id: not a UUID"),
])
async def test_a_match_with_a_malformed_state_field_is_a_dead_letter(pool, field, value, reason):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    message = json.loads(repeating(client, rule).encode())
    message[field] = value
    async with aggregate_matches.test_context() as agent:
        await agent.put(json.dumps(message).encode(), key=client.encode())
        aggregation = agent.results[0]

    [letter] = aggregation.dead_letters
    assert reason in letter.reason
    assert await rows_of(pool, client) == []


@AGENT_LOOP
async def test_fingerprints_too_old_to_suppress_anything_are_forgotten(pool):
    client = await insert_client(pool)
    await pool.execute(
        "INSERT INTO fingerprints (client_id, fingerprint, last_notified_at) VALUES "
        "($1, 'old', now() - interval '8 days'), ($1, 'recent', now() - interval '6 days')", client)

    assert await prune_fingerprints(pool) >= 1

    kept = await pool.fetch("SELECT fingerprint FROM fingerprints WHERE client_id = $1", client)
    assert [row["fingerprint"] for row in kept] == ["recent"]


@AGENT_LOOP
async def test_a_fingerprint_is_never_remembered_as_notified_earlier_than_it_was(pool):
    # Two workers in a rebalance overlap, or a clock stepped back, write an older time last.
    from agents.match_outcomes import _REMEMBER_NOTIFIED

    client, group = await insert_client(pool), str(uuid.uuid4())
    now = time.time()
    await pool.execute(_REMEMBER_NOTIFIED, [client], ["fp"], [now], [group])  # a member joining
    await pool.execute(_REMEMBER_NOTIFIED, [client], ["fp"], [now - 3600], [None])  # one notified at once

    row = await pool.fetchrow("SELECT extract(epoch FROM last_notified_at) AS last, notified_in_group::text,"
                              " notified_as_of = last_notified_at AS described FROM fingerprints"
                              " WHERE client_id = $1 AND fingerprint = 'fp'", client)
    assert float(row["last"]) == pytest.approx(now, abs=1e-3)
    # What says whether that notification is final describes it, not the older one.
    assert (row["notified_in_group"], row["described"]) == (group, True)


def test_a_worker_without_the_aggregate_role_does_not_hold_the_group_table():
    import faust

    from alerting_app.roles import apply_roles

    def app_with_table() -> faust.App:
        other = faust.App(f"roles-{uuid.uuid4()}", broker="kafka://localhost:1")
        other.Table(groups.open_groups.name, key_type=bytes, partitions=3, use_partitioner=True)
        return other

    deliver_only, aggregating = app_with_table(), app_with_table()
    apply_roles(deliver_only, frozenset({"deliver"}))
    apply_roles(aggregating, frozenset({"aggregate"}))

    assert list(deliver_only.tables) == [] and deliver_only.tables.changelog_topics == set()
    assert list(aggregating.tables) == [groups.open_groups.name]


@AGENT_LOOP
@DELETIONS
async def test_the_group_of_a_client_deleted_while_it_was_open_is_dropped(pool, finished):
    client, rule = await insert_client(pool), str(uuid.uuid4())
    other_client = await insert_client(pool)
    await aggregate(grouped(client, rule), grouped(other_client, rule))
    await delete_client_as_the_api_does(pool, client, [rule], finished=finished)

    [ready] = await closed_for(pool, {client, other_client}, time.time() + 5)

    assert ready.client_id == other_client
    assert groups.open_groups.get(client.encode()) is None


@AGENT_LOOP
@pytest.mark.parametrize("deletion", [
    "UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id = $1",  # the API's
    "DELETE FROM clients WHERE client_id = $1",  # retention's, finishing it
], ids=["being-deleted", "deleted"])
async def test_the_group_of_a_client_deleted_while_it_closes_is_dropped_and_the_others_are_emitted(pool, deletion):
    # The deletion commits while the closer waits for the client's row (its deleting transaction
    # holds it): the client was there when the round began, and is gone (or being deleted) by the insert.
    client, rule = await insert_client(pool), str(uuid.uuid4())
    other_client = await insert_client(pool)
    await aggregate(grouped(client, rule), grouped(other_client, rule))

    async with pool.acquire() as deleting:
        async with deleting.transaction():
            await deleting.execute(deletion, client)
            closing = asyncio.ensure_future(closed_for(pool, {client, other_client}, time.time() + 5))
            await until_waiting_on_a_lock(pool)
    async with asyncio.timeout(30):
        [ready] = await closing

    assert ready.client_id == other_client
    assert groups.open_groups.get(client.encode()) is None


@AGENT_LOOP
async def test_the_closer_leaves_alone_the_groups_of_partitions_this_worker_does_not_own(pool):
    from alerting_app.sending import partition_for

    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule))
    partitions = tuple(range(settings.topic_partitions))
    own = partition_for(client.encode(), partitions)

    assert await closed_for(pool, client, time.time() + 5, set(partitions) - {own}) == []  # a standby copy
    assert await rows_of(pool, client) == []
    [ready] = await closed_for(pool, client, time.time() + 5, {own})
    assert ready.client_id == client


@AGENT_LOOP
async def test_the_closer_forgets_the_closed_groups_of_a_partition_taken_away(pool):
    client, soon, later = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    await aggregate(grouped(client, soon, window_s=5), grouped(client, later, window_s=300))
    opened = time.time()
    [closed] = await closed_for(pool, client, opened + 5)
    assert closed.notification_id in closed_here  # its client's value still holds the later group

    own = partition_for(client.encode(), tuple(range(settings.topic_partitions)))
    await close_due_groups(pool, opened + 5, ALL_PARTITIONS - {own})  # the partition was taken away
    assert closed.notification_id not in closed_here

    # Given back, the value still lists the closed group: closed again, it sends nothing.
    assert await closed_for(pool, client, opened + 6) == []
    [last] = await closed_for(pool, client, opened + 300)
    assert last.group_rule_id == later
    assert groups.open_groups.get(client.encode()) is None
    assert closed.notification_id not in closed_here


@AGENT_LOOP
async def test_the_closer_leaves_the_table_alone_for_a_partition_moved_away_while_it_closed(pool):
    # Faust does not wait for timers in a rebalance: the partition may have a new owner, which may
    # have written the client's value, by the time the closer's notification is acknowledged.
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule))
    value = groups.open_groups.get(client.encode())

    [ready] = await closed_for(pool, client, time.time() + 5, still_owned=set)

    assert groups.open_groups.get(client.encode()) == value  # not deleted: its owner's to write now
    assert ready.notification_id not in closed_here
    # Given back: closed again, it sends nothing, and the value is removed.
    assert await closed_for(pool, client, time.time() + 6) == []
    assert groups.open_groups.get(client.encode()) is None


@pytest.mark.parametrize(("variable", "value"), [("GROUP_MAX_ALERTS", "0"), ("GROUP_MAX_ALERTS", "many"),
                                                 ("GROUP_CLOSE_INTERVAL_S", "0"), ("GROUP_CLOSE_INTERVAL_S", "-1")])
def test_a_bad_grouping_setting_stops_start_up_naming_the_variable(monkeypatch, variable, value):
    from alerting_app.settings import ConfigurationError, load_settings

    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert f"{variable}:" in str(error.value)


def test_grouping_settings_default_to_the_documented_values(monkeypatch):
    from alerting_app.settings import load_settings

    monkeypatch.delenv("GROUP_MAX_ALERTS", raising=False)
    monkeypatch.delenv("GROUP_CLOSE_INTERVAL_S", raising=False)

    settings = load_settings()

    assert (settings.group_max_alerts, settings.group_close_interval_s) == (100, 0.5)



@AGENT_LOOP
@pytest.mark.parametrize("closing_first", ["the later member's group", "the first member's group"])
async def test_the_repeats_of_members_of_one_fingerprint_muted_at_different_closes_are_not_lost(
        pool, monkeypatch, closing_first):
    """Members of one fingerprint muted at different closes (groups of different windows): a member at
    0 s, a repeat at 30 s it suppresses, and a member at 70 s (60 s interval), both muted by a silence
    when their groups close. Neither reached the client: when the second of the two groups closes,
    the repeat at 30 s, suppressed by a member notified to nobody, is decided again, and notified.
    Closing first, the later member's group decides the repeats since it joined (none); the first
    member's, the later member's group still open (it may yet be notified), decides nothing yet."""
    client, first_rule, later_rule = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    first_window, later_window = (300, 5) if closing_first == "the later member's group" else (100, 300)
    opened = time.time()
    first = grouped_repeating(client, first_rule, alert(1), window_s=first_window, interval_s=60)
    at_30 = grouped_repeating(client, first_rule, alert(2), window_s=first_window, interval_s=60)
    later = grouped_repeating(client, later_rule, alert(1), window_s=later_window, interval_s=60)
    for seconds, match in ((0, first), (30, at_30), (70, later)):
        await aggregate_at(monkeypatch, opened + seconds, match)
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")
    first_close, second_close = sorted((first_window, 70 + later_window))
    assert await closed_for(pool, client, opened + first_close) == []

    [ready] = await closed_for(pool, client, opened + second_close)

    assert (ready.alerts, ready.rule_ids) == ([at_30.alert], [first_rule])
    assert [row["alert_id"] for row in await rows_of(pool, client) if row["status"] == "SUPPRESSED"] == []
    last = await pool.fetchval("SELECT extract(epoch FROM last_notified_at)::float8 FROM fingerprints"
                               " WHERE client_id = $1", client)
    assert last == pytest.approx(opened + 30, abs=1e-3)



@AGENT_LOOP
async def test_the_repeats_an_earlier_close_decided_again_are_not_decided_again_at_a_later_close(pool, monkeypatch):
    """A member at 0 s (5-minute group), a repeat at 30 s, a member at 70 s (40-second group) and its
    repeat at 95 s, which a second silence mutes when the 40-second group closes: it stays
    SUPPRESSED, notified to nobody. That silence has ended when the 5-minute group closes: the
    repeat at 30 s is decided again and notified, the one at 95 s (65 s after it) is not decided a
    second time."""
    client, slow, fast = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    opened = time.time()
    first = grouped_repeating(client, slow, alert(1), window_s=300, interval_s=60)
    at_30 = grouped_repeating(client, slow, alert(2), window_s=300, interval_s=60)
    later = grouped_repeating(client, fast, alert(1), window_s=40, interval_s=60)
    at_95 = grouped_repeating(client, fast, alert(3), window_s=40, interval_s=60)
    for seconds, match in ((0, first), (30, at_30), (70, later), (95, at_95)):
        await aggregate_at(monkeypatch, opened + seconds, match)
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")
    await insert_silence(pool, client, opened - 60, opened + 200, n="3")
    assert await closed_for(pool, client, opened + 110) == []

    [ready] = await closed_for(pool, client, opened + 305)

    assert ready.alerts == [at_30.alert]
    assert [row["alert_id"] for row in await rows_of(pool, client) if row["status"] == "SUPPRESSED"
            ] == [at_95.alert.alert_id]


@AGENT_LOOP
@pytest.mark.parametrize("in_between", ["a later member notified", "a notification at once",
                                        "a later member muted by a release before 019"])
async def test_the_repeats_of_a_member_muted_after_a_later_notification_reached_the_client_stay_suppressed(
        pool, monkeypatch, in_between):
    """As when a later notification of the fingerprint is made before the member is muted: one that
    reached the client since the member (a later member notified at its close, or a notification
    made at once, which no member records) leaves the member's repeats suppressed, and so does a
    later member that a release before migrations/019 muted (not known to be muted)."""
    client, slow, fast = await insert_client(pool), str(uuid.uuid4()), str(uuid.uuid4())
    opened = time.time()
    first = grouped_repeating(client, slow, alert(1), window_s=300, interval_s=60)
    at_30 = grouped_repeating(client, slow, alert(2), window_s=300, interval_s=60)
    await aggregate_at(monkeypatch, opened, first)
    await aggregate_at(monkeypatch, opened + 30, at_30)
    later_at = 70
    if in_between == "a notification at once":
        await aggregate_at(monkeypatch, opened + 65, notified_at_once(client, fast, alert(3), 60))
        later_at = 130
    later = grouped_repeating(client, fast, alert(5 if in_between == "a later member notified" else 1),
                              interval_s=60)
    await aggregate_at(monkeypatch, opened + later_at, later)
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")
    assert [ready.alerts for ready in await closed_for(pool, client, opened + later_at + 5)] == (
        [[later.alert]] if in_between == "a later member notified" else [])
    if in_between == "a later member muted by a release before 019":
        await pool.execute("UPDATE notification_alerts SET muted_repeats_decided = NULL WHERE client_id = $1", client)

    assert await closed_for(pool, client, opened + 305) == []

    assert [row["alert_id"] for row in await rows_of(pool, client) if row["status"] == "SUPPRESSED"
            ] == [at_30.alert.alert_id]


@AGENT_LOOP
async def test_the_closer_reads_the_repeats_a_muted_member_suppressed_a_page_at_a_time(pool, monkeypatch):
    """A storm of one fingerprint's repeats while its member's group is open leaves any number of
    SUPPRESSED rows, each with its alert. A silence that mutes the member at close usually mutes
    them too, and then every one is decided again: read at once, they were all held in the worker's
    memory (20 MB for 1,000 alerts of 20 KB). The last of them, which the silence does not mute, is
    still the one notified."""
    client, rule = await insert_client(pool), str(uuid.uuid4())
    opened = time.time()
    member = grouped_repeating(client, rule, alert(1), interval_s=60)
    await aggregate_at(monkeypatch, opened, member)
    padding = {f"pad{i}": "x" * 2000 for i in range(10)}  # about 20 KB an alert
    storm = [Alert(alert_id=str(uuid.uuid4()), event_ts=opened, severity="HIGH", source="payments",
                   name="CheckoutLatency", context={"n": "1", **padding}) for _ in range(1000)]
    kept = alert(2)  # the same fingerprint, which the silence does not mute
    repeats = [*storm, kept]
    # As the agent writes a suppressed repeat (agents/match_outcomes.py write_outcome), a millisecond apart.
    await pool.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, created_at, updated_at,"
        " status, detail, emitted, fingerprint, repeat_interval_s)"
        " SELECT gen_random_uuid(), $1, r.alert_id, r.alerts::jsonb, ARRAY[$2::uuid], to_timestamp(r.at),"
        " to_timestamp(r.at), 'SUPPRESSED', 'repeat', true, $3, 60"
        " FROM unnest($4::text[], $5::text[], $6::float8[]) AS r(alert_id, alerts, at)",
        client, rule, member.fingerprint, [a.alert_id for a in repeats],
        ["[" + a.model_dump_json() + "]" for a in repeats], [opened + 1 + n / 1000 for n in range(len(repeats))])
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")
    ready, peak = await closed_with_peak_memory(pool, client, opened + 5)

    assert ready.alerts == [kept]
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1 AND status = 'SUPPRESSED'",
                               client) == len(storm)
    stored = await pool.fetchval("SELECT sum(octet_length(alerts::text)) FROM notifications"
                                 " WHERE client_id = $1 AND status = 'SUPPRESSED'", client)
    assert peak < stored / 2, (peak, stored)  # a page of 100 at a time: about 2 MB here, whatever the count


@pytest.mark.parametrize("state", ["rebalancing", "in recovery", "recovery not completed"])
def test_the_closer_writes_no_partition_while_partitions_move_or_the_table_recovers(monkeypatch, state):
    # A group read then may be an old version of it: closed from it, a member added since by the
    # partition's owner would be neither notified nor counted.
    from agents import close_groups
    from alerting_app.app import app

    monkeypatch.setattr(close_groups, "owned_partitions", lambda: {0, 1})
    monkeypatch.setattr(app, "rebalancing", False)
    monkeypatch.setattr(app, "in_recovery", False)
    completed = app.tables.recovery.completed
    was_set = completed.is_set()
    completed.set()
    try:
        assert close_groups.table_is_current() and close_groups.writable_partitions() == {0, 1}
        if state == "rebalancing":
            monkeypatch.setattr(app, "rebalancing", True)
        elif state == "in recovery":
            monkeypatch.setattr(app, "in_recovery", True)
        else:
            completed.clear()
        assert not close_groups.table_is_current()
        assert close_groups.writable_partitions() == set()
    finally:
        completed.set() if was_set else completed.clear()


@AGENT_LOOP
async def test_the_closer_returns_only_once_the_broker_acknowledged_its_changelog_writes(pool):
    # Faust's flush gives up silently and never raises for a failed write (groups.wait_until_written):
    # a closer that did not wait could see a round succeed whose deletion of a closed group the
    # broker refused, or never had.
    client, rule = await insert_client(pool), str(uuid.uuid4())
    await aggregate(grouped(client, rule))

    [ready] = await closed_for(pool, client, time.time() + 5)

    assert groups.open_groups.get(client.encode()) is None
    assert groups.open_groups.unchecked_writes == []  # the deletion's write, checked


@AGENT_LOOP
async def test_a_listed_member_kept_as_unlisted_too_is_listed_once_in_the_place_a_silence_freed(pool):
    # A crash between a member's two writes can leave it listed by the table and kept unlisted in
    # Postgres: read among the unlisted members at close, it took the place a silenced one freed,
    # and the notification listed it twice.
    client, _, matches = await open_group(pool, 2)
    opened = time.time()
    await pool.execute("UPDATE notification_alerts SET unlisted_alert = $3::text::jsonb"
                       " WHERE client_id = $1 AND alert_id = $2",
                       uuid.UUID(client), matches[0].alert.alert_id, matches[0].alert.model_dump_json())
    await insert_silence(pool, client, opened - 60, opened + 3600, n="1")

    [ready] = await closed_for(pool, client, opened + 5)

    assert ready.alerts == [matches[0].alert]
    assert ready.truncated_alerts == 0


@AGENT_LOOP
async def test_a_listed_member_whose_row_is_gone_counts_no_negative_truncated_alerts(pool):
    # The table's listing and the members in Postgres are two writes: a listed alert with no member
    # row (removed by hand, or a release that wrote them otherwise) made the count of the members
    # not checked negative.
    client, _, matches = await open_group(pool, 2)
    await pool.execute("DELETE FROM notification_alerts WHERE client_id = $1 AND alert_id = $2",
                       uuid.UUID(client), matches[1].alert.alert_id)

    [ready] = await closed_for(pool, client, time.time() + 5)

    assert ready.alerts == [matches[0].alert, matches[1].alert]
    assert ready.truncated_alerts == 0
