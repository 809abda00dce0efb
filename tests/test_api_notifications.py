"""/api/v1/notifications: what each client was notified of, newest first, with its deliveries.

Notifications are written by the aggregate and deliver stages; here they are inserted as those
stages store them.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def store_notification(client_id: str, rule_id: str, alert_id: str, status: str = "PENDING",
                             deliveries: tuple[tuple[str, str, str, int, str | None], ...] = (), *,
                             created_at: datetime | None = None, truncated_alerts: int = 0,
                             group_rule_id: str | None = None) -> str:
    from alerting_app import db

    notification_id = str(uuid.uuid4())
    alert = {"alert_id": alert_id, "schema_version": 1, "event_ts": 1.0, "severity": "HIGH",
             "source": "payments", "name": "CheckoutLatency", "context": {}}
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status,"
            " created_at, truncated_alerts, group_rule_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, coalesce($7, now()), $8, $9)",
            notification_id, client_id, alert_id, [alert], [rule_id], status, created_at, truncated_alerts,
            group_rule_id,
        )
        for endpoint_id, channel, delivery_status, attempts, last_error in deliveries:
            await conn.execute(
                "INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts, last_error)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                notification_id, endpoint_id, channel, delivery_status, attempts, last_error,
            )
    return notification_id


async def test_a_notification_is_listed_with_each_endpoints_delivery(api, tenant):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    notification_id = await store_notification(
        tenant.client_id, rule["rule_id"], "alert-1", "FAILED",
        ((hook["endpoint_id"], "webhook", "FAILED", 3, "HTTP 502"), (mail["endpoint_id"], "email", "UNSUPPORTED", 0, None)),
    )
    reply = await api.call("GET", "/api/v1/notifications", tenant.key)
    assert reply.status == 200
    [listed] = reply.body["items"]
    assert (listed["notification_id"], listed["alert_id"], listed["status"]) == (notification_id, "alert-1", "FAILED")
    assert listed["rule_ids"] == [rule["rule_id"]]
    assert listed["alerts"][0]["alert_id"] == "alert-1"
    shown = ("endpoint_id", "channel", "status", "attempts", "last_error")
    deliveries = {d["endpoint_id"]: {name: d[name] for name in shown} for d in listed["deliveries"]}
    assert deliveries == {
        hook["endpoint_id"]: {"endpoint_id": hook["endpoint_id"], "channel": "webhook", "status": "FAILED",
                              "attempts": 3, "last_error": "HTTP 502"},
        mail["endpoint_id"]: {"endpoint_id": mail["endpoint_id"], "channel": "email", "status": "UNSUPPORTED",
                              "attempts": 0, "last_error": None},
    }
    single = await api.call("GET", f"/api/v1/notifications/{notification_id}", tenant.key)
    assert single.body == listed


async def test_a_groups_members_a_silence_left_out_at_close_are_listed_with_it(api, tenant):
    """As the closer stores them (migrations/022); a notification not of a group leaves none out,
    and a group closed by a release before 022 does not know (null)."""
    from alerting_app import db

    rule = await api.new_rule(tenant)
    silence_id = str(uuid.uuid4())
    group = await store_notification(tenant.client_id, rule["rule_id"], "a-0", group_rule_id=rule["rule_id"])
    await (await db.pool()).execute(
        "UPDATE notifications SET silenced_alerts = $2, truncated_silenced_alerts = 3 WHERE notification_id = $1",
        group, [{"alert_id": "c-1", "silence_id": silence_id}])
    older_group = await store_notification(tenant.client_id, rule["rule_id"], "b-0", group_rule_id=rule["rule_id"])
    at_once = await store_notification(tenant.client_id, rule["rule_id"], "d-0")

    reply = await api.call("GET", "/api/v1/notifications", tenant.key)
    shown = {n["notification_id"]: (n["silenced_alerts"], n["truncated_silenced_alerts"]) for n in reply.body["items"]}
    assert shown == {group: ([{"alert_id": "c-1", "silence_id": silence_id}], 3), older_group: (None, None),
                     at_once: ([], 0)}
    single = await api.call("GET", f"/api/v1/notifications/{group}", tenant.key)
    assert (single.body["silenced_alerts"], single.body["truncated_silenced_alerts"]) == shown[group]


async def test_notifications_are_filtered_by_status(api, tenant):
    rule = await api.new_rule(tenant)
    sent = await store_notification(tenant.client_id, rule["rule_id"], "a-sent", "SENT")
    await store_notification(tenant.client_id, rule["rule_id"], "a-failed", "FAILED")
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"status": "SENT"})
    assert [n["notification_id"] for n in reply.body["items"]] == [sent]


async def test_the_admin_filters_notifications_by_client(api, tenant, other_tenant):
    mine = await store_notification(tenant.client_id, (await api.new_rule(tenant))["rule_id"], "a-1")
    await store_notification(other_tenant.client_id, (await api.new_rule(other_tenant))["rule_id"], "a-1")
    reply = await api.call("GET", "/api/v1/notifications", api.admin_token, params={"client_id": tenant.client_id})
    assert [n["notification_id"] for n in reply.body["items"]] == [mine]


async def test_notifications_are_paged_newest_first(api, tenant):
    rule = await api.new_rule(tenant)
    stored = [await store_notification(tenant.client_id, rule["rule_id"], f"alert-{i}") for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/notifications", tenant.key, params=params)
        seen += [n["notification_id"] for n in reply.body["items"]]
        assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(stored))


async def test_a_page_stops_at_its_bytes_of_alerts_and_the_next_page_goes_on(api, tenant, monkeypatch):
    # A notification may list a hundred alerts of ~150 KB each: a page of 500 is bounded by size too.
    from alerting_app import db
    import web.notifications

    rule = await api.new_rule(tenant)
    stored = [await store_notification(tenant.client_id, rule["rule_id"], f"sized-{i}") for i in range(5)]
    one = await (await db.pool()).fetchval("SELECT octet_length(alerts::text) FROM notifications "
                                           "WHERE notification_id = $1", stored[0])
    monkeypatch.setattr(web.notifications, "PAGE_ALERT_BYTES", int(one * 2.5))  # the third starts within it

    pages = await all_pages(api, tenant.key, limit=100)

    assert [len(page) for page in pages] == [3, 2]
    assert [n for page in pages for n in page] == list(reversed(stored))


async def test_one_notification_larger_than_a_page_is_still_listed(api, tenant, monkeypatch):
    import web.notifications

    rule = await api.new_rule(tenant)
    stored = [await store_notification(tenant.client_id, rule["rule_id"], f"large-{i}") for i in range(2)]
    monkeypatch.setattr(web.notifications, "PAGE_ALERT_BYTES", 1)

    assert await all_pages(api, tenant.key, limit=100) == [[stored[1]], [stored[0]]]


async def test_another_clients_key_sees_none_of_a_clients_notifications(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    notification_id = await store_notification(tenant.client_id, rule["rule_id"], "alert-x")
    assert (await api.call("GET", f"/api/v1/notifications/{notification_id}", other_tenant.key)).status == 404
    assert (await api.call("GET", "/api/v1/notifications", other_tenant.key)).body["items"] == []
    filtered = await api.call("GET", "/api/v1/notifications", other_tenant.key,
                              params={"client_id": tenant.client_id})
    assert filtered.body["items"] == []


@pytest.mark.parametrize("params, field", [
    ({"status": "DONE"}, "status"),
    ({"status": "sent"}, "status"),
    ({"limit": "-1"}, "limit"),
    ({"since": "yesterday"}, "since"),
    ({"since": "2026-11-26T10:00:00"}, "since"),  # no UTC offset: which instant is meant is unknown
    ({"until": "2026-13-01T00:00:00Z"}, "until"),
    ({"since": "2026-11-26T10:00:00Z", "until": "2026-11-26T10:00:00Z"}, "until"),
    ({"since": "2026-11-26T10:00:00Z", "until": "2026-11-26T11:00:00+02:00"}, "until"),
    # Valid ISO 8601, but in UTC year 0 and year 10000, which no datetime (nor Postgres query) holds.
    ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
    ({"until": "9999-12-31T23:59:59-01:00"}, "until"),
    # Unix seconds past year 9999 and before year 1: pydantic took a number past 2e10 as milliseconds,
    # a day of 1978 and of 1968.
    ({"since": "253402300800"}, "since"),
    ({"until": "-62135596801"}, "until"),
])
async def test_bad_notification_filters_are_refused(api, tenant, params, field):
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params=params)
    assert reply.failing_fields() == {field}


async def test_a_time_filter_in_milliseconds_is_refused_saying_it_wants_seconds(api, tenant):
    # The message gave only the calendar's bounds, leaving the sender to work out its unit was wrong.
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"since": "1700000000000"})
    assert reply.body["fields"] == [{"field": "since", "message": (
        "out of range: must lie between years 1 and 9999 in UTC: unix seconds, not milliseconds "
        "(a time in milliseconds is a thousand times too large)")}]


async def test_the_first_and_last_second_of_the_calendar_in_utc_are_valid_filters(api, tenant):
    reply = await api.call("GET", "/api/v1/notifications", tenant.key,
                           params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"})
    assert (reply.status, reply.body["items"]) == (200, [])


async def test_a_time_filter_in_unix_seconds_is_always_read_as_seconds(api, tenant):
    # 20000000001 s is in 2603; pydantic alone read such a number as milliseconds (August 1970),
    # listing what was created since 1970 for a filter meaning "since 2603".
    rule = await api.new_rule(tenant, source="unix-seconds-filter")
    await store_notification(tenant.client_id, rule["rule_id"], "alert-unix-seconds")
    assert await listed_ids(api, tenant.key, since="20000000001") == []
    assert len(await listed_ids(api, tenant.key, until="20000000001")) == 1


# --- statuses, time windows and grouping (issue 5) -----------------------------------------------

STATUSES = ["PENDING", "SENT", "FAILED", "SUPPRESSED", "SILENCED"]
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    return moment.isoformat()


async def listed_ids(api, key: str, **params: str) -> list[str]:
    reply = await api.call("GET", "/api/v1/notifications", key, params=params)
    assert reply.status == 200, reply.body
    return [n["notification_id"] for n in reply.body["items"]]


async def all_pages(api, key: str, limit: int, **params: str) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page_params = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/notifications", key, params=page_params)
        assert reply.status == 200, reply.body
        pages.append([n["notification_id"] for n in reply.body["items"]])
        assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
        cursor = reply.body["next_cursor"]
        if cursor is None:
            return pages


async def test_every_status_is_shown_and_filtered_on(api, tenant):
    rule = await api.new_rule(tenant)
    by_status = {status: await store_notification(tenant.client_id, rule["rule_id"], f"a-{status}", status,
                                                  created_at=T0 + timedelta(minutes=n))
                 for n, status in enumerate(STATUSES)}

    reply = await api.call("GET", "/api/v1/notifications", tenant.key)

    assert [(n["notification_id"], n["status"]) for n in reply.body["items"]] == [
        (by_status[status], status) for status in reversed(STATUSES)]
    for status in STATUSES:
        assert await listed_ids(api, tenant.key, status=status) == [by_status[status]]


async def test_notifications_are_filtered_by_creation_time_since_inclusive_until_exclusive(api, tenant):
    rule = await api.new_rule(tenant)
    hourly = [await store_notification(tenant.client_id, rule["rule_id"], f"a-{hour}",
                                       created_at=T0 + timedelta(hours=hour)) for hour in range(4)]
    newest_first = list(reversed(hourly))

    assert await listed_ids(api, tenant.key, since=iso(T0 + timedelta(hours=1))) == newest_first[:3]
    assert await listed_ids(api, tenant.key, until=iso(T0 + timedelta(hours=2))) == newest_first[2:]
    assert await listed_ids(api, tenant.key, since=iso(T0 + timedelta(hours=1)),
                            until=iso(T0 + timedelta(hours=3))) == [hourly[2], hourly[1]]
    # The same instant written with another UTC offset, and with Z.
    assert await listed_ids(api, tenant.key, since="2026-11-26T13:00:00+02:00") == newest_first[:3]
    assert await listed_ids(api, tenant.key, since="2026-11-26T12:30:00Z") == newest_first[:1]
    assert await listed_ids(api, tenant.key, since=iso(T0 + timedelta(hours=4))) == []


async def test_pages_of_a_filtered_list_together_hold_each_match_once_newest_first(api, tenant):
    rule = await api.new_rule(tenant)
    expected = []
    for n in range(12):
        status = STATUSES[n % 2]  # PENDING and SENT alternately
        # Pairs share a creation time: the cursor must break ties on notification_id.
        created_at = T0 + timedelta(minutes=n // 2)
        notification_id = await store_notification(tenant.client_id, rule["rule_id"], f"a-{n}", status,
                                                    created_at=created_at)
        if status == "SENT" and created_at >= T0 + timedelta(minutes=1):
            expected.append((created_at, notification_id))
    expected.sort(key=lambda row: (-row[0].timestamp(), row[1]))

    pages = await all_pages(api, tenant.key, 2, status="SENT", since=iso(T0 + timedelta(minutes=1)))

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [notification_id for page in pages for notification_id in page] == [n for _, n in expected]
    every = await all_pages(api, tenant.key, 5)
    assert [len(page) for page in every] == [5, 5, 2]
    assert len({notification_id for page in every for notification_id in page}) == 12


async def test_a_grouped_notification_shows_its_group_rule_and_the_alerts_left_out(api, tenant):
    rule = await api.new_rule(tenant, group_window_s=300)
    grouped = await store_notification(tenant.client_id, rule["rule_id"], "a-grouped", truncated_alerts=42,
                                       group_rule_id=rule["rule_id"])
    at_once = await store_notification(tenant.client_id, rule["rule_id"], "a-at-once")

    reply = await api.call("GET", "/api/v1/notifications", tenant.key)
    items = {n["notification_id"]: n for n in reply.body["items"]}

    assert (items[grouped]["truncated_alerts"], items[grouped]["group_rule_id"]) == (42, rule["rule_id"])
    assert (items[at_once]["truncated_alerts"], items[at_once]["group_rule_id"]) == (0, None)
    single = await api.call("GET", f"/api/v1/notifications/{grouped}", tenant.key)
    assert single.body == items[grouped]


# --- ?alert_id=: what became of one alert ----------------------------------------------------------

async def store_members(client_id: str, notification_id: str, *alert_ids: str) -> None:
    """Members of a group, as the aggregate stage records them (migrations/005)."""
    from alerting_app import db

    await (await db.pool()).executemany(
        "INSERT INTO notification_alerts (client_id, alert_id, notification_id) VALUES ($1, $2, $3)",
        [(client_id, alert_id, notification_id) for alert_id in alert_ids])


async def test_an_alert_notified_alone_is_found_by_its_id(api, tenant):
    rule = await api.new_rule(tenant)
    mine = await store_notification(tenant.client_id, rule["rule_id"], "alone-1", "SENT")
    await store_notification(tenant.client_id, rule["rule_id"], "alone-2", "SENT")

    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"alert_id": "alone-1", "limit": "1"})

    assert reply.status == 200, reply.body
    assert ([n["notification_id"] for n in reply.body["items"]], reply.body["next_cursor"]) == ([mine], None)
    # The other filters still apply with it.
    assert await listed_ids(api, tenant.key, alert_id="alone-1", status="FAILED") == []
    assert await listed_ids(api, tenant.key, alert_id="alone-unknown") == []


async def test_a_member_of_a_group_is_found_by_its_id_in_the_groups_notification(api, tenant):
    """The group's notification carries its first listed member's alert_id; the others are found
    through their membership (notification_alerts), each once."""
    rule = await api.new_rule(tenant, group_window_s=300)
    group = await store_notification(tenant.client_id, rule["rule_id"], "member-1", group_rule_id=rule["rule_id"],
                                     truncated_alerts=1)
    await store_members(tenant.client_id, group, "member-1", "member-2", "member-unlisted")
    # A member of a group still open has no notification yet: nothing to show.
    await store_members(tenant.client_id, str(uuid.uuid4()), "member-open")

    for alert_id in ("member-1", "member-2", "member-unlisted"):
        assert await listed_ids(api, tenant.key, alert_id=alert_id) == [group], alert_id
    assert await listed_ids(api, tenant.key, alert_id="member-open") == []


async def test_a_member_a_silence_muted_at_close_is_found_in_its_groups_silenced_alerts(api, tenant):
    from alerting_app import db

    rule = await api.new_rule(tenant, group_window_s=300)
    silence_id = str(uuid.uuid4())
    group = await store_notification(tenant.client_id, rule["rule_id"], "kept-1", group_rule_id=rule["rule_id"])
    await (await db.pool()).execute(
        "UPDATE notifications SET silenced_alerts = $2, truncated_silenced_alerts = 0 WHERE notification_id = $1",
        group, [{"alert_id": "muted-1", "silence_id": silence_id}])
    await store_members(tenant.client_id, group, "kept-1", "muted-1")

    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"alert_id": "muted-1"})

    assert [(n["notification_id"], n["silenced_alerts"]) for n in reply.body["items"]] == [
        (group, [{"alert_id": "muted-1", "silence_id": silence_id}])]


async def test_another_clients_alert_of_the_same_id_is_not_shown(api, tenant, other_tenant):
    their_rule = (await api.new_rule(other_tenant))["rule_id"]
    theirs = await store_notification(other_tenant.client_id, their_rule, "same-1")
    their_group = await store_notification(other_tenant.client_id, their_rule, "same-0", group_rule_id=their_rule)
    await store_members(other_tenant.client_id, their_group, "same-0", "same-2")
    mine = await store_notification(tenant.client_id, (await api.new_rule(tenant))["rule_id"], "same-2")

    assert await listed_ids(api, tenant.key, alert_id="same-1") == []
    assert await listed_ids(api, tenant.key, alert_id="same-2") == [mine]
    # Naming the other client with a key lists nothing either, as for any other filter.
    assert await listed_ids(api, tenant.key, alert_id="same-1", client_id=other_tenant.client_id) == []
    assert await listed_ids(api, api.admin_token, alert_id="same-2", client_id=tenant.client_id) == [mine]
    assert await listed_ids(api, api.admin_token, alert_id="same-2", client_id=other_tenant.client_id) == [their_group]
    assert await listed_ids(api, api.admin_token, alert_id="same-1", client_id=other_tenant.client_id) == [theirs]


async def test_the_admin_must_name_the_client_of_an_alert_id(api, tenant):
    await store_notification(tenant.client_id, (await api.new_rule(tenant))["rule_id"], "admin-1")

    reply = await api.call("GET", "/api/v1/notifications", api.admin_token, params={"alert_id": "admin-1"})

    assert reply.body["fields"] == [{"field": "client_id", "message": "required with alert_id: alert ids are per client"}]


@pytest.mark.parametrize("alert_id, message", [
    ("x" * 201, "String should have at most 200 characters"),
    ("", "String should have at least 1 character"),
    ("a\x00b", "String should match pattern '^[^\\x00]*$'"),
], ids=["201 characters", "empty", "a NUL"])
async def test_an_alert_id_the_alert_contract_refuses_is_refused_naming_it(api, tenant, alert_id, message):
    reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"alert_id": alert_id})
    assert reply.body["fields"] == [{"field": "alert_id", "message": message}]
    # As long as an alert's id may be (alerting_app/contracts.py): taken.
    assert await listed_ids(api, tenant.key, alert_id="x" * 200) == []


# --- POST /api/v1/notifications/{notification_id}/retry ---------------------------------------------

async def test_retrying_a_failed_notification_makes_its_failed_deliveries_due_again(api, tenant):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    mail = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    notification_id = await store_notification(
        tenant.client_id, rule["rule_id"], "retry-1", "FAILED",
        ((hook["endpoint_id"], "webhook", "FAILED", 8, "HTTP 502"), (mail["endpoint_id"], "email", "SENT", 1, None)))

    reply = await api.call("POST", f"/api/v1/notifications/{notification_id}/retry", tenant.key)

    assert (reply.status, reply.body["status"], reply.body["detail"]) == (202, "PENDING", None)
    states = {d["endpoint_id"]: (d["status"], d["attempts"]) for d in reply.body["deliveries"]}
    assert states == {hook["endpoint_id"]: ("PENDING", 0), mail["endpoint_id"]: ("SENT", 1)}
    [due] = [d for d in reply.body["deliveries"] if d["status"] == "PENDING"]
    assert due["next_attempt_at"] is not None
    # Retried once, it is PENDING: not retried again until it has failed again.
    again = await api.call("POST", f"/api/v1/notifications/{notification_id}/retry", tenant.key)
    assert (again.status, again.body["message"]) == (409, "the notification is PENDING; only a FAILED one can be retried")


@pytest.mark.parametrize("status", ["SENT", "SUPPRESSED", "SILENCED"])
async def test_only_a_failed_notification_can_be_retried(api, tenant, status):
    rule = await api.new_rule(tenant)
    notification_id = await store_notification(tenant.client_id, rule["rule_id"], f"retry-{status}", status)

    reply = await api.call("POST", f"/api/v1/notifications/{notification_id}/retry", tenant.key)

    assert (reply.status, reply.body["message"]) == (409, f"the notification is {status}; only a FAILED one can be retried")


async def test_a_notification_that_failed_for_want_of_an_endpoint_has_nothing_to_retry(api, tenant):
    rule = await api.new_rule(tenant)
    notification_id = await store_notification(tenant.client_id, rule["rule_id"], "retry-none", "FAILED")

    reply = await api.call("POST", f"/api/v1/notifications/{notification_id}/retry", tenant.key)

    assert reply.status == 409 and "no enabled endpoint" in reply.body["message"]
    shown = await api.call("GET", f"/api/v1/notifications/{notification_id}", tenant.key)
    assert shown.body["status"] == "FAILED"  # left as it was


async def test_another_clients_notification_cannot_be_retried_and_the_admin_may(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    hook = await api.new_endpoint(tenant, rule["rule_id"])
    notification_id = await store_notification(
        tenant.client_id, rule["rule_id"], "retry-other", "FAILED",
        ((hook["endpoint_id"], "webhook", "FAILED", 1, "HTTP 400"),))
    path = f"/api/v1/notifications/{notification_id}/retry"

    assert (await api.call("POST", path, other_tenant.key)).status == 404
    assert (await api.call("POST", f"/api/v1/notifications/{uuid.uuid4()}/retry", tenant.key)).status == 404
    assert (await api.call("POST", "/api/v1/notifications/not-an-id/retry", tenant.key)).status == 404
    assert (await api.call("POST", path, api.admin_token)).status == 202
