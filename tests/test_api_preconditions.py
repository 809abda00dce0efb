"""Conditional requests: every single rule, endpoint, silence and client carries an ETag, and
If-Match / If-None-Match are evaluated against the locked row in the change's own transaction
(web/preconditions.py), so two writers editing one resource cannot overwrite each other unseen."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from postgres_waits import until_waiting_on_a_lock
from test_api_support import API_LOOP, Tenant, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def stored_rule(rule_id: str) -> dict:
    from alerting_app import db

    pool = await db.pool()
    return dict(await pool.fetchrow("SELECT name, enabled, version FROM rules WHERE rule_id = $1", rule_id))


async def outbox_versions(rule_id: str) -> list[int]:
    """The versions of the rule.changed events written for the rule (the relay is not running here)."""
    from alerting_app import db

    pool = await db.pool()
    rows = await pool.fetch("SELECT payload FROM rule_outbox WHERE rule_id = $1 ORDER BY outbox_id", rule_id)
    return [row["payload"]["version"] for row in rows]


def silence_body() -> dict:
    ends_at = datetime.now(timezone.utc) + timedelta(hours=1)
    return {"source": "payments", "ends_at": ends_at.isoformat(), "comment": "maintenance", "created_by": "ops"}


def whole_rule(source: str, name: str, **fields) -> dict:
    """A PUT body of a rule, without its version unless given."""
    return {"severity": "HIGH", "source": source, "name": name, "enabled": True, **fields}


def is_strong_etag(value: str | None) -> bool:
    return value is not None and value.startswith('"') and value.endswith('"') and len(value) > 2


async def test_a_rule_read_carries_a_strong_etag_and_each_change_answers_the_new_one(api, tenant):
    created = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "etag", "name": "*"})
    path = f"/api/v1/rules/{created.body['rule_id']}"
    read = await api.call("GET", path, tenant.key)
    assert is_strong_etag(read.headers.get("ETag"))
    assert created.headers.get("ETag") == read.headers["ETag"]  # the 201's tag is the rule's as GET shows it
    assert (await api.call("HEAD", path, tenant.key)).headers.get("ETag") == read.headers["ETag"]

    patched = await api.call("PATCH", path, tenant.key, {"version": 1, "name": "Latency"},
                             headers={"If-Match": read.headers["ETag"]})
    assert patched.status == 200, patched.body
    assert patched.headers["ETag"] not in (None, read.headers["ETag"])
    assert (await api.call("GET", path, tenant.key)).headers["ETag"] == patched.headers["ETag"]

    replaced = await api.call("PUT", path, tenant.key,
                              {"version": 2, "severity": "HIGH", "source": "etag", "name": "Errors", "enabled": True},
                              headers={"If-Match": patched.headers["ETag"]})
    assert replaced.status == 200, replaced.body
    assert (await api.call("GET", path, tenant.key)).headers["ETag"] == replaced.headers["ETag"]


async def test_a_patch_with_a_stale_etag_is_refused_412_and_changes_nothing(api, tenant):
    rule = await api.new_rule(tenant, source="stale")
    path = f"/api/v1/rules/{rule['rule_id']}"
    first_read = (await api.call("GET", path, tenant.key)).headers["ETag"]
    # The other operator's change, made with the ETag both read.
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "name": "Theirs"},
                           headers={"If-Match": first_read})).status == 200
    # This one read version 2 from somewhere (the body's version is current): only the ETag is stale.
    refused = await api.call("PATCH", path, tenant.key, {"version": 2, "name": "Mine", "enabled": False},
                             headers={"If-Match": first_read})
    assert refused.status == 412, refused.body
    assert refused.body["error"] == "precondition_failed"
    assert "read it again" in refused.body["message"]
    assert await stored_rule(rule["rule_id"]) == {"name": "Theirs", "enabled": True, "version": 2}
    assert await outbox_versions(rule["rule_id"]) == [1, 2]  # no event for the refused change
    # A GET with If-Match is refused alike, rather than showing a rule that is not the one named.
    assert (await api.call("GET", path, tenant.key, headers={"If-Match": first_read})).status == 412


async def test_a_put_or_patch_with_only_if_match_changes_the_rule_and_bumps_its_version(api, tenant):
    """If-Match with the ETag read says which rule the change was made to, as the body's version
    does: a client using HTTP preconditions need not send the version too."""
    rule = await api.new_rule(tenant, source="etag-only")
    path = f"/api/v1/rules/{rule['rule_id']}"
    read = (await api.call("GET", path, tenant.key)).headers["ETag"]
    replaced = await api.call("PUT", path, tenant.key, whole_rule("etag-only", "Replaced"), headers={"If-Match": read})
    assert replaced.status == 200, replaced.body
    assert (replaced.body["name"], replaced.body["version"]) == ("Replaced", 2)
    patched = await api.call("PATCH", path, tenant.key, {"enabled": False},
                             headers={"If-Match": replaced.headers["ETag"]})
    assert patched.status == 200, patched.body
    assert (patched.body["enabled"], patched.body["version"]) == (False, 3)
    assert await stored_rule(rule["rule_id"]) == {"name": "Replaced", "enabled": False, "version": 3}
    assert await outbox_versions(rule["rule_id"]) == [1, 2, 3]  # each change published, as with a version


async def test_a_stale_if_match_without_a_version_is_refused_412_and_changes_nothing(api, tenant):
    rule = await api.new_rule(tenant, source="etag-only-stale")
    path = f"/api/v1/rules/{rule['rule_id']}"
    read = (await api.call("GET", path, tenant.key)).headers["ETag"]
    assert (await api.call("PATCH", path, tenant.key, {"name": "Theirs"}, headers={"If-Match": read})).status == 200
    for method, body in (("PUT", whole_rule("etag-only-stale", "Mine")), ("PATCH", {"name": "Mine"})):
        refused = await api.call(method, path, tenant.key, body, headers={"If-Match": read})
        assert (refused.status, refused.body["error"]) == (412, "precondition_failed"), (method, refused.body)
    assert await stored_rule(rule["rule_id"]) == {"name": "Theirs", "enabled": True, "version": 2}
    assert await outbox_versions(rule["rule_id"]) == [1, 2]


async def test_a_rule_change_with_neither_version_nor_an_etag_is_refused_naming_version(api, tenant):
    """Without either, the change would overwrite whatever the rule has become since it was read.
    `If-Match: *` names no ETag (any rule matches it), and a null version is not one."""
    rule = await api.new_rule(tenant, source="neither")
    path = f"/api/v1/rules/{rule['rule_id']}"
    for method, body in (("PUT", whole_rule("neither", "Mine")), ("PATCH", {"name": "Mine"})):
        for headers in ({}, {"If-Match": "*"}):
            refused = await api.call(method, path, tenant.key, body, headers=headers)
            assert refused.failing_fields() == {"version"}, (method, headers, refused.body)
            assert "If-Match" in refused.body["fields"][0]["message"]
        refused = await api.call(method, path, tenant.key, {**body, "version": None}, headers={"If-Match": "*"})
        assert refused.failing_fields() == {"version"}, (method, refused.body)
        # What to send instead, in PATCH as in PUT: not a PATCH's "leave the field out to keep its
        # value", which for the version is the refusal just above.
        assert "If-Match" in refused.body["fields"][0]["message"], (method, refused.body)
    assert await stored_rule(rule["rule_id"]) == {"name": "*", "enabled": True, "version": 1}
    assert await outbox_versions(rule["rule_id"]) == [1]


async def test_a_null_version_is_refused_even_with_the_current_etag(api, tenant):
    """docs/api.md: a null version is refused, not taken for "not given", which the ETag alone
    would then guard: a client sending null meant something, and it is no version."""
    rule = await api.new_rule(tenant, source="null-version")
    path = f"/api/v1/rules/{rule['rule_id']}"
    current = (await api.call("GET", path, tenant.key)).headers["ETag"]
    for method, body in (("PUT", whole_rule("null-version", "Mine")), ("PATCH", {"name": "Mine"})):
        refused = await api.call(method, path, tenant.key, {**body, "version": None}, headers={"If-Match": current})
        assert refused.failing_fields() == {"version"}, (method, refused.body)
        assert "may not be null" in refused.body["fields"][0]["message"]
    assert await stored_rule(rule["rule_id"]) == {"name": "*", "enabled": True, "version": 1}
    assert await outbox_versions(rule["rule_id"]) == [1]


async def test_an_if_match_and_a_version_that_disagree_are_refused_409_and_change_nothing(api, tenant):
    """The rule meets the If-Match, so no header failed (not a 412, which would send the client for
    an ETag it has): the body's version is wrong, as a stale version is without If-Match (409)."""
    rule = await api.new_rule(tenant, source="disagree")
    path = f"/api/v1/rules/{rule['rule_id']}"
    changed = await api.call("PATCH", path, tenant.key, {"version": 1, "name": "Theirs"})
    current = changed.headers["ETag"]  # of version 2
    for method, body in (("PUT", whole_rule("disagree", "Mine")), ("PATCH", {"name": "Mine"})):
        for version in (1, 3):  # behind the ETag's version, and ahead of it
            refused = await api.call(method, path, tenant.key, {**body, "version": version},
                                     headers={"If-Match": current})
            assert (refused.status, refused.body["error"]) == (409, "conflict"), (method, version, refused.body)
            assert "disagree" in refused.body["message"] and "version 2" in refused.body["message"]
    # `If-Match: *` names no version: a stale one with it is stale as without it.
    starred = await api.call("PATCH", path, tenant.key, {"version": 1, "name": "Mine"}, headers={"If-Match": "*"})
    assert (starred.status, starred.body["message"]) == (409, "the rule is at version 2, not 1; read it again")
    assert await stored_rule(rule["rule_id"]) == {"name": "Theirs", "enabled": True, "version": 2}
    assert await outbox_versions(rule["rule_id"]) == [1, 2]
    # Agreeing, they change it.
    agreed = await api.call("PATCH", path, tenant.key, {"version": 2, "name": "Mine"}, headers={"If-Match": current})
    assert (agreed.status, agreed.body["version"]) == (200, 3), agreed.body


