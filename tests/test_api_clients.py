"""/api/v1/clients: the admin creates tenants; a tenant sees and renames only itself."""
from __future__ import annotations

from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


async def test_creating_a_client_returns_its_api_key_once(api):
    created = await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "Acme Payments"})
    assert created.status == 201
    assert created.body["name"] == "Acme Payments"
    assert created.body["api_key"].startswith("alk_")

    read = await api.call("GET", f"/api/v1/clients/{created.body['client_id']}", api.admin_token)
    assert read.status == 200
    assert "api_key" not in read.body
    assert {k: v for k, v in created.body.items() if k != "api_key"} == read.body


async def test_each_client_gets_a_different_key(api, tenant, other_tenant):
    assert tenant.key != other_tenant.key
    assert tenant.client_id != other_tenant.client_id


async def test_a_client_without_a_name_is_refused_with_422_naming_the_field(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, {})
    assert reply.failing_fields() == {"name"}


async def test_unknown_fields_in_a_body_are_refused(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, {"name": "x", "nmae": "typo"})
    assert reply.failing_fields() == {"nmae"}


async def test_a_body_that_is_not_json_is_refused_with_422(api):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, data=b"{name: 'no quotes'")
    assert reply.failing_fields() == {"body"}


async def test_a_client_key_lists_only_its_own_client(api, tenant, other_tenant):
    reply = await api.call("GET", "/api/v1/clients", tenant.key)
    assert reply.status == 200
    assert [c["client_id"] for c in reply.body["items"]] == [tenant.client_id]
    assert reply.body["next_cursor"] is None


async def test_the_admin_lists_every_client(api, tenant, other_tenant):
    seen = []
    cursor = None
    while True:
        params = {"limit": "10", **({"cursor": cursor} if cursor else {})}
        reply = await api.call("GET", "/api/v1/clients", api.admin_token, params=params)
        assert reply.status == 200
        assert len(reply.body["items"]) <= 10
        seen += [c["client_id"] for c in reply.body["items"]]
        assert cursor is None or reply.body["next_cursor"] != cursor, "the same page again: paging would never end"
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert {tenant.client_id, other_tenant.client_id} <= set(seen)
    assert len(seen) == len(set(seen))


async def test_a_client_key_cannot_read_change_or_delete_another_client(api, tenant, other_tenant):
    path = f"/api/v1/clients/{tenant.client_id}"
    assert (await api.call("GET", path, other_tenant.key)).status == 404
    assert (await api.call("PATCH", path, other_tenant.key, {"name": "mine now"})).status == 404
    assert (await api.call("DELETE", path, other_tenant.key)).status == 404
    still = await api.call("GET", path, api.admin_token)
    assert still.status == 200
    assert still.body["name"] != "mine now"


async def test_a_client_can_rename_itself(api, tenant):
    reply = await api.call("PATCH", f"/api/v1/clients/{tenant.client_id}", tenant.key, {"name": "Renamed"})
    assert reply.status == 200
    assert reply.body["name"] == "Renamed"
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", tenant.key)).body["name"] == "Renamed"


async def test_renaming_to_an_empty_name_is_refused(api, tenant):
    reply = await api.call("PATCH", f"/api/v1/clients/{tenant.client_id}", api.admin_token, {"name": ""})
    assert reply.failing_fields() == {"name"}


async def test_a_deleted_client_is_gone_with_its_rules(api, tenant):
    rule = await api.new_rule(tenant)
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    assert (await api.call("GET", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 404
    assert (await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", api.admin_token)).status == 404
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 404


async def test_an_id_that_is_not_a_uuid_is_not_found(api):
    assert (await api.call("GET", "/api/v1/clients/not-a-uuid", api.admin_token)).status == 404
