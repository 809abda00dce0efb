"""POST /api/v1/endpoints/{id}/test: a test notification sent now by the endpoint's channel, to real
local receivers (HTTP and SMTP), with the tokens taken from the real Redis."""
from __future__ import annotations

import contextlib
import hashlib
import hmac

import pytest
import pytest_asyncio

from delivery_receivers import Receiver, SmtpServer
from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)


@contextlib.contextmanager
def relay_of_the_api(monkeypatch):
    """A local SMTP relay (plain SMTP, no STARTTLS) that the API's settings send email to."""
    from alerting_app.app import settings

    with SmtpServer() as relay:
        monkeypatch.setattr(settings, "smtp_host", "127.0.0.1")
        monkeypatch.setattr(settings, "smtp_port", relay.port)
        monkeypatch.setattr(settings, "smtp_starttls", False)
        yield relay

pytestmark = API_LOOP


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def redis_closed_after_the_module():
    from alerting_app import redis_client

    yield
    await redis_client.close()


async def endpoint_to(api, tenant, type_: str, value: str, **extra) -> dict:
    rule = await api.new_rule(tenant)
    reply = await api.call("POST", "/api/v1/endpoints", tenant.key,
                           {"rule_id": rule["rule_id"], "type": type_, "value": value, **extra})
    assert reply.status == 201, reply.body
    return reply.body


async def test_a_webhook_test_is_signed_with_the_endpoints_secret_and_leaves_no_record(api, tenant):
    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url())
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)

        assert reply.status == 200, reply.body
        assert reply.body == {"endpoint_id": endpoint["endpoint_id"], "notification_id": reply.body["notification_id"],
                              "channel": "webhook", "delivered": True, "error": None, "retryable": None}
        [post] = receiver.posts
    # What a receiver checks, with the secret shown at the endpoint's creation.
    mac = hmac.new(endpoint["secret"].encode(), post.headers["X-Alerting-Timestamp"].encode() + b"." + post.raw,
                   hashlib.sha256)
    assert post.headers["X-Alerting-Signature-Timestamped"] == "sha256=" + mac.hexdigest()
    assert post.headers["Idempotency-Key"] == f"{reply.body['notification_id']}:{endpoint['endpoint_id']}"
    [alert] = post.body["alerts"]
    assert (alert["name"], alert["source"], alert["context"]) == (
        "Test notification", "alerting-app", {"test": "true", "endpoint_id": endpoint["endpoint_id"]})
    assert (post.body["client_id"], post.body["rule_ids"]) == (tenant.client_id, [endpoint["rule_id"]])
    # A test is no notification: nothing in the tenant's history, nothing to deliver again.
    listed = await api.call("GET", "/api/v1/notifications", tenant.key)
    assert listed.body["items"] == []


@pytest.mark.parametrize("status, retryable", [(500, True), (429, True), (404, False)])
async def test_a_test_the_endpoint_refuses_says_why_and_whether_a_delivery_would_retry(api, tenant, status,
                                                                                         retryable):
    async with Receiver() as receiver:
        receiver.answer("hook", status)
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url())
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)

        assert reply.status == 200, reply.body
        assert (reply.body["delivered"], reply.body["retryable"]) == (False, retryable)
        assert reply.body["error"].startswith(f"HTTP {status}")
        assert len(receiver.posts) == 1  # once: a test is not retried