async def test_rule_changes_with_only_if_match_waiting_on_its_locked_row_are_each_checked_against_the_one_before(
        api, tenant):
    """Without a version, If-Match alone guards the rule: checked on the row as locked, the PUTs that
    queue behind the first with the same ETag find it changed (412), rather than each overwriting it."""
    from alerting_app import db

    rule = await api.new_rule(tenant, source="etag-only-lock")
    path = f"/api/v1/rules/{rule['rule_id']}"
    tag = (await api.call("GET", path, tenant.key)).headers["ETag"]
    pool = await db.pool()
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM rules WHERE rule_id = $1 FOR UPDATE", rule["rule_id"])
            puts = [asyncio.create_task(api.call("PUT", path, tenant.key, whole_rule("etag-only-lock", f"name-{n}"),
                                                 headers={"If-Match": tag})) for n in range(3)]
            await until_waiting_on_a_lock(pool, query_like="%rules%FOR UPDATE%", sessions=3)
        replies = await asyncio.gather(*puts)
    assert sorted(reply.status for reply in replies) == [200, 412, 412], [reply.body for reply in replies]
    [winner] = [reply for reply in replies if reply.status == 200]
    assert await stored_rule(rule["rule_id"]) == {"name": winner.body["name"], "enabled": True, "version": 2}
    assert await outbox_versions(rule["rule_id"]) == [1, 2]


