"""Which addresses an endpoint may point at when private endpoints are not allowed: checked at
creation, and again when a delivery connects (real local receivers on 127.0.0.1)."""
from __future__ import annotations

import ipaddress

import aiohttp
import pytest

from alerting_app.channels.addresses import (
    PublicAddressResolver, RefusedAddress, check_public_host, non_public_kind, refuse_non_public,
)
from alerting_app.channels.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from alerting_app.channels.http import endpoint_session
from alerting_app.channels.slack import send_slack
from alerting_app.channels.webhook import send_webhook
from alerting_app.contracts import Alert, NotificationReady
from delivery_receivers import Receiver
from name_servers import SilentNameServer


@pytest.mark.parametrize(("address", "kind"), [
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("127.0.0.53", "loopback"), ("fe80::1", "link-local"),
    ("172.16.5.4", "private"), ("fd00::1", "private"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
    ("192.0.2.1", "private"), ("::ffff:127.0.0.1", "loopback"), ("fec0::1", "site-local"),
    # Shared address space (CGNAT, RFC 6598): neither private nor global to Python, a carrier's
    # internal network; and the same in its IPv4-mapped form.
    ("100.64.0.1", "non-public"), ("100.127.255.254", "non-public"), ("::ffff:100.64.0.1", "non-public"),
    ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"), ("ff02::1", "multicast"),
    ("239.255.255.250", "multicast"), ("100.128.0.1", None),
])
def test_addresses_are_classified_public_or_not(address, kind):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(("address", "kind"), [
    ("64:ff9b::a00:5", "private"), ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ("2002:a00:1::", "private"), ("2002:7f00:1::1", "loopback"), ("2002:808:808::1", None),  # 6to4
    ("::7f00:1", "loopback"), ("::a00:5", "private"), ("::808:808", None),  # IPv4-compatible
    ("::ffff:0:7f00:1", "loopback"), ("::ffff:0:a00:5", "private"), ("::ffff:0:808:808", None),  # SIIT
    ("::", "unspecified"), ("::1", "loopback"),
])
def test_an_ipv6_address_that_carries_an_ipv4_address_is_judged_by_it(address, kind):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", ["64:ff9b:1::1", "64:ff9b:1::808:808", "64:ff9b:1:ffff::a00:5"])
def test_a_local_use_nat64_address_is_refused_whatever_it_carries(address):
    assert non_public_kind(ipaddress.ip_address(address)) == "local-use NAT64"


@pytest.mark.parametrize("host", ["[64:ff9b::a00:5]", "[2002:a00:1::]", "[::7f00:1]", "[64:ff9b:1::1]",
                                  "[::ffff:0:7f00:1]", "[fec0::1]"])
async def test_an_endpoint_at_an_ipv6_form_of_an_internal_address_is_refused(host):
    with pytest.raises(RefusedAddress, match="is a"):
        await check_public_host(host, 443)


async def test_a_host_name_is_checked_by_every_address_it_resolves_to():
    with pytest.raises(RefusedAddress, match="localhost resolves to"):
        await check_public_host("localhost", 80)
    await check_public_host("93.184.216.34", 443)
    # localhost resolves to loopback only; a name with a public address first (in the checked
    # order) and a private one after it must be refused for the private one.
    with pytest.raises(RefusedAddress, match="h.example resolves to a private address"):
        refuse_non_public("h.example", {ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("192.168.0.1")})
    with pytest.raises(RefusedAddress, match="h.example resolves to a non-public address"):
        refuse_non_public("h.example", {ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("100.64.0.7")})


@pytest.mark.parametrize("host", ["a..com", "a" * 64 + ".example.com", ".example.com"])
async def test_a_host_that_is_not_a_valid_dns_name_is_refused(host):
    # The IDNA codec raises UnicodeError, not gaierror, before any lookup.
    with pytest.raises(RefusedAddress, match="is not a valid DNS name"):
        await check_public_host(host, 80)


# --- at send time: the delivery session connects to public addresses only ---------------------------

def notification() -> NotificationReady:
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000.5, severity="HIGH", source="payments",
                  name="CheckoutLatency")
    return NotificationReady(notification_id="6f1c2a34-0000-4000-8000-000000000002",
                             client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=[alert],
                             rule_ids=["1d2e3f40-0000-4000-8000-000000000004"], created_at=1_700_000_001.25)


