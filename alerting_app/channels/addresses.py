"""Where an endpoint may point: public internet addresses only, unless ALLOW_PRIVATE_ENDPOINTS.

Without this, a tenant could make our workers POST into our own network (the metadata service at
169.254.169.254, Postgres on 10.x, the worker's own port on 127.0.0.1).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedAddress(ValueError):
    """`str(self)` says which address was refused and why."""


def non_public_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None when it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("private", ip.is_private),
                       ("multicast", ip.is_multicast)):
        if flag:
            return kind
    # Shared (100.64/10), documentation and reserved ranges are not reachable as public hosts either.
    return None if ip.is_global else "non-public"


async def check_public_host(host: str, port: int) -> None:
    """Raise RefusedAddress unless every address `host` resolves to is public."""
    literal = host.strip("[]")  # an IPv6 literal comes bracketed in a URL
    try:
        addresses = {ipaddress.ip_address(literal)}
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise RefusedAddress(f"{host} does not resolve ({exc.strerror})") from None
        # The scope of an IPv6 link-local address ("fe80::1%eth0") is not part of the address.
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    for ip in sorted(addresses, key=str):
        kind = non_public_kind(ip)
        if kind is not None:
            where = literal if str(ip) == literal else f"{host} resolves to {ip}, which"
            raise RefusedAddress(f"{where} is a {kind} address")
