"""Notification retention (agents/retention.py): what is old and settled goes, with its deliveries and
memberships; nothing still in the pipeline's hands does. Against the real Postgres."""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import uuid

import asyncpg
import pytest
import pytest_asyncio

from agents.retention import RETENTION_INTERVAL_S, forget_rule_deletions, prune_notifications, prune_silences
from agents.rule_outbox import RULE_OUTBOX, SILENCE_OUTBOX, Outbox, queue_current_rules, relay_pending, republish_rules
from alerting_app import metrics
from alerting_app.contracts import RuleChanged, SilenceChanged
from alerting_app.matching import RuleIndex
from alerting_app.silencing import SilenceIndex, silence_of_row
from alerting_app.settings import ConfigurationError, load_settings
from broker_front import OutageFront
from kafka_probe import read_topic
from private_brokers import app_sending_behind
from test_agent_support import AGENT_LOOP, insert_client, pipeline, pool  # noqa: F401  (fixtures)
from test_outbox_ordering import own_pool, terminate_the_relays_session  # noqa: F401  (fixture)

DAY_S = 86_400.0


async def notification(pool, client_id: str, *, age_days: float, status: str = "SENT", emitted: bool = True,
                       deliveries: int = 1, members: int = 0) -> str:
    """A notifications row `age_days` old, with delivery rows and group memberships pointing at it."""
    notification_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status, emitted,"
        " created_at) VALUES ($1, $2, $3, '[]', '{}', $4, $5, now() - make_interval(secs => $6))",
        notification_id, client_id, f"alert-{notification_id}", status, emitted, age_days * DAY_S)
    for _ in range(deliveries):
        await pool.execute(
            "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts)"
            " VALUES ($1, $2, 'webhook', $3, 1)",
            notification_id, str(uuid.uuid4()), "PENDING" if status == "PENDING" else "SENT")
    for n in range(members):
        await member(pool, client_id, notification_id, f"member-{n}-{notification_id}")
    return notification_id


@pytest_asyncio.fixture(loop_scope="session")
async def client(pool):
    """A client whose rows go with it after the test. Its PENDING deliveries are due, to endpoints
    that do not exist, in notifications no contract would carry: left behind, any later sweep of
    the session (tests/test_agent_deliver.py, ...) would lease them, and fail on them."""
    client_id = await insert_client(pool)
    yield client_id
    await pool.execute("DELETE FROM clients WHERE client_id = $1", client_id)  # cascades to all of them


async def member(pool, client_id: str, notification_id: str, alert_id: str) -> None:
    await pool.execute("INSERT INTO notification_alerts (client_id, alert_id, notification_id) VALUES ($1, $2, $3)",
                       client_id, alert_id, notification_id)


async def left_of(pool, client_id: str) -> tuple[set, int, set]:
    """The client's notification ids, how many delivery rows, and the notification ids of its memberships."""
    notifications = {row[0] for row in await pool.fetch(
        "SELECT notification_id::text FROM notifications WHERE client_id = $1", client_id)}
    deliveries = await pool.fetchval(
        "SELECT count(*) FROM deliveries d JOIN notifications n USING (notification_id) WHERE n.client_id = $1",
        client_id)
    members = {row[0] for row in await pool.fetch(
        "SELECT notification_id::text FROM notification_alerts WHERE client_id = $1", client_id)}
    return notifications, deliveries, members


@AGENT_LOOP
async def test_old_settled_notifications_go_with_their_deliveries_and_memberships(pool, client):
    old = [await notification(pool, client, age_days=31, status=status, members=2)
           for status in ("SENT", "FAILED", "SUPPRESSED", "SILENCED")]
    recent = await notification(pool, client, age_days=29, members=2)
    before = metrics.notifications_pruned._value.get()

    pruned = await prune_notifications(pool, 30 * DAY_S)

    assert pruned >= len(old)  # other tests' old rows may go too
    assert metrics.notifications_pruned._value.get() - before == pruned
    assert await left_of(pool, client) == ({recent}, 1, {recent})
    orphans = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE notification_id = ANY($1::uuid[])", old)
    assert orphans == 0


