"""A real name server for the lookup tests, one that never answers: UDP on 127.0.0.1, keeping the
name of every query it is asked, answering none (a tenant's own name server that is down, or a
recursive resolver waiting on it).

`SilentNameServer.resolving_here(monkeypatch)` points our endpoint lookups (c-ares,
alerting_app/channels/addresses.py) at it, and the system's resolver (getaddrinfo, on threads) as
well, for names under a domain: what resolv.conf naming it would do, which tests cannot write.
There each lookup holds its thread, sending its query and then waiting, as glibc does for its
timeout times its attempts, here until the server is closed. `threads_held` counts them.

This module holds no tests.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading


def query_for(name: str) -> bytes:
    """A DNS query (RFC 1035 4.1) of `name`'s A record, recursion desired."""
    labels = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", 0x2a2a, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", 1, 1)


def name_asked(query: bytes) -> str:
    """The name of a query's first question."""
    labels, at = [], 12
    while query[at]:
        labels.append(query[at + 1:at + 1 + query[at]].decode("ascii", "replace"))
        at += 1 + query[at]
    return ".".join(labels)


class SilentNameServer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.threads_held = 0
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._transport: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> "SilentNameServer":
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed.set()  # the system's lookups give up
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.asked.append(name_asked(data))  # and no answer

    @property
    def address(self) -> tuple[str, int]:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")[:2]

    def resolving_here(self, monkeypatch, domain: str) -> None:
        """Every endpoint lookup asks this server (/etc/hosts first: localhost still resolves), and
        the system's resolver asks it names under `domain`."""
        from alerting_app.channels import addresses

        host, port = self.address
        monkeypatch.setattr(addresses, "NAMESERVERS", [f"{host}:{port}"])
        system_lookup = socket.getaddrinfo

        def getaddrinfo(name, *args, **kwargs):
            if not (isinstance(name, str) and name.rstrip(".").endswith(domain)):
                return system_lookup(name, *args, **kwargs)
            with self._held_lock:
                self.threads_held += 1
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asking:
                    asking.sendto(query_for(name), (host, port))
                self._closed.wait(300)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            finally:
                with self._held_lock:
                    self.threads_held -= 1

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
