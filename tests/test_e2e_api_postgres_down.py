"""The API while Postgres is away under a running worker: 503 with a JSON body saying so, then the
same worker answers again once Postgres is back; also when Postgres is frozen, its connections
open but nothing answering.

Before, every API call answered aiohttp's plain-text "500 Internal Server Error ... Server got
itself in trouble": neither the JSON every other error is, nor a status a client retries on.
The worker's Postgres is a private embedded one (the session's is never stopped), as in
tests/test_e2e_operations_probes.py.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import signal
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from uuid import UUID

import asyncpg
import psutil
import pytest

from alerting_app.embedded import EmbeddedServices
from operations_support import WAIT_TIMEOUT_S, wait_until
from postgres_waits import until_waiting_on_a_lock

pytestmark = pytest.mark.e2e


def call(method: str, url: str, token: str, body: object = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_api_answers_503_database_unavailable_while_postgres_is_away(services, private_postgres, start_worker):
    postgres_port = urllib.parse.urlsplit(private_postgres.database_url).port
    worker = start_worker(DATABASE_URL=private_postgres.database_url, APP_ID=f"api-pg-{secrets.token_hex(4)}")
    status, _, body = call("POST", worker.url + "/api/v1/clients", services.admin_token, {"name": "Acme"})
    assert status == 201, body
    client_key = json.loads(body)["api_key"]

    private_postgres.embedded.stop_postgres()
    # The admin's token needs no Postgres to authenticate, a client's key does: both reach Postgres.
    for method, path, token, request_body in [
            ("GET", "/api/v1/rules", services.admin_token, None),
            ("GET", "/api/v1/rules", client_key, None),
            ("POST", "/api/v1/rules", client_key, {"severity": "HIGH", "source": "payments", "name": "*"})]:
        status, headers, body = call(method, worker.url + path, token, request_body)
        assert status == 503, (method, path, status, body)
        answer = json.loads(body)
        assert answer["error"] == "database_unavailable", answer
        # Which kind of trouble, without asyncpg's text, which names the database's address.
        assert answer["message"].startswith("the database is unavailable ("), answer
        assert f":{postgres_port}" not in answer["message"] and "127.0.0.1" not in answer["message"], answer
        assert int(headers["Retry-After"]) > 0

    private_postgres.embedded.start_postgres_again()
    wait_until(lambda: call("GET", worker.url + "/api/v1/rules", client_key)[0] == 200, "answering again")
    assert worker.child.running()  # the same process throughout: no restart


@contextmanager
def frozen(postgres: EmbeddedServices) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP), the postmaster first so that it forks no new one
    meanwhile, and all of them continued (SIGCONT) on leaving, whatever happened.

    Stopped processes keep their sockets open: a connection made, or being made, is neither refused
    nor reset, as with a frozen server or a network dropping packets.
    """
    postmaster = psutil.Process(next(child for child in postgres.children if child.name == "PostgreSQL").pid)
    stopped = [postmaster]
    try:
        postmaster.send_signal(signal.SIGSTOP)
        stopped += postmaster.children(recursive=True)
        for process in stopped[1:]:
            process.send_signal(signal.SIGSTOP)
        yield
    finally:
        for process in stopped:
            process.send_signal(signal.SIGCONT)


def assert_database_unavailable(reply: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = reply
    assert status == 503, (status, body)
    assert json.loads(body)["error"] == "database_unavailable", body
    assert int(headers["Retry-After"]) > 0


async def lock_row_of(database_url: str, client_id: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(database_url)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM clients WHERE client_id = $1 FOR UPDATE", UUID(client_id))
    return conn


def test_the_api_answers_503_database_unavailable_while_postgres_does_not_answer(services, private_postgres,
                                                                                   start_worker):
    """Before, every request waited until TCP gave up, many minutes later; the `call`'s 60 s bound is
    what fails the test then. Once Postgres answers again, so does the API: the connections that
    were stuck are not handed out again."""
    postgres, database_url = private_postgres.embedded, private_postgres.database_url
    holder_loop = asyncio.new_event_loop()  # for the test's own connection, which outlives one asyncio.run
    holder = None
    try:
        worker = start_worker(DATABASE_URL=database_url, APP_ID=f"api-pg-{secrets.token_hex(4)}",
                              API_DATABASE_TIMEOUT_S="2")
        status, _, body = call("POST", worker.url + "/api/v1/clients", services.admin_token, {"name": "Acme"})
        assert status == 201, body
        client = json.loads(body)
        rules = worker.url + "/api/v1/rules"
        new_rule = {"severity": "HIGH", "source": "payments", "name": "*"}
        assert call("GET", rules, client["api_key"])[0] == 200  # a connection in the API's pool

        with frozen(postgres):
            # The pool's idle connection (the client's key is looked up: the admin's is not), then
            # connections the pool must make, for a read and for a write.
            assert_database_unavailable(call("GET", rules, client["api_key"]))
            assert_database_unavailable(call("GET", rules, services.admin_token))
            assert_database_unavailable(call("POST", rules, services.admin_token,
                                             {**new_rule, "client_id": client["client_id"]}))
        wait_until(lambda: call("GET", rules, client["api_key"])[0] == 200, "answering again")

        # A write inside its transaction when Postgres freezes (held up by the test's lock on the
        # client's row): its statement times out, then its ROLLBACK waits for the cancel too.
        holder = holder_loop.run_until_complete(lock_row_of(database_url, client["client_id"]))
        with ThreadPoolExecutor(1) as requests:
            writing = requests.submit(call, "POST", rules, client["api_key"], new_rule)
            # The write waiting for the client's row.
            holder_loop.run_until_complete(until_waiting_on_a_lock(holder, bound_s=WAIT_TIMEOUT_S))
            with frozen(postgres):
                assert_database_unavailable(writing.result())
        holder_loop.run_until_complete(holder.close())
        holder = None

        wait_until(lambda: call("GET", rules, client["api_key"])[0] == 200, "answering again")
        status, _, body = call("POST", rules, client["api_key"], new_rule)
        assert status == 201, body
        assert worker.child.running()
    finally:
        if holder is not None:
            holder_loop.run_until_complete(holder.close())
        holder_loop.close()
