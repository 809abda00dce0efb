"""Start-up order does not matter: a worker started before its broker waits for it, becomes ready
once it is up (and its topics exist), and then processes alerts end to end."""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter

import aiohttp
import psutil
import pytest

from alerting_app.app import settings
from alerting_app.embedded import free_port
from alerting_app.kafka_admin import create_topics
from alerting_app.up import WorkerProcess, alerting_app_executable
from kafka_probe import create_topics as create_plain_topics  # not the app's, kafka_admin.create_topics
from operations_support import get_json, health_check, readiness, start_tansu, wait_until
from test_e2e_pipeline import Platform, WebhookReceiver, alert, create_tenant_with_webhook

pytestmark = pytest.mark.e2e


async def deliver_one_alert(worker_url: str, bootstrap: str, group: str, services) -> Counter:
    """A tenant with a webhook, one matching alert on the broker: what the webhook received."""
    async with aiohttp.ClientSession() as http, WebhookReceiver() as receiver:
        platform = Platform(http, worker_url, bootstrap, group, services.admin_token, services.database_url)
        await create_tenant_with_webhook(platform, services.admin_token, receiver.url)
        await platform.settle()
        await platform.produce_alerts(alert("after-the-broker-came-up"))
        await platform.settle()
        return receiver.alert_ids()


def test_worker_started_before_the_broker_becomes_ready_and_processes_alerts(services, clean_db, tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    group = f"ops-order-{secrets.token_hex(4)}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "WEB_PORT": str(free_port()),
           "DATA_DIR": str(tmp_path / "worker"), "APP_ID": group}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    broker = None
    try:
        wait_until(lambda: "waiting for broker" in worker.log(), "logging that it waits for the broker")
        status, states = wait_until(lambda: (r := readiness(worker.url))[0] and r, "answering /readyz")
        assert (status, states) == (503, {"broker": False, "postgres": True, "redis": True})
        assert get_json(worker.url + "/healthz")[0] == 200
        assert health_check(worker.port).returncode == 0

        broker = start_tansu(port, tmp_path / "kafka")
        # Up, but without its topics the worker keeps waiting: Faust would have them auto-created
        # with the broker's partition count.
        wait_until(lambda: "topics missing" in get_json(worker.url + "/readyz")[1]["dependencies"]["broker"]["detail"],
                   "waiting for the topics")
        report = asyncio.run(create_topics(bootstrap, settings.topic_partitions, settings.topic_replication_factor))
        assert "alerts.new" in report.created

        worker.wait_until_ready()
        assert wait_until(lambda: readiness(worker.url)[0] == 200, "ready")
        assert worker.child.running()

        assert asyncio.run(deliver_one_alert(worker.url, bootstrap, group, services)) == Counter(
            {"after-the-broker-came-up": 1})
    finally:
        worker.stop()
        if broker is not None:
            broker.stop()


