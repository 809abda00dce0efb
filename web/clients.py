"""/api/v1/clients: tenants. Only the admin creates them; a client key sees only its own record."""
from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from faust.web import Request, Response

from agents.rule_outbox import record_rule_changes, wake_up
from alerting_app import db
from alerting_app.app import app
from alerting_app.contracts import RuleChanged
from web.auth import ApiView, Caller, hash_api_key, new_api_key
from web.errors import NOT_OUR_TOKEN, NotFound, Unauthorized
from web.pagination import PageQuery, page_of
from web.preconditions import NONE, RESOURCE_METHODS, Preconditions, preconditions, representation
from web.schemas import ClientCreate, ClientCreated, ClientOut, ClientPatch
from web.silences import record_silence_deletes
from web.validation import parse_body, parse_query, path_id

COLUMNS = "client_id, name, created_at, updated_at"

# $1 is the caller's own client_id, NULL for the admin: every query is scoped by it. A client being
# deleted (`deleting_since` set: delete_client) is gone to every one of them.
LIST = f"""
    SELECT {COLUMNS} FROM clients
    WHERE deleting_since IS NULL AND ($1::uuid IS NULL OR client_id = $1)
      AND ($2::timestamptz IS NULL OR (created_at, client_id) > ($2, $3::uuid))
    ORDER BY created_at, client_id
    LIMIT $4
"""
GET = f"""
    SELECT {COLUMNS} FROM clients
    WHERE client_id = $1 AND ($2::uuid IS NULL OR client_id = $2) AND deleting_since IS NULL
"""
# Dated when inserted (clock_timestamp), as rules are (web/rules.py says why).
INSERT = f"""
    INSERT INTO clients (client_id, name, api_key_hash, created_at, updated_at)
    SELECT $1, $2, $3, at, at FROM clock_timestamp() AS at
    RETURNING {COLUMNS}
"""
RENAME = f"UPDATE clients SET name = $2, updated_at = now() WHERE client_id = $1 RETURNING {COLUMNS}"
# A new key replaces the old one at once: authentication looks the hash up on every request.
# Asked with a client key ($4, its hash; NULL for the admin), only while that key is still the
# client's: a request authenticated a moment before another replacement committed would otherwise
# replace the new key in turn, and a leaked key's holder, asking at the moment its owner replaces
# it, would get a working key while the owner's stopped working.
NEW_KEY = f"""
    UPDATE clients SET api_key_hash = $3, updated_at = now()
    WHERE client_id = $1 AND ($2::uuid IS NULL OR client_id = $2) AND ($4::text IS NULL OR api_key_hash = $4)
      AND deleting_since IS NULL
    RETURNING {COLUMNS}
"""
LOCK_CLIENT = GET + " FOR UPDATE"
LOCK_RULES = "SELECT rule_id, version FROM rules WHERE client_id = $1 ORDER BY rule_id FOR UPDATE"
DELETE_RULES = "DELETE FROM rules WHERE client_id = $1"  # their endpoints with them (ON DELETE CASCADE)
DELETE_SILENCES = "DELETE FROM silences WHERE client_id = $1"
# No key hashes to NULL: the key answers 401 from the commit on (web/auth.py looks it up every request).
MARK_BEING_DELETED = "UPDATE clients SET deleting_since = now(), api_key_hash = NULL WHERE client_id = $1"


def client_out(row: Any) -> ClientOut:
    return ClientOut.model_validate(dict(row))


async def rename_client(client_id: UUID, caller: Caller, name: str, expected: Preconditions = NONE) -> Any:
    pool = await db.api_pool()
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(LOCK_CLIENT, client_id, caller.client_id)
        if current is None:
            raise NotFound("client")
        expected.check(client_out(current), "client")
        return await conn.fetchrow(RENAME, client_id, name)