async def test_a_delete_with_a_stale_etag_is_refused_412_and_one_with_the_current_etag_deletes(api, tenant):
    rule = await api.new_rule(tenant, source="delete-stale")
    path = f"/api/v1/rules/{rule['rule_id']}"
    old = (await api.call("GET", path, tenant.key)).headers["ETag"]
    current = (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})).headers["ETag"]
    refused = await api.call("DELETE", path, tenant.key, headers={"If-Match": old})
    assert refused.status == 412, refused.body
    assert (await api.call("GET", path, tenant.key)).status == 200
    assert await outbox_versions(rule["rule_id"]) == [1, 2]
    # A list of tags matches when any of them is the current one.
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": f"{old}, {current}"})).status == 204
    assert (await api.call("GET", path, tenant.key)).status == 404


async def test_if_match_star_matches_an_existing_rule_and_a_missing_one_stays_404(api, tenant):
    rule = await api.new_rule(tenant, source="star")
    path = f"/api/v1/rules/{rule['rule_id']}"
    assert (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False},
                           headers={"If-Match": "*"})).status == 200
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": "*"})).status == 204
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": "*"})).status == 404
    assert (await api.call("GET", path, tenant.key, headers={"If-Match": "*"})).status == 404


async def test_a_weak_etag_never_satisfies_if_match(api, tenant):
    rule = await api.new_rule(tenant, source="weak")
    path = f"/api/v1/rules/{rule['rule_id']}"
    tag = (await api.call("GET", path, tenant.key)).headers["ETag"]
    refused = await api.call("DELETE", path, tenant.key, headers={"If-Match": f"W/{tag}"})
    assert refused.status == 412, refused.body
    assert (await api.call("GET", path, tenant.key)).status == 200