def start_worker_until_it_exits(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([alerting_app_executable(), "worker"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_a_worker_whose_topic_partitions_differ_from_the_topics_stops_naming_the_setting(services, tmp_path):
    # It would create its table changelogs with its own count, and a client's open group would be
    # written where no closer of that client's partition reads it: never notified, nothing said.
    wrong = settings.topic_partitions + 1
    result = start_worker_until_it_exits({"TOPIC_PARTITIONS": str(wrong), "APP_ID": f"ops-parts-{secrets.token_hex(4)}",
                                          "DATA_DIR": str(tmp_path / "worker"), "WEB_PORT": str(free_port())})

    assert result.returncode == 1, result.stderr[-2000:]
    assert (f"TOPIC_PARTITIONS: topic alerts.new has {settings.topic_partitions} partitions but "
            f"TOPIC_PARTITIONS={wrong}") in result.stderr


def test_a_worker_stops_on_a_table_changelog_with_another_partition_count(services, tmp_path):
    group = f"ops-parts-{secrets.token_hex(4)}"
    changelog = f"{group}-notification-groups-changelog"

    asyncio.run(create_plain_topics(services.kafka_bootstrap_servers, {changelog: settings.topic_partitions + 2}))
    result = start_worker_until_it_exits({"APP_ID": group, "DATA_DIR": str(tmp_path / "worker"),
                                          "WEB_PORT": str(free_port())})

    assert result.returncode == 1, result.stderr[-2000:]
    assert f"topic {changelog} has {settings.topic_partitions + 2} partitions" in result.stderr


@pytest.mark.parametrize("existing", ["none", "changelog"])
def test_a_worker_that_would_create_its_topics_with_more_replicas_than_brokers_stops_naming_the_setting(
        services, tmp_path, existing):
    # Faust creates its table changelogs and its leader-election topic as the worker starts: Kafka
    # refused them with an error that did not name the variable, and the worker stopped with a
    # traceback. Tansu reports one broker (and would have created them all the same).
    group = f"ops-repl-{secrets.token_hex(4)}"
    if existing == "changelog":  # only the leader-election topic is left to create
        changelog = f"{group}-notification-groups-changelog"
        asyncio.run(create_plain_topics(services.kafka_bootstrap_servers, {changelog: settings.topic_partitions}))
    result = start_worker_until_it_exits({"TOPIC_REPLICATION_FACTOR": "2", "APP_ID": group,
                                          "DATA_DIR": str(tmp_path / "worker"), "WEB_PORT": str(free_port())})

    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().endswith(
        "Invalid configuration:\n  TOPIC_REPLICATION_FACTOR: 2 is more than the 1 broker of the cluster at "
        "KAFKA_BOOTSTRAP_SERVERS (no topic was created)"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_worker_whose_topics_all_exist_starts_whatever_its_replication_factor(services, start_worker):
    # It creates nothing, and the factor never changes an existing topic: refusing would stop a
    # worker that has nothing to do with it (a cluster shrunk since, a value meant for another).
    group = f"ops-repl-{secrets.token_hex(4)}"
    # What a worker of every role creates as it starts (alerting_app.kafka_admin.faust_topic_names).
    asyncio.run(create_plain_topics(services.kafka_bootstrap_servers, {
        f"{group}-notification-groups-changelog": settings.topic_partitions, f"{group}-__assignor-__leader": 1}))

    worker = start_worker(APP_ID=group, TOPIC_REPLICATION_FACTOR="2")

    assert readiness(worker.url)[0] == 200


def test_a_waiting_worker_that_is_pid_1_stops_on_sigterm(tmp_path):
    """In a container without an init (compose, Kubernetes, `docker run`) the worker is PID 1, and the
    kernel delivers to PID 1 only the signals it handles: a worker still waiting for its services must
    handle SIGTERM itself, or `docker compose stop` waits out the stop timeout and then kills it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to run the worker as PID 1 of a PID namespace")
    as_root = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    port = free_port()
    env = waiting_worker_environment(port, tmp_path)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        namespace = subprocess.Popen([unshare, *as_root, "--pid", "--fork", "--kill-child",
                                      alerting_app_executable(), "worker"], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: "waiting for" in log_path.read_text() or namespace.poll() is not None,
                   "waiting for its services")
        if namespace.poll() is not None:
            pytest.skip(f"cannot make a PID namespace here: {log_path.read_text()[-500:]}")
        [worker] = psutil.Process(namespace.pid).children()
        worker.send_signal(signal.SIGTERM)  # from outside its namespace, as Docker sends it
        deadline = time.monotonic() + 15
        while namespace.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert namespace.poll() == 128 + signal.SIGTERM, log_path.read_text()[-2000:]
        with socket.socket() as listener:  # the waiting worker's probe port was closed on the way out
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", port))
    finally:
        if namespace.poll() is None:
            namespace.kill()  # --kill-child: the worker goes with it
            namespace.wait()


def waiting_worker_environment(port: int, tmp_path) -> dict[str, str]:
    """A worker's environment whose services are all on a port nothing listens on: it keeps waiting,
    its probe on `port`."""
    closed = free_port()
    return {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}", "WEB_PORT": str(port),
            "DATABASE_URL": f"postgresql://alerting@127.0.0.1:{closed}/alerting",
            "REDIS_URL": f"redis://127.0.0.1:{closed}/0", "DATA_DIR": str(tmp_path / "worker")}


def sigint_at_its_default() -> None:
    # As in a terminal: a test run as a background job inherits an ignored SIGINT, which Python keeps.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_waiting_worker_stopped_with_ctrl_c_closes_its_port_and_exits_without_a_traceback(tmp_path):
    """Ctrl-C on a worker still waiting for its services (`alerting-app worker` in a terminal, started
    before them) ended in click's "Aborted!", exit code 1, an ERROR "Task was destroyed but it is
    pending!" and a traceback ("coroutine ignored GeneratorExit"), its probe port closed by the
    process's end rather than by the wait."""
    port = free_port()
    env = waiting_worker_environment(port, tmp_path)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([alerting_app_executable(), "worker"], env=env, stdout=log, stderr=log,
                                  preexec_fn=sigint_at_its_default)
    try:
        wait_until(lambda: "waiting for" in log_path.read_text() or worker.poll() is not None,
                   "waiting for its services")
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 128 + signal.SIGINT, log_path.read_text()[-2000:]
        output = log_path.read_text()
        assert "SIGINT while waiting for the services: stopping" in output
        assert "Traceback" not in output and "Task was destroyed" not in output, output[-2000:]
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", port))
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