async def delete_client(client_id: UUID, caller: Caller, expected: Preconditions = NONE) -> bool:
    """Delete the client's rules and silences (each announced) and endpoints, and its key; mark it
    being deleted, so that it is gone to the API and to the pipeline from the commit on.

    Its notification history is deleted afterwards, in batches, and then its row, by the aggregate
    workers (agents/retention.py `finish_client_deletions`): in one transaction Postgres cascades
    to each notification's deliveries one notification at a time, and a client with a few hundred
    thousand outlasted API_DATABASE_TIMEOUT_S (and millions, any HTTP timeout in front of the API).
    This transaction touches only what the workers match with (rules, silences), the endpoints and
    the client's own row.
    """
    pool = await db.api_pool()
    async with pool.acquire() as conn, conn.transaction():
        # Locking the client first makes a concurrent rule insert for it wait (web/quotas.py), then
        # find no client: no rule can appear after its delete event was written.
        current = await conn.fetchrow(LOCK_CLIENT, client_id, caller.client_id)
        if current is None:
            return False
        expected.check(client_out(current), "client")
        await record_rule_changes(conn, [
            RuleChanged(rule_id=str(rule["rule_id"]), client_id=str(client_id), version=rule["version"] + 1,
                        action="delete")
            for rule in await conn.fetch(LOCK_RULES, client_id)
        ])
        await record_silence_deletes(conn, client_id)
        await conn.execute(DELETE_RULES, client_id)
        await conn.execute(DELETE_SILENCES, client_id)
        await conn.execute(MARK_BEING_DELETED, client_id)
    wake_up()
    return True


@app.page("/api/v1/clients")
class ClientsView(ApiView):
    body_methods = frozenset({"POST"})
    query_methods = frozenset({"GET"})  # the list's filters and paging

    async def post(self, request: Request) -> Response:
        self.caller(request).require_admin("creating a client")
        body = parse_body(await self.read_request_content(request), ClientCreate)
        api_key = new_api_key()
        pool = await db.api_pool()
        row = await pool.fetchrow(INSERT, uuid4(), body.name, hash_api_key(api_key))
        created = ClientCreated(**client_out(row).model_dump(), api_key=api_key)
        return representation(self, request, created, tagged=client_out(row), status=201, what="client")

    async def get(self, request: Request) -> Response:
        query = parse_query(request, PageQuery)
        pool = await db.api_pool()
        rows = await pool.fetch(LIST, self.caller(request).client_id, *query.after, query.limit + 1)
        return self.json(page_of(rows, query, client_out, "client_id").model_dump(mode="json"))


@app.page("/api/v1/clients/{client_id}")
class ClientView(ApiView):
    body_methods = frozenset({"PATCH"})
    conditional_methods = RESOURCE_METHODS

    async def get(self, request: Request, client_id: str) -> Response:
        pool = await db.api_pool()
        row = await pool.fetchrow(GET, path_id(client_id, "client"), self.caller(request).client_id)
        if row is None:
            raise NotFound("client")
        return representation(self, request, client_out(row), what="client")

    async def patch(self, request: Request, client_id: str) -> Response:
        id_ = path_id(client_id, "client")
        body = parse_body(await self.read_request_content(request), ClientPatch)
        row = await rename_client(id_, self.caller(request), body.name, preconditions(request))
        return representation(self, request, client_out(row), what="client")

    async def delete(self, request: Request, client_id: str) -> Response:
        if not await delete_client(path_id(client_id, "client"), self.caller(request), preconditions(request)):
            raise NotFound("client")
        return self.bytes(b"", status=204)


@app.page("/api/v1/clients/{client_id}/key")
class ClientKeyView(ApiView):
    """A new API key for the client (the admin, or the client's own key), shown once; the old key
    answers 401 from now on. For a leaked key: before this, deleting the client was the only way."""

    async def post(self, request: Request, client_id: str) -> Response:
        id_, caller = path_id(client_id, "client"), self.caller(request)
        api_key = new_api_key()
        pool = await db.api_pool()
        row = await pool.fetchrow(NEW_KEY, id_, caller.client_id, hash_api_key(api_key), caller.key_hash)
        if row is None:
            if caller.client_id is not None and caller.client_id == id_:
                raise Unauthorized(NOT_OUR_TOKEN)  # its key was replaced (or its client deleted) since it was looked up
            raise NotFound("client")
        created = ClientCreated(**client_out(row).model_dump(), api_key=api_key)
        return self.json(created.model_dump(mode="json"))
