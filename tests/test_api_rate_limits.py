"""The API's request rate limit per client key (web/request_limits.py), on the worker's own views
with real Redis: past its budget a key is answered 429 with Retry-After, nobody else's budget
moves, and the operator's tokens are not limited. (Two worker processes sharing a budget: tests/test_e2e_api_rate_limits.py.)"""
from __future__ import annotations

import asyncio
import logging
import secrets

from prometheus_client import REGISTRY

import web.operations  # noqa: F401  (registers the probes and /metrics, as on a worker, before the server starts)
from test_api_support import API_LOOP, api, other_tenant, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP

BURST = 3
# One request back per 1,000 s: none comes back while a test runs.
SLOW_RATE_PER_S = 0.001


def limit_to_a_few_requests(monkeypatch) -> None:
    """API_RATE_BURST requests per token, then one per 1,000 s; called in the test, once its
    tenants were made under the default limit."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "api_rate_limit_per_s", SLOW_RATE_PER_S)
    monkeypatch.setattr(settings, "api_rate_burst", BURST)


def limited_count() -> float:
    return REGISTRY.get_sample_value("alerting_api_requests_limited_total") or 0.0


async def test_a_tenant_past_its_limit_gets_429_with_retry_after_while_other_tokens_go_on(
        api, tenant, other_tenant, monkeypatch):
    limit_to_a_few_requests(monkeypatch)
    limited_before = limited_count()

    statuses = [(await api.call("GET", "/api/v1/rules", tenant.key)).status for _ in range(BURST)]
    refused = await api.call("POST", "/api/v1/rules", tenant.key,
                             {"severity": "HIGH", "source": "payments", "name": "*"})

    assert statuses == [200] * BURST
    assert refused.status == 429, refused.body
    retry_after = refused.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 1 / SLOW_RATE_PER_S
    assert refused.body == {
        "error": "rate_limited",
        "message": f"this token made more requests than the API's rate limit (API_RATE_LIMIT_PER_S "
                   f"{SLOW_RATE_PER_S:g} a second, in bursts of up to API_RATE_BURST {BURST}); "
                   f"try again in {retry_after} s"}
    assert limited_count() == limited_before + 1
    # Another tenant has a budget of its own; the admin is not limited.
    assert (await api.call("GET", "/api/v1/rules", other_tenant.key)).status == 200
    assert (await api.call("GET", "/api/v1/clients", api.admin_token)).status == 200
    monkeypatch.undo()
    # The refused POST did nothing: no rule was made.
    assert (await api.call("GET", "/api/v1/rules", tenant.key)).body["items"] == []


async def test_a_wait_shorter_than_a_second_is_told_as_retry_after_1_never_0(api, tenant, monkeypatch):
    """At more than one request a second, a refused request's wait is under a second: Retry-After
    (whole seconds) rounds it up, since 0 reads as "at once" and a client retrying at once is
    refused again."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "api_rate_limit_per_s", 1.25)  # one back each 0.8 s
    monkeypatch.setattr(settings, "api_rate_burst", 1)
    for _ in range(50):  # until one is refused: the next token is never more than 0.8 s away
        refused = await api.call("GET", "/api/v1/rules", tenant.key)
        if refused.status == 429:
            break
    assert refused.status == 429, refused.body
    assert refused.headers["Retry-After"] == "1"
    assert refused.body["message"].endswith("try again in 1 s")


async def test_requests_without_a_valid_token_spend_no_tenants_budget(api, tenant, monkeypatch):
    limit_to_a_few_requests(monkeypatch)
    unknown = f"alk_{secrets.token_urlsafe(32)}"

    without_token = [(await api.call("GET", "/api/v1/rules", None)).status for _ in range(BURST + 2)]
    unknown_tokens = [(await api.call("GET", "/api/v1/rules", f"alk_{secrets.token_urlsafe(32)}")).status
                      for _ in range(BURST + 2)]
    # One unknown token, again and again, spends a budget of its own: checked before the key is
    # looked up, past it the answer is 429 without asking Postgres.
    one_unknown_token = [(await api.call("GET", "/api/v1/rules", unknown)).status for _ in range(BURST + 1)]
    tenant_statuses = [(await api.call("GET", "/api/v1/rules", tenant.key)).status for _ in range(BURST + 1)]

    assert without_token == [401] * (BURST + 2)
    assert unknown_tokens == [401] * (BURST + 2)
    assert one_unknown_token == [401] * BURST + [429]
    assert tenant_statuses == [200] * BURST + [429]


