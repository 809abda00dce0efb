"""/api/v1/rules: a client's matching rules.

Every change bumps the rule's version and writes its RuleChanged event to the outbox in the same
transaction; the relay (agents/rule_outbox.py) carries it to `rule.changed`.
"""
from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import asyncpg
from faust.web import Request, Response
from pydantic import ValidationError

from agents.rule_outbox import record_rule_change, wake_up
from alerting_app import db
from alerting_app.app import app
from alerting_app.contracts import Rule, RuleChanged, RuleCriteria
from web.auth import ApiView, Caller
from web.errors import Conflict, Forbidden, NotFound, ValidationFailed, pydantic_message
from web.pagination import page_of
from web.preconditions import ANY, NONE, RESOURCE_METHODS, Preconditions, preconditions, representation
from web.quotas import RULES, lock_client_within_quota
from web.schemas import RuleCreate, RuleOut, RulePatch, RuleQuery, RuleReplace
from web.validation import parse_body, parse_query, path_id

COLUMNS = ("rule_id, client_id, severity, source, name, enabled, version, group_window_s, repeat_interval_s,"
           " fingerprint_keys, created_at, updated_at")
CRITERIA = ("severity", "source", "name")
# What a rule does besides matching: written as given, each validated on its own by the body model.
SETTINGS = ("enabled", "group_window_s", "repeat_interval_s", "fingerprint_keys")

# $N "scope" parameters are the caller's own client_id, NULL for the admin.
LIST = f"""
    SELECT {COLUMNS} FROM rules
    WHERE ($1::uuid IS NULL OR client_id = $1)
      AND ($2::uuid IS NULL OR client_id = $2)
      AND ($3::timestamptz IS NULL OR (created_at, rule_id) > ($3, $4::uuid))
    ORDER BY created_at, rule_id
    LIMIT $5
"""
GET = f"SELECT {COLUMNS} FROM rules WHERE rule_id = $1 AND ($2::uuid IS NULL OR client_id = $2)"
LOCK = GET + " FOR UPDATE"
# Dated when inserted (clock_timestamp), after the client's lock, not when the transaction began
# (now()): a create that waited for that lock would otherwise land behind rows committed while it
# waited, behind a page a reader has already read (docs/api.md, "Cursors and times").
INSERT = f"""
    INSERT INTO rules (rule_id, client_id, severity, source, name, enabled, group_window_s, repeat_interval_s,
                       fingerprint_keys, created_at, updated_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, at, at FROM clock_timestamp() AS at
    RETURNING {COLUMNS}
"""
UPDATE = f"""
    UPDATE rules SET severity = $2, source = $3, name = $4, enabled = $5, group_window_s = $6,
                     repeat_interval_s = $7, fingerprint_keys = $8, version = version + 1, updated_at = now()
    WHERE rule_id = $1
    RETURNING {COLUMNS}
"""
DELETE = """
    DELETE FROM rules WHERE rule_id = $1 AND ($2::uuid IS NULL OR client_id = $2)
    RETURNING rule_id, client_id, version
"""

DUPLICATE = "this client already has a rule with the same severity, source and name"
SAME_CRITERIA = "SELECT rule_id FROM rules WHERE client_id = $1 AND severity = $2 AND source = $3 AND name = $4"


async def duplicate(client_id: UUID, criteria: dict[str, str]) -> Conflict:
    """The 409 for criteria the client's rule already has, naming that rule (as an endpoint's 409
    names the endpoint of the same address): without its id, the tenant had to list its rules to
    find the one in the way. Read after the refused transaction; gone since, the 409 names none."""
    pool = await db.api_pool()
    existing = await pool.fetchval(SAME_CRITERIA, client_id, *criteria.values())
    return Conflict(f"{DUPLICATE}: {existing}" if existing is not None else DUPLICATE)


def rule_out(row: Any) -> RuleOut:
    return RuleOut.model_validate(dict(row))


def criteria_of(values: dict[str, Any]) -> dict[str, str]:
    """The criteria as stored, checked with the contract's own rule (not all three `*`)."""
    try:
        criteria = RuleCriteria(**{field: values[field] for field in CRITERIA})
    except ValidationError as exc:
        # Each field was checked on its own already; what is left concerns the three together.
        message = "; ".join(pydantic_message(error) for error in exc.errors(include_url=False))
        raise ValidationFailed([{"field": field, "message": message} for field in CRITERIA]) from None
    return criteria.model_dump(mode="json")


def upsert_event(row: Any) -> RuleChanged:
    rule = Rule(
        rule_id=str(row["rule_id"]), client_id=str(row["client_id"]), severity=row["severity"],
        source=row["source"], name=row["name"], enabled=row["enabled"], version=row["version"],
        group_window_s=row["group_window_s"], repeat_interval_s=row["repeat_interval_s"],
        fingerprint_keys=row["fingerprint_keys"],
    )
    return RuleChanged.upsert(rule)


def owner_for_new_rule(caller: Caller, requested: UUID | None) -> UUID:
    if caller.client_id is None:
        if requested is None:
            raise ValidationFailed.field("client_id", "required when creating a rule with the admin token")
        return requested
    if requested is not None and requested != caller.client_id:
        raise Forbidden("a client key creates rules for its own client only (leave client_id out)")
    return caller.client_id


