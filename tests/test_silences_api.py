"""/api/v1/silences against real Postgres and the real broker: validation, tenancy, expiry, the outbox."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from alerting_app.contracts import SilenceChanged
from kafka_probe import read_topic
from postgres_waits import until_waiting_on_a_lock
from test_api_support import API_LOOP, api, broker, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


def iso(delta_s: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=delta_s)).isoformat()


IN_TEN_MINUTES = iso(600)


def body(**fields) -> dict:
    return {"source": "payments", "ends_at": iso(3600), "comment": "deploying payments",
            "created_by": "ops@example.com", **fields}


async def new_silence(api, tenant, **fields) -> dict:
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(**fields))
    assert reply.status == 201, reply.body
    return reply.body


async def outbox_events(silence_id: str) -> list[SilenceChanged]:
    from alerting_app import db

    pool = await db.pool()
    rows = await pool.fetch("SELECT payload FROM silence_outbox WHERE silence_id = $1 ORDER BY outbox_id",
                            silence_id)
    return [SilenceChanged.model_validate(row["payload"]) for row in rows]


async def test_a_client_silences_a_source_from_now_and_the_change_is_queued(api, tenant):
    reply = await api.call("POST", "/api/v1/silences", tenant.key,
                           body(context_matchers={"region": "eu-west-1", "canary": "*"}))

    assert reply.status == 201, reply.body
    silence = reply.body
    assert silence["client_id"] == tenant.client_id
    assert (silence["severity"], silence["source"], silence["name"]) == ("*", "payments", "*")
    assert silence["context_matchers"] == {"region": "eu-west-1", "canary": "*"}
    assert (silence["state"], silence["version"]) == ("active", 1)
    assert (silence["comment"], silence["created_by"]) == ("deploying payments", "ops@example.com")
    assert (await api.call("GET", f"/api/v1/silences/{silence['silence_id']}", tenant.key)).body == silence
    [event] = await outbox_events(silence["silence_id"])
    assert (event.action, event.version, event.client_id) == ("upsert", 1, tenant.client_id)
    assert event.silence.source == "payments"
    assert event.silence.ends_at == datetime.fromisoformat(silence["ends_at"]).timestamp()


async def test_the_admin_creates_a_silence_for_the_client_it_names(api, tenant):
    reply = await api.call("POST", "/api/v1/silences", api.admin_token, body(client_id=tenant.client_id))
    assert reply.status == 201, reply.body
    assert reply.body["client_id"] == tenant.client_id

    assert (await api.call("POST", "/api/v1/silences", api.admin_token, body())).failing_fields() == {"client_id"}
    unknown = body(client_id="00000000-0000-4000-8000-000000000000")
    assert (await api.call("POST", "/api/v1/silences", api.admin_token, unknown)).failing_fields() == {"client_id"}


async def test_a_client_key_cannot_silence_another_client(api, tenant, other_tenant):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(client_id=other_tenant.client_id))
    assert reply.status == 403


async def test_a_context_matcher_takes_any_value_an_alert_can_carry(api, tenant):
    # An alert's context value may be empty or up to 2,000 characters: a silence must be able to name it.
    matchers = {"url": "u" * 2000, "canary": ""}
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(context_matchers=matchers))
    assert reply.status == 201, reply.body
    assert reply.body["context_matchers"] == matchers


@pytest.mark.parametrize("fields, failing", [
    ({"ends_at": iso(-60), "starts_at": iso(-120)}, {"ends_at"}),
    ({"starts_at": iso(600), "ends_at": iso(300)}, {"ends_at"}),
    ({"starts_at": IN_TEN_MINUTES, "ends_at": IN_TEN_MINUTES}, {"ends_at"}),
    ({"ends_at": "tomorrow"}, {"ends_at"}),
    ({"ends_at": "2030-01-01T00:00:00"}, {"ends_at"}),  # no time zone: ambiguous
    ({"severity": "URGENT"}, {"severity"}),
    ({"source": ""}, {"source"}),
    ({"name": "n" * 201}, {"name"}),
    ({"comment": ""}, {"comment"}),
    ({"comment": "c" * 1001}, {"comment"}),
    ({"created_by": ""}, {"created_by"}),
    ({"context_matchers": {"region": "r" * 2001}}, {"context_matchers.region"}),  # longer than any alert's
    ({"context_matchers": {"region": "eu\u0000"}}, {"context_matchers.region"}),
    ({"context_matchers": ["region"]}, {"context_matchers"}),
    ({"context_matchers": {f"key-{i}": "*" for i in range(21)}}, {"context_matchers"}),  # 20 at most
    ({"muted": True}, {"muted"}),
    ({"source": "*"}, {"severity", "source", "name", "context_matchers"}),
])
async def test_an_invalid_silence_is_refused_with_422_naming_the_field(api, tenant, fields, failing):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(**fields))
    assert reply.failing_fields() == failing


@pytest.mark.parametrize("fields, failing", [
    # Python can parse these, but not carry them to UTC (year 0, year 10000), nor can Postgres.
    ({"starts_at": "0001-01-01T00:00:00+01:00"}, {"starts_at"}),
    ({"ends_at": "9999-12-31T23:59:59-01:00"}, {"ends_at"}),
    # silence.changed carries times as positive unix seconds.
    ({"starts_at": "1970-01-01T00:00:00+00:00"}, {"starts_at"}),
    ({"starts_at": "1969-12-31T23:00:00+00:00"}, {"starts_at"}),
    ({"starts_at": "0001-01-01T00:00:00+00:00"}, {"starts_at"}),
    # The last instant Python holds: asyncpg would store it as infinity and read it back without a zone.
    ({"ends_at": "9999-12-31T23:59:59.999999Z"}, {"ends_at"}),
])
async def test_a_silence_window_outside_storable_times_is_refused_naming_the_field(api, tenant, fields, failing):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(**fields))
    assert reply.failing_fields() == failing


async def test_a_silence_may_start_just_after_1970_and_end_at_the_last_second_of_9999(api, tenant):
    silence = await new_silence(api, tenant, starts_at="1970-01-01T00:00:01+00:00",
                                ends_at="9999-12-31T23:59:59+00:00")
    assert datetime.fromisoformat(silence["starts_at"]).timestamp() == 1
    assert datetime.fromisoformat(silence["ends_at"]) == datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


async def test_a_silence_window_may_be_given_in_unix_seconds_as_json_numbers(api, tenant):
    # docs/api.md: times are ISO 8601 with an offset, or unix seconds; a JSON number is the natural
    # way to send seconds, and it is always seconds (not read as milliseconds past 2e10).
    starts_at = int(datetime.now(timezone.utc).timestamp()) - 60
    silence = await new_silence(api, tenant, starts_at=starts_at, ends_at=starts_at + 3600.5)
    assert datetime.fromisoformat(silence["starts_at"]).timestamp() == starts_at
    assert datetime.fromisoformat(silence["ends_at"]).timestamp() == starts_at + 3600.5
    assert silence["state"] == "active"
    far = await new_silence(api, tenant, source="far", ends_at=253402300799)  # 9999-12-31T23:59:59Z
    assert datetime.fromisoformat(far["ends_at"]) == datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


async def test_unix_seconds_given_as_text_are_seconds_too(api, tenant):
    # pydantic reads numeric text past 2e10 as milliseconds: "4102444800000" (2100-01-01 in ms) was
    # taken, while the same JSON number is refused as out of range.
    in_an_hour = int(datetime.now(timezone.utc).timestamp()) + 3600
    silence = await new_silence(api, tenant, ends_at=str(in_an_hour))
    assert datetime.fromisoformat(silence["ends_at"]).timestamp() == in_an_hour
    for ends_at in ("4102444800000", 4102444800000):
        reply = await api.call("POST", "/api/v1/silences", tenant.key, body(ends_at=ends_at))
        assert reply.failing_fields() == {"ends_at"}


@pytest.mark.parametrize("ends_at", [True, 1e300, -1e15])
async def test_a_unix_time_that_is_no_time_is_refused_naming_the_field(api, tenant, ends_at):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(ends_at=ends_at))
    assert reply.failing_fields() == {"ends_at"}


@pytest.mark.parametrize("starts_at", [True, False])
async def test_a_boolean_start_is_refused_not_read_as_a_second_of_1970(api, tenant, starts_at):
    # true is an int to Python: read as unix seconds it was 1970-01-01T00:00:01Z, a valid start.
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(starts_at=starts_at, ends_at=iso(3600)))
    assert reply.failing_fields() == {"starts_at"}


@pytest.mark.parametrize("fields, message", [
    # Without starts_at the silence starts now: an end in the past is in the past, not "before starts_at".
    ({"ends_at": iso(-60)}, "must be in the future"),
    ({"starts_at": iso(-120), "ends_at": iso(-60)}, "must be in the future"),
    ({"starts_at": iso(600), "ends_at": iso(300)}, "must be after starts_at"),
])
async def test_an_end_in_the_past_or_before_the_start_is_refused_saying_which(api, tenant, fields, message):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, body(**fields))
    assert reply.failing_fields() == {"ends_at"}
    assert reply.body["fields"][0]["message"] == message


async def test_missing_ends_at_comment_and_creator_are_each_named(api, tenant):
    reply = await api.call("POST", "/api/v1/silences", tenant.key, {"source": "payments"})
    assert reply.failing_fields() == {"ends_at", "comment", "created_by"}


async def test_a_client_sees_and_expires_only_its_own_silences(api, tenant, other_tenant):
    silence = await new_silence(api, tenant)
    path = f"/api/v1/silences/{silence['silence_id']}"

    assert (await api.call("GET", path, other_tenant.key)).status == 404
    assert (await api.call("DELETE", path, other_tenant.key)).status == 404
    assert (await api.call("GET", "/api/v1/silences", other_tenant.key)).body["items"] == []
    assert (await api.call("GET", path, tenant.key)).body["state"] == "active"
    assert (await api.call("GET", "/api/v1/silences/not-a-uuid", tenant.key)).status == 404


async def test_delete_expires_the_silence_now_and_keeps_it_readable(api, tenant):
    silence = await new_silence(api, tenant)
    path = f"/api/v1/silences/{silence['silence_id']}"
    before = datetime.now(timezone.utc)

    assert (await api.call("DELETE", path, tenant.key)).status == 204

    expired = (await api.call("GET", path, tenant.key)).body
    assert (expired["state"], expired["version"]) == ("expired", 2)
    assert datetime.fromisoformat(expired["ends_at"]) >= before - timedelta(seconds=1)
    assert datetime.fromisoformat(expired["ends_at"]) < datetime.fromisoformat(silence["ends_at"])
    assert expired["starts_at"] == silence["starts_at"]
    # Expiring again changes nothing and announces nothing.
    assert (await api.call("DELETE", path, tenant.key)).status == 204
    assert (await api.call("GET", path, tenant.key)).body == expired
    events = await outbox_events(silence["silence_id"])
    assert [(e.action, e.version) for e in events] == [("upsert", 1), ("upsert", 2)]
    assert events[1].silence.ends_at == datetime.fromisoformat(expired["ends_at"]).timestamp()


async def test_a_silence_expired_while_its_expiry_waited_is_not_expired_again(api, tenant):
    """Two DELETEs at once: the one whose transaction began first, waiting on the other's lock,
    found the silence ending at the other's now(), after its own: it expired it again, a version
    and an event more, ending earlier. Here the other expiry is made holding the silence's row
    lock, once the request waits on it: it lands after the waiting request's transaction began."""
    import asyncio

    from alerting_app import db

    silence = await new_silence(api, tenant)
    path = f"/api/v1/silences/{silence['silence_id']}"
    pool = await db.pool()
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        # Its own UPDATE below is not held up by its own lock; the request's is (wherever the
        # request takes the row: web/silences.py locks it before expiring it, for If-Match).
        await other.execute("SELECT 1 FROM silences WHERE silence_id = $1 FOR UPDATE", silence["silence_id"])
        expiring = asyncio.ensure_future(api.call("DELETE", path, tenant.key))
        await until_waiting_on_a_lock(pool, query_like="%silences%", unless_done=expiring)
        await other.execute("UPDATE silences SET starts_at = least(starts_at, clock_timestamp()),"
                            " ends_at = clock_timestamp(), version = version + 1 WHERE silence_id = $1",
                            silence["silence_id"])
        ended_at = await other.fetchval("SELECT ends_at FROM silences WHERE silence_id = $1", silence["silence_id"])
        await transaction.commit()
    assert (await expiring).status == 204

    expired = (await api.call("GET", path, tenant.key)).body
    assert (expired["state"], expired["version"]) == ("expired", 2)
    assert datetime.fromisoformat(expired["ends_at"]) == ended_at
    assert [event.version for event in await outbox_events(silence["silence_id"])] == [1]


