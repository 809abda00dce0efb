"""/api/v1/endpoints: where a rule's notifications go, checked per type, owned with the rule."""
from __future__ import annotations

import pytest
import pytest_asyncio

from name_servers import SilentNameServer
from postgres_waits import until_waiting_on_a_lock
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


async def test_another_clients_rule_is_refused_before_the_address_is_checked(api, tenant, other_tenant):
    # Checked first, the rule keeps a key without a rule of its own from having our resolver look
    # names up for it: an address refused for what it is (`value`) showed the check had run.
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", other_tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "http://a..com/hook"})
    assert reply.failing_fields() == {"rule_id"}


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


async def test_an_endpoint_created_while_its_rule_is_deleted_is_refused_for_its_rule(api, tenant):
    """The insert reads the rule, then its foreign key waits on the delete's lock and finds the rule
    gone: a 422 naming rule_id, as for any unknown rule, not a 500."""
    import asyncio

    from alerting_app import db

    rule = await api.new_rule(tenant)
    pool = await db.pool()
    async with pool.acquire() as deleting:
        transaction = deleting.transaction()
        await transaction.start()
        await deleting.execute("DELETE FROM rules WHERE rule_id = $1", rule["rule_id"])
        creating = asyncio.ensure_future(api.call(
            "POST", "/api/v1/endpoints", tenant.key,
            {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://93.184.216.34/hook"}))
        # The delete commits only once the insert is waiting on its lock (else the insert would
        # not see the rule at all, the case every other test covers).
        await until_waiting_on_a_lock(pool, query_like="%INSERT INTO endpoints%", unless_done=creating)
        await transaction.commit()
    reply = await creating
    assert reply.failing_fields() == {"rule_id"}, reply.body


# --- the stored URL is the one checked ------------------------------------------------------------

@pytest.fixture
def private_endpoints_refused(monkeypatch):
    """The production setting; the test session itself allows private endpoints (local receivers)."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "allow_private_endpoints", False)


@pytest.mark.parametrize("given, stored", [
    # WHATWG parsing reads the backslash as a path separator: the host checked is example.com, and
    # a delivery must not read the raw text as user "example.com\" at host 10.0.0.1.
    ("http://example.com\\@10.0.0.1/", "http://example.com/@10.0.0.1/"),
    ("HTTPS://Hooks.Example.COM", "https://hooks.example.com/"),
    ("https://hooks.example.com:443/a b", "https://hooks.example.com/a%20b"),
])
async def test_a_url_is_stored_normalised_as_it_was_checked(api, tenant, given, stored):
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"], "webhook", given)
    other = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    patched = await api.call("PATCH", f"/api/v1/endpoints/{other['endpoint_id']}", tenant.key,
                             {"type": "slack", "value": given})
    assert (created["value"], patched.body["value"]) == (stored, stored)


async def test_a_url_too_long_once_normalised_is_refused(api, tenant):
    """362 characters as given, 2,062 once each `é` is percent-encoded: over the column's 2,000."""
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://93.184.216.34/hook")
    long_url = "https://93.184.216.34/" + "\u00e9" * 340
    created = await api.call("POST", "/api/v1/endpoints", tenant.key,
                             {"rule_id": rule["rule_id"], "type": "webhook", "value": long_url})
    patched = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                             {"value": long_url})
    for reply in (created, patched):
        assert reply.failing_fields() == {"value"}, reply.body
        assert "2062" in reply.body["fields"][0]["message"]
    # At the limit exactly: 22 + 329 * 6 + 4 = 2,000 characters fit, one more does not.
    one_over = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                              {"value": "https://93.184.216.34/" + "\u00e9" * 329 + "abcde"})
    assert one_over.failing_fields() == {"value"}, one_over.body
    assert "it is 2001" in one_over.body["fields"][0]["message"]
    fits = "https://93.184.216.34/" + "\u00e9" * 329 + "abcd"
    assert (await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                           {"value": fits})).body["value"] == "https://93.184.216.34/" + "%C3%A9" * 329 + "abcd"


@pytest.mark.parametrize("private", ["allowed", "refused"])
@pytest.mark.parametrize("url", ["http://a..com/hook", f"http://{'a' * 64}.example.com/hook"])
async def test_a_host_that_is_not_a_valid_dns_name_is_refused(api, tenant, monkeypatch, url, private):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "allow_private_endpoints", private == "allowed")
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": url})
    assert reply.failing_fields() == {"value"}
    assert "not a valid DNS name" in reply.body["fields"][0]["message"]


