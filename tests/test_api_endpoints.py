"""/api/v1/endpoints: where a rule's notifications go, checked per type, owned with the rule."""
from __future__ import annotations

import pytest

from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP


@pytest.mark.parametrize("type_, value", [
    ("webhook", "https://hooks.example.com/alerts?team=payments"),
    ("webhook", "http://10.1.2.3:8080/hook"),
    ("slack", "https://hooks.slack.com/services/T000/B000/XXXX"),
    ("email", "oncall+payments@example.co.uk"),
])
async def test_an_endpoint_is_attached_to_a_rule_of_the_client(api, tenant, type_, value):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": type_, "value": value})
    assert reply.status == 201
    assert (reply.body["rule_id"], reply.body["client_id"]) == (rule["rule_id"], tenant.client_id)
    assert (reply.body["type"], reply.body["value"], reply.body["enabled"]) == (type_, value, True)
    read = await api.call("GET", f"/api/v1/endpoints/{reply.body['endpoint_id']}", tenant.key)
    # The signing secret is shown at creation only.
    assert read.body == {name: value for name, value in reply.body.items() if name != "secret"}


@pytest.mark.parametrize("type_, value", [
    ("webhook", "not a url"),
    ("webhook", "ftp://files.example.com/drop"),
    ("webhook", "https://"),
    ("slack", "hooks.slack.com/services/T000"),
    ("email", "https://example.com"),
    ("email", "oncall@example"),
    ("email", "on call@example.com"),
    ("email", "@example.com"),
    ("email", "oncall@@example.com"),
])
async def test_a_value_that_does_not_fit_the_endpoint_type_is_refused(api, tenant, type_, value):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": type_, "value": value})
    assert reply.failing_fields() == {"value"}


async def test_an_unknown_endpoint_type_is_refused(api, tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "pager", "value": "https://x.example.com"})
    assert reply.failing_fields() == {"type"}


async def test_an_endpoint_cannot_be_attached_to_another_clients_rule(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", other_tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://evil.example.com"})
    assert reply.failing_fields() == {"rule_id"}
    listed = await api.call("GET", "/api/v1/endpoints", tenant.key, params={"rule_id": rule["rule_id"]})
    assert listed.body["items"] == []


async def test_endpoints_are_listed_per_rule(api, tenant):
    first_rule, second_rule = await api.new_rule(tenant, source="a"), await api.new_rule(tenant, source="b")
    first = await api.new_endpoint(tenant, first_rule["rule_id"])
    second = await api.new_endpoint(tenant, second_rule["rule_id"], "email", "ops@example.com")
    by_rule = await api.call("GET", "/api/v1/endpoints", tenant.key, params={"rule_id": first_rule["rule_id"]})
    assert [e["endpoint_id"] for e in by_rule.body["items"]] == [first["endpoint_id"]]
    every = await api.call("GET", "/api/v1/endpoints", tenant.key)
    assert [e["endpoint_id"] for e in every.body["items"]] == [first["endpoint_id"], second["endpoint_id"]]


async def test_an_endpoint_is_disabled_and_changed_with_its_value_checked_against_its_type(api, tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    disabled = await api.call("PATCH", path, tenant.key, {"enabled": False})
    assert (disabled.status, disabled.body["enabled"]) == (200, False)
    # The stored URL is not an address: switching the type alone is refused ...
    assert (await api.call("PATCH", path, tenant.key, {"type": "email"})).failing_fields() == {"value"}
    # ... switching type and value together is fine.
    email = await api.call("PATCH", path, tenant.key, {"type": "email", "value": "ops@example.com"})
    assert (email.status, email.body["type"], email.body["value"]) == (200, "email", "ops@example.com")


async def test_another_clients_key_can_neither_see_nor_change_an_endpoint(api, tenant, other_tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    assert (await api.call("GET", path, other_tenant.key)).status == 404
    assert (await api.call("PATCH", path, other_tenant.key, {"enabled": False})).status == 404
    assert (await api.call("DELETE", path, other_tenant.key)).status == 404
    assert (await api.call("GET", "/api/v1/endpoints", other_tenant.key)).body["items"] == []
    assert (await api.call("GET", path, tenant.key)).body == {k: v for k, v in endpoint.items() if k != "secret"}


async def test_a_deleted_endpoint_is_no_longer_found(api, tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    assert (await api.call("DELETE", path, tenant.key)).status == 204
    assert (await api.call("GET", path, tenant.key)).status == 404


async def test_deleting_a_rule_deletes_its_endpoints(api, tenant):
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    assert (await api.call("DELETE", f"/api/v1/rules/{rule['rule_id']}", tenant.key)).status == 204
    assert (await api.call("GET", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key)).status == 404
