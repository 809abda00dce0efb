"""A SASL login in front of Tansu, for the tests of KAFKA_SECURITY_PROTOCOL=SASL_SSL / SASL_PLAINTEXT.

Tansu 0.6.0 cannot be given SCRAM users here (it refuses to create them with its memory storage),
so the login is checked in front of it, as a broker's SASL listener checks it: each connection
may ask for the broker's API versions (passed on to Tansu), must then complete a SaslHandshake and
SaslAuthenticate exchange (SCRAM with a user of `users`, the server side being scramp's, as
pg8000's; or OAUTHBEARER with a token the test checks), and only then is it joined to Tansu, in
plaintext. Any other request before the login
closes the connection, as Kafka does. Optionally with TLS first (SASL_SSL), without a client
certificate, as MSK's SCRAM listener.
"""
from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable

import scramp

from broker_front import BrokerFront, join

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    data = text.encode()
    return struct.pack(">h", len(data)) + data


class LoginRefused(Exception):
    pass


class ScramExchange:
    """The server side of one SCRAM login (scramp's), against `auth_info` by user."""

    def __init__(self, scram: scramp.ScramMechanism, auth_info: dict[str, tuple]) -> None:
        self.user: str | None = None

        def lookup(user: str) -> tuple:
            self.user = user
            return auth_info[user]  # KeyError: no such user
        self._server = scram.make_server(lookup)

    def step(self, message: str) -> tuple[str, bool]:
        """(the answer, whether the login is complete); raises LoginRefused."""
        try:
            if self._server.stage is None:
                self._server.set_client_first(message)
                return self._server.get_server_first(), False
            self._server.set_client_final(message)
            return self._server.get_server_final(), True
        except (scramp.ScramException, KeyError) as exc:
            raise LoginRefused(str(exc)) from None


class BearerExchange:
    """One OAUTHBEARER login (RFC 7628): the client's first message carries the token, which
    `check_token` accepts (returning who it names) or refuses (raising LoginRefused)."""

    def __init__(self, check_token: Callable[[str], str]) -> None:
        self.user: str | None = None
        self._check_token = check_token

    def step(self, message: str) -> tuple[str, bool]:
        fields = dict(field.split("=", 1) for field in message.split("\x01")[1:] if "=" in field)
        scheme, _, token = fields.get("auth", "").partition(" ")
        if scheme != "Bearer" or not token:
            raise LoginRefused("no bearer token")
        try:
            self.user = self._check_token(token)
        except LoginRefused:
            raise
        except Exception as exc:  # a token `check_token` cannot even read is refused like a wrong one
            raise LoginRefused(f"unreadable token: {type(exc).__name__}: {exc}") from None
        return "", True


class SaslLoginBroker(BrokerFront):
    """`port` takes SASL logins and then forwards to `upstream_port`: `mechanism` SCRAM-SHA-256/512
    with `users` (name -> password), or OAUTHBEARER with tokens `check_token` accepts. `logins` lists
    who logged in, `refusals` counts failed logins."""

    def __init__(self, port: int, upstream_port: int, users: dict[str, str] | None = None, *,
                 mechanism: str = "SCRAM-SHA-512", check_token: Callable[[str], str] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(port, upstream_port, tls)
        self.mechanism = mechanism
        if mechanism == "OAUTHBEARER":
            assert check_token is not None
            self._exchange: Callable[[], ScramExchange | BearerExchange] = lambda: BearerExchange(check_token)
        else:
            scram = scramp.ScramMechanism(mechanism)
            auth_info = {user: scram.make_auth_info(password, iteration_count=4096)
                         for user, password in (users or {}).items()}
            self._exchange = lambda: ScramExchange(scram, auth_info)
        self.logins: list[str] = []
        self.refusals = 0

    async def _log_in(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter) -> bool:
        """The exchange before the login; True once a user has logged in."""
        exchange = None
        while True:
            body = await read_frame(reader)
            api_key, api_version, correlation_id, client_id_length = struct.unpack(">hhih", body[:10])
            payload = body[10 + max(client_id_length, 0):]
            header = struct.pack(">i", correlation_id)
            if api_key == API_VERSIONS:
                upstream_writer.write(frame(body))
                writer.write(frame(await read_frame(upstream_reader)))
            elif api_key == SASL_HANDSHAKE and api_version <= 1:
                (length,) = struct.unpack(">h", payload[:2])
                asked = payload[2:2 + length].decode()
                error = 0 if asked == self.mechanism else UNSUPPORTED_SASL_MECHANISM
                writer.write(frame(header + struct.pack(">hi", error, 1) + string(self.mechanism)))
                if error:
                    return False
                exchange = self._exchange()
            elif api_key == SASL_AUTHENTICATE and api_version <= 1 and exchange is not None:
                (length,) = struct.unpack(">i", payload[:4])
                session_lifetime = struct.pack(">q", 0) if api_version else b""
                try:
                    answer, done = exchange.step(payload[4:4 + length].decode())
                except LoginRefused as exc:
                    self.refusals += 1
                    reply = struct.pack(">h", SASL_AUTHENTICATION_FAILED) + string(f"Authentication failed: {exc}")
                    writer.write(frame(header + reply + struct.pack(">i", 0) + session_lifetime))
                    return False
                reply = struct.pack(">h", 0) + string(None) + struct.pack(">i", len(answer)) + answer.encode()
                writer.write(frame(header + reply + session_lifetime))
                if done:
                    self.logins.append(exchange.user)
                    return True
            else:  # anything else before the login: Kafka closes the connection
                return False
            await writer.drain()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            logged_in = await self._log_in(reader, writer, upstream_reader, upstream_writer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            logged_in = False
        if not logged_in:
            writer.close()
            upstream_writer.close()
            return
        await join(reader, writer, upstream_reader, upstream_writer)