async def test_a_pending_silence_expired_before_it_starts_never_becomes_active(api, tenant):
    silence = await new_silence(api, tenant, starts_at=iso(600), ends_at=iso(1200))
    assert silence["state"] == "pending"
    path = f"/api/v1/silences/{silence['silence_id']}"

    assert (await api.call("DELETE", path, tenant.key)).status == 204

    expired = (await api.call("GET", path, tenant.key)).body
    assert expired["state"] == "expired"
    assert expired["starts_at"] == expired["ends_at"]
    [_, event] = await outbox_events(silence["silence_id"])
    assert event.silence.starts_at == event.silence.ends_at


async def test_the_list_filters_by_state_and_pages_with_a_cursor(api, tenant):
    active = [await new_silence(api, tenant, name=f"n{n}") for n in range(3)]
    pending = await new_silence(api, tenant, starts_at=iso(600), ends_at=iso(1200))
    expired = await new_silence(api, tenant, name="gone")
    assert (await api.call("DELETE", f"/api/v1/silences/{expired['silence_id']}", tenant.key)).status == 204

    async def ids(state: str | None = None, limit: int = 2) -> list[str]:
        found, cursor = [], None
        while True:
            params = {"limit": str(limit), **({"state": state} if state else {}),
                      **({"cursor": cursor} if cursor else {})}
            reply = await api.call("GET", "/api/v1/silences", tenant.key, params=params)
            assert reply.status == 200, reply.body
            found += [item["silence_id"] for item in reply.body["items"]]
            assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
            cursor = reply.body["next_cursor"]
            if cursor is None:
                return found

    assert await ids("active") == [s["silence_id"] for s in active]
    assert await ids("pending") == [pending["silence_id"]]
    assert await ids("expired") == [expired["silence_id"]]
    assert len(await ids()) == 5
    assert (await api.call("GET", "/api/v1/silences", tenant.key, params={"state": "muted"})).failing_fields() == {
        "state"}