@AGENT_LOOP
async def test_what_the_pipeline_still_holds_is_kept_however_old(pool, client):
    pending = await notification(pool, client, age_days=40, status="PENDING")  # deliveries still to make
    unemitted = await notification(pool, client, age_days=40, status="SENT", emitted=False)
    # A group still open: its members are recorded, its notification row does not exist yet.
    open_group = str(uuid.uuid4())
    await member(pool, client, open_group, "in-an-open-group")

    # Settled, yet with a delivery still PENDING (opened for it after it settled): kept too.
    settled_in_use = await notification(pool, client, age_days=40, status="SENT")
    await pool.execute("UPDATE deliveries SET status = 'PENDING' WHERE notification_id = $1", settled_in_use)

    await prune_notifications(pool, 30 * DAY_S)

    assert await left_of(pool, client) == ({pending, unemitted, settled_in_use}, 3, {open_group})


@AGENT_LOOP
async def test_a_pending_notification_whose_deliveries_are_not_opened_yet_is_kept_however_old(pool, client):
    # Emitted, but the deliver stage has not opened its deliveries yet (a backlog, the stage down),
    # or has settled them all and not yet the notification: no PENDING delivery protects it, only
    # its own status.
    waiting = await notification(pool, client, age_days=40, status="PENDING", deliveries=0)

    await prune_notifications(pool, 30 * DAY_S)

    assert await left_of(pool, client) == ({waiting}, 0, set())


@AGENT_LOOP
async def test_workers_finishing_a_client_deletion_at_once_share_it_and_leave_nothing(pool):
    # Every aggregate worker runs the round: two at once take different batches (SKIP LOCKED), and
    # the second to delete the client's row finds it gone. What the pipeline still held goes too
    # (the client's endpoints are gone: nothing will deliver it), as does a group still open.
    from agents.retention import finish_client_deletions

    leaving, staying = await insert_client(pool), await insert_client(pool)
    for _ in range(30):
        await notification(pool, leaving, age_days=0, deliveries=2, members=1)
    await notification(pool, leaving, age_days=0, status="PENDING")
    await notification(pool, leaving, age_days=0, emitted=False)
    await member(pool, leaving, str(uuid.uuid4()), "in-an-open-group")
    kept = await notification(pool, staying, age_days=0)
    await pool.execute("UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id = $1",
                       leaving)

    deleted = await asyncio.gather(finish_client_deletions(pool, batch_size=4),
                                   finish_client_deletions(pool, batch_size=4))

    assert sum(deleted) >= 32  # a client left being deleted by another test may go too
    assert await left_of(pool, leaving) == (set(), 0, set())
    assert await pool.fetchval("SELECT count(*) FROM clients WHERE client_id = $1", leaving) == 0
    assert await left_of(pool, staying) == ({kept}, 1, set())
    await pool.execute("DELETE FROM clients WHERE client_id = $1", staying)


@AGENT_LOOP
async def test_a_backlog_goes_in_batches_until_none_is_left(pool, client):
    for _ in range(7):
        await notification(pool, client, age_days=100)

    assert await prune_notifications(pool, 30 * DAY_S, batch_size=2) >= 7

    assert await left_of(pool, client) == (set(), 0, set())


@AGENT_LOOP
async def test_a_row_another_transaction_holds_is_skipped_not_waited_for(pool, client, services):
    held = await notification(pool, client, age_days=31)
    free = await notification(pool, client, age_days=31)
    other = await asyncpg.connect(services.database_url)
    try:
        async with other.transaction():
            # As the recorder holds a notification it settles (records._LOCK_FOR_SETTLE).
            await other.execute("SELECT 1 FROM notifications WHERE notification_id = $1 FOR UPDATE", held)
            await asyncio.wait_for(prune_notifications(pool, 30 * DAY_S), timeout=30)
            assert (await left_of(pool, client))[0] == {held}
    finally:
        await other.close()
    assert free not in (await left_of(pool, client))[0]

    await prune_notifications(pool, 30 * DAY_S)

    assert await left_of(pool, client) == (set(), 0, set())