async def test_the_admin_and_ingest_tokens_are_never_limited(api, monkeypatch):
    """The operator's tokens: the ingest token carries the monitored systems' alerts, often one per
    request from many of them in an incident, when a 429 would hurt most."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "ingest_token", f"ingest-{secrets.token_hex(16)}")
    limit_to_a_few_requests(monkeypatch)
    limited_before = limited_count()

    admin = [(await api.call("GET", "/api/v1/clients", api.admin_token)).status for _ in range(BURST + 2)]
    # The ingest token may only send alerts (403 elsewhere, after it is recognised): a 429 would
    # come before that.
    ingest = [(await api.call("GET", "/api/v1/rules", settings.ingest_token)).status for _ in range(BURST + 2)]

    assert admin == [200] * (BURST + 2)
    assert ingest == [403] * (BURST + 2)
    assert limited_count() == limited_before


async def test_probes_and_metrics_are_never_limited_even_with_a_token(api, monkeypatch):
    limit_to_a_few_requests(monkeypatch)
    # /readyz reads a token (the admin's shows the full detail): still no budget is spent.
    admin = {"Authorization": f"Bearer {api.admin_token}"}
    for path in ("/healthz", "/readyz", "/startedz", "/metrics"):
        statuses = set()
        for _ in range(BURST + 2):
            async with api.client.get(path, headers=admin) as response:
                statuses.add(response.status)
        assert 429 not in statuses, (path, statuses)
    assert (await api.call("GET", "/api/v1/clients", api.admin_token)).status == 200


async def test_a_rate_of_0_limits_nothing(api, tenant, monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "api_rate_limit_per_s", 0.0)
    monkeypatch.setattr(settings, "api_rate_burst", 1)

    statuses = [(await api.call("GET", "/api/v1/rules", tenant.key)).status for _ in range(5)]

    assert statuses == [200] * 5


async def requests_go_on_unchecked(api, tenant, monkeypatch, caplog, redis_url: str) -> None:
    """With REDIS_URL at `redis_url`, requests past the burst, sent together, still answer 200,
    counted as unchecked, with one WARNING."""
    from alerting_app import redis_client
    from alerting_app.app import settings
    from web.request_limits import request_limit

    limit_to_a_few_requests(monkeypatch)
    monkeypatch.setattr(request_limit, "unchecked_until", 0.0)  # put back after the test
    unchecked_before = REGISTRY.get_sample_value("alerting_api_requests_unchecked_total")
    await redis_client.close()
    monkeypatch.setattr(settings, "redis_url", redis_url)
    try:
        with caplog.at_level(logging.WARNING, logger="web.request_limits"):
            replies = await asyncio.gather(*(api.call("GET", "/api/v1/rules", tenant.key) for _ in range(BURST + 2)))
            later = await api.call("GET", "/api/v1/rules", tenant.key)  # not asking Redis again
    finally:
        await redis_client.close()  # the next request connects to the session's Redis again

    assert [reply.status for reply in replies] == [200] * (BURST + 2)
    assert later.status == 200
    assert REGISTRY.get_sample_value("alerting_api_requests_unchecked_total") == unchecked_before + BURST + 3
    # Once, not per request: neither per request that asked together, nor per later one (Redis is
    # asked again only after UNCHECKED_FOR_S).
    warnings = [record.getMessage() for record in caplog.records if record.name == "web.request_limits"]
    assert len(warnings) == 1 and "requests go on unchecked" in warnings[0], warnings


async def test_with_redis_refusing_connections_requests_go_on_unchecked_with_a_warning(api, tenant, monkeypatch,
                                                                                      caplog):
    from alerting_app.embedded import free_port

    await requests_go_on_unchecked(api, tenant, monkeypatch, caplog, f"redis://127.0.0.1:{free_port()}/0")


async def test_with_redis_answering_nothing_requests_go_on_unchecked_with_a_warning(api, tenant, monkeypatch,
                                                                                   caplog):
    """A Redis that takes the connection and never answers (a paused VM) holds the requests that
    asked it CHECK_TIMEOUT_S, however long the client's own timeout, and later ones not at all."""
    async def answer_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up

    server = await asyncio.start_server(answer_nothing, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        # Ten minutes of the client's own: without CHECK_TIMEOUT_S, the requests would still be waiting.
        await requests_go_on_unchecked(api, tenant, monkeypatch, caplog,
                                       f"redis://127.0.0.1:{port}/0?socket_timeout=600")
    finally:
        server.close()
