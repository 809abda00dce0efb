"""Health and readiness of a real worker process: the image's health-check command, /readyz
following Postgres as it stops and comes back, without restarting the worker, and a worker that
waits for its schema to be migrated.

The session's shared Postgres is never stopped: the Postgres test points its worker at a private
embedded one.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import aiohttp
import pytest
import redis

from alerting_app.dependencies import shipped_schema_version
from alerting_app.embedded import create_database, drop_database, free_port, with_database
from alerting_app.migrate import apply_migrations
from alerting_app.up import WorkerProcess, _instructions, alerting_app_executable
from operations_support import get_json, health_check, readiness, wait_until
from test_operations_dependencies import older_migrations

pytestmark = pytest.mark.e2e


def test_health_check_command_passes_against_a_running_worker(start_worker, tmp_path):
    worker = start_worker(APP_ID=f"ops-probes-{secrets.token_hex(4)}")
    # Faust says "Ready" once it has joined its group; matching waits for the rule replica too.
    wait_until(lambda: readiness(worker.url)[0] == 200, "ready")

    live, ready = health_check(worker.port), health_check(worker.port, "ready")

    assert live.returncode == 0, live.stderr
    assert ready.returncode == 0, ready.stderr
    assert get_json(worker.url + "/healthz") == (200, {"status": "alive"})
    status, body = get_json(worker.url + "/readyz")
    assert status == 200 and body["status"] == "ready"
    assert {name: state["ok"] for name, state in body["dependencies"].items()} == {
        "broker": True, "postgres": True, "redis": True, "worker": True, "rules": True,
        "silences": True}
    assert body["roles"] == sorted(["evaluate", "aggregate", "deliver", "relay", "api"])
    # Faust's own views answer without a token (/table lists the tenants' open groups): not served.
    for path in ("/router/", "/table/notification-groups/"):
        assert _status(worker.url + path) == 404, path

    # What `up` prints to try the platform runs as printed, with nothing but Python: no curl.
    script = _instructions(dict(os.environ), worker.url, tmp_path).split("Try it (in another shell):\n")[1]
    # Run from an install whose path holds a space (a checkout under "My Projects", say).
    spaced = tmp_path / "My Projects"
    spaced.mkdir()
    (spaced / "alerting-app").symlink_to(alerting_app_executable())
    script = script.replace(shlex.quote(alerting_app_executable()), shlex.quote(str(spaced / "alerting-app")), 1)
    script = script.split("\nCtrl-C stops")[0]
    no_tools = tmp_path / "no-tools"  # the PATH of a machine with no curl, no python3 on it even
    no_tools.mkdir()
    tried = subprocess.run(["/bin/bash", "-euo", "pipefail", "-c", script + '\necho "client key: $KEY, rule: $RULE"'],
                           env={"PATH": str(no_tools)}, capture_output=True, text=True, timeout=300)
    assert tried.returncode == 0, tried.stderr
    key, rule = tried.stdout.rsplit("client key: ", 1)[1].strip().split(", rule: ")
    assert len(key) > 20 and len(rule) == 36, tried.stdout
    assert '"items"' in tried.stdout  # the notifications list, as the tenant sees it


def test_a_worker_bound_to_one_address_is_waited_for_there(start_worker):
    """`up` (and these tests) wait for a worker where it listens: one bound to [::1] alone does not
    answer on 127.0.0.1, where they asked before, for five minutes, and then gave up."""
    worker = start_worker(APP_ID=f"ops-bind-{secrets.token_hex(4)}", WEB_BIND="::1")

    assert worker.url == f"http://[::1]:{worker.port}"
    assert get_json(worker.url + "/healthz") == (200, {"status": "alive"})



def test_a_flood_of_readiness_probes_opens_no_connection_per_request(start_worker, services):
    """/readyz answers anyone on WEB_PORT, without a token: each request asked Postgres (on the
    agents' pool), Redis and the broker (a new connection and login) for itself, so a flood of them
    opened a Redis connection per concurrent request, kept after, and a broker login per request."""
    worker = start_worker(APP_ID=f"ops-flood-{secrets.token_hex(4)}", ROLES="api")
    wait_until(lambda: readiness(worker.url)[0] == 200, "ready")
    server = redis.Redis.from_url(services.redis_url)

    async def flood() -> list[int]:
        async with aiohttp.ClientSession() as http:
            async def probe() -> int:
                async with http.get(worker.url + "/readyz") as response:
                    await response.read()
                    return response.status
            return await asyncio.gather(*(probe() for _ in range(40)))

    try:
        before = server.info("clients")["connected_clients"]
        statuses = asyncio.run(flood())
        after = server.info("clients")["connected_clients"]
    finally:
        server.close()
    assert set(statuses) == {200}
    assert after - before <= 1, (before, after)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_readyz_follows_postgres_stopping_and_returning_without_a_restart(private_postgres, tmp_path):
    postgres = private_postgres.embedded
    worker = None
    try:
        postgres.stop_postgres()

        # Started while its Postgres is down: it waits, says so, and answers the probes meanwhile.
        env = {**os.environ, "DATABASE_URL": private_postgres.database_url, "WEB_PORT": str(free_port()),
               "DATA_DIR": str(tmp_path / "worker"), "APP_ID": f"ops-pg-{secrets.token_hex(4)}"}
        worker = WorkerProcess(env, tmp_path / "worker.log")
        wait_until(lambda: "waiting for postgres" in worker.log(), "logging that it waits for postgres")
        status, states = wait_until(lambda: (r := readiness(worker.url))[0] and r, "answering /readyz")
        assert (status, states) == (503, {"broker": True, "postgres": False, "redis": True})
        # Anyone may ask (a load balancer may route /readyz from anywhere): the failure's kind, not
        # its text, which names our database's host and port. The admin's token gets the text.
        port = str(urllib.parse.urlsplit(private_postgres.database_url).port)
        public = get_json(worker.url + "/readyz")[1]["dependencies"]["postgres"]["detail"]
        full = get_json(worker.url + "/readyz", env["ADMIN_TOKEN"])[1]["dependencies"]["postgres"]["detail"]
        assert port not in public and "ADMIN_TOKEN" in public, public
        assert port in full, full
        assert get_json(worker.url + "/startedz")[0] == 503
        assert health_check(worker.port).returncode == 0  # alive: no reason to restart it
        assert health_check(worker.port, "ready").returncode == 1
        assert health_check(worker.port, "started").returncode == 1  # never ready yet: a deployment fails

        postgres.start_postgres_again()
        worker.wait_until_ready()
        assert wait_until(lambda: (r := readiness(worker.url))[0] == 200 and r, "ready") == (
            200, {"broker": True, "postgres": True, "redis": True, "worker": True, "rules": True,
                  "silences": True})

        postgres.stop_postgres()
        status, states = wait_until(lambda: (r := readiness(worker.url))[0] == 503 and r, "503 without Postgres")
        # The started worker's /readyz hides the text as the waiting one's did.
        assert port not in get_json(worker.url + "/readyz")[1]["dependencies"]["postgres"]["detail"]
        assert states == {"broker": True, "postgres": False, "redis": True, "worker": True, "rules": True,
                          "silences": True}
        assert health_check(worker.port).returncode == 0
        assert health_check(worker.port, "started").returncode == 0  # ready once: an outage restarts nothing

        postgres.start_postgres_again()
        wait_until(lambda: readiness(worker.url)[0] == 200, "ready again once Postgres is back")
        assert worker.child.running()  # the same process throughout: no restart
        assert health_check(worker.port, "ready").returncode == 0
    finally:
        if worker is not None:
            worker.stop()


def test_a_worker_on_an_unmigrated_schema_waits_and_starts_once_migrated(services, tmp_path):
    # Without the check it became ready and then failed its batches on missing tables.
    name = f"alerting_old_{secrets.token_hex(4)}"
    asyncio.run(create_database(services.server_url, name))
    database_url = with_database(services.server_url, name)
    worker = None
    try:
        folder, older = older_migrations(tmp_path / "migrations")
        asyncio.run(apply_migrations(database_url, folder))
        env = {**os.environ, "DATABASE_URL": database_url, "WEB_PORT": str(free_port()),
               "DATA_DIR": str(tmp_path / "worker"), "APP_ID": f"ops-schema-{secrets.token_hex(4)}"}
        worker = WorkerProcess(env, tmp_path / "worker.log")

        wait_until(lambda: "alerting-app migrate" in worker.log(), "logging that it waits for the migration")
        status, body = wait_until(lambda: (r := get_json(worker.url + "/readyz"))[0] and r, "answering /readyz")
        assert status == 503
        assert body["dependencies"]["postgres"] == {
            "ok": False,
            "detail": f"schema at migration {older}, this release needs {shipped_schema_version()} "
                      "(run `alerting-app migrate`)"}
        assert health_check(worker.port).returncode == 0  # alive: it only waits

        asyncio.run(apply_migrations(database_url))
        worker.wait_until_ready()
        assert wait_until(lambda: (r := readiness(worker.url))[0] == 200 and r, "ready")[1]["postgres"] is True
    finally:
        if worker is not None:
            worker.stop()
        asyncio.run(drop_database(services.server_url, name))



def test_what_up_prints_shows_no_password_and_no_token_the_user_set(tmp_path):
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", "ADMIN_TOKEN": "the-users-own-admin-token",
           "DATABASE_URL": "postgresql://app:PgS3cret@db.internal:5432/alerts",
           "REDIS_URL": "redis://:R3disPw@cache.internal:6379/0"}

    printed = _instructions(env, "http://127.0.0.1:6066", tmp_path, token_generated=False)

    assert not any(secret in printed for secret in ("PgS3cret", "R3disPw", "the-users-own-admin-token")), printed
    assert "postgresql://app:***@db.internal:5432/alerts" in printed
    # The lines to try still work in a shell where the user exported the token.
    assert 'ADMIN_TOKEN="${ADMIN_TOKEN:?' in printed
    # A token `up` generated is the user's only way to learn it: that one is printed.
    assert "generated-token" in _instructions({**env, "ADMIN_TOKEN": "generated-token"}, "http://127.0.0.1:6066",
                                              tmp_path)
