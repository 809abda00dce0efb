"""The API while Postgres is away under a running worker: 503 with a JSON body saying so, then the
same worker answers again once Postgres is back.

Before, every API call answered aiohttp's plain-text "500 Internal Server Error ... Server got
itself in trouble": neither the JSON every other error is, nor a status a client retries on.
The worker's Postgres is a private embedded one (the session's is never stopped), as in
tests/test_e2e_operations_probes.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request

import pytest

from alerting_app.embedded import EmbeddedServices, free_port
from alerting_app.migrate import apply_migrations
from alerting_app.up import WorkerProcess
from operations_support import wait_until

pytestmark = pytest.mark.e2e


def call(method: str, url: str, token: str, body: object = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_api_answers_503_database_unavailable_while_postgres_is_away(services, service_folder, tmp_path):
    postgres = EmbeddedServices(service_folder)
    worker = None
    try:
        database_url = postgres.start(kafka=False, redis=False)["DATABASE_URL"]
        postgres_port = urllib.parse.urlsplit(database_url).port
        asyncio.run(apply_migrations(database_url))
        env = {**os.environ, "DATABASE_URL": database_url, "WEB_PORT": str(free_port()),
               "DATA_DIR": str(tmp_path / "worker"), "APP_ID": f"api-pg-{secrets.token_hex(4)}"}
        worker = WorkerProcess(env, tmp_path / "worker.log")
        worker.wait_until_ready()
        status, _, body = call("POST", worker.url + "/api/v1/clients", services.admin_token, {"name": "Acme"})
        assert status == 201, body
        client_key = json.loads(body)["api_key"]

        postgres.stop_postgres()
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

        postgres.start_postgres_again()
        wait_until(lambda: call("GET", worker.url + "/api/v1/rules", client_key)[0] == 200, "answering again")
        assert worker.child.running()  # the same process throughout: no restart
    finally:
        if worker is not None:
            worker.stop()
        postgres.stop()