@pytest.mark.parametrize("burst_s", [None, 10.0])
async def test_a_second_test_within_the_interval_is_refused_with_retry_after_and_sends_nothing(api, tenant,
                                                                                               monkeypatch, burst_s):
    # Whatever ENDPOINT_RATE_BURST_S: it sizes the endpoints' buckets, not the tests' own. At 10 s it
    # made the tests' bucket two tokens deep (at 3,600 s, 720), and two tests went out at once.
    from alerting_app.app import settings
    from web.endpoint_trial import TEST_INTERVAL_S

    if burst_s is not None:
        monkeypatch.setattr(settings, "endpoint_rate_burst_s", burst_s)
    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url())
        path = f"/api/v1/endpoints/{endpoint['endpoint_id']}/test"
        first = await api.call("POST", path, tenant.key)
        second = await api.call("POST", path, tenant.key)

        assert first.status == 200 and first.body["delivered"]
        assert second.status == 429, second.body
        assert second.body["error"] == "rate_limited"
        assert f"one test per {TEST_INTERVAL_S:g} s" in second.body["message"]
        assert 1 <= int(second.headers["Retry-After"]) <= TEST_INTERVAL_S
        assert len(receiver.posts) == 1


async def test_retry_after_is_the_time_left_until_the_endpoints_next_token(api, tenant):
    # At 0.01/s a token comes every 100 s: a test refused 2 s after a delivery took the token is
    # told to come back when the next one is there, not a whole interval later (at 0.001/s, 1,000 s).
    import asyncio

    from alerting_app import redis_client
    from alerting_app.app import settings
    from alerting_app.delivery.rate_limits import RateLimits, endpoint_bucket
    from alerting_app.redis_pipelining import PipelinedRedis

    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url(), rate_limit_per_s=0.01)
        limits = RateLimits(PipelinedRedis(redis_client.redis()), settings.endpoint_rate_burst_s)
        assert await limits.try_take(endpoint_bucket(settings.app_id, endpoint["endpoint_id"]), 0.01)
        await asyncio.sleep(2)

        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        assert reply.status == 429
        assert 1 <= int(reply.headers["Retry-After"]) <= 99
        assert f"try again in {reply.headers['Retry-After']} s" in reply.body["message"]
        assert receiver.posts == []


async def test_a_test_takes_the_endpoints_own_rate_limit_token_as_a_delivery_does(api, tenant):
    # A tenant's key cannot make the platform send to an address faster than its endpoint allows.
    from alerting_app import redis_client
    from alerting_app.app import settings
    from alerting_app.delivery.rate_limits import RateLimits, endpoint_bucket
    from alerting_app.redis_pipelining import PipelinedRedis

    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url(), rate_limit_per_s=0.001)
        # A delivery took the endpoint's one token.
        limits = RateLimits(PipelinedRedis(redis_client.redis()), settings.endpoint_rate_burst_s)
        assert await limits.try_take(endpoint_bucket(settings.app_id, endpoint["endpoint_id"]), 0.001)

        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        assert reply.status == 429
        assert "the endpoint's rate limit" in reply.body["message"]
        assert receiver.posts == []


async def test_an_email_test_reaches_the_relay_with_the_test_in_its_subject(api, tenant, monkeypatch):
    with relay_of_the_api(monkeypatch) as relay:
        endpoint = await endpoint_to(api, tenant, "email", "oncall@example.com")
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)

        assert reply.status == 200 and reply.body["delivered"], reply.body
        [message] = relay.messages
    assert message["To"] == "oncall@example.com"
    assert "Test notification" in message["Subject"]


async def test_a_test_refused_by_the_all_email_limit_spends_no_token_so_its_retry_goes(api, tenant, monkeypatch):
    # Taken one by one, the refused test had spent the endpoint's one test token (and the client's):
    # the retry the answer's Retry-After asked for was refused again, for one test per 5 s.
    from alerting_app import redis_client
    from alerting_app.app import settings
    from alerting_app.delivery.rate_limits import RateLimits, email_bucket
    from alerting_app.redis_pipelining import PipelinedRedis

    with relay_of_the_api(monkeypatch) as relay:
        endpoint = await endpoint_to(api, tenant, "email", "oncall@example.com")
        path = f"/api/v1/endpoints/{endpoint['endpoint_id']}/test"
        # Every tenant's email took the all-email limit's token.
        monkeypatch.setattr(settings, "email_rate_limit_per_s", 0.001)
        limits = RateLimits(PipelinedRedis(redis_client.redis()), settings.endpoint_rate_burst_s)
        await limits.try_take(email_bucket(settings.app_id), 0.001)

        refused = await api.call("POST", path, tenant.key)
        assert refused.status == 429, refused.body
        assert "EMAIL_RATE_LIMIT_PER_S" in refused.body["message"]
        # The all-email limit has a token again (here: a higher rate, a bucket of its own).
        monkeypatch.setattr(settings, "email_rate_limit_per_s", 1_000.0)
        retried = await api.call("POST", path, tenant.key)

        assert retried.status == 200 and retried.body["delivered"], retried.body
        assert [message["To"] for message in relay.messages] == ["oncall@example.com"]