async def test_a_malformed_if_match_is_refused_naming_it_and_changes_nothing(api, tenant):
    rule = await api.new_rule(tenant, source="malformed")
    path = f"/api/v1/rules/{rule['rule_id']}"
    tag = (await api.call("GET", path, tenant.key)).headers["ETag"]
    for value in ("1", tag[1:-1], f"{tag} junk", f"*, {tag}", "", '"a"b"'):
        refused = await api.call("DELETE", path, tenant.key, headers={"If-Match": value})
        assert refused.failing_fields() == {"If-Match"}, value
        assert "quoted entity tags" in refused.body["fields"][0]["message"]
    refused = await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False},
                             headers={"If-None-Match": "v1"})
    assert refused.failing_fields() == {"If-None-Match"}
    assert await stored_rule(rule["rule_id"]) == {"name": "*", "enabled": True, "version": 1}
    # Two header lines are one list (RFC 9110 5.3): the second line's tag is read, not dropped.
    changed = (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})).headers["ETag"]
    assert (await api.call("DELETE", path, tenant.key,
                           headers=[("If-Match", tag), ("If-Match", changed)])).status == 204


async def test_if_none_match_naming_the_current_etag_answers_304_without_a_body(api, tenant):
    rule = await api.new_rule(tenant, source="cache")
    path = f"/api/v1/rules/{rule['rule_id']}"
    tag = (await api.call("GET", path, tenant.key)).headers["ETag"]
    for value in (tag, f"W/{tag}", f'"other", {tag}', "*"):  # weak comparison, as for a cache
        unchanged = await api.call("GET", path, tenant.key, headers={"If-None-Match": value})
        assert (unchanged.status, unchanged.body, unchanged.headers.get("ETag")) == (304, None, tag), value
    changed = await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False})
    again = await api.call("GET", path, tenant.key, headers={"If-None-Match": tag})
    assert (again.status, again.headers["ETag"], again.body["enabled"]) == (200, changed.headers["ETag"], False)
    # On a change, If-None-Match naming the current state refuses it.
    refused = await api.call("DELETE", path, tenant.key, headers={"If-None-Match": "*"})
    assert refused.status == 412, refused.body


