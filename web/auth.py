"""Who is calling: the admin (ADMIN_TOKEN), one client (its own API key), or an alert source
(INGEST_TOKEN), which may only send alerts.

Client keys are stored only as sha256 hashes; the key itself is shown once, when the client is
created. Every /api/v1 view derives from `ApiView`, so no handler runs unauthenticated or past its
key's rate limit (web/request_limits.py), none reads an unbounded body, none runs with a query
parameter it does not read, and none ignores an If-Match it would not evaluate (web/preconditions.py).
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from aiohttp.web import RequestKey
from faust.web import Request, Response, View
from faust.web.exceptions import WebError

from alerting_app import db
from alerting_app.app import settings
from alerting_app.bearer import bearer, is_token
from web.errors import (NO_TOKEN, NOT_OUR_TOKEN, TWO_AUTHORIZATIONS, Forbidden, RateLimited, Unauthorized,
                        ValidationFailed)
from web.preconditions import PRECONDITIONS, read_preconditions
from web.request_limits import client_address, request_limit
from web.validation import NoQuery, parse_query, read_body, refuse_a_body

# Recognisable in logs and by secret scanners.
API_KEY_PREFIX = "alk_"


@dataclass(frozen=True)
class Caller:
    client_id: UUID | None  # None for the admin (and an alert source, which reaches no view but one)
    alert_source: bool = False  # INGEST_TOKEN: only views with `accepts_alert_sources` serve it
    # The hash of the client key it was authenticated with: replacing the key checks it is still the
    # client's (web/clients.py), since the key may have been replaced after it was looked up.
    key_hash: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.client_id is None and not self.alert_source

    def require_admin(self, what: str) -> None:
        """Refuse any caller but the admin; `what` names the request (`creating a client`)."""
        if not self.is_admin:
            raise Forbidden(f"{what} needs the admin token (ADMIN_TOKEN)")


INGEST_TOKEN_ONLY_SENDS_ALERTS = "the ingest token (INGEST_TOKEN) may only send alerts (POST /api/v1/alerts)"

ADMIN = Caller(client_id=None)
ALERT_SOURCE = Caller(client_id=None, alert_source=True)

# Where ApiView keeps the authenticated caller on the (aiohttp) request.
CALLER = RequestKey("caller", Caller)


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str:
    token = bearer(authorization)
    if token is None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            raise Unauthorized(NOT_OUR_TOKEN)  # not UTF-8: no token of ours, as any unknown one
        raise Unauthorized(NO_TOKEN)
    return token


async def authenticate(request: Request) -> Caller:
    authorizations = request.headers.getall("Authorization", [])
    if len(authorizations) > 1:
        # Which one a proxy in front of us checked is unknown: refused, rather than the first taken
        # silently (as a JSON key or a query parameter given twice is refused).
        raise Unauthorized(TWO_AUTHORIZATIONS)
    token = bearer_token(authorizations[0] if authorizations else None)
    # The operator's own tokens are not limited, not even from an address past its failed
    # authentications: neither asks Postgres, and the ingest token carries the monitored systems'
    # alerts, one per request from many of them in a storm, when a 429 hurts most. A wrong guess at
    # either is a token none of ours, below.
    if is_token(token, settings.admin_token):
        return ADMIN
    if is_token(token, settings.ingest_token):
        return ALERT_SOURCE
    key_hash = hash_api_key(token)
    address = client_address(request)
    # Each key spends a request of its own budget (web/request_limits.py), before it is looked up,
    # and an address that failed to authenticate too often is refused then, whatever its token:
    # requests past either cost Postgres nothing.
    await request_limit.admit(address, f"key:{key_hash}")
    # Looking up the hash, not the key, keeps the comparison independent of the key's bytes.
    pool = await db.api_pool()
    client_id = await pool.fetchval("SELECT client_id FROM clients WHERE api_key_hash = $1", key_hash)
    if client_id is None:
        await request_limit.count_failed_authentication(address)
        raise Unauthorized(NOT_OUR_TOKEN)
    return Caller(client_id=client_id, key_hash=key_hash)


class ApiView(View):
    """Base of every /api/v1 view: authenticates the caller before any handler runs."""

    # Whether an alert source (INGEST_TOKEN) may call this view at all. Its Caller has no
    # client_id, which the views' queries read as "every client": it is refused here, before any
    # handler, everywhere but where it is meant to go.
    accepts_alert_sources = False

    # The methods whose handler reads query parameters: a list's GET, through parse_query and a
    # model that refuses unknown ones. Every other handler reads none: a parameter given to it is
    # refused (422 naming it, as a list does) before it runs. Ignored, it let
    # `DELETE /api/v1/clients/{id}?dry_run=true` delete the client.
    query_methods: frozenset[str] = frozenset()
    # The methods whose handler reads a body (read_request_content). Every other handler reads none:
    # a body holding anything is refused (422 naming `body`) before it runs. Ignored, it read as
    # accepted: `DELETE /api/v1/silences/{id}` with `{"comment": "fixed"}` answered 204 and kept no
    # comment. An empty body, `{}` and `null` hold nothing, and pass (some clients send one always).
    body_methods: frozenset[str] = frozenset()
    # The methods whose handler evaluates If-Match and If-None-Match (web/preconditions.py): a single
    # rule's, endpoint's, silence's or client's. Elsewhere If-Match is refused (422 naming it) before
    # the handler runs: ignored, `DELETE` with a stale If-Match answered 204.
    conditional_methods: frozenset[str] = frozenset()

    async def dispatch(self, request: Any) -> Any:
        try:
            caller = await authenticate(request)
            if caller.alert_source and not self.accepts_alert_sources:
                raise Forbidden(INGEST_TOKEN_ONLY_SENDS_ALERTS)
        except (Unauthorized, Forbidden, RateLimited) as exc:
            return await self.on_request_error(request, exc)
        request[CALLER] = caller
        method = "GET" if request.method == "HEAD" else request.method  # Faust's head() is get()
        if request.query and method not in self.query_methods:
            try:
                parse_query(request, NoQuery)
            except ValidationFailed as exc:
                return await self.on_request_error(request, exc)
        if method not in self.body_methods:
            try:
                refuse_a_body(await read_body(request))
            except WebError as exc:  # 422, or 413 and 415 as for any body
                return await self.on_request_error(request, exc)
        try:
            request[PRECONDITIONS] = read_preconditions(request, method, method in self.conditional_methods)
        except ValidationFailed as exc:
            return await self.on_request_error(request, exc)
        return await super().dispatch(request)

    async def read_request_content(self, request: Request) -> bytes:
        # Faust's own reads `request.content` whole, with no limit: every view's body goes
        # through read_body, which answers 413 beyond MAX_BODY_BYTES.
        return await read_body(request)

    async def on_request_error(self, request: Request, exc: WebError) -> Response:
        headers = None
        if exc.code == Unauthorized.code:
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return self.error(exc.code, exc.detail, headers=headers, **exc.extra_context)

    @staticmethod
    def caller(request: Request) -> Caller:
        return request[CALLER]  # type: ignore[index]
