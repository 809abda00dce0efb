"""The aggregate stage's batch functions against the real Postgres: a notification left unemitted
is emitted on redelivery wherever it sits in the batch, one client's notifications come out in the
order of its matches, and a match Postgres refuses becomes a dead letter without stopping the rest."""
from __future__ import annotations

import hashlib
import time
import uuid
from types import SimpleNamespace

import pytest

from agents.aggregate import Aggregation, aggregate_batch, record_first_match, record_first_matches, record_matches
from alerting_app.contracts import Alert, AlertMatched
from test_agent_support import (  # noqa: F401  (fixtures)
    AGENT_LOOP, DELETIONS, delete_client_as_the_api_does, insert_client, pipeline, pool,
)

pytestmark = AGENT_LOOP


def matched(client_id: str, *, repeat_checked: bool = False) -> AlertMatched:
    alert = Alert(alert_id=str(uuid.uuid4()), event_ts=time.time(), severity="HIGH", source="payments",
                  name="CheckoutLatency", context={"region": "eu-west-1"})
    if not repeat_checked:
        return AlertMatched(alert=alert, client_id=client_id, rule_ids=[str(uuid.uuid4())])
    # Stateful: aggregate records it through match_outcomes (PENDING, since its fingerprint is new).
    return AlertMatched(alert=alert, client_id=client_id, rule_ids=[str(uuid.uuid4())], repeat_interval_s=60,
                        fingerprint=hashlib.sha256(uuid.uuid4().bytes).hexdigest())


def with_nul_in_context(match: AlertMatched) -> AlertMatched:
    """The match with a NUL in a context value, which Postgres refuses in jsonb (built without
    validation: the contracts may refuse it, and this is about what happens if they do not)."""
    alert = match.alert.model_copy(update={"context": {"region": "a\u0000b"}})
    return match.model_copy(update={"alert": alert})


def event(match: AlertMatched, offset: int) -> SimpleNamespace:
    """What aggregate reads of a Faust event: its message."""
    return SimpleNamespace(message=SimpleNamespace(
        topic="alerts.matched", partition=0, offset=offset, key=match.client_id.encode(),
        value=match.model_dump_json().encode()))


def alert_ids(readies) -> list[str]:
    return [ready.alerts[0].alert_id for ready in readies]


async def test_a_notification_left_unemitted_is_emitted_when_redelivered_behind_a_new_match(pool):
    client = await insert_client(pool)
    new, redelivered = matched(client), matched(client)
    # A worker inserted B's notification and died before marking it emitted.
    first_built = await record_first_match(pool, redelivered)

    ready = await record_first_matches(pool, [new, redelivered])

    assert alert_ids(ready) == [new.alert.alert_id, redelivered.alert.alert_id]
    assert ready[1] == first_built


async def test_a_clients_notifications_come_out_in_the_order_of_its_matches(pool):
    client = await insert_client(pool)
    # Stateful, plain, stateful: the two kinds are recorded by different paths.
    matches = [matched(client, repeat_checked=True), matched(client), matched(client, repeat_checked=True)]
    # A notification left unemitted, redelivered last, comes out last.
    left_unemitted = matched(client)
    await record_first_match(pool, left_unemitted)
    matches.append(left_unemitted)

    aggregation = await aggregate_batch(pool, [event(match, offset) for offset, match in enumerate(matches)])

    assert aggregation.dead_letters == []
    assert alert_ids(aggregation.ready) == [match.alert.alert_id for match in matches]


async def test_a_plain_match_postgres_refuses_is_a_dead_letter_and_the_others_are_recorded(pool):
    await assert_refused_match_is_isolated(pool, repeat_checked=False)


async def test_a_stateful_match_postgres_refuses_is_a_dead_letter_and_the_others_are_recorded(pool):
    await assert_refused_match_is_isolated(pool, repeat_checked=True)


async def assert_refused_match_is_isolated(pool, *, repeat_checked: bool) -> None:
    client = await insert_client(pool)
    matches = [matched(client, repeat_checked=repeat_checked),
               with_nul_in_context(matched(client, repeat_checked=repeat_checked)),
               matched(client, repeat_checked=repeat_checked)]
    aggregation = Aggregation()

    await record_matches(pool, [(event(match, offset), match) for offset, match in enumerate(matches)], aggregation)

    [letter] = aggregation.dead_letters
    assert letter.offset == 1 and letter.reason.startswith("refused by Postgres: UntranslatableCharacterError")
    assert alert_ids(aggregation.ready) == [matches[0].alert.alert_id, matches[2].alert.alert_id]
    stored = await pool.fetch("SELECT alert_id FROM notifications WHERE client_id = $1", client)
    assert sorted(row[0] for row in stored) == sorted(alert_ids(aggregation.ready))