async def test_if_unmodified_since_is_refused_naming_it_unless_if_match_comes_with_it(api, tenant):
    rule = await api.new_rule(tenant, source="dates")
    path = f"/api/v1/rules/{rule['rule_id']}"
    future = "Fri, 01 Jan 2100 00:00:00 GMT"
    refused = await api.call("DELETE", path, tenant.key, headers={"If-Unmodified-Since": future})
    assert refused.failing_fields() == {"If-Unmodified-Since"}
    assert "If-Match" in refused.body["fields"][0]["message"]
    assert (await api.call("GET", path, tenant.key)).status == 200
    # With If-Match it is ignored (RFC 9110 13.1.4): If-Match decides.
    past = "Sat, 01 Jan 2000 00:00:00 GMT"
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": "*", "If-Unmodified-Since": past})
            ).status == 204


async def test_if_match_on_a_request_that_does_not_evaluate_it_is_refused_not_ignored(api, tenant):
    refused = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "refused", "name": "*"},
                             headers={"If-Match": '"x"'})
    assert refused.failing_fields() == {"If-Match"}
    listed = await api.call("GET", "/api/v1/rules", tenant.key)
    assert [rule for rule in listed.body["items"] if rule["source"] == "refused"] == []
    key_refused = await api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", tenant.key,
                                 headers={"If-Match": "*"})
    assert key_refused.failing_fields() == {"If-Match"}
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", tenant.key)).status == 200  # key unchanged
    # A list has no ETag: If-None-Match on its GET is a cache's question, answered in full.
    assert (await api.call("GET", "/api/v1/rules", tenant.key, headers={"If-None-Match": '"x"'})).status == 200


async def test_another_clients_rule_stays_404_whatever_the_preconditions(api, tenant, other_tenant):
    theirs = await api.new_rule(other_tenant, source="theirs")
    path = f"/api/v1/rules/{theirs['rule_id']}"
    tag = (await api.call("GET", path, other_tenant.key)).headers["ETag"]
    for headers in ({"If-Match": "*"}, {"If-Match": tag}, {"If-None-Match": tag}, {"If-None-Match": '"x"'}):
        assert (await api.call("GET", path, tenant.key, headers=headers)).status == 404, headers
        assert (await api.call("DELETE", path, tenant.key, headers=headers)).status == 404, headers
        assert (await api.call("PATCH", path, tenant.key, {"version": 1, "enabled": False},
                               headers=headers)).status == 404, headers
    assert await stored_rule(theirs["rule_id"]) == {"name": "*", "enabled": True, "version": 1}


async def test_renames_waiting_on_the_locked_client_are_each_checked_against_the_one_before(api, tenant):
    """The check is made on the row as locked, not as read before: the renames queue on the row's
    lock, and each that comes after the first finds the client renamed (412), rather than every one
    of them passing a check made before the first wrote."""
    from alerting_app import db

    path = f"/api/v1/clients/{tenant.client_id}"
    tag = (await api.call("GET", path, tenant.key)).headers["ETag"]
    pool = await db.pool()
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM clients WHERE client_id = $1 FOR UPDATE", tenant.client_id)
            renames = [asyncio.create_task(api.call("PATCH", path, tenant.key, {"name": f"name-{n}"},
                                                    headers={"If-Match": tag})) for n in range(3)]
            # Each waits on the row, wherever it takes it (a lock before the check, or the write after it).
            await until_waiting_on_a_lock(pool, query_like="%clients%", sessions=3)
        replies = await asyncio.gather(*renames)
    assert sorted(reply.status for reply in replies) == [200, 412, 412], [reply.body for reply in replies]
    [winner] = [reply for reply in replies if reply.status == 200]
    assert (await api.call("GET", path, tenant.key)).body["name"] == winner.body["name"]


