"""Per-tenant quotas (web/quotas.py) and replacing a leaked client key or endpoint secret."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from postgres_waits import until_waiting_on_a_lock
from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


def _silence(minutes: int = 60) -> dict:
    ends_at = datetime.now(timezone.utc) + timedelta(minutes=minutes)
    return {"source": "payments", "ends_at": ends_at.isoformat(), "comment": "maintenance", "created_by": "ops"}


async def test_a_client_at_its_rule_quota_gets_409_and_others_are_not_held(api, tenant, other_tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_rules_per_client", 2)
    first = await api.new_rule(tenant, source="a")
    await api.new_rule(tenant, source="b")

    refused = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "c", "name": "*"})
    assert refused.status == 409, refused.body
    assert "MAX_RULES_PER_CLIENT" in refused.body["message"]
    # The admin creating for the client is held to the same quota.
    as_admin = await api.call("POST", "/api/v1/rules", api.admin_token,
                              {"client_id": tenant.client_id, "severity": "HIGH", "source": "c", "name": "*"})
    assert as_admin.status == 409, as_admin.body
    await api.new_rule(other_tenant, source="c")  # another tenant's quota is its own

    listed = await api.call("GET", "/api/v1/rules", tenant.key)
    assert len(listed.body["items"]) == 2
    assert (await api.call("DELETE", f"/api/v1/rules/{first['rule_id']}", tenant.key)).status == 204
    await api.new_rule(tenant, source="c")


async def test_concurrent_creations_stop_exactly_at_the_quota(api, tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_rules_per_client", 3)
    replies = await asyncio.gather(*(
        api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": f"s{n}", "name": "*"})
        for n in range(12)))
    assert sorted(reply.status for reply in replies) == [201] * 3 + [409] * 9


async def test_silences_count_against_the_quota_until_retention_deletes_them(api, tenant, monkeypatch):
    # Every worker holds an ended silence until then: were they not counted, a key could create and
    # expire silences without bound.
    from agents.retention import prune_silences
    from alerting_app import db
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_silences_per_client", 2)
    first = await api.call("POST", "/api/v1/silences", tenant.key, _silence())
    assert first.status == 201, first.body
    # One that has not started yet counts: it will hold the workers' memory when it does.
    later = dict(_silence(120), starts_at=(datetime.now(timezone.utc) + timedelta(minutes=60)).isoformat())
    assert (await api.call("POST", "/api/v1/silences", tenant.key, later)).status == 201

    refused = await api.call("POST", "/api/v1/silences", tenant.key, _silence())
    assert refused.status == 409, refused.body
    assert "MAX_SILENCES_PER_CLIENT" in refused.body["message"]

    # Expiring one (DELETE ends it now) makes no room: the workers still hold it.
    assert (await api.call("DELETE", f"/api/v1/silences/{first.body['silence_id']}", tenant.key)).status == 204
    assert (await api.call("POST", "/api/v1/silences", tenant.key, _silence())).status == 409
    # Retention deleting it does.
    await asyncio.sleep(0.01)  # ended strictly before the prune's "now"
    assert await prune_silences(await db.pool(), 0) >= 1
    assert (await api.call("POST", "/api/v1/silences", tenant.key, _silence())).status == 201


async def test_with_silences_kept_for_ever_only_those_not_ended_count(api, tenant, monkeypatch):
    # SILENCE_RETENTION_DAYS=0: retention never deletes one, so counting ended ones would refuse
    # the client's silences for good once it had made MAX_SILENCES_PER_CLIENT.
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_silences_per_client", 1)
    monkeypatch.setattr(settings, "silence_retention_days", 0)
    first = await api.call("POST", "/api/v1/silences", tenant.key, _silence())
    refused = await api.call("POST", "/api/v1/silences", tenant.key, _silence())
    assert (first.status, refused.status) == (201, 409)
    assert "that have not ended" in refused.body["message"]

    assert (await api.call("DELETE", f"/api/v1/silences/{first.body['silence_id']}", tenant.key)).status == 204
    assert (await api.call("POST", "/api/v1/silences", tenant.key, _silence())).status == 201


async def test_a_rule_at_its_endpoint_quota_gets_409(api, tenant, monkeypatch):
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_endpoints_per_rule", 2)
    rule, other_rule = await api.new_rule(tenant, source="a"), await api.new_rule(tenant, source="b")
    for n in range(2):
        await api.new_endpoint(tenant, rule["rule_id"], value=f"https://hooks.example.com/{n}")

    refused = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/2"})
    assert refused.status == 409, refused.body
    assert "MAX_ENDPOINTS_PER_RULE" in refused.body["message"]
    await api.new_endpoint(tenant, other_rule["rule_id"])  # the quota is per rule


async def test_disabled_rules_and_endpoints_count_against_their_quotas(api, tenant, monkeypatch):
    # Every worker holds a disabled rule too, and an endpoint is re-enabled without a quota check:
    # counted only while enabled, a key could create any number and then enable them.
    from alerting_app.app import settings
    monkeypatch.setattr(settings, "max_rules_per_client", 2)
    monkeypatch.setattr(settings, "max_endpoints_per_rule", 1)
    rule = await api.new_rule(tenant, source="a", enabled=False)
    await api.new_rule(tenant, source="b", enabled=False)
    refused = await api.call("POST", "/api/v1/rules", tenant.key, {"severity": "HIGH", "source": "c", "name": "*"})
    assert refused.status == 409, refused.body
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], value="https://hooks.example.com/0")
    assert (await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                           {"enabled": False})).status == 200
    refused = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/1"})
    assert refused.status == 409, refused.body


async def test_an_unknown_client_is_still_a_422_naming_client_id(api):
    missing = "00000000-0000-4000-8000-000000000000"
    rule = await api.call("POST", "/api/v1/rules", api.admin_token,
                          {"client_id": missing, "severity": "HIGH", "source": "a", "name": "*"})
    assert rule.failing_fields() == {"client_id"}
    silence = await api.call("POST", "/api/v1/silences", api.admin_token, dict(_silence(), client_id=missing))
    assert silence.failing_fields() == {"client_id"}


async def test_a_client_replaces_its_own_key_and_the_old_one_stops_working(api, tenant, other_tenant):
    replaced = await api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", tenant.key)
    assert replaced.status == 200, replaced.body
    new_key = replaced.body["api_key"]
    assert new_key.startswith("alk_") and new_key != tenant.key
    assert replaced.body["client_id"] == tenant.client_id

    assert (await api.call("GET", "/api/v1/rules", tenant.key)).status == 401
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", new_key)).status == 200

    # Another client's key cannot, and learns nothing: 404 as for an unknown client.
    assert (await api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", other_tenant.key)).status == 404
    by_admin = await api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", api.admin_token)
    assert by_admin.status == 200
    assert (await api.call("GET", "/api/v1/rules", new_key)).status == 401
    assert (await api.call("GET", "/api/v1/rules", by_admin.body["api_key"])).status == 200


async def test_a_key_replaced_while_a_replacement_with_it_waited_does_not_replace_the_new_one(api, tenant):
    """The leaked key's holder asks for a new key as the owner replaces it: authenticated with the
    old key a moment before the owner's replacement committed, its own replacement used to wait for
    that one's lock, then replace the owner's new key with one for the leaked key's holder, who kept
    access and locked the owner out. It is refused now, as the old key is from that moment."""
    from alerting_app import db
    from web.auth import hash_api_key, new_api_key

    owners_key = new_api_key()
    pool = await db.pool()
    async with pool.acquire() as owner:
        transaction = owner.transaction()
        await transaction.start()
        await owner.execute("UPDATE clients SET api_key_hash = $2 WHERE client_id = $1", tenant.client_id,
                            hash_api_key(owners_key))
        leaked = asyncio.ensure_future(api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", tenant.key))
        await until_waiting_on_a_lock(pool, query_like="%UPDATE clients SET api_key_hash%", unless_done=leaked)
        await transaction.commit()

    assert (await leaked).status == 401, (await leaked).body
    assert (await api.call("GET", "/api/v1/rules", owners_key)).status == 200
    assert (await api.call("GET", "/api/v1/rules", tenant.key)).status == 401


async def test_an_endpoint_gets_a_new_secret_which_deliveries_sign_with(api, tenant, other_tenant):
    from alerting_app import db
    from alerting_app.delivery.records import endpoints_now

    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}/secret"

    assert (await api.call("POST", path, other_tenant.key)).status == 404
    replaced = await api.call("POST", path, tenant.key)
    assert replaced.status == 200, replaced.body
    assert replaced.body["secret"] != endpoint["secret"]
    assert replaced.body["endpoint_id"] == endpoint["endpoint_id"]

    pool = await db.pool()
    async with pool.acquire() as conn:
        [stored] = (await endpoints_now(conn, [endpoint["endpoint_id"]])).values()
        assert stored.secret == replaced.body["secret"]
    assert "secret" not in (await api.call("GET", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key)).body