async def test_a_disabled_endpoint_can_be_tested_before_it_is_enabled(api, tenant):
    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url(), enabled=False)
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        assert reply.status == 200 and reply.body["delivered"]
        assert len(receiver.posts) == 1


async def test_another_tenants_endpoint_cannot_be_tested(api, tenant, other_tenant):
    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url())
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", other_tenant.key)
        assert reply.status == 404
        assert receiver.posts == []


async def test_a_clients_tests_of_many_endpoints_are_limited_together(api, tenant, monkeypatch):
    # The per-endpoint interval alone bounded nothing: MAX_ENDPOINTS_PER_RULE endpoints on each of
    # MAX_RULES_PER_CLIENT rules, each tested once per 5 s, and three rules of email endpoints (60
    # tests per 5 s) took every token of EMAIL_RATE_LIMIT_PER_S (10/s): every tenant's email waited.
    from alerting_app.app import settings
    from web.endpoint_trial import TEST_CLIENT_INTERVAL_S

    monkeypatch.setattr(settings, "email_rate_limit_per_s", 1_000.0)  # not the limit this is about
    with relay_of_the_api(monkeypatch) as relay:
        first = await endpoint_to(api, tenant, "email", "first@example.com")
        second = await api.call("POST", "/api/v1/endpoints", tenant.key,
                                {"rule_id": first["rule_id"], "type": "email", "value": "second@example.com"})
        assert second.status == 201, second.body
        second = second.body
        tested = await api.call("POST", f"/api/v1/endpoints/{first['endpoint_id']}/test", tenant.key)
        refused = await api.call("POST", f"/api/v1/endpoints/{second['endpoint_id']}/test", tenant.key)

        assert tested.status == 200 and tested.body["delivered"], tested.body
        assert refused.status == 429, refused.body
        assert f"one test per {TEST_CLIENT_INTERVAL_S:g} s per client" in refused.body["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= max(1, TEST_CLIENT_INTERVAL_S)
        assert [message["To"] for message in relay.messages] == ["first@example.com"]


async def test_another_clients_tests_are_not_held_by_a_clients_limit(api, tenant, other_tenant):
    async with Receiver() as receiver:
        mine = await endpoint_to(api, tenant, "webhook", receiver.url("mine"))
        theirs = await endpoint_to(api, other_tenant, "webhook", receiver.url("theirs"))
        first = await api.call("POST", f"/api/v1/endpoints/{mine['endpoint_id']}/test", tenant.key)
        second = await api.call("POST", f"/api/v1/endpoints/{theirs['endpoint_id']}/test", other_tenant.key)
        assert (first.status, second.status) == (200, 200), (first.body, second.body)
        assert first.body["delivered"] and second.body["delivered"]



async def test_a_tests_host_lookup_does_not_wait_for_the_event_loops_threads(api, tenant, monkeypatch):
    # A test's lookup ran on the event loop's default executor, where deliveries resolved their
    # endpoints' hosts too: a tenant testing endpoints under a name server that answers late or
    # never held those threads, and every delivery's new connection waited. Tests and deliveries
    # now look hosts up with c-ares: here every thread of the default executor is held, and the
    # test still resolves its host and is delivered.
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from alerting_app import redis_client
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "webhook_timeout_s", 3.0)
    await redis_client.redis().ping()  # its connection made before the threads are held
    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url().replace("127.0.0.1", "localhost"))
        loop = asyncio.get_running_loop()
        previous = loop._default_executor
        held, release = ThreadPoolExecutor(max_workers=1), threading.Event()
        loop.set_default_executor(held)
        holding = loop.run_in_executor(None, release.wait)
        try:
            reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        finally:
            release.set()
            await holding
            loop._default_executor = previous
            held.shutdown()
        assert reply.status == 200 and reply.body["delivered"], reply.body["error"]
        assert len(receiver.posts) == 1