async def test_an_endpoint_carries_its_etag_and_a_stale_one_changes_or_deletes_nothing(api, tenant):
    rule = await api.new_rule(tenant, source="endpoint-etag")
    created = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/e"})
    path = f"/api/v1/endpoints/{created.body['endpoint_id']}"
    read = await api.call("GET", path, tenant.key)
    assert created.headers["ETag"] == read.headers["ETag"]  # the endpoint's, not that of its shown-once secret
    patched = await api.call("PATCH", path, tenant.key, {"enabled": False}, headers={"If-Match": read.headers["ETag"]})
    assert patched.status == 200, patched.body
    assert (await api.call("GET", path, tenant.key)).headers["ETag"] == patched.headers["ETag"]
    stale = await api.call("PATCH", path, tenant.key, {"value": "https://hooks.example.com/other"},
                           headers={"If-Match": read.headers["ETag"]})
    assert stale.status == 412, stale.body
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": read.headers["ETag"]})).status == 412
    now = await api.call("GET", path, tenant.key)
    assert (now.body["value"], now.body["enabled"]) == ("https://hooks.example.com/e", False)
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": patched.headers["ETag"]})).status == 204


async def test_a_patch_making_an_endpoint_a_webhook_answers_the_etag_get_then_shows_not_its_secrets(api, tenant):
    """The answer shows the new signing secret once; its ETag is the endpoint's as GET shows it
    (without the secret), or an If-Match with it would be refused at once."""
    rule = await api.new_rule(tenant, source="endpoint-becomes-webhook")
    created = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "slack", "value": "https://hooks.example.com/s"})
    path = f"/api/v1/endpoints/{created.body['endpoint_id']}"
    patched = await api.call("PATCH", path, tenant.key, {"type": "webhook", "value": "https://hooks.example.com/w"},
                             headers={"If-Match": created.headers["ETag"]})
    assert patched.status == 200, patched.body
    assert patched.body["secret"]
    read = await api.call("GET", path, tenant.key)
    assert "secret" not in read.body
    assert patched.headers["ETag"] == read.headers["ETag"]
    assert (await api.call("PATCH", path, tenant.key, {"enabled": False},
                           headers={"If-Match": patched.headers["ETag"]})).status == 200


async def test_endpoint_patches_waiting_on_its_locked_row_are_each_checked_against_the_one_before(api, tenant):
    """Each PATCH checks If-Match on the row it has read before the lock (no address lookup for a
    stale one) and again on the row as locked: the three queue on the row's lock with the same
    ETag, and the two after the first find it changed (412), rather than passing the early check."""
    from alerting_app import db

    rule = await api.new_rule(tenant, source="endpoint-lock")
    created = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/l"})
    path = f"/api/v1/endpoints/{created.body['endpoint_id']}"
    pool = await db.pool()
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM endpoints WHERE endpoint_id = $1 FOR UPDATE",
                                 created.body["endpoint_id"])
            patches = [asyncio.create_task(api.call("PATCH", path, tenant.key, {"rate_limit_per_s": float(n + 1)},
                                                    headers={"If-Match": created.headers["ETag"]}))
                       for n in range(3)]
            await until_waiting_on_a_lock(pool, query_like="%endpoints%FOR UPDATE%", sessions=3)
        replies = await asyncio.gather(*patches)
    assert sorted(reply.status for reply in replies) == [200, 412, 412], [reply.body for reply in replies]
    [winner] = [reply for reply in replies if reply.status == 200]
    assert (await api.call("GET", path, tenant.key)).body["rate_limit_per_s"] == winner.body["rate_limit_per_s"]


async def deleted_while_another_change_commits(api, key: str, path: str, change: str, *args) -> int:
    """The status of a DELETE of `path` with the ETag read before `change` (SQL, in a transaction
    of its own) was made: sent while that transaction holds the row, answered after it commits."""
    from alerting_app import db

    tag = (await api.call("GET", path, key)).headers["ETag"]
    pool = await db.pool()
    async with pool.acquire() as other, other.transaction():
        await other.execute(change, *args)
        deletion = asyncio.create_task(api.call("DELETE", path, key, headers={"If-Match": tag}))
        await until_waiting_on_a_lock(pool, unless_done=deletion)
    return (await deletion).status