async def create_rule(caller: Caller, body: RuleCreate) -> Any:
    client_id = owner_for_new_rule(caller, body.client_id)
    criteria = criteria_of(body.model_dump())
    pool = await db.api_pool()
    try:
        async with pool.acquire() as conn, conn.transaction():
            await lock_client_within_quota(conn, client_id, RULES)
            row = await conn.fetchrow(INSERT, uuid4(), client_id, *criteria.values(),
                                      *(getattr(body, setting) for setting in SETTINGS))
            await record_rule_change(conn, upsert_event(row))
    except asyncpg.UniqueViolationError:
        raise await duplicate(client_id, criteria) from None
    wake_up()
    return row


def stale_version(current: int, version: int, expected: Preconditions) -> Conflict:
    """The 409 for a body `version` the rule is not at. 409 and not 412 also when it disagrees with
    an If-Match that the rule meets (the ETag of version `current`): 412 says a precondition
    header failed (RFC 9110 13.1), and sends the client to read a new ETag, but the one it sent is
    current; it is the body's version that is wrong, and a wrong version is a 409 (docs/api.md,
    "Concurrent changes"). An If-Match the rule does not meet is a 412 before this, whatever the version."""
    if expected.if_match not in (None, ANY):  # `*` names no version to disagree with
        return Conflict(f"If-Match names the rule as it stands, at version {current}, but the body's version is "
                        f"{version}: they disagree; send the version read with that ETag, or leave version out; "
                        f"nothing was changed")
    return Conflict(f"the rule is at version {current}, not {version}; read it again")


async def change_rule(rule_id: UUID, caller: Caller, version: int | None, changes: dict[str, Any],
                      expected: Preconditions = NONE) -> Any:
    """Apply `changes` if the rule is still at `version` and meets `expected` (optimistic concurrency).

    Either one is enough: `version` None stands for "as If-Match names it". Neither is refused,
    before anything is read: a change must say which state of the rule it was made to, or two
    writers overwrite each other unseen. If-Match `*` names none (it matches any version)."""
    if version is None and expected.if_match in (None, ANY):
        raise ValidationFailed.field("version", "required unless If-Match names the ETag of the rule as last "
                                                "read (If-Match: * names none): give the version last read, or "
                                                "that ETag; nothing was changed")
    pool = await db.api_pool()
    try:
        async with pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(LOCK, rule_id, caller.client_id)
            if current is None:
                raise NotFound("rule")
            expected.check(rule_out(current), "rule")
            if version is not None and current["version"] != version:
                raise stale_version(current["version"], version, expected)
            merged = {**dict(current), **changes}
            criteria = criteria_of(merged)
            row = await conn.fetchrow(UPDATE, rule_id, *criteria.values(), *(merged[setting] for setting in SETTINGS))
            await record_rule_change(conn, upsert_event(row))
    except asyncpg.UniqueViolationError:
        raise await duplicate(merged["client_id"], criteria) from None
    wake_up()
    return row


async def delete_rule(rule_id: UUID, caller: Caller, expected: Preconditions = NONE) -> bool:
    pool = await db.api_pool()
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(LOCK, rule_id, caller.client_id)
        if current is None:
            return False
        expected.check(rule_out(current), "rule")
        deleted = await conn.fetchrow(DELETE, rule_id, caller.client_id)
        # The deletion marker takes the next version, so it supersedes every upsert before it.
        await record_rule_change(conn, RuleChanged(
            rule_id=str(deleted["rule_id"]), client_id=str(deleted["client_id"]),
            version=deleted["version"] + 1, action="delete",
        ))
    wake_up()
    return True


@app.page("/api/v1/rules")
class RulesView(ApiView):
    body_methods = frozenset({"POST"})
    query_methods = frozenset({"GET"})  # the list's filters and paging

    async def post(self, request: Request) -> Response:
        body = parse_body(await self.read_request_content(request), RuleCreate)
        row = await create_rule(self.caller(request), body)
        return representation(self, request, rule_out(row), status=201, what="rule")

    async def get(self, request: Request) -> Response:
        query = parse_query(request, RuleQuery)
        pool = await db.api_pool()
        rows = await pool.fetch(LIST, self.caller(request).client_id, query.client_id, *query.after,
                                query.limit + 1)
        return self.json(page_of(rows, query, rule_out, "rule_id").model_dump(mode="json"))


@app.page("/api/v1/rules/{rule_id}")
class RuleView(ApiView):
    body_methods = frozenset({"PUT", "PATCH"})
    conditional_methods = RESOURCE_METHODS

    async def get(self, request: Request, rule_id: str) -> Response:
        pool = await db.api_pool()
        row = await pool.fetchrow(GET, path_id(rule_id, "rule"), self.caller(request).client_id)
        if row is None:
            raise NotFound("rule")
        return representation(self, request, rule_out(row), what="rule")

    async def put(self, request: Request, rule_id: str) -> Response:
        id_ = path_id(rule_id, "rule")
        body = parse_body(await self.read_request_content(request), RuleReplace)
        row = await change_rule(id_, self.caller(request), body.version, body.model_dump(exclude={"version"}),
                                preconditions(request))
        return representation(self, request, rule_out(row), what="rule")

    async def patch(self, request: Request, rule_id: str) -> Response:
        id_ = path_id(rule_id, "rule")
        body = parse_body(await self.read_request_content(request), RulePatch)
        # null counts as "not given": every rule field is required in the stored rule.
        changes = body.model_dump(exclude={"version"}, exclude_none=True)
        row = await change_rule(id_, self.caller(request), body.version, changes, preconditions(request))
        return representation(self, request, rule_out(row), what="rule")

    async def delete(self, request: Request, rule_id: str) -> Response:
        if not await delete_rule(path_id(rule_id, "rule"), self.caller(request), preconditions(request)):
            raise NotFound("rule")
        return self.bytes(b"", status=204)