async def test_a_url_on_port_0_is_refused(api, tenant):
    rule = await api.new_rule(tenant, source="port-zero")
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://93.184.216.34:0/hook"})
    assert reply.failing_fields() == {"value"}
    assert "port 0" in reply.body["fields"][0]["message"]


async def test_a_changed_address_is_resolved_before_the_endpoint_is_locked(api, tenant, private_endpoints_refused,
                                                                           monkeypatch):
    """A slow DNS answer must not hold the row lock (nor a pool connection) that delivery waits on."""
    import asyncpg

    import web.endpoints
    from alerting_app import db

    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://93.184.216.34/hook")
    pool = await db.pool()
    lock_free_while_resolving = []

    async def resolving(host: str, port: int, executor: object = None) -> None:
        async with pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute("SELECT 1 FROM endpoints WHERE endpoint_id = $1 FOR UPDATE NOWAIT",
                                   endpoint["endpoint_id"])
                lock_free_while_resolving.append(True)
            except asyncpg.LockNotAvailableError:
                lock_free_while_resolving.append(False)

    monkeypatch.setattr(web.endpoints, "check_public_host", resolving)
    reply = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                           {"value": "https://hooks.example.com/new"})
    assert (reply.status, reply.body["value"]) == (200, "https://hooks.example.com/new")
    assert lock_free_while_resolving == [True]


async def test_an_address_changed_meanwhile_is_checked_again_before_it_is_stored(api, tenant,
                                                                                  private_endpoints_refused,
                                                                                  monkeypatch):
    import web.endpoints
    from alerting_app import db

    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://93.184.216.34/hook")
    pool = await db.pool()
    resolved = []

    async def resolving(host: str, port: int, executor: object = None) -> None:
        if not resolved:  # another change makes it a Slack endpoint while the first lookup runs
            await pool.execute("UPDATE endpoints SET type = 'slack' WHERE endpoint_id = $1", endpoint["endpoint_id"])
        resolved.append(host)

    monkeypatch.setattr(web.endpoints, "check_public_host", resolving)
    reply = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                           {"value": "https://hooks.example.com/new"})
    assert (reply.status, reply.body["type"], reply.body["value"]) == (200, "slack", "https://hooks.example.com/new")
    assert resolved == ["hooks.example.com", "hooks.example.com"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_refused_name_reads_the_same_whether_it_resolves_inside_our_network_or_not_at_all(
        api, tenant, private_endpoints_refused, method):
    """Otherwise any key with a rule maps our network's names: which exist (`localhost` here, a
    database's name in production) and what kind of address they have, from our resolver's answers."""
    rule = await api.new_rule(tenant, source="name-oracle")
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://93.184.216.34/hook")
    messages = {}
    for host in ("localhost", "no-such-name.invalid"):
        url = f"http://{host}/hook"
        if method == "POST":
            reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                                   {"rule_id": rule["rule_id"], "type": "webhook", "value": url})
        else:
            reply = await api.call("PATCH", f"/api/v1/endpoints/{endpoint['endpoint_id']}", tenant.key,
                                   {"value": url})
        assert reply.failing_fields() == {"value"}
        messages[host] = reply.body["fields"][0]["message"].replace(host, "<host>")
    assert messages["localhost"] == messages["no-such-name.invalid"], messages
    assert "ALLOW_PRIVATE_ENDPOINTS is off" in messages["localhost"]


async def test_an_address_written_in_the_url_is_refused_saying_what_kind_it_is(api, tenant, private_endpoints_refused):
    # The tenant wrote the address itself: its kind tells it nothing about our network.
    rule = await api.new_rule(tenant, source="literal-kind")
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": "http://127.0.0.1/hook"})
    assert reply.failing_fields() == {"value"}
    assert "127.0.0.1 is a loopback address" in reply.body["fields"][0]["message"]


# --- a tenant's slow DNS holds nobody else's lookups --------------------------------------------

SLOW_DOMAIN = ".slow-dns.test"


@pytest_asyncio.fixture(loop_scope="session")
async def slow_dns(monkeypatch):
    """Names under SLOW_DOMAIN never resolve, as names under a tenant's own name server that is
    down: every lookup asks a name server that never answers (name_servers.py); /etc/hosts still
    answers first."""
    async with SilentNameServer() as name_server:
        name_server.resolving_here(monkeypatch, SLOW_DOMAIN)
        yield name_server