async def send_to_webhook(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> None:
    await send_webhook(session, url, "s3cret-of-the-endpoint", "7a1b4c9e-0000-4000-8000-000000000001",
                       notification(), timeout_s)


async def send_to_slack(session: aiohttp.ClientSession, url: str) -> None:
    await send_slack(session, url, notification(), 5.0)


@pytest.mark.parametrize("send", [send_to_webhook, send_to_slack], ids=["webhook", "slack"])
async def test_a_name_resolving_to_a_private_address_is_refused_when_sending(send, caplog):
    """What DNS rebinding looks like to the worker: a name whose address is private *now*."""
    async with Receiver() as receiver, endpoint_session(concurrency=4, allow_private=False) as session:
        with pytest.raises(RetryableDeliveryError) as refused:
            await send(session, f"http://localhost:{receiver.port}/hook")
        assert receiver.posts == []
    assert str(refused.value) == ("localhost does not resolve to public addresses only; endpoints must be public "
                                  "addresses (ALLOW_PRIVATE_ENDPOINTS is off)")
    assert "localhost resolves to a loopback address" in caplog.text  # the operator's log says which


@pytest.mark.parametrize("send", [send_to_webhook, send_to_slack], ids=["webhook", "slack"])
async def test_a_name_resolving_into_our_network_fails_as_a_name_that_does_not_resolve(send, caplog):
    """A tenant's public name turned into a CNAME of an internal one after its endpoint's creation:
    told "resolves to a loopback address", permanently, against a DNS error retried, the delivery
    said which of our internal names exist. Both read the same and are retried alike."""
    failures = {}
    async with endpoint_session(concurrency=4, allow_private=False) as session:
        for host in ("localhost", "no-such-name.invalid"):
            with pytest.raises(DeliveryError) as failed:
                await send(session, f"http://{host}:9/hook")
            failures[host] = (type(failed.value), getattr(failed.value, "retry_after", None),
                             str(failed.value).replace(host, "<host>"))
    assert failures["localhost"] == failures["no-such-name.invalid"], failures
    assert failures["localhost"][0] is RetryableDeliveryError
    assert "localhost resolves to a loopback address" in caplog.text
    assert "no-such-name.invalid" in caplog.text and "ClientConnectorDNSError" in caplog.text


@pytest.mark.parametrize("send", [send_to_webhook, send_to_slack], ids=["webhook", "slack"])
async def test_a_private_address_in_the_url_is_refused_when_sending(send):
    """An endpoint created while ALLOW_PRIVATE_ENDPOINTS was on is refused once it is off."""
    async with Receiver() as receiver, endpoint_session(concurrency=4, allow_private=False) as session:
        with pytest.raises(PermanentDeliveryError, match="127.0.0.1 is a loopback address"):
            await send(session, receiver.url())
        assert receiver.posts == []


@pytest.mark.parametrize("allow_private", [False, True], ids=["private-refused", "private-allowed"])
async def test_a_name_its_name_server_never_answers_ends_in_a_retryable_timeout_holding_no_thread(
        monkeypatch, allow_private):
    """A send's lookup is a c-ares query, which the send's timeout ends: no thread waits on for the
    system's resolver to give up. /etc/hosts is still read first: localhost resolves (and, private
    endpoints refused, is refused) while the name server answers nothing."""
    async with Receiver() as receiver, SilentNameServer() as name_server:
        name_server.resolving_here(monkeypatch, ".silent-dns.test")
        async with endpoint_session(concurrency=4, allow_private=allow_private) as session:
            with pytest.raises(RetryableDeliveryError, match=r"^timed out after 0\.5s$"):
                await send_to_webhook(session, f"http://n1.silent-dns.test:{receiver.port}/hook", timeout_s=0.5)
            if allow_private:
                await send_to_webhook(session, f"http://localhost:{receiver.port}/hook")
            else:
                with pytest.raises(RetryableDeliveryError, match="localhost does not resolve to public addresses only"):
                    await send_to_webhook(session, f"http://localhost:{receiver.port}/hook")
        assert "n1.silent-dns.test" in name_server.asked and name_server.threads_held == 0
        assert len(receiver.posts) == (1 if allow_private else 0)


@pytest.mark.parametrize("allow_private", [False, True], ids=["private-refused", "private-allowed"])
async def test_a_lookup_in_flight_ends_when_its_session_closes(monkeypatch, allow_private):
    """aiohttp closes only a resolver it made: ours was left open with the session, its queries to
    a name server that never answers going on until c-ares gave up, and answering into an event
    loop that may be closed by then (a worker's stop, an endpoint test's end)."""
    import asyncio

    async with SilentNameServer() as name_server:
        name_server.resolving_here(monkeypatch, ".silent-dns.test")
        session = endpoint_session(concurrency=1, allow_private=allow_private)
        lookup = asyncio.ensure_future(session.connector._resolver.resolve("n1.silent-dns.test", 80))
        async with asyncio.timeout(30):  # a guard against hanging only
            while "n1.silent-dns.test" not in name_server.asked:
                await asyncio.sleep(0.01)
            await session.close()
            with pytest.raises(OSError, match="cancel"):
                await lookup


async def test_the_same_sends_reach_a_private_receiver_when_private_endpoints_are_allowed():
    async with Receiver() as receiver, endpoint_session(concurrency=4, allow_private=True) as session:
        await send_to_webhook(session, f"http://localhost:{receiver.port}/hook")
        await send_to_slack(session, receiver.url())
        assert len(receiver.posts) == 2


async def test_a_public_address_is_not_refused_when_sending():
    # Nothing of ours listens there, and this machine may have no route out: the send may fail as
    # any unreachable or unwilling endpoint does, but not as a refused address.
    async with endpoint_session(concurrency=4, allow_private=False) as session:
        try:
            await send_to_webhook(session, "http://93.184.216.34:9/hook", timeout_s=1.0)
        except DeliveryError as exc:
            assert "ALLOW_PRIVATE_ENDPOINTS" not in str(exc)


async def test_a_name_in_etc_hosts_is_checked_at_creation_whatever_the_name_server(monkeypatch):
    async with SilentNameServer() as name_server:
        name_server.resolving_here(monkeypatch, ".silent-dns.test")
        with pytest.raises(RefusedAddress, match="localhost resolves to a loopback address"):
            await check_public_host("localhost", 80)
    assert name_server.asked == []


async def test_the_resolver_refuses_a_name_with_a_private_address():
    resolver = PublicAddressResolver()
    try:
        with pytest.raises(RefusedAddress, match="localhost resolves to"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