async def silence(pool, client_id: str, *, ended_days_ago: float, version: int = 1) -> str:
    silence_id = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO silences (silence_id, client_id, severity, source, name, starts_at, ends_at, comment,"
        " created_by, version) VALUES ($1, $2, 'HIGH', 'payments', '*', now() - make_interval(secs => $3),"
        " now() - make_interval(secs => $4), 'deploy', 'test', $5)",
        silence_id, client_id, (ended_days_ago + 1) * DAY_S, ended_days_ago * DAY_S, version)
    return silence_id


@AGENT_LOOP
async def test_silences_ended_long_ago_are_deleted_and_their_deletion_announced_to_the_replicas(pool):
    client = await insert_client(pool)
    old = await silence(pool, client, ended_days_ago=6, version=3)
    recent = await silence(pool, client, ended_days_ago=4)
    active = await silence(pool, client, ended_days_ago=-1)  # ends tomorrow
    # A replica holding all three, as every worker does.
    rows = await pool.fetch("SELECT * FROM silences WHERE client_id = $1", client)
    index = SilenceIndex(SilenceChanged.upsert(silence_of_row(row)) for row in rows)

    assert await prune_silences(pool, 5 * DAY_S) >= 1

    kept = {row[0] for row in await pool.fetch("SELECT silence_id::text FROM silences WHERE client_id = $1", client)}
    assert kept == {recent, active}
    [queued] = await pool.fetch("SELECT payload FROM silence_outbox WHERE silence_id = $1", old)
    event = SilenceChanged.model_validate(queued["payload"])
    assert (event.action, event.version, event.client_id) == ("delete", 4, client)
    assert index.apply(event) and set(index.versions()) == {recent, active}


@AGENT_LOOP
async def test_remembered_silence_deletions_are_forgotten_after_the_silence_retention_behind_a_tombstone(pool):
    old, recent, unrelayed = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    await pool.execute("INSERT INTO deleted_silences (silence_id, client_id, version, deleted_at)"
                       " VALUES ($1, $4, 2, now() - interval '6 days'), ($2, $4, 2, now() - interval '4 days'),"
                       " ($3, $4, 2, now() - interval '6 days')",
                       old, recent, unrelayed, str(uuid.uuid4()))
    # Its delete event not relayed yet (the broker away all that time): the tombstone must come after it.
    await pool.execute("INSERT INTO silence_outbox (silence_id, payload) VALUES ($1, '{}')", unrelayed)
    try:
        await prune_silences(pool, 5 * DAY_S)

        remembered = {row[0] for row in await pool.fetch(
            "SELECT silence_id::text FROM deleted_silences WHERE silence_id = ANY($1::uuid[])", [old, recent, unrelayed])}
        assert remembered == {recent, unrelayed}
        assert await queued(pool, SILENCE_OUTBOX, [old, recent, unrelayed]) == [(unrelayed, {}), (old, None)]
    finally:
        # Nothing left for a later test's retention to forget, with a null for the shared topic.
        await pool.execute("DELETE FROM deleted_silences WHERE silence_id = ANY($1::uuid[])", [old, recent, unrelayed])
        await pool.execute("DELETE FROM silence_outbox WHERE silence_id = ANY($1::uuid[])", [old, unrelayed])


