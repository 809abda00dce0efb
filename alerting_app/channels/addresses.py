"""Where an endpoint may point: public internet addresses only, unless ALLOW_PRIVATE_ENDPOINTS.

Without this, a tenant could make our workers POST into our own network (the metadata service at
169.254.169.254, Postgres on 10.x, the worker's own port on 127.0.0.1).

Checked twice: when an endpoint is created (`check_public_host`, a 422 naming the field), and when a
delivery connects (`PublicAddressResolver`, `refuse_non_public_literal`), because a name that
resolved to a public address at creation may resolve into our network later (DNS rebinding).
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The name servers endpoint hosts are looked up on: None, the system's (/etc/resolv.conf, with its
# search domains and options, after /etc/hosts). Tests point it at a name server of their own.
NAMESERVERS: list[str] | None = None


def host_resolver() -> AsyncResolver:
    """The resolver of tenants' endpoint hosts: aiohttp's AsyncResolver, c-ares through aiodns.

    Not the system's getaddrinfo on threads (aiohttp's ThreadedResolver, what we used before): a
    lookup there holds its thread until the system's resolver gives up (resolv.conf's timeout times
    its attempts, 10-30 s), long after the send's timeout, so a few tenants naming many hosts under
    a name server that never answers held every thread and every other tenant's deliveries waited.
    A c-ares lookup is a query on the channel's one socket: a send that times out leaves a pending
    query, not a held thread. c-ares reads /etc/hosts (localhost included) and /etc/resolv.conf
    (name servers, search domains, ndots, timeout and attempts) as glibc does; it does not ask
    other NSS sources (mDNS, LDAP), which no public endpoint's name needs.
    """
    if NAMESERVERS is None:
        return AsyncResolver()  # aiohttp shares one c-ares channel per event loop among these
    return AsyncResolver(nameservers=NAMESERVERS)


class RefusedAddress(ValueError):
    """`str(self)` says which address was refused and why."""


_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765): ::ffff:0:a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches, where it is one that carries it.

    IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d: a NAT64 gateway on our network connects
    to a.b.c.d), 6to4 (2002:AABB:CCDD::, bits 16-48: a relay forwards to AA.BB.CC.DD) and the
    deprecated IPv4-compatible form (::a.b.c.d, which some stacks still route as IPv4), and the
    IPv4-translated form of stateless translators (::ffff:0:a.b.c.d). Python 3.11
    judges only the mapped form by its IPv4 address: the others pass as public, whatever they embed.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.is_unspecified or ip.is_loopback:
        return None  # :: and ::1 are IPv4-compatible in form only, and judged as what they are
    if ip in _NAT64_WELL_KNOWN or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None when it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL_USE:
            # Local-use NAT64 prefixes (RFC 8215) lead wherever the operator's translator is set to.
            return "local-use NAT64"
        if ip.is_site_local:
            # fec0::/10: deprecated (RFC 3879) but still routed inside some networks; Python 3.11
            # counts it as global.
            return "site-local"
        ip = embedded_ipv4(ip) or ip
    for kind, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("private", ip.is_private),
                       ("multicast", ip.is_multicast)):
        if flag:
            return kind
    # Shared (100.64/10), documentation and reserved ranges are not reachable as public hosts either.
    return None if ip.is_global else "non-public"


async def check_public_host(host: str, port: int) -> None:
    """Raise RefusedAddress unless every address `host` resolves to is public. The lookup is the
    one a delivery makes (`host_resolver`); the caller bounds how long it may take."""
    literal = host.strip("[]")  # an IPv6 literal comes bracketed in a URL
    try:
        addresses = {ipaddress.ip_address(literal)}
    except ValueError:
        refuse_invalid_name(host)
        resolver = host_resolver()
        try:
            results = await resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as exc:  # AsyncResolver's for any DNS error, its text the strerror
            raise RefusedAddress(f"{host} does not resolve ({exc.strerror})") from None
        finally:
            await resolver.close()
        addresses = {_address(result["host"]) for result in results}
    refuse_non_public(host, addresses)


def refuse_invalid_name(host: str) -> None:
    """Raise RefusedAddress if no lookup could take `host`.

    Every lookup first encodes the name with the IDNA codec, which raises UnicodeError (not
    gaierror) for an empty label ("a..com") or one longer than 63 characters.
    """
    try:
        host.encode("idna")
    except UnicodeError:
        raise RefusedAddress(f"{host} is not a valid DNS name") from None


def refuse_non_public(host: str, addresses: Iterable[IPAddress]) -> None:
    """Raise RefusedAddress if any of the addresses `host` stands for is not public."""
    literal = host.strip("[]")
    for ip in sorted(addresses, key=str):
        kind = non_public_kind(ip)
        if kind is not None:
            # Not which address a name resolves to: the reason reaches the tenant (a 422, a
            # delivery's last error), and our network's addresses are none of its business.
            a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
            if str(ip) == literal:
                raise RefusedAddress(f"{literal} is {a_kind}")
            raise RefusedAddress(f"{host} resolves to {a_kind}")


def refusal_told(host: str, refusal: Exception) -> str:
    """What a tenant is told of a refused host, at creation (a 422) and at delivery (`last_error`, an
    endpoint test's `error`): the reason for an address it wrote itself, but one answer for every
    name, whether it does not resolve or resolves into our network.

    Saying which (and what kind of address) told any key with a rule which names exist inside our
    network (`db.internal resolves to a private address`, `nosuch.internal does not resolve`), at
    creation or, through a public name of its own turned into a CNAME of an internal one, at the
    next delivery. The operator's log has the detail (channels/http.py).
    """
    if is_address_literal(host):
        return str(refusal)
    return f"{host} does not resolve to public addresses only"


def is_address_literal(host: str) -> bool:
    """Whether `host` is an IP address (an IPv6 one bracketed or not), not a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _address(text: str) -> IPAddress:
    # The scope of an IPv6 link-local address ("fe80::1%eth0") is not part of the address.
    return ipaddress.ip_address(text.split("%")[0])


class PublicAddressResolver(AbstractResolver):
    """aiohttp's resolver for delivery connections, refusing a name if any address it resolves to
    is not public (RefusedAddress, raised out of the request).

    Wraps `host_resolver`, the lookup `check_public_host` makes at creation (/etc/hosts included).
    The connector caches only answers this returned (10 s by default): a refusal is not cached.
    """

    def __init__(self) -> None:
        self._resolver = host_resolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        refuse_non_public(host, {_address(result["host"]) for result in results})
        return results

    async def close(self) -> None:
        await self._resolver.close()


async def refuse_non_public_literal(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    """aiohttp client middleware: an IP address written in the URL never reaches the resolver."""
    host = request.url.host or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await handler(request)  # a name: PublicAddressResolver checks it when connecting
    refuse_non_public(host, [ip])
    return await handler(request)
