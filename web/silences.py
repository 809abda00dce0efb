"""/api/v1/silences: a tenant mutes its matching alerts for a while (and /api/v1/worker/silences).

Silences travel like rules: each change bumps the version and writes its SilenceChanged event to
the outbox in the same transaction; the relay (agents/rule_outbox.py) carries it to
`silence.changed`, which every worker replicates (tables/silences.py). DELETE expires a silence
rather than erasing it (ends_at becomes now), as Alertmanager does: what was muted, by whom and
why stays readable.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal
from uuid import UUID, uuid4

import asyncpg
from faust.web import Request, Response
from pydantic import BaseModel, Field, ValidationError

from agents.rule_outbox import record_silence_change, record_silence_changes, silence_deleted, wake_up
from alerting_app import db
from alerting_app.app import app
from alerting_app.contracts import (NO_NUL, WILDCARD, Comment, ContextKey, ContextValue, SilenceChanged,
                                    SilenceMatchers, Text)
from alerting_app.silencing import SILENCE_COLUMNS, silence_of_row
from tables.silences import silence_index
from web.auth import ApiView, Caller
from web.errors import Forbidden, NotFound, ValidationFailed, pydantic_message
from web.pagination import PageQuery, page_of
from web.preconditions import NONE, RESOURCE_METHODS, Preconditions, preconditions, representation
from web.quotas import lock_client_within_quota, silences_quota
from web.schemas import RequestBody, SeverityCriterion
from web.validation import StorableDatetime, parse_body, parse_query, path_id
from web.worker_state import rules_digest

MATCHERS = ("severity", "source", "name", "context_matchers")
State = Literal["active", "pending", "expired"]
Matcher = Field(default=WILDCARD, min_length=1, max_length=200, pattern=NO_NUL)


class SilenceCreate(RequestBody):
    client_id: UUID | None = Field(default=None, description="required with the admin token")
    # Each matcher `*` unless given: a silence names what it mutes, e.g. just a source.
    severity: SeverityCriterion = WILDCARD
    source: str = Matcher
    name: str = Matcher
    context_matchers: dict[ContextKey, ContextValue] = Field(
        default_factory=dict, max_length=20, description="context key -> exact value, or '*' for the key's presence")
    starts_at: StorableDatetime | None = Field(default=None, description="default: now; after 1970-01-01")
    ends_at: StorableDatetime
    comment: str = Comment
    created_by: str = Text


class SilenceOut(BaseModel):
    silence_id: UUID
    client_id: UUID
    severity: str
    source: str
    name: str
    context_matchers: dict[str, str]
    starts_at: datetime
    ends_at: datetime
    comment: str
    created_by: str
    state: State
    version: int
    created_at: datetime
    updated_at: datetime


class SilenceQuery(PageQuery):
    client_id: UUID | None = None
    state: State | None = None


COLUMNS = f"""{SILENCE_COLUMNS}, created_at, updated_at,
    CASE WHEN ends_at <= now() THEN 'expired' WHEN starts_at > now() THEN 'pending' ELSE 'active' END AS state"""

# $1 is the caller's own client_id, NULL for the admin.
LIST = f"""
    SELECT {COLUMNS} FROM silences
    WHERE ($1::uuid IS NULL OR client_id = $1)
      AND ($2::uuid IS NULL OR client_id = $2)
      AND ($3::text IS NULL
           OR ($3 = 'active' AND starts_at <= now() AND ends_at > now())
           OR ($3 = 'pending' AND starts_at > now())
           OR ($3 = 'expired' AND ends_at <= now()))
      AND ($4::timestamptz IS NULL OR (created_at, silence_id) > ($4, $5::uuid))
    ORDER BY created_at, silence_id
    LIMIT $6