async def test_a_test_connects_to_public_addresses_only_as_a_delivery_does(api, tenant, monkeypatch):
    # The endpoint's name resolves into our network now (created while ALLOW_PRIVATE_ENDPOINTS was
    # on, say): the test's own lookup is checked as a delivery's is, and nothing is sent.
    from alerting_app.app import settings

    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url().replace("127.0.0.1", "localhost"))
        monkeypatch.setattr(settings, "allow_private_endpoints", False)
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        assert reply.status == 200, reply.body
        assert (reply.body["delivered"], reply.body["retryable"]) == (False, True)
        # As a name that does not resolve reads (test_a_test_tells_a_name_into_our_network_as_one_that_does_not_resolve).
        assert reply.body["error"].startswith("localhost does not resolve to public addresses only"), reply.body
        assert receiver.posts == []


async def test_a_test_tells_a_name_into_our_network_as_one_that_does_not_resolve(api, tenant, other_tenant,
                                                                                   monkeypatch):
    # Its `error` and `retryable` said "resolves to a loopback address", not retryable, against a
    # retryable DNS error: at once and without an alert, a tenant whose public name it had turned
    # into a CNAME of one of ours learnt whether that internal name exists.
    from alerting_app.app import settings

    answers = {}
    # One host per tenant: a client's tests are one per second.
    for host, owner in (("localhost", tenant), ("no-such-name.invalid", other_tenant)):
        endpoint = await endpoint_to(api, owner, "webhook", f"http://{host}:9/hook")
        monkeypatch.setattr(settings, "allow_private_endpoints", False)
        reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", owner.key)
        monkeypatch.setattr(settings, "allow_private_endpoints", True)
        assert reply.status == 200, reply.body
        answers[host] = (reply.body["delivered"], reply.body["retryable"], reply.body["error"].replace(host, "<host>"))
    assert answers["localhost"] == answers["no-such-name.invalid"], answers
    assert answers["localhost"][:2] == (False, True)


async def test_email_tests_hold_no_more_of_the_relay_than_a_workers_deliveries_may(api, tenant, other_tenant,
                                                                                  monkeypatch):
    # Every email goes to the one SMTP relay: before, each tenant's test to a relay that hangs held a
    # connection for SMTP_TIMEOUT_S, beyond the relay's send slots, however many tenants tested.
    import asyncio

    from alerting_app.app import settings

    with relay_of_the_api(monkeypatch) as relay:
        monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
        relay.stall(2)  # the relay is slow: the first test holds its one slot meanwhile
        first = await endpoint_to(api, tenant, "email", "oncall@example.com")
        second = await endpoint_to(api, other_tenant, "email", "oncall@example.com")
        holding = asyncio.ensure_future(api.call("POST", f"/api/v1/endpoints/{first['endpoint_id']}/test", tenant.key))
        async with asyncio.timeout(30):
            while relay.envelopes_begun < 1:
                await asyncio.sleep(0.01)
        refused = await api.call("POST", f"/api/v1/endpoints/{second['endpoint_id']}/test", other_tenant.key)

        assert refused.status == 429, refused.body
        assert "tests to the SMTP relay" in refused.body["message"]
        assert (await holding).body["delivered"]
        assert relay.envelopes_begun == 1


