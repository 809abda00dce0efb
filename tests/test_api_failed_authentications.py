"""The API's limit on failed authentications per client address (web/request_limits.py), on the
worker's own views with real Redis: past it, an address is answered 429 with Retry-After before any
token it sends is looked up, until its allowance refills; other addresses go on. Each test calls
from a loopback address of its own (Linux routes all of 127/8 to lo), and behind a "load balancer"
(API_TRUSTED_PROXIES) names its clients in X-Forwarded-For."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from multidict import CIMultiDict
from prometheus_client import REGISTRY

import web.operations  # noqa: F401  (registers the probes and /metrics, as on a worker, before the server starts)
from test_api_support import API_LOOP, Api, Reply, api, tenant  # noqa: F401  (fixtures)

pytestmark = API_LOOP

BURST = 3
# One failure back per 1,000 s: none comes back while a test runs.
SLOW_RATE_PER_S = 0.001


def limit_failed_authentications(monkeypatch, rate_per_s: float = SLOW_RATE_PER_S, burst: int = BURST) -> None:
    """`burst` failed authentications per address, then `rate_per_s`; called in the test, once its
    tenant was made."""
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "api_failed_auth_limit_per_s", rate_per_s)
    monkeypatch.setattr(settings, "api_failed_auth_burst", burst)


def trust_proxies(monkeypatch, hops: int) -> None:
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "api_trusted_proxies", hops)


def made_up_token() -> str:
    return f"alk_{secrets.token_urlsafe(32)}"


def counted(metric: str) -> float:
    return REGISTRY.get_sample_value(metric) or 0.0


class AddressClient:
    """Requests to the test server over connections from one local address."""

    def __init__(self, server: Api, http: aiohttp.ClientSession) -> None:
        self._server, self._http = server, http

    async def get(self, token: str | None, path: str = "/api/v1/rules", forwarded_for: str | list[str] = ()) -> Reply:
        """`forwarded_for`: X-Forwarded-For, or its lines when the header is given on several."""
        headers = CIMultiDict() if token is None else CIMultiDict(Authorization=f"Bearer {token}")
        for line in [forwarded_for] if isinstance(forwarded_for, str) else forwarded_for:
            headers.add("X-Forwarded-For", line)
        async with self._http.get(self._server.client.make_url(path), headers=headers) as response:
            text = await response.text()
            return Reply(response.status, await response.json(content_type=None) if text else None,
                         response.headers)


@asynccontextmanager
async def calling_from(server: Api, address: str) -> AsyncIterator[AddressClient]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as http:
        yield AddressClient(server, http)


async def test_a_flood_of_made_up_tokens_from_one_address_is_refused_429_before_any_token_is_looked_up(
        api, tenant, monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "ingest_token", f"ingest-{secrets.token_hex(16)}")
    limit_failed_authentications(monkeypatch)
    failed_before = counted("alerting_api_failed_authentications_total")
    limited_before = counted("alerting_api_requests_limited_by_address_total")

    async with calling_from(api, "127.0.0.11") as flooder:
        made_up = [(await flooder.get(made_up_token())).status for _ in range(BURST)]
        refused = [await flooder.get(made_up_token()) for _ in range(3)]
        # Telling a valid key from a made-up one is the lookup the limit saves: refused too.
        valid_key = await flooder.get(tenant.key)
        # The operator's tokens are recognised without a lookup: they go on.
        admin = await flooder.get(api.admin_token, "/api/v1/clients")
        ingest = await flooder.get(settings.ingest_token)  # recognised, and refused where it may not go
        without_token = await flooder.get(None)  # costs nothing to refuse: 401 as ever

    assert made_up == [401] * BURST
    assert [reply.status for reply in refused] == [429] * 3, refused[0].body
    retry_after = refused[0].headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 1 / SLOW_RATE_PER_S
    assert refused[0].body == {
        "error": "rate_limited",
        "message": f"too many requests from this address failed to authenticate (API_FAILED_AUTH_LIMIT_PER_S "
                   f"{SLOW_RATE_PER_S:g} a second, in bursts of up to API_FAILED_AUTH_BURST {BURST}); "
                   f"try again in {retry_after} s"}
    assert valid_key.status == 429 and valid_key.body["error"] == "rate_limited"
    assert (admin.status, ingest.status, without_token.status) == (200, 403, 401)
    # Only the first BURST were looked up: the refused ones cost Postgres nothing.
    assert counted("alerting_api_failed_authentications_total") == failed_before + BURST
    assert counted("alerting_api_requests_limited_by_address_total") == limited_before + 4


async def test_another_address_is_not_limited_by_one_that_failed_too_often(api, tenant, monkeypatch):
    limit_failed_authentications(monkeypatch)

    async with calling_from(api, "127.0.0.12") as flooder, calling_from(api, "127.0.0.13") as neighbour:
        flood = [(await flooder.get(made_up_token())).status for _ in range(BURST + 1)]
        neighbours = [(await neighbour.get(made_up_token())).status for _ in range(BURST - 1)]
        neighbours_key = await neighbour.get(tenant.key)
        flooders_key = await flooder.get(tenant.key)

    assert flood == [401] * BURST + [429]
    assert neighbours == [401] * (BURST - 1)  # a budget of its own, one failure left
    assert neighbours_key.status == 200
    assert flooders_key.status == 429


async def test_once_the_allowance_refills_a_valid_key_from_that_address_works_and_spends_none_of_it(
        api, tenant, monkeypatch):
    limit_failed_authentications(monkeypatch, rate_per_s=2.0, burst=2)  # one back each 0.5 s

    async with calling_from(api, "127.0.0.14") as caller:
        failed = [(await caller.get(made_up_token())).status for _ in range(2)]
        refused = await caller.get(tenant.key)
        await asyncio.sleep(int(refused.headers["Retry-After"]))  # as a client told so would
        # A valid key spends none of its address's failed authentications: all of them go on.
        valid = [(await caller.get(tenant.key)).status for _ in range(5)]

    assert failed == [401, 401]
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert valid == [200] * 5


async def test_failed_attempts_at_the_operators_tokens_count_like_any_other(api, monkeypatch):
    from alerting_app.app import settings

    monkeypatch.setattr(settings, "ingest_token", f"ingest-{secrets.token_hex(16)}")
    limit_failed_authentications(monkeypatch)
    near_misses = [api.admin_token[:-1], api.admin_token + "x", settings.ingest_token + "x", settings.ingest_token[1:]]

    async with calling_from(api, "127.0.0.15") as guesser:
        statuses = [(await guesser.get(token, "/api/v1/clients")).status for token in near_misses]

    assert statuses == [401] * BURST + [429]


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(api, monkeypatch):
    """Anyone can write X-Forwarded-For: read with no proxy in front, a new address in it with each
    request would be a new budget each."""
    limit_failed_authentications(monkeypatch)

    async with calling_from(api, "127.0.0.16") as flooder:
        statuses = [(await flooder.get(made_up_token(), forwarded_for=f"198.51.100.{n}")).status
                    for n in range(BURST + 2)]

    assert statuses == [401] * BURST + [429] * 2


async def test_behind_a_trusted_proxy_the_forwarded_client_is_limited_and_a_spoofed_entry_does_not_escape(
        api, tenant, monkeypatch):
    """API_TRUSTED_PROXIES=1, as behind an ALB: it appends the address it was called from to whatever
    X-Forwarded-For the client sent, and the workers see the load balancer's own address."""
    limit_failed_authentications(monkeypatch)
    trust_proxies(monkeypatch, 1)

    async with calling_from(api, "127.0.0.17") as load_balancer:
        # One client, writing a new address of its own in front of the one the load balancer appends.
        spoofing = [(await load_balancer.get(made_up_token(), forwarded_for=f"10.1.2.{n}, 203.0.113.7")).status
                    for n in range(BURST + 2)]
        its_key = await load_balancer.get(tenant.key, forwarded_for="203.0.113.7")
        other_client = [(await load_balancer.get(made_up_token(), forwarded_for="203.0.113.8")).status
                        for _ in range(BURST)]
        other_clients_key = await load_balancer.get(tenant.key, forwarded_for="203.0.113.9")
        # The header on two lines is one list, read in order: the client is still the last entry.
        two_lines = await load_balancer.get(made_up_token(), forwarded_for=["10.1.2.99", "203.0.113.7"])
        # Not through the load balancer (a caller inside the VPC): its own address, not limited.
        direct = await load_balancer.get(made_up_token())

    assert spoofing == [401] * BURST + [429] * 2
    assert its_key.status == 429
    assert other_client == [401] * BURST
    assert other_clients_key.status == 200
    assert two_lines.status == 429
    assert direct.status == 401


