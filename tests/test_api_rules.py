"""/api/v1/rules: criteria validated like the contract, versions guard concurrent changes."""
from __future__ import annotations

import uuid

import pytest

from postgres_waits import until_waiting_on_a_lock
from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def test_a_client_creates_a_rule_for_itself_at_version_1(api, tenant):
    reply = await api.call("POST", "/api/v1/rules", tenant.key,
                           {"severity": "HIGH", "source": "payments", "name": "*"})
    assert reply.status == 201
    assert reply.body["client_id"] == tenant.client_id
    assert (reply.body["severity"], reply.body["source"], reply.body["name"]) == ("HIGH", "payments", "*")
    assert reply.body["enabled"] is True
    assert reply.body["version"] == 1
    read = await api.call("GET", f"/api/v1/rules/{reply.body['rule_id']}", tenant.key)
    assert read.body == reply.body


async def test_the_admin_creates_a_rule_for_the_client_named_in_the_body(api, tenant):
    reply = await api.call("POST", "/api/v1/rules", api.admin_token,
                           {"client_id": tenant.client_id, "severity": "LOW", "source": "*", "name": "Disk"})
    assert reply.status == 201
    assert reply.body["client_id"] == tenant.client_id


async def test_the_admin_must_name_the_client_of_a_new_rule(api):
    reply = await api.call("POST", "/api/v1/rules", api.admin_token, {"severity": "LOW", "source": "a", "name": "b"})
    assert reply.failing_fields() == {"client_id"}


async def test_a_rule_for_a_client_that_does_not_exist_is_refused(api):
    body = {"client_id": "00000000-0000-4000-8000-000000000000", "severity": "LOW", "source": "a", "name": "b"}
    reply = await api.call("POST", "/api/v1/rules", api.admin_token, body)
    assert reply.failing_fields() == {"client_id"}


async def test_a_client_key_cannot_create_a_rule_for_another_client(api, tenant, other_tenant):
    body = {"client_id": other_tenant.client_id, "severity": "LOW", "source": "a", "name": "b"}
    reply = await api.call("POST", "/api/v1/rules", tenant.key, body)
    assert (reply.status, reply.body) == (403, {
        "error": "forbidden",
        "message": "a client key creates rules for its own client only (leave client_id out)"})
    listed = await api.call("GET", "/api/v1/rules", other_tenant.key)
    assert listed.body["items"] == []


@pytest.mark.parametrize("body, field", [
    ({"severity": "URGENT", "source": "payments", "name": "*"}, "severity"),
    ({"severity": "high", "source": "payments", "name": "*"}, "severity"),
    ({"source": "payments", "name": "*"}, "severity"),
    ({"severity": "HIGH", "name": "*"}, "source"),
    ({"severity": "HIGH", "source": "", "name": "*"}, "source"),
    ({"severity": "HIGH", "source": "p" * 201, "name": "*"}, "source"),
    ({"severity": "HIGH", "source": "payments", "name": 7}, "name"),
    ({"severity": "HIGH", "source": "payments", "name": "*", "enabled": "sometimes"}, "enabled"),
])
async def test_an_invalid_rule_is_refused_with_422_naming_the_field(api, tenant, body, field):
    reply = await api.call("POST", "/api/v1/rules", tenant.key, body)
    assert reply.failing_fields() == {field}


async def test_a_rule_of_only_wildcards_is_refused_naming_its_criteria(api, tenant):
    reply = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "*", "source": "*", "name": "*"})
    assert reply.failing_fields() == {"severity", "source", "name"}
    # Our validator's message as it wrote it: pydantic's "Value error, " before it was noise.
    assert [field["message"] for field in reply.body["fields"]] == [
        "at least one of severity, source, name must not be '*'"] * 3


async def test_a_second_rule_with_the_same_criteria_for_the_client_is_a_conflict(api, tenant, other_tenant):
    first = await api.new_rule(tenant, "HIGH", "payments", "*")
    again = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "payments", "name": "*"})
    assert again.status == 409
    # Naming the rule in the way, as an endpoint's 409 names the endpoint of the same address.
    assert again.body == {"error": "conflict", "message": "this client already has a rule with the same severity, "
                                                          f"source and name: {first['rule_id']}"}
    # The same criteria for another client are that client's own rule.
    await api.new_rule(other_tenant, "HIGH", "payments", "*")