async def test_a_test_taking_its_tokens_already_holds_its_slot_of_the_relay(api, tenant, other_tenant, monkeypatch):
    # The slot was taken only once the tokens were, after their Redis round trip: tests arriving
    # together all found the slots free, and all were sent, past the relay's slots (and past 64).
    import asyncio

    from alerting_app.app import settings
    from web import endpoint_trial

    taking_tokens, let_the_first_on = asyncio.Event(), asyncio.Event()
    take_tokens = endpoint_trial._take_tokens

    async def first_test_waits_between_its_room_and_its_tokens(*args):
        if not taking_tokens.is_set():
            taking_tokens.set()
            await let_the_first_on.wait()
        else:
            let_the_first_on.set()  # unless the second is refused first, it lets the first on
        return await take_tokens(*args)

    with relay_of_the_api(monkeypatch) as relay:
        monkeypatch.setattr(settings, "delivery_endpoint_concurrency", 1)
        monkeypatch.setattr(endpoint_trial, "_take_tokens", first_test_waits_between_its_room_and_its_tokens)
        first = await endpoint_to(api, tenant, "email", "oncall@example.com")
        second = await endpoint_to(api, other_tenant, "email", "oncall@example.com")
        holding = asyncio.ensure_future(api.call("POST", f"/api/v1/endpoints/{first['endpoint_id']}/test", tenant.key))
        await taking_tokens.wait()
        refused = await api.call("POST", f"/api/v1/endpoints/{second['endpoint_id']}/test", other_tenant.key)
        let_the_first_on.set()

        assert refused.status == 429, refused.body
        assert "tests to the SMTP relay" in refused.body["message"]
        assert (await holding).body["delivered"]
        assert relay.envelopes_begun == 1


async def test_a_test_while_redis_does_not_answer_is_refused_with_503_and_retry_after_and_sends_nothing(
        api, tenant, monkeypatch):
    from redis.asyncio import Redis

    from alerting_app import redis_client
    from alerting_app.embedded import free_port

    async with Receiver() as receiver:
        endpoint = await endpoint_to(api, tenant, "webhook", receiver.url())
        unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
        monkeypatch.setattr(redis_client, "_client", unreachable)
        try:
            reply = await api.call("POST", f"/api/v1/endpoints/{endpoint['endpoint_id']}/test", tenant.key)
        finally:
            await unreachable.aclose()
        assert reply.status == 503 and reply.body["error"] == "redis_unavailable"
        assert int(reply.headers["Retry-After"]) >= 1
        assert receiver.posts == []


async def test_a_test_past_the_workers_tests_in_flight_is_refused_with_retry_after_and_sends_nothing(
        api, tenant, other_tenant, monkeypatch):
    # TESTS_IN_FLIGHT_MAX bounds every channel's tests a worker sends at once (each may wait up to
    # WEBHOOK_TIMEOUT_S on an endpoint that hangs), the email relay's slots aside.
    import asyncio

    from web import endpoint_trial

    monkeypatch.setattr(endpoint_trial, "TESTS_IN_FLIGHT_MAX", 1)
    async with Receiver() as receiver:
        release = receiver.hold("hanging")
        first = await endpoint_to(api, tenant, "webhook", receiver.url("hanging"))
        second = await endpoint_to(api, other_tenant, "webhook", receiver.url("answering"))
        holding = asyncio.ensure_future(api.call("POST", f"/api/v1/endpoints/{first['endpoint_id']}/test", tenant.key))
        async with asyncio.timeout(30):  # a guard against hanging only
            while receiver.in_flight["hanging"] < 1:
                await asyncio.sleep(0.01)
        refused = await api.call("POST", f"/api/v1/endpoints/{second['endpoint_id']}/test", other_tenant.key)
        release.set()

        assert refused.status == 429, refused.body
        assert "this worker is already sending 1 tests" in refused.body["message"]
        assert refused.headers["Retry-After"] == "1"
        assert (await holding).body["delivered"]
        assert receiver.posts_to("answering") == []
