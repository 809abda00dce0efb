"""Who may call the API: the admin token, or a client's own key, and nobody else."""
from __future__ import annotations

import hashlib

import pytest

from test_api_support import API_LOOP, api, other_tenant, served_api_routes, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP

UNKNOWN = "00000000-0000-4000-8000-000000000000"

DOCUMENTED_ROUTES = {
    ("POST", "/api/v1/clients"), ("GET", "/api/v1/clients"),
    ("GET", "/api/v1/clients/{client_id}"), ("PATCH", "/api/v1/clients/{client_id}"),
    ("DELETE", "/api/v1/clients/{client_id}"), ("POST", "/api/v1/clients/{client_id}/key"),
    ("POST", "/api/v1/rules"), ("GET", "/api/v1/rules"),
    ("GET", "/api/v1/rules/{rule_id}"), ("PUT", "/api/v1/rules/{rule_id}"),
    ("PATCH", "/api/v1/rules/{rule_id}"), ("DELETE", "/api/v1/rules/{rule_id}"),
    ("POST", "/api/v1/endpoints"), ("GET", "/api/v1/endpoints"),
    ("GET", "/api/v1/endpoints/{endpoint_id}"), ("PATCH", "/api/v1/endpoints/{endpoint_id}"),
    ("DELETE", "/api/v1/endpoints/{endpoint_id}"), ("POST", "/api/v1/endpoints/{endpoint_id}/secret"),
    ("POST", "/api/v1/endpoints/{endpoint_id}/test"),
    ("GET", "/api/v1/notifications"), ("GET", "/api/v1/notifications/{notification_id}"),
    ("POST", "/api/v1/notifications/{notification_id}/retry"),
    ("POST", "/api/v1/silences"), ("GET", "/api/v1/silences"),
    ("GET", "/api/v1/silences/{silence_id}"), ("DELETE", "/api/v1/silences/{silence_id}"),
    ("POST", "/api/v1/alerts"),
    ("GET", "/api/v1/worker/rules"), ("GET", "/api/v1/worker/silences"), ("POST", "/api/v1/worker/match"),
}


async def test_the_api_serves_exactly_the_documented_routes():
    assert served_api_routes() == DOCUMENTED_ROUTES


async def test_every_api_route_answers_401_without_a_token(api):
    for method, template in sorted(served_api_routes()):
        path = template.format(client_id=UNKNOWN, rule_id=UNKNOWN, endpoint_id=UNKNOWN, notification_id=UNKNOWN,
                               silence_id=UNKNOWN)
        reply = await api.call(method, path, None, {})
        assert reply.status == 401, (method, path, reply.body)
        assert reply.body == {"error": "unauthorized"}
        assert reply.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", ["Bearer not-a-key", "Basic YWRtaW46YWRtaW4=", "Bearer ", "token"])
async def test_a_wrong_or_malformed_authorization_header_answers_401(api, authorization):
    async with api.client.get("/api/v1/rules", headers={"Authorization": authorization}) as response:
        assert response.status == 401


@pytest.mark.parametrize("second", ["not-a-key", "the admin token again"])
async def test_two_authorization_headers_answer_401(api, second):
    # The first was taken and the rest ignored: a request naming the admin token first was served
    # as the admin, whatever token a proxy in front may have checked.
    second = api.admin_token if second == "the admin token again" else second
    headers = [("Authorization", f"Bearer {api.admin_token}"), ("Authorization", f"Bearer {second}")]
    async with api.client.get("/api/v1/clients", headers=headers) as response:
        assert response.status == 401
        assert await response.json() == {"error": "unauthorized"}


async def test_the_admin_token_is_accepted(api):
    reply = await api.call("GET", "/api/v1/clients", api.admin_token)
    assert reply.status == 200


async def test_a_client_key_is_accepted_and_only_its_hash_is_stored(api, tenant):
    from alerting_app import db

    reply = await api.call("GET", f"/api/v1/clients/{tenant.client_id}", tenant.key)
    assert reply.status == 200
    pool = await db.pool()
    stored = await pool.fetchval("SELECT api_key_hash FROM clients WHERE client_id = $1", tenant.client_id)
    assert stored == hashlib.sha256(tenant.key.encode()).hexdigest()
    assert tenant.key.startswith("alk_")


async def test_a_client_key_cannot_create_clients(api, tenant):
    reply = await api.call("POST", "/api/v1/clients", tenant.key, {"name": "sneaky"})
    assert reply.status == 403
    assert reply.body == {"error": "forbidden"}


async def test_a_client_key_cannot_post_alerts(api, tenant):
    alert = {"alert_id": "a-1", "event_ts": 1.0, "severity": "HIGH", "source": "s", "name": "n"}
    reply = await api.call("POST", "/api/v1/alerts", tenant.key, alert)
    assert reply.status == 403


async def test_the_key_of_a_deleted_client_stops_working(api, tenant):
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    reply = await api.call("GET", "/api/v1/rules", tenant.key)
    assert reply.status == 401


async def test_no_such_route_and_a_method_a_route_does_not_take_answer_json_errors(api, tenant):
    unknown = await api.call("GET", "/api/v1/nothing-here", tenant.key)
    assert (unknown.status, unknown.body) == (404, {"error": "not_found"})
    assert unknown.headers["Content-Type"].startswith("application/json")

    wrong_method = await api.call("PUT", "/api/v1/clients", api.admin_token, {"name": "x"})
    assert wrong_method.status == 405
    assert wrong_method.body == {"error": "method_not_allowed"}
    assert "POST" in wrong_method.headers["Allow"]
