"""Who may call the API: the admin token, or a client's own key, and nobody else."""
from __future__ import annotations

import hashlib
import uuid

import pytest

from test_api_support import API_LOOP, api, other_tenant, served_api_routes, tenant  # noqa: F401  (fixtures)
from web.errors import NO_TOKEN, NOT_OUR_TOKEN, TWO_AUTHORIZATIONS

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
        assert reply.body == {"error": "unauthorized", "message": NO_TOKEN}
        assert reply.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("authorization", "message"), [
    ("Bearer not-a-key", NOT_OUR_TOKEN), ("Basic YWRtaW46YWRtaW4=", NO_TOKEN), ("Bearer ", NO_TOKEN),
    ("token", NO_TOKEN)])
async def test_a_wrong_or_malformed_authorization_header_answers_401_saying_what_to_send(api, authorization,
                                                                                        message):
    # Before, a 401 had no message, unlike every other error: a header without a token read as a
    # wrong token.
    async with api.client.get("/api/v1/rules", headers={"Authorization": authorization}) as response:
        assert response.status == 401
        assert await response.json() == {"error": "unauthorized", "message": message}
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("second", ["not-a-key", "the admin token again"])
async def test_two_authorization_headers_answer_401(api, second):
    # The first was taken and the rest ignored: a request naming the admin token first was served
    # as the admin, whatever token a proxy in front may have checked.
    second = api.admin_token if second == "the admin token again" else second
    headers = [("Authorization", f"Bearer {api.admin_token}"), ("Authorization", f"Bearer {second}")]
    async with api.client.get("/api/v1/clients", headers=headers) as response:
        assert response.status == 401
        assert await response.json() == {"error": "unauthorized", "message": TWO_AUTHORIZATIONS}


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
    # Saying what was refused: a bare "forbidden" read as a key gone wrong.
    assert reply.body == {"error": "forbidden", "message": "creating a client needs the admin token (ADMIN_TOKEN)"}


async def test_a_client_key_cannot_post_alerts(api, tenant):
    alert = {"alert_id": "a-1", "event_ts": 1.0, "severity": "HIGH", "source": "s", "name": "n"}
    reply = await api.call("POST", "/api/v1/alerts", tenant.key, alert)
    assert reply.status == 403


async def test_the_key_of_a_deleted_client_stops_working(api, tenant):
    assert (await api.call("DELETE", f"/api/v1/clients/{tenant.client_id}", api.admin_token)).status == 204
    reply = await api.call("GET", "/api/v1/rules", tenant.key)
    assert reply.status == 401
    assert reply.body == {"error": "unauthorized", "message": NOT_OUR_TOKEN}


async def test_no_such_route_and_a_method_a_route_does_not_take_answer_json_errors(api, tenant):
    # Each with a message, as every other error has.
    unknown = await api.call("GET", "/api/v1/nothing-here", tenant.key)
    assert (unknown.status, unknown.body) == (404, {"error": "not_found", "message": "no route of the API at this "
                                                                                     "path (docs/api.md lists them)"})
    assert unknown.headers["Content-Type"].startswith("application/json")

    wrong_method = await api.call("PUT", "/api/v1/clients", api.admin_token, {"name": "x"})
    assert wrong_method.status == 405
    assert "POST" in wrong_method.headers["Allow"]
    assert wrong_method.body == {"error": "method_not_allowed",
                                 "message": f"this route does not take PUT; it takes {wrong_method.headers['Allow']}"}


# What a valid request of each route changing something sends, so that what refuses another client's
# key is its scoping, not its body.
VALID_BODIES = {
    ("PATCH", "/api/v1/clients/{client_id}"): {"name": "taken over"},
    ("PUT", "/api/v1/rules/{rule_id}"): {"version": 1, "severity": "LOW", "source": "s", "name": "n", "enabled": False},
    ("PATCH", "/api/v1/rules/{rule_id}"): {"version": 1, "enabled": False},
    ("PATCH", "/api/v1/endpoints/{endpoint_id}"): {"enabled": False},
}