@AGENT_LOOP
async def test_a_deletion_relayed_late_is_forgotten_only_the_retention_after_it_was_relayed(pool):
    """Its tombstone must not follow the delete at once: a worker stopped before the relay, and
    whose store is trusted for the retention, could find both compacted away (tables/rule_replica.py)."""
    late = await remembered_rule_deletion(pool, days_ago=31, in_outbox=True)
    try:
        await forget_rule_deletions(pool, 30 * DAY_S)
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", late)  # relayed at last

        await forget_rule_deletions(pool, 30 * DAY_S)

        assert await remembered_rules(pool, [late]) == {late}
        assert await queued(pool, RULE_OUTBOX, [late]) == []
        age_s = await pool.fetchval("SELECT extract(epoch FROM now() - deleted_at) FROM deleted_rules"
                                    " WHERE rule_id = $1", late)
        assert age_s < 60, "dated when it was last seen waiting to be relayed"
    finally:
        await pool.execute("DELETE FROM deleted_rules WHERE rule_id = $1", late)
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", late)


@AGENT_LOOP
async def test_a_deletion_a_republish_is_queuing_is_left_for_the_next_round(pool):
    """The republish's delete must reach the outbox before the tombstone, or the delete would be the
    key's last record on the topic again."""
    deleted = await remembered_rule_deletion(pool, days_ago=31)
    try:
        async with pool.acquire() as conn, conn.transaction():
            assert await queue_current_rules(conn, [deleted]) == 1
            async with asyncio.timeout(30):  # a retention waiting for this transaction would wait for ever
                await forget_rule_deletions(pool, 30 * DAY_S)
            assert await remembered_rules(pool, [deleted]) == {deleted}, "forgotten while the republish held it"
        assert await remembered_rules(pool, [deleted]) == {deleted}
        # The republished delete is still to be relayed: the tombstone waits for that too.
        await forget_rule_deletions(pool, 30 * DAY_S)
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", deleted)  # relayed
        # Dated again when it was seen waiting to be relayed; the retention has passed since.
        await pool.execute("UPDATE deleted_rules SET deleted_at = now() - interval '31 days' WHERE rule_id = $1",
                           deleted)
        await forget_rule_deletions(pool, 30 * DAY_S)
        assert await remembered_rules(pool, [deleted]) == set()
        assert await queued(pool, RULE_OUTBOX, [deleted]) == [(deleted, None)]
    finally:
        await pool.execute("DELETE FROM deleted_rules WHERE rule_id = $1", deleted)
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", deleted)


@AGENT_LOOP
async def test_the_relay_sends_a_forgotten_deletions_tombstone_as_a_null_value(pipeline, own_pool, services):
    """On a database of its own, so that the relay sends only this test's rows, to a topic of its own."""
    from alerting_app.app import app

    rule_id = await remembered_rule_deletion(own_pool, days_ago=31)
    topic = app.topic(f"rule.changed.test-{uuid.uuid4().hex[:8]}", partitions=1)
    await topic.maybe_declare()
    assert await forget_rule_deletions(own_pool, 30 * DAY_S) == 1

    assert await relay_pending(own_pool, outboxes=(dataclasses.replace(RULE_OUTBOX, topic=topic),)) == 1

    assert await read_topic(services.kafka_bootstrap_servers, topic.get_topic_name()) == [(rule_id.encode(), None)]
    assert await queued(own_pool, RULE_OUTBOX, [rule_id]) == []


@AGENT_LOOP
async def test_a_tombstone_the_broker_refused_while_the_relay_lost_its_session_stays_queued(own_pool, tmp_path):
    """The relay queues each key's current version in place of a batch whose session was lost
    after its sends: a forgotten deletion has none, so its tombstone is kept, not dropped (the
    delete would then stay on the topic for ever). The broker holds the send while the session
    ends, then refuses it (a producer request timeout of a second, as in the dead-letter tests)."""
    from agents import rule_outbox

    rule_id = await remembered_rule_deletion(own_pool, days_ago=31)
    assert await forget_rule_deletions(own_pool, 30 * DAY_S) == 1
    async with app_sending_behind(OutageFront, tmp_path, "tombstone-refused", "rule.changed",
                                  producer_request_timeout=1.0) as (front, topic):
        outbox = dataclasses.replace(RULE_OUTBOX, topic=topic)
        try:
            front.hang()
            relaying = asyncio.ensure_future(rule_outbox.relay_pending(own_pool, outboxes=(outbox,)))
            async with asyncio.timeout(30):
                while not front.held:  # the tombstone at the broker, the relay's lock held
                    await asyncio.sleep(0.01)
            await terminate_the_relays_session(own_pool)
            front.refuse()
            await relaying
        finally:
            front.let_through()

        assert await queued(own_pool, RULE_OUTBOX, [rule_id]) == [(rule_id, None)]
        assert await relay_pending(own_pool, outboxes=(outbox,)) == 1
        assert (rule_id.encode(), None) in await read_topic(front.address, topic.get_topic_name())