async def test_a_tenants_slow_lookups_hold_no_thread_of_anyones(api, tenant, private_endpoints_refused, slow_dns,
                                                                 monkeypatch):
    """The API's lookups ran on threads, first the event loop's default executor (which every
    delivery's connection resolved its host on), then four of their own: a few endpoint changes
    naming hosts under a name server that never answers held them until the system's resolver
    gave up, every tenant's deliveries or every other endpoint change waiting as long. c-ares
    queries hold none: while forty wait, a delivery's lookup answers."""
    import asyncio

    import web.endpoints
    from alerting_app.channels.addresses import host_resolver

    monkeypatch.setattr(web.endpoints, "ENDPOINT_LOOKUP_TIMEOUT_S", 3.0)  # the creations' end, sooner
    rule = await api.new_rule(tenant, source="slow-dns")
    creating = [asyncio.create_task(api.call("POST", "/api/v1/endpoints", tenant.key,
                                             {"rule_id": rule["rule_id"], "type": "webhook",
                                              "value": f"https://n{number}{SLOW_DOMAIN}/hook"}))
                for number in range(40)]
    async with asyncio.timeout(60):  # a guard against hanging only
        while len({name for name in slow_dns.asked if name.endswith(SLOW_DOMAIN)}) < 40:
            await asyncio.sleep(0.01)
    resolver = host_resolver()
    try:
        # Bounds a hang only: were the lookups on threads, it would wait for the creations' timeout.
        async with asyncio.timeout(5):
            assert await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    assert slow_dns.threads_held == 0
    replies = await asyncio.gather(*creating)
    assert {reply.status for reply in replies} == {422}


async def test_a_lookup_that_does_not_answer_in_time_is_refused_naming_the_value(api, tenant,
                                                                                 private_endpoints_refused,
                                                                                 slow_dns, monkeypatch):
    import web.endpoints

    monkeypatch.setattr(web.endpoints, "ENDPOINT_LOOKUP_TIMEOUT_S", 0.2)
    rule = await api.new_rule(tenant, source="dns-timeout")
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "webhook", "value": f"https://n{SLOW_DOMAIN}/hook"})
    assert reply.failing_fields() == {"value"}
    assert f"n{SLOW_DOMAIN} did not resolve within 0.2 s" in reply.body["fields"][0]["message"]


async def test_a_rule_has_one_endpoint_per_address_a_second_answers_409_naming_the_first(api, tenant):
    # Each endpoint is a delivery of its own: a creation retried after its answer was lost made a
    # second endpoint, and every notification of the rule went to the address twice.
    import asyncio

    rule, other_rule = await api.new_rule(tenant), await api.new_rule(tenant, source="billing")
    body = {"rule_id": rule["rule_id"], "type": "webhook", "value": "https://hooks.example.com/same"}
    replies = await asyncio.gather(*(api.call("POST", "/api/v1/endpoints", tenant.key, body) for _ in range(5)))

    assert sorted(reply.status for reply in replies) == [201, 409, 409, 409, 409]
    [created] = [reply.body for reply in replies if reply.status == 201]
    assert all(created["endpoint_id"] in reply.body["message"] for reply in replies if reply.status == 409)
    # Another address on the rule, and the same address on another rule, are other endpoints.
    assert (await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {**body, "value": "https://hooks.example.com/other"})).status == 201
    assert (await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {**body, "rule_id": other_rule["rule_id"]})).status == 201


async def test_readdressing_an_endpoint_to_another_endpoints_address_on_its_rule_answers_409(api, tenant):
    rule = await api.new_rule(tenant)
    first = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/first")
    second = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/second")
    path = f"/api/v1/endpoints/{second['endpoint_id']}"

    taken = await api.call("PATCH", path, tenant.key, {"value": "https://hooks.example.com/first"})
    assert taken.status == 409 and first["endpoint_id"] in taken.body["message"]
    # Its own address again, or one no other endpoint of the rule has, is no conflict.
    assert (await api.call("PATCH", path, tenant.key, {"value": "https://hooks.example.com/second"})).status == 200
    assert (await api.call("PATCH", path, tenant.key, {"value": "https://hooks.example.com/third"})).status == 200


@pytest.mark.parametrize("type_, value", [
    ("slack", "https://hooks.slack.com/services/T000/B000/XXXX"),
    ("email", "oncall@example.com"),
])
async def test_a_slack_or_email_endpoint_has_no_secret_which_it_gets_once_it_becomes_a_webhook(api, tenant,
                                                                                                 type_, value):
    # Only webhooks are signed: a secret shown for the others read as if it signed something.
    rule = await api.new_rule(tenant)
    endpoint = await api.new_endpoint(tenant, rule["rule_id"], type_, value)
    assert endpoint["secret"] is None
    path = f"/api/v1/endpoints/{endpoint['endpoint_id']}"
    refused = await api.call("POST", path + "/secret", tenant.key)
    assert refused.status == 409 and "not signed" in refused.body["message"]

    webhook = await api.call("PATCH", path, tenant.key, {"type": "webhook", "value": "https://hooks.example.com/now"})

    assert webhook.status == 200
    # Never shown before: the answer that makes it a webhook shows the secret it is signed with.
    from alerting_app import db
    pool = await db.pool()
    stored = await pool.fetchval("SELECT secret FROM endpoints WHERE endpoint_id = $1", endpoint["endpoint_id"])
    assert webhook.body["secret"] == stored
    # A change that leaves it a webhook shows none.
    assert "secret" not in (await api.call("PATCH", path, tenant.key, {"enabled": False})).body