async def test_a_client_deleted_while_its_stateful_match_is_recorded_is_a_dead_letter(pool, monkeypatch):
    # The race: record_stateful finds the client known, then the client is deleted before the write,
    # which then violates the foreign key. Stood in for by a client that exists only in that check.
    from agents import match_outcomes

    client, deleted = await insert_client(pool), str(uuid.uuid4())
    real_known_clients = match_outcomes.known_clients

    async def known_clients(conn, client_ids):
        return await real_known_clients(conn, client_ids) | {deleted}

    monkeypatch.setattr(match_outcomes, "known_clients", known_clients)
    matches = [matched(client, repeat_checked=True), matched(deleted, repeat_checked=True)]
    aggregation = Aggregation()

    await record_matches(pool, [(event(match, offset), match) for offset, match in enumerate(matches)], aggregation)

    [letter] = aggregation.dead_letters
    assert letter.offset == 1 and letter.reason == f"client_id: no such client {deleted}"
    assert alert_ids(aggregation.ready) == [matches[0].alert.alert_id]


@DELETIONS
@pytest.mark.parametrize("repeat_checked", [False, True], ids=["plain", "stateful"])
async def test_the_matches_of_a_client_deleted_while_they_were_in_flight_are_dropped_not_dead_lettered(
        pool, repeat_checked, finished):
    # Every replica matches a deleted client's rules until their deletions reach it, and matches
    # already on alerts.matched still come: nothing to notify, and nothing wrong with the message.
    from alerting_app import metrics

    kept, deleted = await insert_client(pool), await insert_client(pool)
    matches = [matched(deleted, repeat_checked=repeat_checked), matched(kept, repeat_checked=repeat_checked),
               matched(deleted, repeat_checked=repeat_checked)]
    await delete_client_as_the_api_does(pool, deleted, [*matches[0].rule_ids, *matches[2].rule_ids],
                                        finished=finished)
    dropped = metrics.messages_of_deleted_clients.labels(topic="alerts.matched")
    dropped_before = dropped._value.get()

    aggregation = await aggregate_batch(pool, [event(match, offset) for offset, match in enumerate(matches)])

    assert aggregation.dead_letters == []
    assert alert_ids(aggregation.ready) == [matches[1].alert.alert_id]
    assert dropped._value.get() - dropped_before == 2
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", deleted) == 0


async def test_a_batch_with_an_unknown_client_and_one_being_deleted_drops_the_one_and_dead_letters_the_other(pool):
    # The batch statement meets the client being deleted first (the lock statement says so), then,
    # without it, the unknown client (the foreign key): the matches go one by one, and the client
    # being deleted must still be told apart there, as the foreign key lets its match through.
    kept, being_deleted, unknown = await insert_client(pool), await insert_client(pool), str(uuid.uuid4())
    matches = [matched(being_deleted), matched(unknown), matched(kept)]
    await delete_client_as_the_api_does(pool, being_deleted, matches[0].rule_ids)

    aggregation = await aggregate_batch(pool, [event(match, offset) for offset, match in enumerate(matches)])

    assert [letter.reason for letter in aggregation.dead_letters] == [f"client_id: no such client {unknown}"]
    assert alert_ids(aggregation.ready) == [matches[2].alert.alert_id]
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", being_deleted) == 0


async def test_a_match_repeated_in_a_batch_recorded_one_by_one_is_notified_once(pool):
    # The unknown client makes the batch statement insert nothing: the matches go one by one, and
    # the repeat then finds the row its first occurrence inserted, still unemitted.
    client = await insert_client(pool)
    repeated, unknown = matched(client), matched(str(uuid.uuid4()))
    matches = [repeated, unknown, repeated]

    aggregation = await aggregate_batch(pool, [event(match, offset) for offset, match in enumerate(matches)])

    assert alert_ids(aggregation.ready) == [repeated.alert.alert_id]
    assert [letter.reason for letter in aggregation.dead_letters] == [f"client_id: no such client {unknown.client_id}"]



async def test_an_alert_matched_again_in_a_batch_by_other_rules_is_notified_once_with_the_first_rules(pool):
    # As recorded one by one: the first match inserts the row, the later one finds it. (The client
    # changed its rules between the two matches of an alert sent twice.)
    client = await insert_client(pool)
    first = matched(client)
    again = first.model_copy(update={"rule_ids": [str(uuid.uuid4())]})

    [ready] = await record_first_matches(pool, [first, again])

    assert (ready.alerts, ready.rule_ids) == ([first.alert], first.rule_ids)
    row = await pool.fetchrow("SELECT rule_ids::text[] FROM notifications WHERE notification_id = $1",
                              uuid.UUID(ready.notification_id))
    assert row[0] == first.rule_ids