async def queued(pool, outbox: Outbox, keys: list[str]) -> list[tuple[str, dict | None]]:
    """(key, payload) of the outbox's rows for these keys, in the order they are relayed; the
    payload of a tombstone is None, as it is relayed."""
    return [(str(row[0]), None if row[2] else row[1]) for row in await pool.fetch(
        f"SELECT {outbox.key_column}, payload, tombstone FROM {outbox.table}"
        f" WHERE {outbox.key_column} = ANY($1::uuid[]) ORDER BY outbox_id", keys)]


@AGENT_LOOP
async def test_a_tombstone_row_holds_the_delete_a_relay_of_an_earlier_release_sends_instead(pool):
    """A relay of a release before migration 009 (a rolling deployment, a rollback) reads the
    outbox's key and payload and sends the payload: it must be the key's delete, which replicas
    ignore by its version, not a JSON null, which they would dead-letter, and compaction keep."""
    rule_id = await remembered_rule_deletion(pool, days_ago=31)
    client_id = await pool.fetchval("SELECT client_id::text FROM deleted_rules WHERE rule_id = $1", rule_id)
    try:
        await forget_rule_deletions(pool, 30 * DAY_S)

        [row] = await pool.fetch("SELECT payload, tombstone FROM rule_outbox WHERE rule_id = $1", rule_id)
        assert row["tombstone"]
        sent_by_an_earlier_relay = json.dumps(row["payload"]).encode()
        event = RuleChanged.model_validate_json(sent_by_an_earlier_relay)
        assert (event.rule_id, event.client_id, event.version, event.action) == (rule_id, client_id, 3, "delete")
        replica = RuleIndex([event.model_copy(update={"version": 3})])
        assert not replica.apply(event), "a replica holding the deletion ignores it"
    finally:
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", rule_id)


async def remembered_rule_deletion(pool, *, days_ago: float, in_outbox: bool = False, in_flight: bool = False) -> str:
    rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
    await pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version, deleted_at)"
                       " VALUES ($1, $2, 3, now() - make_interval(secs => $3))", rule_id, client_id, days_ago * DAY_S)
    if in_outbox:  # its delete event not relayed yet (the broker away all that time)
        await pool.execute("INSERT INTO rule_outbox (rule_id, payload) VALUES ($1, '{}')", rule_id)
    if in_flight:  # in a batch of a relay that lost its lock, and died, with its sends on their way
        await pool.execute("INSERT INTO outbox_in_flight (outbox, keys) VALUES ('rule_outbox', ARRAY[$1::uuid])",
                           rule_id)
    return rule_id


async def remembered_rules(pool, rule_ids: list[str]) -> set[str]:
    return {row[0] for row in await pool.fetch(
        "SELECT rule_id::text FROM deleted_rules WHERE rule_id = ANY($1::uuid[])", rule_ids)}