@pytest.mark.parametrize("type_, first, second", [
    # One inbox: the domain is case-insensitive, and mailboxes' local parts are in practice.
    ("email", "Ops@Example.com", "ops@example.com"),
    ("email", "ops@example.com", "OPS@EXAMPLE.COM"),
    # Scheme and host are case-insensitive: the URL is stored normalised, so these are one value.
    ("webhook", "https://Hooks.Example.com/x", "https://hooks.example.com/x"),
    ("webhook", "HTTPS://hooks.example.com:443/x", "https://hooks.example.com/x"),
    # A fragment is never sent (the request is to /x either way), and %2f is %2F (RFC 3986 6.2.2.1).
    ("webhook", "https://hooks.example.com/x#team-a", "https://hooks.example.com/x#team-b"),
    ("webhook", "https://hooks.example.com/a%2fb", "https://hooks.example.com/a%2Fb"),
    # A host name's final dot roots it in DNS: the same name, looked up and connected to alike.
    ("webhook", "https://hooks.example.com./x", "https://hooks.example.com/x"),
    ("webhook", "https://ops@hooks.example.com:8443/x", "https://ops@Hooks.Example.com.:8443/x"),
])
async def test_addresses_that_reach_one_place_are_one_address(api, tenant, type_, first, second):
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"], type_, first)
    body = {"rule_id": rule["rule_id"], "type": type_, "value": second}

    again = await api.call("POST", "/api/v1/endpoints", tenant.key, body)
    assert again.status == 409 and created["endpoint_id"] in again.body["message"]
    other = await api.new_endpoint(tenant, rule["rule_id"], type_,
                                   "elsewhere@example.com" if type_ == "email" else "https://hooks.example.com/y")
    readdressed = await api.call("PATCH", f"/api/v1/endpoints/{other['endpoint_id']}", tenant.key, {"value": second})
    assert readdressed.status == 409 and created["endpoint_id"] in readdressed.body["message"]


async def test_the_409_of_a_second_email_endpoint_reads_an_email_endpoint(api, tenant):
    # It read "the rule already has a email endpoint ...".
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    again = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": "email", "value": "Ops@example.com"})
    assert (again.status, again.body["message"]) == (
        409, f"the rule already has an email endpoint with this value: {created['endpoint_id']}")


async def test_the_409_of_an_email_endpoints_secret_reads_an_email_endpoint(api, tenant):
    # It read "a email endpoint's notifications are not signed".
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"], "email", "ops@example.com")
    refused = await api.call("POST", f"/api/v1/endpoints/{created['endpoint_id']}/secret", tenant.key)
    assert refused.status == 409
    assert refused.body["message"].startswith("an email endpoint's notifications are not signed: it has no secret")


async def test_a_new_type_without_a_value_its_old_value_does_not_fit_asks_for_one(api, tenant):
    # PATCH {"type": "email"} of a webhook answered "value: must be an email address ...", about a
    # value the request did not send.
    rule = await api.new_rule(tenant)
    created = await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/x")
    path = f"/api/v1/endpoints/{created['endpoint_id']}"

    refused = await api.call("PATCH", path, tenant.key, {"type": "email"})

    assert refused.status == 422
    [failed] = refused.body["fields"]
    assert failed["field"] == "value"
    assert failed["message"].startswith("the endpoint's value does not fit an email endpoint: give a new value "
                                        "with the new type (must be an email address")
    assert (await api.call("GET", path, tenant.key)).body["type"] == "webhook"
    # With a value of that type it is made, and a bad value given with it is told as any value is.
    bad = await api.call("PATCH", path, tenant.key, {"type": "email", "value": "nobody"})
    assert bad.body["fields"][0]["message"].startswith("must be an email address")
    assert (await api.call("PATCH", path, tenant.key, {"type": "email", "value": "ops@example.com"})).status == 200


async def test_a_url_path_differing_in_case_is_another_address(api, tenant):
    rule = await api.new_rule(tenant)
    await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/Team")
    await api.new_endpoint(tenant, rule["rule_id"], "webhook", "https://hooks.example.com/team")
