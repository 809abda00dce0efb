"""A webhook receiver to watch notifications arrive while trying the platform locally
(`alerting-app receive`): the endpoint that `up`'s "Try it" lines create posts to it.

Each POST is answered 200 and printed as one JSON line: when it came, its path, its
`Idempotency-Key`, whether its signature holds (given the endpoint's secret; the timestamped one,
as a receiver should check it: alerting_app/channels/webhook.py; a POST without one, a Slack
message, is shown as not signed) and the notification. Several secrets may be given, one per
endpoint pointed here (or an endpoint's old and new one while it is replaced): a POST is valid when
one of them verifies it, and shown with that secret's position among them, never the secret. Without a
receiver there, those notifications were retried for two minutes and then FAILED, and the first
delivery a new user saw was a failure. Not for production: it keeps nothing and checks nothing it
is not asked to.
"""
from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from alerting_app.channels.webhook import TIMESTAMP_HEADER, TIMESTAMPED_SIGNATURE_HEADER, timestamped_signature


def describe(path: str, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...], now: float) -> dict:
    """What one POST brought, as `receive` prints it, its signature checked against each of `secrets`."""
    if not secrets:
        verdict = "not checked (give --secret, the endpoint's secret)"
    elif TIMESTAMPED_SIGNATURE_HEADER not in headers:
        # A Slack endpoint pointed here posts unsigned messages: "INVALID" read as a wrong secret.
        verdict = "none (not signed: a Slack message, or not sent by a webhook endpoint)"
    else:
        verdict = signature_verdict(headers, body, secrets)
    try:
        notification: object = json.loads(body)
    except ValueError:
        notification = body.decode("utf-8", "replace")
    return {"received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "path": path,
            "idempotency_key": headers.get("Idempotency-Key"), "signature": verdict, "notification": notification}


def signature_verdict(headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...]) -> str:
    """Whether one of `secrets` verifies the timestamped signature: `valid`, or with several secrets
    `valid (--secret #2)`, the first that does by its position (the endpoints told apart without a
    secret in the output); `INVALID` when none does. With one --secret only, every other endpoint
    pointed at one receiver was shown INVALID."""
    timestamp, signature = headers.get(TIMESTAMP_HEADER, ""), headers.get(TIMESTAMPED_SIGNATURE_HEADER, "")
    for position, secret in enumerate(secrets, start=1):
        if hmac.compare_digest(timestamped_signature(secret, timestamp, body), signature):
            return "valid" if len(secrets) == 1 else f"valid (--secret #{position})"
    return "INVALID" if len(secrets) == 1 else f"INVALID (none of the {len(secrets)} secrets given)"


def receiver_app(secrets: tuple[str, ...], show: Callable[[dict], None]) -> web.Application:
    """An aiohttp application answering every POST 200, after `show`ing `describe` of it (`secrets`
    empty: signatures not checked)."""

    async def received(request: web.Request) -> web.Response:
        show(describe(request.path, request.headers, await request.read(), secrets, time.time()))
        return web.json_response({"received": True})

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="alerting-app receive: POST webhooks here\n")

    app = web.Application()
    app.router.add_post("/{path:.*}", received)
    app.router.add_get("/{path:.*}", hello)
    return app