@AGENT_LOOP
async def test_rule_deletions_older_than_the_retention_are_forgotten_once_relayed(pool):
    old = await remembered_rule_deletion(pool, days_ago=31)
    young = await remembered_rule_deletion(pool, days_ago=29)
    unrelayed = await remembered_rule_deletion(pool, days_ago=31, in_outbox=True)
    # To be queued again by the next relay once the dead relay's sends cannot land any more.
    in_flight = await remembered_rule_deletion(pool, days_ago=31, in_flight=True)
    try:
        assert await forget_rule_deletions(pool, 30 * DAY_S, batch_size=1) >= 1

        assert await remembered_rules(pool, [old, young, unrelayed, in_flight]) == {young, unrelayed, in_flight}
        # A tombstone (no payload) queued behind the forgotten deletion's delete, and only for it.
        assert await queued(pool, RULE_OUTBOX, [old, young, unrelayed, in_flight]) == [(unrelayed, {}), (old, None)]
        # Republishing now carries only the young deletion: the old one is gone from Postgres.
        await republish_rules(pool, [old, young])
        queued_now = await queued(pool, RULE_OUTBOX, [old, young])
        assert [(rule_id, payload and payload["action"]) for rule_id, payload in queued_now] == [
            (old, None), (young, "delete")]
    finally:
        await pool.execute("DELETE FROM deleted_rules WHERE rule_id = ANY($1::uuid[])", [young, unrelayed, in_flight])
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = ANY($1::uuid[])", [old, young, unrelayed])
        await pool.execute("DELETE FROM outbox_in_flight WHERE $1::uuid = ANY(keys)", in_flight)


@pytest.mark.parametrize("days", ["0.5", "-1", "3651", "a month"])
def test_a_rule_deletion_retention_under_a_day_or_absurd_is_refused_by_name(monkeypatch, days):
    monkeypatch.setenv("DELETED_RULE_RETENTION_DAYS", days)

    with pytest.raises(ConfigurationError, match="DELETED_RULE_RETENTION_DAYS"):
        load_settings()


@pytest.mark.parametrize("days", ["0", "1", "30"])
def test_a_rule_deletion_retention_of_0_or_a_day_or_more_is_accepted(monkeypatch, days):
    monkeypatch.setenv("DELETED_RULE_RETENTION_DAYS", days)

    assert load_settings().deleted_rule_retention_days == float(days)


@pytest.mark.parametrize("days", ["0.5", "1.9", "-1", "3651"])
def test_a_retention_shorter_than_two_days_or_absurd_is_refused_by_name(monkeypatch, days):
    monkeypatch.setenv("NOTIFICATION_RETENTION_DAYS", days)

    with pytest.raises(ConfigurationError, match="NOTIFICATION_RETENTION_DAYS"):
        load_settings()


@pytest.mark.parametrize("days", ["-1", "3651", "a week"])
def test_a_silence_retention_out_of_range_is_refused_by_name(monkeypatch, days):
    monkeypatch.setenv("SILENCE_RETENTION_DAYS", days)

    with pytest.raises(ConfigurationError, match="SILENCE_RETENTION_DAYS"):
        load_settings()


@pytest.mark.parametrize("days", ["0", "2", "30"])
def test_no_retention_or_two_days_or_more_is_accepted(monkeypatch, days):
    monkeypatch.setenv("NOTIFICATION_RETENTION_DAYS", days)

    assert load_settings().notification_retention_days == float(days)


async def forgotten_relayed_before(pool) -> float | None:
    return await pool.fetchval("SELECT extract(epoch FROM relayed_before)::float8 FROM forgotten_deletions"
                               " WHERE deletions = 'deleted_rules'")


async def dated(pool, rule_id: str) -> float:
    return await pool.fetchval("SELECT extract(epoch FROM deleted_at)::float8 FROM deleted_rules WHERE rule_id = $1",
                               rule_id)