async def test_an_ipv6_client_is_limited_by_its_64_and_an_ipv4_mapped_address_as_the_ipv4_one(api, monkeypatch):
    """One host is commonly given a whole /64: an address of it per request would be a new budget each."""
    limit_failed_authentications(monkeypatch)
    trust_proxies(monkeypatch, 1)

    async with calling_from(api, "127.0.0.18") as load_balancer:
        same_64 = [(await load_balancer.get(made_up_token(), forwarded_for=f"2001:db8:7:1::{n:x}")).status
                   for n in range(1, BURST + 2)]
        next_64 = await load_balancer.get(made_up_token(), forwarded_for="2001:db8:7:2::1")
        mapped = [(await load_balancer.get(made_up_token(), forwarded_for=address)).status
                  for address in ["::ffff:198.51.100.77", "198.51.100.77", "::ffff:198.51.100.77",
                                  "198.51.100.77"]]

    assert same_64 == [401] * BURST + [429]
    assert next_64.status == 401
    assert mapped == [401] * BURST + [429]


async def test_a_port_or_a_zone_id_with_the_forwarded_address_is_no_new_budget(api, monkeypatch):
    """Some proxies append the address with the port they were called from (Azure's Application
    Gateway: `203.0.113.7:50123`, `[2001:db8::1]:50123`): each new connection of one client comes
    from a new port, and counted with it, each would be a new budget. So would each zone id after
    an IPv6 address (`%eth0`), which names an interface of the host that wrote it, not the client."""
    limit_failed_authentications(monkeypatch)
    trust_proxies(monkeypatch, 1)

    async with calling_from(api, "127.0.0.20") as load_balancer:
        ipv4 = [(await load_balancer.get(made_up_token(), forwarded_for=f"203.0.113.70:{40_000 + n}")).status
                for n in range(BURST + 1)]
        ipv6 = [(await load_balancer.get(made_up_token(), forwarded_for=f"[2001:db8:70::{n + 1:x}]:{50_000 + n}"))
                .status for n in range(BURST + 1)]
        # The same client without a port, as another proxy of the chain may write it: one address.
        bare = await load_balancer.get(made_up_token(), forwarded_for="203.0.113.70")
        zoned = [(await load_balancer.get(made_up_token(), forwarded_for=f"2001:db8:71::%{zone}")).status
                 for zone in range(BURST + 1)]

    assert ipv4 == [401] * BURST + [429]
    assert ipv6 == [401] * BURST + [429]
    assert bare.status == 429
    assert zoned == [401] * BURST + [429]


