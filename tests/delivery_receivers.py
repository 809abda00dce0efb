"""Real local endpoints for the delivery tests: an HTTP receiver and an SMTP server.

`Receiver` is an aiohttp server on 127.0.0.1 that records every POST. Each path answers from its
script (`answer(path, 500, 500, 200)`: one status per request, the last one repeating; 200 when
unscripted), and a path can be held (`hold(path)`: requests wait, unanswered, until released),
slowed (`delay(path, seconds)`: each request answered that long after it arrived) or made to hang
(`hang(path, count)`: the next `count` requests are never answered; the sender times out).
`SmtpServer` is aiosmtpd's SMTP server in its own thread, keeping every message it accepts; it can
refuse a recipient (`refuse`), answer slowly (`stall`) or be slow to say goodbye (`stall_goodbye`).

This module holds no tests.
"""
from __future__ import annotations

import asyncio
import ssl
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from alerting_app.embedded import free_port


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    raw: bytes
    received_at: float  # time.monotonic()
    status: int  # what the receiver answers (or will, once released); 0: never answered (`hang`)

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


class Receiver:
    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.port = free_port()
        self._scripts: dict[str, list[Answer]] = {}
        self._held: dict[str, asyncio.Event] = {}
        self._delays: dict[str, float] = {}
        self._hangs: Counter[str] = Counter()  # requests per path still to leave unanswered
        self._closing = asyncio.Event()
        self.in_flight: Counter[str] = Counter()  # requests per path received and not yet answered
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "Receiver":
        application = web.Application()
        application.router.add_post("/{path:.*}", self._receive)
        self._runner = web.AppRunner(application)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for gate in [*self._held.values(), self._closing]:
            gate.set()
        await self._runner.cleanup()

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def answer(self, path: str, *answers: int | Answer) -> None:
        self._scripts[path] = [a if isinstance(a, Answer) else Answer(a) for a in answers]

    def hold(self, path: str) -> asyncio.Event:
        """Requests to `path` wait unanswered until the returned event is set."""
        self._held[path] = asyncio.Event()
        return self._held[path]

    def delay(self, path: str, seconds: float) -> None:
        """Answer each request to `path` `seconds` after it arrived: a slow endpoint, its sends in flight meanwhile."""
        self._delays[path] = seconds

    def hang(self, path: str, count: int) -> None:
        """Never answer the next `count` requests to `path` (recorded with status 0: no answer)."""
        self._hangs[path] = count

    def posts_to(self, path: str = "hook") -> list[Post]:
        return [post for post in self.posts if post.path == path]

    def idempotency_keys(self) -> Counter[str]:
        return Counter(post.headers["Idempotency-Key"] for post in self.posts)

    def accepted(self) -> Counter[str]:
        """POSTs answered 2xx, by Idempotency-Key: the deliveries, as the receiver counts them."""
        return Counter(post.headers["Idempotency-Key"] for post in self.posts if 200 <= post.status < 300)

    async def wait_for_posts(self, count: int, path: str | None = None, timeout: float = 60.0) -> list[Post]:
        """Wait until `count` POSTs (to `path`, if given) have arrived; a bound, not a measurement."""
        def arrived() -> list[Post]:
            return self.posts if path is None else self.posts_to(path)

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(arrived()) >= count), timeout)
        return arrived()

    async def wait_until_disconnected(self, timeout: float = 30.0) -> None:
        """Wait until no client holds a connection: whatever a client sent before it went away has
        been answered (a connection is only closed after the requests buffered on it)."""
        async with asyncio.timeout(timeout):
            while self._runner.server.connections:
                await asyncio.sleep(0.01)

    async def _receive(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        raw = await request.read()
        script = self._scripts.get(path) or [Answer(200)]
        answer = script.pop(0) if len(script) > 1 else script[0]
        hangs = self._hangs[path] > 0
        if hangs:
            self._hangs[path] -= 1
        self.posts.append(Post(path, dict(request.headers), raw, time.monotonic(), 0 if hangs else answer.status))
        async with self._arrived:
            self._arrived.notify_all()
        if hangs:
            await self._closing.wait()  # the sender gives up meanwhile
        if path in self._delays:
            self.in_flight[path] += 1
            try:
                await asyncio.sleep(self._delays[path])
            finally:
                self.in_flight[path] -= 1
        if path in self._held:
            self.in_flight[path] += 1
            try:
                await self._held[path].wait()
            finally:
                self.in_flight[path] -= 1
        return web.Response(status=answer.status, headers=answer.headers)


class _KeepMessages:
    """aiosmtpd handler: accepts mail, except from senders or to recipients given a reply in `replies`; waits
    `stall_s` before answering MAIL, RCPT and DATA, and `goodbye_stall_s` before answering QUIT."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.over_tls: list[bool] = []  # for each message, whether its session had switched to TLS
        self.received_at: list[float] = []  # for each message, time.monotonic() when its DATA was taken
        self.replies: dict[str, str | bytes] = {}
        self.stall_s = 0.0
        self.goodbye_stall_s = 0.0
        self.envelopes_begun = 0  # MAIL commands received, answered or not (a stalled send counts)
        self.greeted_as: list[str] = []  # for each MAIL command, the name the sender greeted with (EHLO)
        self.greeting_refusal: str | None = None  # the reply to EHLO and HELO, if they are refused
        self.fqdn_helo_required = False  # Postfix's reject_non_fqdn_helo_hostname, at RCPT
        self.message_refusal: str | None = None  # the reply to the end of DATA, if messages are refused

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802 (aiosmtpd's name)
        if self.greeting_refusal is not None:
            return [self.greeting_refusal]
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):  # noqa: N802 (aiosmtpd's name)
        if self.greeting_refusal is not None:
            return self.greeting_refusal
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802 (aiosmtpd's name)
        self.envelopes_begun += 1
        self.greeted_as.append(session.host_name)
        await asyncio.sleep(self.stall_s)
        reply = self.replies.get(address)
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802 (aiosmtpd's name)
        await asyncio.sleep(self.stall_s)
        if self.fqdn_helo_required and "." not in session.host_name and not session.host_name.startswith("["):
            # Postfix's restrictions are applied at RCPT (smtpd_delay_reject), whatever they check.
            return f"504 5.5.2 <{session.host_name}>: Helo command rejected: need fully-qualified hostname"
        reply = self.replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        await asyncio.sleep(self.stall_s)
        if self.message_refusal is not None:
            return self.message_refusal
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        self.over_tls.append(session.ssl is not None)
        self.received_at.append(time.monotonic())
        return "250 Message accepted for delivery"

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        await asyncio.sleep(self.goodbye_stall_s)
        return "221 Bye"


class SmtpServer:
    def __init__(self, logins: dict[str, str] | None = None, starttls: ssl.SSLContext | None = None) -> None:
        """With `logins` (user -> password), mail is taken only after AUTH with one of them;
        `logged_in` lists who did. With `starttls` (the server's TLS context), STARTTLS is offered,
        not required; a login is then taken over TLS only. `over_tls` says which messages came over TLS."""
        self.port = free_port()
        self._handler = _KeepMessages()
        self.logged_in: list[str] = []
        options: dict = {"tls_context": starttls} if starttls is not None else {}
        if logins is not None:
            def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
                user, password = auth_data.login.decode(), auth_data.password.decode()
                if logins.get(user) != password:
                    return AuthResult(success=False, handled=False)
                self.logged_in.append(user)
                return AuthResult(success=True)

            options |= {"authenticator": authenticate, "auth_required": True,
                        "auth_require_tls": starttls is not None}
        # The name it greets with is its own (aiosmtpd looks this machine's up otherwise, for every
        # connection, which a test counting our own look-ups would count too).
        self._controller = Controller(self._handler, hostname="127.0.0.1", port=self.port,
                                      server_hostname="relay.test", **options)

    def __enter__(self) -> "SmtpServer":
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[EmailMessage]:
        return self._handler.messages

    @property
    def envelopes_begun(self) -> int:
        """How many messages were begun (MAIL received), including those the relay is stalling."""
        return self._handler.envelopes_begun

    @property
    def over_tls(self) -> list[bool]:
        return self._handler.over_tls

    @property
    def greeted_as(self) -> list[str]:
        """For each message begun, the name its sender greeted the relay with (EHLO)."""
        return self._handler.greeted_as

    @property
    def received_at(self) -> list[float]:
        """time.monotonic() at each message's arrival, in the order of `messages`."""
        return self._handler.received_at

    def refuse(self, recipient: str, reply: str | bytes) -> None:
        """Answer RCPT TO for `recipient`, or MAIL FROM for a sender, with `reply` (e.g. "550 5.1.1 no
        such user"); bytes go out as
        they are, as a relay that does not speak UTF-8 sends them."""
        self._handler.replies[recipient] = reply

    def refuse_messages(self, reply: str) -> None:
        """Answer the end of DATA with `reply` (e.g. "554 Message rejected: ..."): the message refused
        once the relay has it, as Amazon SES refuses an unverified sender."""
        self._handler.message_refusal = reply

    def refuse_greetings(self, reply: str) -> None:
        """Answer EHLO and HELO with `reply` (e.g. "550 5.7.1 go away")."""
        self._handler.greeting_refusal = reply

    def require_fqdn_helo(self) -> None:
        """Refuse every recipient of a sender that greeted with a name without a dot, as Postfix's
        reject_non_fqdn_helo_hostname does (at RCPT: smtpd_delay_reject)."""
        self._handler.fqdn_helo_required = True

    def stall(self, seconds: float) -> None:
        """Wait `seconds` before each reply to MAIL, RCPT and DATA: a slow relay."""
        self._handler.stall_s = seconds

    def stall_goodbye(self, seconds: float) -> None:
        """Wait `seconds` before answering QUIT: a relay slow to close a conversation it is done with."""
        self._handler.goodbye_stall_s = seconds