async def test_the_relay_publishes_silence_changes_to_silence_changed(api, tenant, broker):
    from agents.rule_outbox import relay_pending
    from alerting_app import db

    silence = await new_silence(api, tenant)
    assert (await api.call("DELETE", f"/api/v1/silences/{silence['silence_id']}", tenant.key)).status == 204
    written = await outbox_events(silence["silence_id"])

    pool = await db.pool()
    while await relay_pending(pool, batch_size=1):
        pass

    assert await outbox_events(silence["silence_id"]) == []
    published = [SilenceChanged.model_validate_json(value)
                 for key, value in await read_topic(broker, "silence.changed")
                 if key == silence["silence_id"].encode()]
    assert published == written


async def test_deleting_a_client_announces_the_deletion_of_its_silences(api):
    doomed = await api.new_tenant("Doomed")
    silence = await new_silence(api, doomed)

    reply = await api.call("DELETE", f"/api/v1/clients/{doomed.client_id}", api.admin_token)

    assert reply.status == 204
    events = await outbox_events(silence["silence_id"])
    assert [(e.action, e.version) for e in events] == [("upsert", 1), ("delete", 2)]


async def test_each_worker_reports_the_silences_it_holds_to_the_admin_only(api, tenant):
    reply = await api.call("GET", "/api/v1/worker/silences", api.admin_token)
    assert reply.status == 200
    assert set(reply.body) == {"silences", "digest", "versions", "deleted_versions"}
    assert (await api.call("GET", "/api/v1/worker/silences", tenant.key)).status == 403


async def test_republishing_queues_every_silence_at_its_current_version(api, tenant):
    from agents.rule_outbox import republish_all_silences
    from alerting_app import db

    silence = await new_silence(api, tenant)
    assert (await api.call("DELETE", f"/api/v1/silences/{silence['silence_id']}", tenant.key)).status == 204
    expired = (await api.call("GET", f"/api/v1/silences/{silence['silence_id']}", tenant.key)).body
    pool = await db.pool()
    await pool.execute("DELETE FROM silence_outbox")

    assert await republish_all_silences(pool) >= 1

    [event] = await outbox_events(silence["silence_id"])
    assert (event.action, event.version) == ("upsert", 2)
    assert event.silence.ends_at == datetime.fromisoformat(expired["ends_at"]).timestamp()
