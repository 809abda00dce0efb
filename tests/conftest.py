"""The test session's services, and the fixtures that reach them.

`pytest_configure` runs before any test module is imported, so the environment it sets is what
`alerting_app.app` reads. KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL are used when set;
otherwise an embedded Tansu broker, PostgreSQL or redis-server is started in a temporary folder.
Either way the session gets a fresh, migrated database of its own and a unique APP_ID (consumer
group), so sessions never see each other's rows or offsets.

Fixtures: `services` (session), `clean_db`, `empty_database`, `private_postgres`, `start_worker`; `free_port()` is
`alerting_app.embedded.free_port`. A test that leaves the app or a pool bound to its own event loop,
closed after it, fails (`pytest_runtest_teardown`).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, AsyncIterator, Callable, Iterator

import asyncpg
import pytest

from alerting_app import embedded
from alerting_app.embedded import (EmbeddedServices, create_database, drop_database, free_port, hold_lock,
                                   with_database)
from alerting_app.migrate import apply_migrations

if TYPE_CHECKING:
    from alerting_app.up import WorkerProcess

ADMIN_TOKEN = "test-admin-token-0123456789"
_FOLDER_PREFIX = "alerting-test-"
_SESSION_LOCK = "session.lock"
_FIRST_TEST_PORT = 10_000
_SESSION = pytest.StashKey["_Session"]()


@dataclass(frozen=True)
class SessionServices:
    kafka_bootstrap_servers: str
    database: str  # the session's own migrated database ...
    database_url: str  # ... and its URL
    server_url: str  # a database on the same server, to create and drop others from
    redis_url: str
    admin_token: str
    app_id: str
    data_dir: Path


@dataclass
class _Session:
    folder: Path
    embedded: EmbeddedServices
    lock: IO | None  # held while the session runs (_remove_folders_of_ended_sessions)
    services: SessionServices | None = None


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help:
        return
    signal.signal(signal.SIGTERM, _interrupt)  # in pytest-xdist's controller too: it then stops the workers
    if _is_xdist_controller(config):
        return
    _ports_of_this_process(config)
    _remove_folders_of_ended_sessions()
    folder = Path(tempfile.mkdtemp(prefix=_FOLDER_PREFIX))
    session = _Session(folder, EmbeddedServices(folder / "services"), _lock_session_folder(folder))
    config.stash[_SESSION] = session
    try:
        session.services = _prepare(session)
    except BaseException:
        del config.stash[_SESSION]  # finished here; pytest_unconfigure has nothing left to do
        _finish(session)
        raise


def _is_xdist_controller(config: pytest.Config) -> bool:
    """True in the process that, with pytest-xdist's `-n N`, only hands tests out to N workers.

    It runs no test, so it starts nothing; each worker is a session of its own here, with its own
    embedded services, database and APP_ID, so workers never share rows, offsets or Redis keys.
    """
    return not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"


def _ports_of_this_process(config: pytest.Config) -> None:
    """Under pytest-xdist, each process picks ports (`free_port`) from a range of its own, below the
    kernel's ephemeral ports, so that processes never race for the same one. (`alerting-app up`,
    run by some tests, picks from the kernel's: not from any process's range either.)"""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    count, number = workerinput["workercount"], int(workerinput["workerid"].removeprefix("gw"))
    span = (ephemeral_low - _FIRST_TEST_PORT) // count
    if span >= 500:  # else leave it to the kernel
        embedded.PORT_RANGE = (_FIRST_TEST_PORT + number * span, _FIRST_TEST_PORT + (number + 1) * span - 1)


def _remove_folders_of_ended_sessions() -> None:
    """Remove the folders (embedded services' data, some 50 MB) of sessions that ended without
    removing their own: killed, by a CI timeout or by pytest-xdist ending its processes after an
    interrupt. Their lock is free; a session still running holds its own, and one that has not yet
    taken it has no lock file yet. (Their services ended with them: PR_SET_PDEATHSIG, embedded.py.)"""
    for folder in Path(tempfile.gettempdir()).glob(_FOLDER_PREFIX + "*"):
        if not (folder / _SESSION_LOCK).exists():
            continue
        lock = hold_lock(folder / _SESSION_LOCK)
        if lock is not None:
            shutil.rmtree(folder, ignore_errors=True)
            lock.close()


def _lock_session_folder(folder: Path) -> IO | None:
    # Taken under another name, then renamed: a lock file that exists is always held, so another
    # session starting at the same moment never finds it free and removes this folder.
    lock = hold_lock(folder / (_SESSION_LOCK + ".new"))
    (folder / (_SESSION_LOCK + ".new")).rename(folder / _SESSION_LOCK)
    return lock


def _interrupt(signum: int, frame: object) -> None:
    # A CI timeout sends SIGTERM: as an interrupt, pytest still reports where it was and the
    # session still drops its database and stops its services.
    raise KeyboardInterrupt


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is not None:
        _finish(session)


# The process-wide asyncio state of the code under test: the Faust app (its producer, consumer and
# transport take its loop), the Postgres pools, module-level asyncio primitives. Each is bound to
# the event loop that first uses it, as in a worker, whose one loop runs for as long as it does.
_SHARED_LOOP_BOUND = {
    "alerting_app.app": ("app",),
    "alerting_app.db": ("_pool", "_api_pool", "_lock", "_api_lock"),
    "agents.rule_outbox": ("_wake_up",),
    "web.operations": ("_started", "_ready_once"),
}
_REPORTED_LOOPS = pytest.StashKey[set[tuple[str, asyncio.AbstractEventLoop]]]()


def _left_bound_to_a_closed_loop() -> list[tuple[str, asyncio.AbstractEventLoop]]:
    left = []
    for module_name, names in _SHARED_LOOP_BOUND.items():
        module = sys.modules.get(module_name)  # a module no test imported holds nothing
        for name in names:
            loop = getattr(getattr(module, name, None), "_loop", None)
            if loop is not None and loop.is_closed():
                left.append((f"{module_name}.{name}", loop))
    return left


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Fails the test that left shared state bound to its own event loop, now closed.

    Used in a test's own (function-scoped) loop, the app or a pool stays bound to that loop: every
    later test of the process that uses it then fails with "Event loop is closed", in whichever
    module pytest-xdist runs next in that process, and passes when run alone. Tests that use them
    share the session's loop (AGENT_LOOP, API_LOOP) or close them in their own (`db.close()`).
    """
    yield
    if nextitem is None:  # the last test: the session's own loop has just been closed
        return
    reported = item.config.stash.setdefault(_REPORTED_LOOPS, set())
    left = set(_left_bound_to_a_closed_loop())
    new = sorted(name for name, _ in left - reported)  # reported once, by the test that left it
    reported |= left
    if new:
        pytest.fail(f"{item.nodeid} left {', '.join(new)} bound to its event loop, now closed: later tests "
                    f"of this process that use them would fail with 'Event loop is closed'. Run it in the "
                    f"session's loop (pytest.mark.asyncio(loop_scope=\"session\")).", pytrace=False)


def _prepare(session: _Session) -> SessionServices:
    given = {name: os.environ.get(name) for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")}
    urls = {name: value for name, value in given.items() if value}
    urls.update(session.embedded.start(
        kafka="KAFKA_BOOTSTRAP_SERVERS" not in urls,
        postgres="DATABASE_URL" not in urls,
        redis="REDIS_URL" not in urls,
    ))
    suffix = secrets.token_hex(4)
    database = f"alerting_test_{suffix}"
    asyncio.run(create_database(urls["DATABASE_URL"], database))
    services = SessionServices(
        kafka_bootstrap_servers=urls["KAFKA_BOOTSTRAP_SERVERS"],
        database=database,
        database_url=with_database(urls["DATABASE_URL"], database),
        server_url=urls["DATABASE_URL"],
        redis_url=urls["REDIS_URL"],
        admin_token=ADMIN_TOKEN,
        app_id=f"alerting-test-{suffix}",
        data_dir=session.folder / "data",
    )
    session.services = services  # from here on, _finish drops the database
    asyncio.run(apply_migrations(services.database_url))
    os.environ.update(
        KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap_servers,
        DATABASE_URL=services.database_url,
        REDIS_URL=services.redis_url,
        ADMIN_TOKEN=services.admin_token,
        APP_ID=services.app_id,
        DATA_DIR=str(services.data_dir),
        STORE_URL="memory://",
        # A fresh consumer group joins only after the rebalance timeout: keep it short.
        BROKER_REBALANCE_TIMEOUT_S="2",
        BROKER_SESSION_TIMEOUT_S="6",
        ALLOW_PRIVATE_ENDPOINTS="true",  # the tests' webhook receivers listen on 127.0.0.1
    )
    # Imported only now: it imports alerting_app.app, which reads the environment just set.
    from alerting_app.app import settings
    from alerting_app.kafka_admin import create_topics

    report = asyncio.run(create_topics(
        services.kafka_bootstrap_servers, settings.topic_partitions, settings.topic_replication_factor
    ))
    if report.mismatched:
        raise pytest.UsageError(report.mismatch_message(settings.topic_partitions))
    return services


def _finish(session: _Session) -> None:
    try:
        if session.services is not None:
            asyncio.run(drop_database(session.services.server_url, session.services.database))
    finally:
        session.embedded.stop()
        shutil.rmtree(session.folder, ignore_errors=True)
        if session.lock is not None:
            session.lock.close()


@pytest.fixture(scope="session")
def services(pytestconfig: pytest.Config) -> SessionServices:
    return pytestconfig.stash[_SESSION].services


@pytest.fixture
async def clean_db(services: SessionServices) -> str:
    """Empties every app table (not schema_migrations) before the test; returns DATABASE_URL."""
    conn = await asyncpg.connect(services.database_url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        if tables:
            names = ", ".join(f'"{row["tablename"]}"' for row in tables)
            # A lock left by a broken earlier test fails this one with a reason, instead of hanging the run.
            await conn.execute("SET lock_timeout = '120s'")
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return services.database_url


@pytest.fixture
async def empty_database(services: SessionServices) -> AsyncIterator[str]:
    """The URL of a new database with nothing in it, dropped after the test."""
    name = f"alerting_empty_{secrets.token_hex(4)}"
    await create_database(services.server_url, name)
    try:
        yield with_database(services.server_url, name)
    finally:
        await drop_database(services.server_url, name)


@pytest.fixture
def service_folder() -> Iterator[Path]:
    """A folder for embedded services started by a test, outside pytest's basetemp.

    Embedded Postgres runs as another user, who must traverse every parent folder; another pytest
    session starting meanwhile resets pytest's basetemp root to mode 0700, which would lock it out.
    """
    folder = Path(tempfile.mkdtemp(prefix="alerting-services-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class PrivatePostgres:
    embedded: EmbeddedServices  # to stop it, start it again, freeze it
    database_url: str  # migrated


@pytest.fixture
def private_postgres(service_folder: Path) -> Iterator[PrivatePostgres]:
    """A migrated Postgres of the test's own, for tests that stop, freeze or break it: the session's is
    never touched. Request it before `start_worker`, so that the worker stops before it does."""
    postgres = EmbeddedServices(service_folder)
    try:
        database_url = postgres.start(kafka=False, redis=False)["DATABASE_URL"]
        asyncio.run(apply_migrations(database_url))
        yield PrivatePostgres(postgres, database_url)
    finally:
        postgres.stop()


@pytest.fixture
def start_worker(services: SessionServices, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """`start_worker(**env) -> WorkerProcess`: a real `alerting-app worker` subprocess.

    It runs with the session's environment, a free WEB_PORT and its own DATA_DIR, overridden by
    `env` (e.g. `start_worker(APP_ID="other-group")`); its log is `worker.log_path`. The call
    returns once the worker is ready and serving HTTP at `worker.url`; teardown stops it.
    """
    from alerting_app.up import WorkerProcess  # after pytest_configure set the environment

    workers: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        number = len(workers)
        environment = {
            **os.environ,
            "WEB_PORT": str(free_port()),
            "DATA_DIR": str(tmp_path / f"worker-{number}"),
            **{name.upper(): str(value) for name, value in env.items()},
        }
        worker = WorkerProcess(environment, tmp_path / f"worker-{number}.log")
        workers.append(worker)
        worker.wait_until_ready()
        return worker

    yield start
    for worker in reversed(workers):
        worker.stop()