async def test_with_redis_refusing_connections_failed_authentications_go_on_unchecked(api, tenant, monkeypatch,
                                                                                      caplog):
    """As the key's limit, the address's fails open: 401 for each made-up token, and a valid key
    answered, with one WARNING."""
    from alerting_app import redis_client
    from alerting_app.app import settings
    from alerting_app.embedded import free_port
    from web.request_limits import request_limit

    limit_failed_authentications(monkeypatch)
    monkeypatch.setattr(request_limit, "unchecked_until", 0.0)  # put back after the test
    await redis_client.close()
    monkeypatch.setattr(settings, "redis_url", f"redis://127.0.0.1:{free_port()}/0")
    try:
        with caplog.at_level(logging.WARNING, logger="web.request_limits"):
            async with calling_from(api, "127.0.0.19") as flooder:
                flood = [(await flooder.get(made_up_token())).status for _ in range(BURST + 2)]
                valid = await flooder.get(tenant.key)
    finally:
        await redis_client.close()  # the next request connects to the session's Redis again

    assert flood == [401] * (BURST + 2)
    assert valid.status == 200
    warnings = [record.getMessage() for record in caplog.records if record.name == "web.request_limits"]
    assert len(warnings) == 1 and "requests go on unchecked" in warnings[0], warnings