async def stored_failed_notification(client_id: str, rule_id: str, endpoint_id: str) -> str:
    """A FAILED notification of the client, with its endpoint's FAILED delivery, as the pipeline stores one."""
    from alerting_app import db

    notification_id = str(uuid.uuid4())
    alert = {"alert_id": f"isolation-{notification_id}", "schema_version": 1, "event_ts": 1.0, "severity": "HIGH",
             "source": "payments", "name": "n", "context": {}}
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status)"
                           " VALUES ($1, $2, $3, $4, $5, 'FAILED')",
                           notification_id, client_id, alert["alert_id"], [alert], [rule_id])
        await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status, attempts, last_error)"
                           " VALUES ($1, $2, 'webhook', 'FAILED', 8, 'HTTP 500')", notification_id, endpoint_id)
    return notification_id


async def test_another_clients_key_reaches_none_of_a_clients_objects_on_any_route(api, tenant, other_tenant):
    # Every route naming an object answers another client's key 404, as for an unknown id, and
    # changes nothing; the lists and creations naming the client show and make nothing of its.
    rule = await api.new_rule(tenant, source="isolation")
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/isolation")
    silence = await api.call("POST", "/api/v1/silences", tenant.key,
                             {"source": "isolation", "ends_at": 4102444800, "comment": "c", "created_by": "me"})
    assert silence.status == 201, silence.body
    notification_id = await stored_failed_notification(tenant.client_id, rule["rule_id"], endpoint["endpoint_id"])
    ids = {"client_id": tenant.client_id, "rule_id": rule["rule_id"], "endpoint_id": endpoint["endpoint_id"],
           "silence_id": silence.body["silence_id"], "notification_id": notification_id}
    objects = [f"/api/v1/clients/{tenant.client_id}", f"/api/v1/rules/{rule['rule_id']}",
               f"/api/v1/endpoints/{endpoint['endpoint_id']}", f"/api/v1/silences/{silence.body['silence_id']}",
               f"/api/v1/notifications/{notification_id}"]
    before = [(await api.call("GET", path, tenant.key)).body for path in objects]

    answers, unknown_answers = {}, {}
    unknown_ids = {name: str(uuid.uuid4()) for name in ids}
    for method, template in sorted(route for route in served_api_routes() if "{" in route[1]):
        body = VALID_BODIES.get((method, template))
        for asked, answered in ((ids, answers), (unknown_ids, unknown_answers)):
            reply = await (api.call(method, template.format(**asked), other_tenant.key, body) if body is not None
                           else api.call(method, template.format(**asked), other_tenant.key))
            answered[method, template] = (reply.status, reply.body)
    lists = {path: (await api.call("GET", path, other_tenant.key, params=params)).body["items"]
             for path, params in [("/api/v1/clients", {}), ("/api/v1/rules", {"client_id": tenant.client_id}),
                                  ("/api/v1/endpoints", {"rule_id": rule["rule_id"]}),
                                  ("/api/v1/silences", {"client_id": tenant.client_id}),
                                  ("/api/v1/notifications", {"client_id": tenant.client_id})]}
    creations = [
        await api.call("POST", "/api/v1/rules", other_tenant.key,
                       {"client_id": tenant.client_id, "severity": "LOW", "source": "isolation", "name": "n"}),
        await api.call("POST", "/api/v1/silences", other_tenant.key,
                       {"client_id": tenant.client_id, "source": "isolation", "ends_at": 4102444800, "comment": "c",
                        "created_by": "me"}),
        await api.call("POST", "/api/v1/endpoints", other_tenant.key,
                       {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/theirs"}),
    ]

    # The very answer an id naming nothing gets, message included: nothing says the object exists.
    assert answers == unknown_answers
    assert {route: answer for route, answer in answers.items() if answer[0] != 404} == {}
    assert {answer[1]["message"] for answer in answers.values()} == {
        f"no {what} with this id that this token may see"
        for what in ("client", "rule", "endpoint", "silence", "notification")}
    assert lists == {"/api/v1/clients": [(await api.call("GET", f"/api/v1/clients/{other_tenant.client_id}",
                                                         other_tenant.key)).body],
                     "/api/v1/rules": [], "/api/v1/endpoints": [], "/api/v1/silences": [], "/api/v1/notifications": []}
    assert [reply.status for reply in creations] == [403, 403, 422]
    assert [(await api.call("GET", path, tenant.key)).body for path in objects] == before  # its key works still
    assert (await api.call("GET", "/api/v1/rules", tenant.key)).body["items"] == [before[1]]


@pytest.mark.parametrize("token", ["the admin token with its last character changed", "the admin token and one more",
                                   "the admin token less its last character"])
async def test_a_token_differing_from_the_admin_token_only_at_its_end_answers_401(api, token):
    # All of the token counts: one compared on a prefix alone let in whoever guessed that much.
    admin = api.admin_token
    token = {"the admin token with its last character changed": admin[:-1] + ("x" if admin[-1] != "x" else "y"),
             "the admin token and one more": admin + "x",
             "the admin token less its last character": admin[:-1]}[token]
    reply = await api.call("GET", "/api/v1/clients", token)
    assert reply.status == 401, reply.body


@pytest.mark.parametrize("authorization", ["bearer {token}", "BEARER {token}", "Bearer  {token}"])
async def test_the_bearer_scheme_is_read_in_any_case_and_after_any_spaces(api, authorization):
    # RFC 7235 2.1: the scheme is case-insensitive; RFC 6750 2.1: one or more spaces before the token.
    headers = {"Authorization": authorization.format(token=api.admin_token)}
    async with api.client.get("/api/v1/clients", headers=headers) as response:
        assert response.status == 200


async def test_a_client_key_cannot_read_what_a_worker_holds_of_every_client(api, tenant):
    # These views list every client's rules, and match an alert against them all: the admin's only.
    alert = {"alert_id": "a-1", "event_ts": 1.0, "severity": "HIGH", "source": "s", "name": "n"}
    replies = [await api.call("GET", "/api/v1/worker/rules", tenant.key),
               await api.call("POST", "/api/v1/worker/match", tenant.key, alert)]

    assert [(reply.status, reply.body) for reply in replies] == [
        (403, {"error": "forbidden", "message": "reading a worker's rules needs the admin token (ADMIN_TOKEN)"}),
        (403, {"error": "forbidden", "message": "matching an alert on a worker needs the admin token (ADMIN_TOKEN)"}),
    ]
    assert (await api.call("GET", "/api/v1/worker/rules", api.admin_token)).status == 200


async def test_every_kind_of_token_none_of_ours_gets_the_very_same_401(api, tenant, other_tenant, monkeypatch):
    # The message helps a caller whose token is wrong without saying which kind it is: nothing tells a
    # guess nearly right at the admin or ingest token from a random one, nor a replaced or deleted
    # client's key (its client existed) from a key that never was.
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "ingest_token", "ingest-token-of-the-test-" + uuid.uuid4().hex)
    replaced = tenant.key
    assert (await api.call("POST", f"/api/v1/clients/{tenant.client_id}/key", api.admin_token)).status == 200
    deleted = other_tenant.key
    assert (await api.call("DELETE", f"/api/v1/clients/{other_tenant.client_id}", api.admin_token)).status == 204
    tokens = {"a key that never was": "alk_" + uuid.uuid4().hex, "a replaced key": replaced,
              "a deleted client's key": deleted, "the admin token and one more": api.admin_token + "x",
              "the ingest token less its last character": settings.ingest_token[:-1]}
    answers = {}
    for kind, token in tokens.items():
        reply = await api.call("GET", "/api/v1/rules", token)
        answers[kind] = (reply.status, reply.body, reply.headers.get("WWW-Authenticate"))
    assert answers == {kind: (401, {"error": "unauthorized", "message": NOT_OUR_TOKEN}, "Bearer") for kind in tokens}