async def test_a_match_recorded_on_its_own_for_a_client_being_deleted_is_not_recorded(pool):
    # record_one_by_one, as after a refused batch: the client marked since the batch's check.
    from agents.aggregate import record_one_by_one

    client = await insert_client(pool)
    match = matched(client)
    await delete_client_as_the_api_does(pool, client, match.rule_ids)
    aggregation = Aggregation()

    await record_one_by_one(pool, [(event(match, 0), match)], aggregation)

    assert aggregation.ready == [] and aggregation.dead_letters == []
    assert [unknown for _, unknown in aggregation.unknown_clients] == [match]
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", client) == 0

async def test_an_alert_silenced_and_matched_again_in_one_batch_keeps_its_first_fate(pool):
    # Sent again once its silence ended, both matches in one batch (aggregate lagging): the plain
    # path runs first, and used to notify the second before the first was recorded SILENCED.
    client = await insert_client(pool)
    silenced = matched(client).model_copy(update={"silenced_by": str(uuid.uuid4())})
    again = silenced.model_copy(update={"silenced_by": None})

    aggregation = await aggregate_batch(pool, [event(silenced, 0), event(again, 1)])

    assert aggregation.ready == []
    assert [row["status"] for row in await pool.fetch(
        "SELECT status FROM notifications WHERE client_id = $1", client)] == ["SILENCED"]


class TableEvent:
    """An event the group table can file a write under (it keeps a weak reference to it)."""

    def __init__(self, message: SimpleNamespace) -> None:
        self.message = message


async def test_an_alert_grouped_and_matched_again_at_once_in_one_batch_stays_in_its_group(pool, pipeline):
    from test_grouping import grouped
    from test_grouping import matched as match_of

    client = await insert_client(pool)
    in_group = grouped(client, str(uuid.uuid4()), window_s=300)
    # Its rule's window set to 0 meanwhile: the alert sent again is a plain match.
    again = match_of(client, in_group.rule_ids, in_group.alert)

    aggregation = await aggregate_batch(pool, [TableEvent(event(in_group, 0).message),
                                               TableEvent(event(again, 1).message)])

    assert aggregation.ready == []
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE client_id = $1", client) == 0
    assert await pool.fetchval("SELECT count(*) FROM notification_alerts WHERE client_id = $1", client) == 1
    # Closed here, as its window would: the group lists the alert once (and no later test finds it open).
    from agents.close_groups import close_due_groups
    from test_grouping import ALL_PARTITIONS
    closed = await close_due_groups(pool, time.time() + 301, ALL_PARTITIONS)
    assert [ready.alerts for ready in closed if ready.client_id == client] == [[in_group.alert]]


async def spoil_stored_alerts(pool, match: AlertMatched) -> None:
    """Leave the match's notification row unreadable, as an edit by hand could: no alerts at all."""
    await pool.execute("UPDATE notifications SET alerts = '[]' WHERE client_id = $1 AND alert_id = $2",
                       match.client_id, match.alert.alert_id)


async def test_an_unemitted_notification_whose_row_cannot_be_read_is_emitted_from_the_match(pool):
    # Rebuilding it from its row raised, so its batch failed at every redelivery: the partition stopped.
    client = await insert_client(pool)
    left_unemitted = matched(client)
    first_built = await record_first_match(pool, left_unemitted)
    await spoil_stored_alerts(pool, left_unemitted)

    one = await record_first_match(pool, left_unemitted)
    [batched] = await record_first_matches(pool, [left_unemitted])

    for ready in (one, batched):
        assert ready.notification_id == first_built.notification_id
        assert ready.alerts == [left_unemitted.alert]
        assert ready.rule_ids == left_unemitted.rule_ids


async def test_a_stateful_unemitted_notification_whose_row_cannot_be_read_is_emitted_from_the_match(pool):
    client = await insert_client(pool)
    left_unemitted = matched(client, repeat_checked=True)
    first = await aggregate_batch(pool, [event(left_unemitted, 0)])
    [first_built] = first.ready
    await spoil_stored_alerts(pool, left_unemitted)

    again = await aggregate_batch(pool, [event(left_unemitted, 1)])

    assert again.dead_letters == []
    [ready] = again.ready
    assert (ready.notification_id, ready.alerts) == (first_built.notification_id, [left_unemitted.alert])