async def test_a_delete_waiting_on_a_change_is_checked_against_the_change_not_the_row_before_it(api, tenant):
    """Each DELETE checks If-Match on the row as locked: one read before the lock, as it stood
    before a change still being committed, passed the check and then deleted the changed row."""
    rule = await api.new_rule(tenant, source="delete-race")
    endpoint = (await api.call("POST", "/api/v1/endpoints", tenant.key,
                               {"rule_id": rule["rule_id"], "type": "webhook",
                                "value": "https://hooks.example.com/race"})).body
    silence = (await api.call("POST", "/api/v1/silences", tenant.key, silence_body())).body
    changes = {
        f"/api/v1/endpoints/{endpoint['endpoint_id']}":
            ("UPDATE endpoints SET enabled = false, updated_at = clock_timestamp() WHERE endpoint_id = $1",
             endpoint["endpoint_id"]),
        f"/api/v1/silences/{silence['silence_id']}":
            ("UPDATE silences SET comment = 'theirs', updated_at = clock_timestamp() WHERE silence_id = $1",
             silence["silence_id"]),
        f"/api/v1/rules/{rule['rule_id']}":
            ("UPDATE rules SET enabled = false, version = version + 1, updated_at = clock_timestamp()"
             " WHERE rule_id = $1", rule["rule_id"]),
        f"/api/v1/clients/{tenant.client_id}":
            ("UPDATE clients SET name = 'theirs', updated_at = clock_timestamp() WHERE client_id = $1",
             tenant.client_id),
    }
    for path, (change, id_) in changes.items():
        assert await deleted_while_another_change_commits(api, tenant.key, path, change, id_) == 412, path
        still = await api.call("GET", path, tenant.key)
        assert still.status == 200 and still.body.get("state", "active") == "active", path


async def test_a_silence_carries_its_etag_and_a_stale_one_does_not_expire_it(api, tenant):
    created = await api.call("POST", "/api/v1/silences", tenant.key, silence_body())
    path = f"/api/v1/silences/{created.body['silence_id']}"
    read = await api.call("GET", path, tenant.key)
    assert created.headers["ETag"] == read.headers["ETag"]
    refused = await api.call("DELETE", path, tenant.key, headers={"If-Match": '"not-its-tag"'})
    assert refused.status == 412, refused.body
    assert (await api.call("GET", path, tenant.key)).body["state"] == "active"
    assert (await api.call("DELETE", path, tenant.key, headers={"If-Match": read.headers["ETag"]})).status == 204
    expired = await api.call("GET", path, tenant.key)
    assert expired.body["state"] == "expired" and expired.headers["ETag"] != read.headers["ETag"]


async def test_a_client_carries_its_etag_and_a_stale_one_neither_renames_nor_deletes_it(api):
    created = await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "etag-client"})
    assert created.status == 201, created.body
    tenant = Tenant(created.body["client_id"], created.body["api_key"])
    api.tenants.append(tenant)  # deleted after the test, as api.new_tenant's are
    path = f"/api/v1/clients/{tenant.client_id}"
    read = await api.call("GET", path, tenant.key)
    assert created.headers["ETag"] == read.headers["ETag"]  # the client's, not that of its shown-once key
    renamed = await api.call("PATCH", path, api.admin_token, {"name": "renamed"},
                             headers={"If-Match": read.headers["ETag"]})
    assert renamed.status == 200, renamed.body
    assert (await api.call("GET", path, tenant.key)).headers["ETag"] == renamed.headers["ETag"]
    assert (await api.call("PATCH", path, tenant.key, {"name": "mine"},
                           headers={"If-Match": read.headers["ETag"]})).status == 412
    assert (await api.call("DELETE", path, api.admin_token, headers={"If-Match": read.headers["ETag"]})).status == 412
    assert (await api.call("GET", path, tenant.key)).body["name"] == "renamed"