"""
GET = f"SELECT {COLUMNS} FROM silences WHERE silence_id = $1 AND ($2::uuid IS NULL OR client_id = $2)"
LOCK = GET + " FOR UPDATE"
# Dated when inserted (clock_timestamp), after the client's lock, not when the transaction began
# (now()): a create that waited for that lock would otherwise land behind rows committed while it
# waited, behind a page a reader has already read (docs/api.md, "Cursors and times").
INSERT = f"""
    INSERT INTO silences (silence_id, client_id, severity, source, name, context_matchers, starts_at, ends_at,
                          comment, created_by, created_at, updated_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, at, at FROM clock_timestamp() AS at
    RETURNING {COLUMNS}
"""
# A pending silence expired before it started keeps an empty window (starts_at = ends_at).
# Ended is judged by the clock (clock_timestamp), not by now(), when this transaction began: an
# expiry that waited on a concurrent one's lock then finds it ended, at that one's now(), which may
# be after this one's, and leaves it (no second version, no second event, no earlier end).
EXPIRE = f"""
    UPDATE silences SET starts_at = least(starts_at, now()), ends_at = now(),
                        version = version + 1, updated_at = now()
    WHERE silence_id = $1 AND ($2::uuid IS NULL OR client_id = $2) AND ends_at > clock_timestamp()
    RETURNING {COLUMNS}
"""

LOCK_CLIENT_SILENCES = "SELECT silence_id, version FROM silences WHERE client_id = $1 ORDER BY silence_id FOR UPDATE"


def silence_out(row: Any) -> SilenceOut:
    return SilenceOut.model_validate(dict(row))


def upsert_event(row: Any) -> SilenceChanged:
    return SilenceChanged.upsert(silence_of_row(row))


def matchers_of(body: SilenceCreate) -> dict[str, Any]:
    """The matchers as stored, checked with the contract's own rule (they must narrow something)."""
    try:
        matchers = SilenceMatchers(**{field: getattr(body, field) for field in MATCHERS})
    except ValidationError as exc:
        message = "; ".join(pydantic_message(error) for error in exc.errors(include_url=False))
        raise ValidationFailed([{"field": field, "message": message} for field in MATCHERS]) from None
    return matchers.model_dump(mode="json")


# The silence.changed contract carries times as positive unix seconds.
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def window_of(body: SilenceCreate, now: datetime) -> tuple[datetime, datetime]:
    starts_at = body.starts_at or now
    if starts_at <= EPOCH:
        raise ValidationFailed.field("starts_at", "must be after 1970-01-01T00:00:00Z")
    # The past first: without starts_at, starts_at is now, and an end in the past was refused
    # as "must be after starts_at", naming a field the client never sent.
    if body.ends_at <= now:
        raise ValidationFailed.field("ends_at", "must be in the future")
    if body.ends_at <= starts_at:
        raise ValidationFailed.field("ends_at", "must be after starts_at")
    return starts_at, body.ends_at


def owner_for_new_silence(caller: Caller, requested: UUID | None) -> UUID:
    if caller.client_id is None:
        if requested is None:
            raise ValidationFailed.field("client_id", "required when creating a silence with the admin token")
        return requested
    if requested is not None and requested != caller.client_id:
        raise Forbidden("a client key creates silences for its own client only (leave client_id out)")
    return caller.client_id


async def create_silence(caller: Caller, body: SilenceCreate) -> Any:
    client_id = owner_for_new_silence(caller, body.client_id)
    matchers = matchers_of(body)
    starts_at, ends_at = window_of(body, datetime.now(timezone.utc))
    pool = await db.api_pool()
    async with pool.acquire() as conn, conn.transaction():
        await lock_client_within_quota(conn, client_id, silences_quota())
        row = await conn.fetchrow(INSERT, uuid4(), client_id, *matchers.values(), starts_at, ends_at,
                                  body.comment, body.created_by)
        await record_silence_change(conn, upsert_event(row))
    wake_up()
    return row


async def expire_silence(silence_id: UUID, caller: Caller, expected: Preconditions = NONE) -> bool:
    """End the silence now; False if the caller has no such silence. Expiring twice changes nothing."""
    pool = await db.api_pool()
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(LOCK, silence_id, caller.client_id)
        if current is None:
            return False
        expected.check(silence_out(current), "silence")
        row = await conn.fetchrow(EXPIRE, silence_id, caller.client_id)
        if row is None:
            return True  # ended already
        await record_silence_change(conn, upsert_event(row))
    wake_up()
    return True


async def record_silence_deletes(conn: asyncpg.Connection, client_id: UUID) -> None:
    """Announce the deletion of every silence of a client being deleted, inside that transaction."""
    await record_silence_changes(conn, [silence_deleted(str(silence["silence_id"]), str(client_id), silence["version"])
                                        for silence in await conn.fetch(LOCK_CLIENT_SILENCES, client_id)])


@app.page("/api/v1/silences")
class SilencesView(ApiView):
    body_methods = frozenset({"POST"})
    query_methods = frozenset({"GET"})  # the list's filters and paging

    async def post(self, request: Request) -> Response:
        body = parse_body(await self.read_request_content(request), SilenceCreate)
        row = await create_silence(self.caller(request), body)
        return representation(self, request, silence_out(row), status=201, what="silence")

    async def get(self, request: Request) -> Response:
        query = parse_query(request, SilenceQuery)
        pool = await db.api_pool()
        rows = await pool.fetch(LIST, self.caller(request).client_id, query.client_id, query.state, *query.after,
                                query.limit + 1)
        return self.json(page_of(rows, query, silence_out, "silence_id").model_dump(mode="json"))


@app.page("/api/v1/silences/{silence_id}")
class SilenceView(ApiView):
    conditional_methods = RESOURCE_METHODS

    async def get(self, request: Request, silence_id: str) -> Response:
        pool = await db.api_pool()
        row = await pool.fetchrow(GET, path_id(silence_id, "silence"), self.caller(request).client_id)
        if row is None:
            raise NotFound("silence")
        return representation(self, request, silence_out(row), what="silence")

    async def delete(self, request: Request, silence_id: str) -> Response:
        if not await expire_silence(path_id(silence_id, "silence"), self.caller(request), preconditions(request)):
            raise NotFound("silence")
        return self.bytes(b"", status=204)


@app.page("/api/v1/worker/silences")
class WorkerSilencesView(ApiView):
    """What this worker holds (admin only): the multi-worker tests ask each worker directly."""

    async def get(self, request: Request) -> Response:
        self.caller(request).require_admin("reading a worker's silences")
        versions = silence_index.versions()
        return self.json({"silences": len(versions), "digest": rules_digest(versions), "versions": versions,
                          "deleted_versions": silence_index.deleted_versions()})