async def test_replacing_a_rule_with_its_current_version_increments_the_version(api, tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("PUT", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                           {"version": 1, "severity": "CRITICAL", "source": "checkout", "name": "Latency",
                            "enabled": True})
    assert reply.status == 200
    assert reply.body["version"] == 2
    assert (reply.body["severity"], reply.body["source"], reply.body["name"]) == ("CRITICAL", "checkout", "Latency")


async def test_a_change_carrying_a_stale_version_is_a_conflict_and_changes_nothing(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "name": "First"})).status == 200
    stale_patch = await api.call("PATCH", path, tenant.key, {"version": 1, "name": "Second"})
    stale_put = await api.call("PUT", path, tenant.key,
                               {"version": 1, "severity": "LOW", "source": "x", "name": "Third", "enabled": True})
    assert (stale_patch.status, stale_put.status) == (409, 409)
    current = await api.call("GET", path, tenant.key)
    assert (current.body["name"], current.body["version"]) == ("First", 2)


async def test_a_put_without_enabled_is_refused_naming_it_and_changes_nothing(api, tenant):
    # PUT is the whole rule: an `enabled` left out and taken as true would turn a disabled rule back on.
    rule = await api.new_rule(tenant, enabled=False)
    path = f"/api/v1/rules/{rule['rule_id']}"
    reply = await api.call("PUT", path, tenant.key, {"version": 1, "severity": "HIGH", "source": "payments", "name": "*"})
    assert reply.failing_fields() == {"enabled"}
    current = await api.call("GET", path, tenant.key)
    assert (current.body["enabled"], current.body["version"]) == (False, 1)


async def test_a_field_a_body_does_not_take_is_refused_naming_it_not_ignored(api, tenant):
    # Ignored, a misspelt field would look accepted: `"enable": false` would create an enabled rule.
    reply = await api.call("POST", "/api/v1/rules", tenant.key,
                           {"severity": "HIGH", "source": "payments", "name": "*", "enable": False})
    assert reply.failing_fields() == {"enable"}
    assert reply.body["fields"][0]["message"] == "Extra inputs are not permitted"
    assert (await api.call("GET", "/api/v1/rules", tenant.key)).body["items"] == []


async def test_a_change_must_carry_the_version(api, tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key, {"enabled": False})
    assert reply.failing_fields() == {"version"}


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_a_version_no_rule_can_have_is_refused_naming_it_not_a_conflict(api, tenant, method):
    # Postgres's integer column bounds every version the API writes (contracts.Version): past it,
    # a 409 "read it again" sent the client to read a version that cannot exist.
    rule = await api.new_rule(tenant, source="version-bound")
    body = {"version": 2**31, "severity": "HIGH", "source": "version-bound", "name": "*", "enabled": True}
    reply = await api.call(method, f"/api/v1/rules/{rule['rule_id']}", tenant.key, body)
    assert reply.failing_fields() == {"version"}


async def test_disabling_and_enabling_a_rule_each_increment_its_version(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    off = await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})
    assert (off.status, off.body["enabled"], off.body["version"]) == (200, False, 2)
    on = await api.call("PATCH", path, tenant.key, {"version": 2, "enabled": True})
    assert (on.status, on.body["enabled"], on.body["version"]) == (200, True, 3)


async def test_patching_a_rule_into_only_wildcards_is_refused(api, tenant):
    rule = await api.new_rule(tenant, "HIGH", "*", "*")
    reply = await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key, {"version": 1, "severity": "*"})
    assert reply.failing_fields() == {"severity", "source", "name"}
    assert (await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", tenant.key)).body["version"] == 1


async def test_changing_a_rule_into_a_duplicate_of_another_is_a_conflict(api, tenant):
    first = await api.new_rule(tenant, "HIGH", "payments", "*")
    other = await api.new_rule(tenant, "LOW", "payments", "*")
    reply = await api.call("PATCH", f"/api/v1/rules/{other['rule_id']}", tenant.key, {"version": 1, "severity": "HIGH"})
    assert reply.status == 409
    assert reply.body["message"].endswith(f"the same severity, source and name: {first['rule_id']}"), reply.body


async def test_a_deleted_rule_is_no_longer_found(api, tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    assert (await api.call("DELETE", path, tenant.key)).status == 204
    assert (await api.call("GET", path, tenant.key)).status == 404
    assert (await api.call("DELETE", path, tenant.key)).status == 404
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})).status == 404


