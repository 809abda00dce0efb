"""/api/v1/endpoints: where a rule's notifications go (webhook, slack or email).

An endpoint belongs to a rule, and to that rule's client.
"""
from __future__ import annotations

import re
from typing import Any
from uuid import UUID, uuid4

from faust.web import Request, Response
from pydantic import HttpUrl, TypeAdapter, ValidationError

from alerting_app import db
from alerting_app.app import app
from web.auth import ApiView, Caller
from web.errors import NotFound, ValidationFailed
from web.pagination import page_of
from web.schemas import EndpointCreate, EndpointOut, EndpointPatch, EndpointQuery
from web.validation import parse_body, parse_query, path_id

# Deliberately strict: local part of common characters, a dotted domain of DNS labels.
EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@(?=.{4,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_http_url = TypeAdapter(HttpUrl)

COLUMNS = "endpoint_id, rule_id, client_id, type, value, enabled, created_at, updated_at"

LIST = f"""
    SELECT {COLUMNS} FROM endpoints
    WHERE ($1::uuid IS NULL OR client_id = $1)
      AND ($2::uuid IS NULL OR rule_id = $2)
      AND ($3::timestamptz IS NULL OR (created_at, endpoint_id) > ($3, $4::uuid))
    ORDER BY created_at, endpoint_id
    LIMIT $5
"""
GET = f"SELECT {COLUMNS} FROM endpoints WHERE endpoint_id = $1 AND ($2::uuid IS NULL OR client_id = $2)"
# Taking the client from the rule inside the insert keeps the two consistent even if the rule
# is deleted concurrently (then nothing is inserted).
INSERT = f"""
    INSERT INTO endpoints (endpoint_id, rule_id, client_id, type, value, enabled)
    SELECT $1::uuid, rule_id, client_id, $3::text, $4::text, $5::boolean FROM rules
    WHERE rule_id = $2 AND ($6::uuid IS NULL OR client_id = $6)
    RETURNING {COLUMNS}
"""
UPDATE = f"""
    UPDATE endpoints SET type = $2, value = $3, enabled = $4, updated_at = now()
    WHERE endpoint_id = $1
    RETURNING {COLUMNS}
"""
DELETE = "DELETE FROM endpoints WHERE endpoint_id = $1 AND ($2::uuid IS NULL OR client_id = $2) RETURNING 1"


def endpoint_out(row: Any) -> EndpointOut:
    return EndpointOut.model_validate(dict(row))


def check_value(type_: str, value: str) -> None:
    """Webhook and Slack endpoints are http(s) URLs; email endpoints are addresses."""
    if type_ == "email":
        if not EMAIL.match(value):
            raise ValidationFailed.field("value", "must be an email address (name@example.com)")
        return
    try:
        _http_url.validate_python(value)
    except ValidationError as exc:
        reason = "; ".join(error["msg"] for error in exc.errors(include_url=False))
        raise ValidationFailed.field("value", f"must be an http(s) URL for a {type_} endpoint: {reason}") from None


async def create_endpoint(caller: Caller, body: EndpointCreate) -> Any:
    check_value(body.type, body.value)
    pool = await db.pool()
    row = await pool.fetchrow(INSERT, uuid4(), body.rule_id, body.type, body.value, body.enabled, caller.client_id)
    if row is None:
        # Unknown and other clients' rules answer alike, so a key learns nothing about other clients.
        raise ValidationFailed.field("rule_id", "no such rule")
    return row


async def change_endpoint(endpoint_id: UUID, caller: Caller, changes: dict[str, Any]) -> Any:
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(GET + " FOR UPDATE", endpoint_id, caller.client_id)
        if current is None:
            raise NotFound()
        merged = {**dict(current), **changes}
        check_value(merged["type"], merged["value"])
        return await conn.fetchrow(UPDATE, endpoint_id, merged["type"], merged["value"], merged["enabled"])


@app.page("/api/v1/endpoints")
class EndpointsView(ApiView):
    async def post(self, request: Request) -> Response:
        body = parse_body(await self.read_request_content(request), EndpointCreate)
        row = await create_endpoint(self.caller(request), body)
        return self.json(endpoint_out(row).model_dump(mode="json"), status=201)

    async def get(self, request: Request) -> Response:
        query = parse_query(request, EndpointQuery)
        pool = await db.pool()
        rows = await pool.fetch(LIST, self.caller(request).client_id, query.rule_id, *query.after,
                                query.limit + 1)
        return self.json(page_of(rows, query, endpoint_out, "endpoint_id").model_dump(mode="json"))


@app.page("/api/v1/endpoints/{endpoint_id}")
class EndpointView(ApiView):
    async def get(self, request: Request, endpoint_id: str) -> Response:
        pool = await db.pool()
        row = await pool.fetchrow(GET, path_id(endpoint_id), self.caller(request).client_id)
        if row is None:
            raise NotFound()
        return self.json(endpoint_out(row).model_dump(mode="json"))

    async def patch(self, request: Request, endpoint_id: str) -> Response:
        id_ = path_id(endpoint_id)
        body = parse_body(await self.read_request_content(request), EndpointPatch)
        row = await change_endpoint(id_, self.caller(request), body.model_dump(exclude_none=True))
        return self.json(endpoint_out(row).model_dump(mode="json"))

    async def delete(self, request: Request, endpoint_id: str) -> Response:
        pool = await db.pool()
        if await pool.fetchval(DELETE, path_id(endpoint_id), self.caller(request).client_id) is None:
            raise NotFound()
        return self.bytes(b"", status=204)