@AGENT_LOOP
async def test_forgetting_records_a_round_after_the_newest_deletion_it_forgot_and_never_lowers_it(pool):
    """Every worker trusts its rule store only if it read the topic past that time (tables/rule_replica.py
    `outdated`), whatever DELETED_RULE_RETENTION_DAYS each has: a retention with a shorter one forgets
    younger deletions, one with a longer one older deletions, which must not lower it."""
    await pool.execute("DELETE FROM forgotten_deletions")
    old, older, oldest = [await remembered_rule_deletion(pool, days_ago=days) for days in (3, 5, 40)]
    # Each found relayed by the round that dated it (migrations/013).
    await pool.execute("UPDATE deleted_rules SET relayed_by = deleted_at WHERE rule_id = ANY($1::uuid[])",
                       [old, older, oldest])
    deleted_at = {rule_id: await dated(pool, rule_id) for rule_id in (old, older, oldest)}
    try:
        await pool.execute("DELETE FROM deleted_rules WHERE rule_id = $1", oldest)  # not there yet
        assert await forget_rule_deletions(pool, 4 * DAY_S) >= 1
        assert await forgotten_relayed_before(pool) == pytest.approx(deleted_at[older] + RETENTION_INTERVAL_S)

        assert await forget_rule_deletions(pool, 2 * DAY_S) >= 1
        assert await forgotten_relayed_before(pool) == pytest.approx(deleted_at[old] + RETENTION_INTERVAL_S)

        await pool.execute("INSERT INTO deleted_rules (rule_id, client_id, version, deleted_at, relayed_by)"
                           " VALUES ($1, $2, 3, to_timestamp($3), to_timestamp($3))", oldest, str(uuid.uuid4()),
                           deleted_at[oldest])
        assert await forget_rule_deletions(pool, 30 * DAY_S) >= 1
        assert await remembered_rules(pool, [oldest]) == set()
        assert await forgotten_relayed_before(pool) == pytest.approx(deleted_at[old] + RETENTION_INTERVAL_S)
    finally:
        await pool.execute("DELETE FROM deleted_rules WHERE rule_id = ANY($1::uuid[])", [old, older, oldest])
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = ANY($1::uuid[])", [old, older, oldest])


@AGENT_LOOP
async def test_a_deletion_relayed_while_no_round_ran_is_recorded_relayed_only_as_of_the_round_that_found_it(pool):
    """Dated 2 days ago by a round that found it waiting to be relayed, and found relayed only by this
    round: none ran in between (the aggregate workers down, as was the relay), so Postgres knows only
    that it was relayed before now. Recorded as relayed within a round of its date, a store that read
    the topic before its relay, a day ago say, would be trusted without it."""
    await pool.execute("DELETE FROM forgotten_deletions")
    waited = await remembered_rule_deletion(pool, days_ago=2)
    try:
        round_began = await pool.fetchval("SELECT extract(epoch FROM now())::float8")
        assert await forget_rule_deletions(pool, 1 * DAY_S) >= 1
        assert await remembered_rules(pool, [waited]) == set()
        assert await forgotten_relayed_before(pool) >= round_began
    finally:
        await pool.execute("DELETE FROM rule_outbox WHERE rule_id = $1", waited)



@AGENT_LOOP
async def test_a_failed_round_of_deleting_clients_history_says_it_is_tried_again_in_10_seconds(pool, caplog):
    """Its timer runs every CLIENT_DELETION_INTERVAL_S, not every RETENTION_INTERVAL_S as the others.
    Here the client's row cannot go: a table (the test's) refers to it without cascading."""
    from agents.retention import delete_clients_history

    stuck = await insert_client(pool)
    holder = f"holds_a_client_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE TABLE {holder} (client_id uuid REFERENCES clients)")
    try:
        await pool.execute(f"INSERT INTO {holder} VALUES ($1)", stuck)
        await pool.execute("UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id = $1",
                           stuck)

        await inspect.unwrap(delete_clients_history)()  # one round of the timer: its body, without its loop

        assert "deleting the history of deleted clients failed; trying again in 10s" in caplog.text
    finally:
        await pool.execute(f"DROP TABLE {holder}")
        await pool.execute("DELETE FROM clients WHERE client_id = $1", stuck)
