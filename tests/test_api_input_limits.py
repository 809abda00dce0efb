"""Hostile or malformed input answers a 4xx naming what is wrong, never a 500: oversized bodies,
undecodable headers, forged cursors, datetimes Postgres cannot hold, JSON nested too deeply."""
from __future__ import annotations

import asyncio
import base64
import codecs
import gzip
import json

import pytest
from multidict import CIMultiDict

from test_api_support import API_LOOP, Tenant, api, served_api_routes, tenant  # noqa: F401  (fixtures)
from web.errors import NOT_OUR_TOKEN
from web.validation import MAX_BODY_BYTES

pytestmark = API_LOOP


def padded_client_body(size: int) -> bytes:
    """A valid ClientCreate body of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = json.dumps({"name": "padded"}).encode()
    return body + b" " * (size - len(body))


# --- request body size ----------------------------------------------------------------------------

async def test_a_body_of_the_limit_is_read_and_one_byte_more_is_413(api):
    accepted = await api.call("POST", "/api/v1/clients", api.admin_token, data=padded_client_body(MAX_BODY_BYTES))
    refused = await api.call("POST", "/api/v1/clients", api.admin_token,
                             data=padded_client_body(MAX_BODY_BYTES + 1))
    assert accepted.status == 201, accepted.body
    api.tenants.append(Tenant(accepted.body["client_id"], accepted.body["api_key"]))  # deleted with the module
    assert (refused.status, refused.body["error"]) == (413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in refused.body["message"]


async def test_a_chunked_body_without_length_is_cut_off_at_the_limit(api):
    async def chunks():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json"}
    async with api.client.post("/api/v1/alerts", data=chunks(), headers=headers) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"


async def test_a_chunked_body_of_the_limit_is_read_and_one_byte_more_is_413(api):
    """The limit of a body without Content-Length is counted as it is read: exactly, not about."""
    async def chunked(body: bytes):
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json"}
    async with api.client.post("/api/v1/clients", data=chunked(padded_client_body(MAX_BODY_BYTES)),
                               headers=headers) as response:
        accepted = await response.json()
        assert response.status == 201, accepted
    api.tenants.append(Tenant(accepted["client_id"], accepted["api_key"]))  # deleted with the module
    async with api.client.post("/api/v1/clients", data=chunked(padded_client_body(MAX_BODY_BYTES + 1)),
                               headers=headers) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "payload_too_large"


async def test_a_content_length_over_the_limit_is_413_before_the_body_is_sent(api):
    """The answer comes from the header alone: the worker neither waits for nor buffers the body."""
    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json",
               "Content-Length": str(MAX_BODY_BYTES + 1)}
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    try:
        request = "POST /api/v1/clients HTTP/1.1\r\nHost: api\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        writer.write(request.encode() + b'{"name": "never sent whole"')  # and nothing more
        await writer.drain()
        # Bounded only so that a worker waiting for the rest fails the test rather than hanging it.
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
    finally:
        writer.close()
    assert status_line.split()[1] == b"413", status_line


async def test_a_compressed_body_is_limited_by_its_decompressed_size(api):
    # 2 MiB of spaces compress to a few KB: Content-Length alone would let it through.
    compressed = gzip.compress(b"[" + b" " * (2 * MAX_BODY_BYTES) + b"]")
    assert len(compressed) < MAX_BODY_BYTES
    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json",
               "Content-Encoding": "gzip"}
    async with api.client.post("/api/v1/alerts", data=compressed, headers=headers) as response:
        assert response.status == 413


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_its_content_encoding_does_not_undo_is_refused_naming_the_body(api, encoding):
    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json",
               "Content-Encoding": encoding}
    async with api.client.post("/api/v1/alerts", data=b"not compressed at all", headers=headers) as response:
        assert response.status == 422
        [failure] = (await response.json())["fields"]
        assert failure["field"] == "body" and failure["message"].startswith("cannot be read")


async def test_a_key_given_twice_is_refused_naming_it_not_read_as_its_last_value(api, tenant):
    rule = await api.new_rule(tenant, source="duplicate-keys")
    patched = await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                             data=b'{"version": 1, "enabled": true, "enabled": false}')
    alerts = await api.call("POST", "/api/v1/alerts", api.admin_token,
                            data=b'{"alert_id": "a-1", "alert_id": "a-2", "event_ts": 1764000000, '
                                 b'"severity": "HIGH", "source": "s", "name": "n"}')

    for reply in (patched, alerts):
        assert reply.status == 422
        assert reply.body["fields"] == [{"field": "body", "message": reply.body["fields"][0]["message"]}]
    assert "'enabled' is given more than once" in patched.body["fields"][0]["message"]
    assert (await api.call("GET", f"/api/v1/rules/{rule['rule_id']}", tenant.key)).body["enabled"] is True


async def test_a_patch_giving_null_where_null_means_nothing_is_refused_naming_the_field(api, tenant):
    rule = await api.new_rule(tenant, source="null-patch")
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])

    rule_reply = await api.call("PATCH", f"/api/v1/rules/{rule['rule_id']}", tenant.key,
                                {"version": 1, "enabled": None, "source": None})
    endpoint_reply = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                                    {"value": None, "rate_limit_per_s": None})

    assert rule_reply.failing_fields() == {"enabled", "source"}
    assert endpoint_reply.failing_fields() == {"value"}  # a null rate limit means: the default


# --- lone surrogates ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, field", [
    ("/api/v1/clients", rb'{"name": "a\ud800b"}', "name"),
    ("/api/v1/rules", rb'{"severity": "HIGH", "source": "s", "name": "n", "fingerprint_keys": ["ok", "\udc00"]}',
     "fingerprint_keys.1"),
    ("/api/v1/silences", rb'{"source": "s", "ends_at": 4102444800, "comment": "c", "created_by": "me", '
                         rb'"context_matchers": {"region": "\uDE00\uD83D"}}', "context_matchers.region"),
    ("/api/v1/silences", rb'{"source": "s", "ends_at": 4102444800, "comment": "c", "created_by": "me", '
                         rb'"context_matchers": {"\ud800": "eu"}}', "context_matchers"),
    # An escaped backslash, the text "ud83d", then a lone low half: the six bytes before that escape
    # read as a high half's escape, and the half was taken for the second of a pair.
    ("/api/v1/clients", rb'{"name": "a\\ud83d\udcdf"}', "name"),
])
async def test_a_lone_surrogate_is_refused_naming_its_field(api, tenant, path, body, field):
    # JSON can escape half of a UTF-16 pair, which is no character: pydantic's parser refused it as
    # invalid JSON naming the body ("unexpected end of hex escape"), not the field holding it.
    reply = await api.call("POST", path, api.admin_token if path.endswith("clients") else tenant.key, data=body)
    assert reply.failing_fields() == {field}
    assert "lone surrogate" in reply.body["fields"][0]["message"]


@pytest.mark.parametrize("body, name", [
    (rb'{"name": "pager \ud83d\udcdf"}', "pager \U0001f4df"),
    # An escaped backslash before the pair: a backslash, then the pager.
    (rb'{"name": "pager \\\ud83d\udcdf"}', "pager \\\U0001f4df"),
])
async def test_a_surrogate_pair_is_one_character_and_accepted(api, body, name):
    reply = await api.call("POST", "/api/v1/clients", api.admin_token, data=body)
    assert reply.status == 201, reply.body
    api.tenants.append(Tenant(reply.body["client_id"], reply.body["api_key"]))  # deleted with the module
    assert reply.body["name"] == name


# --- Authorization header -------------------------------------------------------------------------

async def raw_request(api, request: bytes) -> bytes:
    url = api.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read(65536)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("token", [b"\xff", b"alk_\xc3\x28", b"\xe2\x82"])
async def test_an_authorization_header_that_is_not_utf8_answers_401(api, token):
    answer = await raw_request(api, b"GET /api/v1/rules HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer "
                               + token + b"\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    # As any token none of ours: bytes that are not UTF-8 are no missing token.
    assert NOT_OUR_TOKEN.encode() in answer, answer


# --- pagination cursors ---------------------------------------------------------------------------

def forged_cursor(content: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(content).encode()).decode().rstrip("=")


@pytest.mark.parametrize("content", [
    ["2024-01-01T00:00:00+00:00", 5],
    ["2024-01-01T00:00:00+00:00", ["8a3f1a52-0000-4000-8000-000000000000"]],
    ["2024-01-01T00:00:00+00:00", True],
    [5, "8a3f1a52-0000-4000-8000-000000000000"],
    ["0001-01-01T00:00:00+01:00", "8a3f1a52-0000-4000-8000-000000000000"],
    ["9999-12-31T23:59:59-01:00", "8a3f1a52-0000-4000-8000-000000000000"],
    ["2024-01-01T00:00:00", "8a3f1a52-0000-4000-8000-000000000000"],  # no zone: this API writes UTC offsets
    {"created_at": 1, "id": 2},
])
@pytest.mark.parametrize("path", ["/api/v1/rules", "/api/v1/notifications", "/api/v1/silences"])
async def test_a_forged_cursor_is_refused_naming_the_cursor(api, tenant, path, content):
    reply = await api.call("GET", path, tenant.key, params={"cursor": forged_cursor(content)})
    assert reply.failing_fields() == {"cursor"}


async def test_a_cursor_nested_too_deeply_is_refused_naming_the_cursor(api, tenant):
    cursor = base64.urlsafe_b64encode(b"[" * 1500 + b"]" * 1500).decode().rstrip("=")
    reply = await api.call("GET", "/api/v1/rules", tenant.key, params={"cursor": cursor})
    assert reply.failing_fields() == {"cursor"}


async def test_a_cursor_near_the_ends_of_the_calendar_in_utc_is_accepted(api, tenant):
    for created_at in ("0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59+00:00"):
        cursor = forged_cursor([created_at, "8a3f1a52-0000-4000-8000-000000000000"])
        reply = await api.call("GET", "/api/v1/notifications", tenant.key, params={"cursor": cursor})
        assert reply.status == 200, reply.body


# --- deeply nested JSON ---------------------------------------------------------------------------

DEEP = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize("path", ["/api/v1/alerts", "/api/v1/worker/match", "/api/v1/clients", "/api/v1/rules"])
async def test_json_nested_a_thousand_levels_deep_is_refused_as_invalid(api, path):
    reply = await api.call("POST", path, api.admin_token, data=DEEP)
    assert reply.failing_fields() == {"body"}


async def test_an_alert_with_a_deeply_nested_context_value_is_refused(api):
    alert = b'{"alert_id": "a", "event_ts": 1700000000, "severity": "HIGH", "source": "s", "name": "n", ' \
            b'"context": {"k": ' + DEEP + b"}}"
    reply = await api.call("POST", "/api/v1/alerts", api.admin_token, data=alert)
    assert reply.status == 422, reply.body


# --- query parameters ----------------------------------------------------------------------------

async def one_of_each_object(api, tenant, source: str) -> tuple[dict[str, str], list[str], list]:
    """A rule, endpoint and silence of `tenant`: the ids each route template takes, the paths of the
    client and those three, and what a GET of each answers now (to show a refused call changed nothing)."""
    rule = await api.new_rule(tenant, source=source)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    silence = await api.call("POST", "/api/v1/silences", tenant.key,
                             {"source": source, "ends_at": 4102444800, "comment": "c", "created_by": "me"})
    assert silence.status == 201, silence.body
    ids = {"client_id": tenant.client_id, "rule_id": rule["rule_id"], "endpoint_id": endpoint["endpoint_id"],
           "silence_id": silence.body["silence_id"], "notification_id": "00000000-0000-4000-8000-000000000000"}
    objects = [f"/api/v1/clients/{tenant.client_id}", f"/api/v1/rules/{rule['rule_id']}",
               f"/api/v1/endpoints/{endpoint['endpoint_id']}", f"/api/v1/silences/{silence.body['silence_id']}"]
    before = [(await api.call("GET", path, tenant.key)).body for path in objects]
    return ids, objects, before


async def test_every_route_refuses_a_query_parameter_it_does_not_take_naming_it_and_does_nothing(api, tenant):
    # Only the lists read query parameters, and they refused unknown ones; every other route
    # ignored them: `DELETE /api/v1/clients/{id}?dry_run=true` deleted the client.
    ids, objects, before = await one_of_each_object(api, tenant, "query-parameters")

    answers = {}
    for method, template in sorted(served_api_routes()):
        reply = await api.call(method, template.format(**ids), api.admin_token, {}, params={"dry_run": "true"})
        answers[method, template] = (reply.status, reply.body)

    refused = (422, {"error": "validation_failed",
                     "fields": [{"field": "dry_run", "message": "Extra inputs are not permitted"}]})
    assert {route: answer for route, answer in answers.items() if answer != refused} == {}
    assert [(await api.call("GET", path, tenant.key)).body for path in objects] == before  # the old key still works


# --- bodies ----------------------------------------------------------------------------------------

# The routes whose handler reads a body.
ROUTES_WITH_A_BODY = {("POST", "/api/v1/alerts"), ("POST", "/api/v1/clients"), ("PATCH", "/api/v1/clients/{client_id}"),
                      ("POST", "/api/v1/rules"), ("PUT", "/api/v1/rules/{rule_id}"), ("PATCH", "/api/v1/rules/{rule_id}"),
                      ("POST", "/api/v1/endpoints"), ("PATCH", "/api/v1/endpoints/{endpoint_id}"),
                      ("POST", "/api/v1/silences"), ("POST", "/api/v1/worker/match")}


async def test_every_route_without_a_body_refuses_one_naming_it_and_does_nothing(api, tenant):
    # Ignored, a body read as accepted: DELETE /api/v1/silences/{id} with {"comment": "fixed"}
    # answered 204 and kept no comment; DELETE /api/v1/clients/{id} with {"dry_run": true} deleted.
    ids, objects, before = await one_of_each_object(api, tenant, "bodies")

    answers = {}
    for method, template in sorted(served_api_routes() - ROUTES_WITH_A_BODY):
        reply = await api.call(method, template.format(**ids), api.admin_token, {"dry_run": True})
        answers[method, template] = (reply.status, reply.body)

    refused = (422, {"error": "validation_failed", "fields": [
        {"field": "body", "message": "this request takes no body, and nothing in it would be read: send it without one"}]})
    assert {route: answer for route, answer in answers.items() if answer != refused} == {}
    assert [(await api.call("GET", path, tenant.key)).body for path in objects] == before  # the old key still works
    # Nothing in it: some clients send {} or null with every request.
    for body in (b"{}", b"null", b""):
        assert (await api.call("GET", objects[1], tenant.key, data=body)).status == 200
    # Those three only: any other JSON (an empty list too) holds something the route would not read.
    for body in (b"[]", b"false", b'""'):
        assert (await api.call("GET", objects[1], tenant.key, data=body)).failing_fields() == {"body"}
    assert (await api.call("DELETE", objects[3], tenant.key, data=b" ")).status == 204


# --- numbers too long for Python --------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/api/v1/rules", b'{"source": "s", "group_window_s": 1' + b"0" * 5000 + b"}"),
    ("/api/v1/alerts", b'{"alert_id": "a", "event_ts": -' + b"9" * 5000 + b', "severity": "HIGH", '
                       b'"source": "s", "name": "n"}'),
])
async def test_an_integer_of_thousands_of_digits_is_refused_as_too_long_without_pythons_hint(api, path, body):
    # json.loads refuses integers past 4,300 digits with a message telling the caller to call
    # sys.set_int_max_str_digits(): an internal detail, which the answer passed on as it was.
    reply = await api.call("POST", path, api.admin_token, data=body)
    assert reply.failing_fields() == {"body"}
    [failure] = reply.body["fields"]
    assert failure["message"] == "a number too long: an integer has at most 4300 digits"


@pytest.mark.parametrize("path, body", [
    ("/api/v1/clients", '{"name": "Café"}'.encode("latin-1")),
    ("/api/v1/alerts", '{"alert_id": "é", "event_ts": 1, "severity": "HIGH", "source": "s", "name": "n"}'
                       .encode("latin-1")),
])
async def test_a_body_that_is_not_utf8_is_refused_saying_so(api, path, body):
    # json.loads raises UnicodeDecodeError, a ValueError like its refusal of a too long integer:
    # a Latin-1 body was told "a number too long: an integer has at most 4300 digits".
    reply = await api.call("POST", path, api.admin_token, data=body)
    assert reply.failing_fields() == {"body"}
    [failure] = reply.body["fields"]
    where = body.index("é".encode("latin-1"))
    assert failure["message"] == f"not UTF-8 text (invalid continuation byte at byte {where}): JSON is read as UTF-8"


_AN_ALERT = '{"alert_id": "bom", "event_ts": 1, "severity": "HIGH", "source": "s", "name": "n"}'


@pytest.mark.parametrize("path, text", [("/api/v1/clients", '{"name": "UTF-16"}'), ("/api/v1/alerts", _AN_ALERT)])
@pytest.mark.parametrize("codec, nul_at", [("utf-16-le", 1), ("utf-16", 3), ("utf-32-be", 0)])
async def test_a_body_in_utf16_or_utf32_is_refused_as_not_utf8_on_every_route(api, path, text, codec, nul_at):
    # json.loads detects UTF-16 and UTF-32 in bytes: POST /alerts read them, while the routes that
    # go on to pydantic answered "invalid JSON: expected value at line 1 column 1".
    reply = await api.call("POST", path, api.admin_token, data=text.encode(codec))
    assert reply.failing_fields() == {"body"}
    [failure] = reply.body["fields"]
    assert failure["message"] == (f"not UTF-8 text (a NUL byte at byte {nul_at}): JSON is read as UTF-8, "
                                  "not UTF-16 or UTF-32")


async def test_a_leading_utf8_byte_order_mark_is_ignored_on_every_route(api):
    # RFC 8259 lets a parser ignore it: POST /alerts did (json.loads), POST /clients answered
    # "invalid JSON: expected value at line 1 column 1" (pydantic).
    bom = codecs.BOM_UTF8
    created = await api.call("POST", "/api/v1/clients", api.admin_token, data=bom + '{"name": "Bömer"}'.encode())
    assert created.status == 201 and created.body["name"] == "Bömer"
    api.tenants.append(Tenant(created.body["client_id"], created.body["api_key"]))  # deleted with the module
    assert (await api.call("POST", "/api/v1/alerts", api.admin_token, data=bom + _AN_ALERT.encode())).status == 202
    # Where the bad byte is, counted in the body as sent, the mark included.
    refused = await api.call("POST", "/api/v1/clients", api.admin_token, data=bom + b'{"name": "Caf\xe9"}')
    [failure] = refused.body["fields"]
    assert failure["message"] == "not UTF-8 text (invalid continuation byte at byte 16): JSON is read as UTF-8"


@pytest.mark.parametrize("encoding", ["foo", "gzip, br", "compress"])
async def test_a_content_encoding_the_api_does_not_undo_is_415_not_read_as_it_is(api, encoding):
    # aiohttp hands these over still encoded: read as JSON, a plain body was accepted.
    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json",
               "Content-Encoding": encoding}
    async with api.client.post("/api/v1/clients", data=b'{"name": "encoded"}', headers=headers) as response:
        assert response.status == 415
        body = await response.json()
    assert body["error"] == "unsupported_media_type" and encoding in body["message"]


@pytest.mark.parametrize("first, second", [("gzip", "gzip"), ("identity", "gzip"), ("gzip", "identity")])
async def test_content_encoding_given_in_two_header_lines_is_415_as_a_list_is(api, first, second):
    # Two lines are one list of codings (RFC 9110, 5.3). The API read the first line, aiohttp undoes
    # the coding of the last: a body gzipped once under `gzip` twice was read as if gzipped once,
    # and `gzip` then `identity` was checked as gzip and read as it came.
    name = f"two-codings-{first}-{second}"
    headers = CIMultiDict([("Authorization", f"Bearer {api.admin_token}"), ("Content-Type", "application/json"),
                           ("Content-Encoding", first), ("Content-Encoding", second)])
    async with api.client.post("/api/v1/clients", data=gzip.compress(json.dumps({"name": name}).encode()),
                               headers=headers) as response:
        assert response.status == 415, await response.text()
        body = await response.json()
    assert body["error"] == "unsupported_media_type" and f"{first}, {second}" in body["message"]
    listed = await api.call("GET", "/api/v1/clients", api.admin_token, params={"limit": 500})
    assert name not in {client["name"] for client in listed.body["items"]}


@pytest.mark.parametrize("encoding", ["identity", "GZIP"])
async def test_the_content_encodings_the_api_undoes_are_read(api, encoding):
    data = b'{"name": "encoded"}'
    headers = {"Authorization": f"Bearer {api.admin_token}", "Content-Type": "application/json",
               "Content-Encoding": encoding}
    async with api.client.post("/api/v1/clients", data=gzip.compress(data) if encoding == "GZIP" else data,
                               headers=headers) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    api.tenants.append(Tenant(created["client_id"], created["api_key"]))  # deleted with the module


# --- numbers that are not finite ----------------------------------------------------------------------

@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_a_number_that_is_not_finite_is_refused_as_such_naming_its_field(api, tenant, number):
    # Python's JSON reader takes NaN and Infinity, which JSON has not (and 1e400 as infinity): against
    # a bound, NaN was refused as "less than or equal to 100000", and a silence's end as out of the
    # calendar's range.
    rule = await api.new_rule(tenant, source="not-finite")
    endpoint = await api.new_endpoint(tenant, rule["rule_id"])
    replies = {
        "created": await api.call("POST", "/api/v1/endpoints", tenant.key,
                                  data=b'{"rule_id": "%s", "type": "webhook", "value": "https://hooks.example.com/nan", '
                                       b'"rate_limit_per_s": %s}' % (rule["rule_id"].encode(), number)),
        "patched": await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                                  data=b'{"rate_limit_per_s": %s}' % number),
        "silenced": await api.call("POST", "/api/v1/silences", tenant.key,
                                   data=b'{"source": "s", "ends_at": %s, "comment": "c", "created_by": "me"}' % number),
    }

    for reply in replies.values():
        [failure] = reply.body["fields"]
        assert reply.failing_fields() == {"rate_limit_per_s" if reply is not replies["silenced"] else "ends_at"}
        assert failure["message"] == "Input should be a finite number"
    assert (await api.call("GET", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key)).body[
        "rate_limit_per_s"] is None