async def test_another_clients_key_can_neither_see_nor_change_a_rule(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    path = f"/api/v1/rules/{rule['rule_id']}"
    replace = {"version": 1, "severity": "LOW", "source": "x", "name": "y", "enabled": False}
    assert (await api.call("GET", path, other_tenant.key)).status == 404
    assert (await api.call("PUT", path, other_tenant.key, replace)).status == 404
    assert (await api.call("PATCH", path, other_tenant.key, {"version": 1, "enabled": False})).status == 404
    assert (await api.call("DELETE", path, other_tenant.key)).status == 404
    assert (await api.call("GET", "/api/v1/rules", other_tenant.key)).body["items"] == []
    filtered = await api.call("GET", "/api/v1/rules", other_tenant.key, params={"client_id": tenant.client_id})
    assert filtered.body["items"] == []
    assert (await api.call("GET", path, tenant.key)).body == rule


async def test_rules_are_listed_in_pages_that_together_hold_every_rule_once(api, tenant):
    created = [await api.new_rule(tenant, "HIGH", f"source-{i}", "*") for i in range(5)]
    pages, cursor = [], None
    while True:
        params = {"limit": "2", "client_id": tenant.client_id, **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/rules", tenant.key, params=params)
        assert reply.status == 200
        pages.append([r["rule_id"] for r in reply.body["items"]])
        assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [rule_id for page in pages for rule_id in page] == [r["rule_id"] for r in created]


async def test_a_last_page_that_is_full_has_no_next_cursor(api, tenant):
    # A cursor promises more: one after a page holding exactly the last `limit` rows led to an empty page.
    created = [await api.new_rule(tenant, "HIGH", f"full-page-{i}", "*") for i in range(2)]
    reply = await api.call("GET", "/api/v1/rules", tenant.key, params={"limit": "2"})
    assert [r["rule_id"] for r in reply.body["items"]] == [r["rule_id"] for r in created]
    assert reply.body["next_cursor"] is None


async def test_the_admin_filters_rules_by_client(api, tenant, other_tenant):
    mine = await api.new_rule(tenant)
    await api.new_rule(other_tenant)
    reply = await api.call("GET", "/api/v1/rules", api.admin_token, params={"client_id": tenant.client_id})
    assert [r["rule_id"] for r in reply.body["items"]] == [mine["rule_id"]]


@pytest.mark.parametrize("params, field", [
    ({"limit": "0"}, "limit"),
    ({"limit": "501"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
    ({"cursor": "%%%"}, "cursor"),
    ({"client_id": "acme"}, "client_id"),
    ({"sort": "name"}, "sort"),
])
async def test_bad_list_parameters_are_refused_with_422_naming_them(api, tenant, params, field):
    reply = await api.call("GET", "/api/v1/rules", tenant.key, params=params)
    assert reply.failing_fields() == {field}


async def test_a_repeated_list_parameter_is_refused(api, tenant):
    reply = await api.call("GET", "/api/v1/rules", tenant.key, params=[("limit", "1"), ("limit", "2")])
    assert reply.failing_fields() == {"limit"}


async def test_an_unknown_rule_is_not_found(api, tenant):
    # With a message saying what was not found, as every other error has one.
    reply = await api.call("GET", "/api/v1/rules/00000000-0000-4000-8000-000000000000", tenant.key)
    assert (reply.status, reply.body) == (404, {"error": "not_found",
                                                "message": "no rule with this id that this token may see"})


# --- grouping and repeat suppression (issue 5) ---------------------------------------------------

GROUPING = {"group_window_s": 300, "repeat_interval_s": 3600, "fingerprint_keys": ["host", "region"]}


async def last_outbox_rule(rule_id: str):
    from alerting_app import db
    from alerting_app.contracts import RuleChanged

    pool = await db.pool()
    payload = await pool.fetchval(
        "SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id DESC LIMIT 1", rule_id)
    return RuleChanged.model_validate(payload).rule


async def test_a_rule_without_grouping_settings_notifies_at_once_and_never_suppresses(api, tenant):
    rule = await api.new_rule(tenant)
    assert (rule["group_window_s"], rule["repeat_interval_s"], rule["fingerprint_keys"]) == (0, 0, [])


async def test_grouping_settings_are_stored_returned_and_published(api, tenant):
    rule = await api.new_rule(tenant, **GROUPING)
    assert {field: rule[field] for field in GROUPING} == GROUPING
    read = await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", tenant.key)
    assert {field: read.body[field] for field in GROUPING} == GROUPING
    published = await last_outbox_rule(rule["rule_id"])
    assert (published.group_window_s, published.repeat_interval_s, published.fingerprint_keys) == (
        300, 3600, ["host", "region"])


async def test_patching_only_a_grouping_setting_bumps_the_version_and_publishes_it(api, tenant):
    rule = await api.new_rule(tenant, **GROUPING)
    path = f"/api/v1/rules/{rule['rule_id']}"

    reply = await api.call("PATCH", path, tenant.key, {"version": 1, "group_window_s": 0})

    assert (reply.status, reply.body["version"], reply.body["group_window_s"]) == (200, 2, 0)
    # What was not given stays as it was.
    assert (reply.body["repeat_interval_s"], reply.body["fingerprint_keys"]) == (3600, ["host", "region"])
    published = await last_outbox_rule(rule["rule_id"])
    assert (published.version, published.group_window_s, published.repeat_interval_s) == (2, 0, 3600)
    keys = await api.call("PATCH", path, tenant.key, {"version": 2, "fingerprint_keys": []})
    assert (keys.body["version"], keys.body["fingerprint_keys"]) == (3, [])
    assert (await last_outbox_rule(rule["rule_id"])).fingerprint_keys == []


async def test_a_put_without_grouping_settings_turns_them_off(api, tenant):
    rule = await api.new_rule(tenant, **GROUPING)
    reply = await api.call("PUT", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                           {"version": 1, "severity": "HIGH", "source": "payments", "name": "*", "enabled": True})
    assert (reply.body["version"], reply.body["group_window_s"], reply.body["repeat_interval_s"],
            reply.body["fingerprint_keys"]) == (2, 0, 0, [])
    replaced = await api.call("PUT", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                              {"version": 2, "severity": "HIGH", "source": "payments", "name": "*", "enabled": True,
                               "group_window_s": 86_400, "repeat_interval_s": 604_800, "fingerprint_keys": ["k"] * 20})
    assert (replaced.status, replaced.body["group_window_s"], replaced.body["repeat_interval_s"]) == (
        200, 86_400, 604_800)


BAD_GROUPING = [
    ({"group_window_s": -1}, "group_window_s"),
    ({"group_window_s": 86_401}, "group_window_s"),
    ({"group_window_s": "soon"}, "group_window_s"),
    ({"group_window_s": 1.5}, "group_window_s"),
    ({"repeat_interval_s": -1}, "repeat_interval_s"),
    ({"repeat_interval_s": 604_801}, "repeat_interval_s"),
    ({"fingerprint_keys": "host"}, "fingerprint_keys"),
    ({"fingerprint_keys": [f"k{n}" for n in range(21)]}, "fingerprint_keys"),
    ({"fingerprint_keys": ["host", ""]}, "fingerprint_keys.1"),
    ({"fingerprint_keys": ["h" * 201]}, "fingerprint_keys.0"),
    ({"fingerprint_keys": [7]}, "fingerprint_keys.0"),
]


@pytest.mark.parametrize("settings, field", BAD_GROUPING)
async def test_invalid_grouping_settings_are_refused_naming_the_field(api, tenant, settings, field):
    create = await api.call("POST", "/api/v1/rules", tenant.key,
                            {"severity": "HIGH", "source": "payments", "name": "*", **settings})
    assert create.failing_fields() == {field}
    rule = await api.new_rule(tenant, source=f"s-{field}-{len(str(settings))}")
    path = f"/api/v1/rules/{rule['rule_id']}"
    patch = await api.call("PATCH", path, tenant.key, {"version": 1, **settings})
    put = await api.call("PUT", path, tenant.key, {"version": 1, "severity": "HIGH", "source": "x", "name": "*",
                                                   "enabled": True, **settings})
    assert patch.failing_fields() == put.failing_fields() == {field}
    assert (await api.call("GET", path, tenant.key)).body["version"] == 1


async def test_republishing_all_rules_carries_their_grouping_settings(api, tenant):
    from agents.rule_outbox import republish_all_rules
    from alerting_app import db

    rule = await api.new_rule(tenant, **GROUPING)
    assert await republish_all_rules(await db.pool()) >= 1
    published = await last_outbox_rule(rule["rule_id"])
    assert (published.version, published.group_window_s, published.repeat_interval_s,
            published.fingerprint_keys) == (1, 300, 3600, ["host", "region"])


async def test_republishing_all_rules_queues_the_deletion_of_every_deleted_rule(api, tenant):
    """A topic filled again from Postgres (a new cluster) must carry deletions too: a replica that
    holds the rule, or read its upsert there, would otherwise match it for ever."""
    from agents.rule_outbox import republish_all_rules
    from alerting_app import db
    from alerting_app.contracts import RuleChanged

    deleted, kept = await api.new_rule(tenant, source="deleted"), await api.new_rule(tenant, source="kept")
    assert (await api.call("DELETE", f"/api/v1/rules/{deleted['rule_id']}", tenant.key)).status == 204
    gone_with_its_client = await api.new_tenant(f"gone-{uuid.uuid4().hex[:8]}")
    its_rule = await api.new_rule(gone_with_its_client, source="gone")
    assert (await api.call("DELETE", f"/api/v1/clients/{gone_with_its_client.client_id}",
                           api.admin_token)).status == 204
    pool = await db.pool()
    await pool.execute("DELETE FROM rule_outbox")  # relayed long ago, to a topic since lost

    await republish_all_rules(pool)

    queued = {}
    for row in await pool.fetch("SELECT rule_id::text, payload FROM rule_outbox ORDER BY outbox_id"):
        event = RuleChanged.model_validate(row["payload"])
        queued[row["rule_id"]] = (event.action, event.version, event.client_id)
    assert queued[deleted["rule_id"]] == ("delete", 2, tenant.client_id)
    assert queued[its_rule["rule_id"]] == ("delete", 2, gone_with_its_client.client_id)
    assert queued[kept["rule_id"]] == ("upsert", 1, tenant.client_id)


# --- pagination while rows are created ---------------------------------------------------------

async def test_a_create_that_waited_for_its_clients_lock_is_not_behind_a_page_already_read(api, tenant, other_tenant):
    # A rule is dated when it is inserted, after its client's lock (web/quotas.py), not when its
    # transaction began: otherwise it lands before rows committed while it waited, behind a cursor
    # a reader already holds, and that reader never sees it.
    import asyncio

    from alerting_app import db

    pool = await db.pool()
    async with pool.acquire() as holder:
        locked = holder.transaction()
        await locked.start()
        # What a concurrent create, rename or key rotation of the tenant holds meanwhile.
        await holder.execute("SELECT 1 FROM clients WHERE client_id = $1 FOR NO KEY UPDATE", tenant.client_id)
        waiting = asyncio.ensure_future(api.call("POST", "/api/v1/rules", tenant.key,
                                                 {"severity": "HIGH", "source": "payments", "name": "late"}))
        await until_waiting_on_a_lock(pool, query_like="%FOR NO KEY UPDATE%", unless_done=waiting)
        seen = await api.new_rule(other_tenant, name="meanwhile")
        listed = await api.call("GET", "/api/v1/rules", api.admin_token, params={"limit": 500})
        while listed.body["items"][-1]["rule_id"] != seen["rule_id"]:
            listed = await api.call("GET", "/api/v1/rules", api.admin_token,
                                    params={"limit": 500, "cursor": listed.body["next_cursor"]})
        cursor = listed.body["next_cursor"] or _cursor_after(listed.body["items"][-1])
        await locked.commit()
    late = await waiting
    assert late.status == 201, late.body
    assert late.body["created_at"] == late.body["updated_at"]  # one time, for both

    following = await api.call("GET", "/api/v1/rules", api.admin_token, params={"limit": 500, "cursor": cursor})
    assert late.body["rule_id"] in [item["rule_id"] for item in following.body["items"]]


def _cursor_after(item: dict) -> str:
    from datetime import datetime

    from web.pagination import encode_cursor

    return encode_cursor(datetime.fromisoformat(item["created_at"]), uuid.UUID(item["rule_id"]))


@pytest.mark.parametrize("fields, failing", [
    ({"enabled": "off"}, "enabled"),
    ({"enabled": 0}, "enabled"),
    ({"group_window_s": 300.0}, "group_window_s"),
    ({"group_window_s": "300"}, "group_window_s"),
])
async def test_the_api_is_as_strict_about_types_as_the_contract(api, tenant, fields, failing):
    # rule.changed refuses these (docs/contracts.md); accepted here, "off" was stored as false.
    reply = await api.call("POST", "/api/v1/rules", tenant.key,
                           {"severity": "HIGH", "source": "payments", "name": "*", **fields})
    assert reply.failing_fields() == {failing}, reply.body


async def test_a_version_given_as_text_is_refused(api, tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key, {"version": "1", "enabled": False})
    assert reply.failing_fields() == {"version"}, reply.body
