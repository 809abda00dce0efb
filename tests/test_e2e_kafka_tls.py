"""Kafka over TLS (KAFKA_SECURITY_PROTOCOL=SSL), end to end: every Kafka client of a worker and of
the command line connects with TLS and a client certificate, and an alert goes from the API to a
webhook through a broker that accepts nothing else.

Tansu 0.6.0's own TLS listener does not complete a handshake here, so TLS is terminated in front of
it, as a load balancer would: the broker listens in plaintext on a port this test alone knows and
advertises the TLS port, so every client, after its first request, is sent back to the TLS port.
The terminator requires a client certificate signed by the test's CA (mutual TLS, as MSK offers).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import trustme

from alerting_app.dependencies import broker_topics_missing
from alerting_app.embedded import free_port
from alerting_app.kafka_connection import KafkaConnection, tls_context
from alerting_app.up import WorkerProcess, alerting_app_executable
from broker_front import BrokerFront, join
from operations_support import readiness, start_tansu, wait_until
from test_e2e_pipeline import WebhookReceiver
from tls_certificates import certificate_files
from worker_probe import wait_until_workers_hold_postgres_rules

pytestmark = pytest.mark.e2e


class TlsTerminator(BrokerFront):
    """TLS on `port`, requiring a client certificate of `ca`, forwarded in plaintext to `upstream_port`."""

    def __init__(self, port: int, upstream_port: int, server_context: ssl.SSLContext) -> None:
        super().__init__(port, upstream_port, server_context)
        self.handshakes = 0

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # only connections whose TLS handshake (client certificate included) passed
        await join(reader, writer, *await asyncio.open_connection("127.0.0.1", self.upstream_port))


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, str]:
    """A CA, the broker's certificate (for 127.0.0.1) and the worker's client certificate, as files."""
    return certificate_files(tmp_path)


def server_context(certificates: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certificates["ca"])
    context.load_cert_chain(certificates["server"])
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def refused(broker) -> bool:
    try:
        asyncio.run(asyncio.wait_for(broker_topics_missing(broker, timeout=3), 20))
    except Exception:
        return True
    return False


async def alert_reaches_webhook(worker_url: str, services, alert_id: str = "over-tls") -> list[str]:
    admin = {"Authorization": f"Bearer {services.admin_token}"}
    async with aiohttp.ClientSession() as http, WebhookReceiver() as receiver:
        async def call(method: str, path: str, token_headers: dict, body: dict | list) -> dict:
            async with http.request(method, worker_url + path, json=body, headers=token_headers) as response:
                assert response.status in (201, 202), await response.text()
                return await response.json()

        client = await call("POST", "/api/v1/clients", admin, {"name": f"Acme {alert_id}"})
        key = {"Authorization": f"Bearer {client['api_key']}"}
        rule = await call("POST", "/api/v1/rules", key, {"severity": "HIGH", "source": "payments", "name": "*"})
        await call("POST", "/api/v1/endpoints", key, {"rule_id": rule["rule_id"], "type": "webhook",
                                                      "value": receiver.url})
        await wait_until_workers_hold_postgres_rules(http, services.admin_token, [worker_url], services.database_url)
        await call("POST", "/api/v1/alerts", admin, {
            "alert_id": alert_id, "schema_version": 1, "event_ts": time.time(), "severity": "HIGH",
            "source": "payments", "name": "CheckoutLatency", "context": {}})
        async with asyncio.timeout(120):  # a bound, not a measurement
            while not receiver.posts:
                await asyncio.sleep(0.1)
        return list(receiver.alert_ids())


def topics_created_and_worker_ready(env: dict[str, str], tmp_path: Path) -> WorkerProcess:
    """`create-topics`, then a worker, each with the broker settings of `env`; the worker is ready."""
    created = subprocess.run([alerting_app_executable(), "create-topics"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    assert "alerts.new" in created.stdout.split("\n")[0]
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_until_ready()
        assert wait_until(lambda: readiness(worker.url)[0] == 200, "ready")
    except BaseException:
        worker.stop()
        raise
    return worker


def first_alert_on_the_topic(env: dict[str, str]) -> str:
    """The alert_id of the first message of alerts.new, as `alerting-app tail` reads it with `env`."""
    tailed = subprocess.run([alerting_app_executable(), "tail", "alerts.new", "--from-beginning", "--limit", "1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert tailed.returncode == 0, tailed.stderr
    return json.loads(tailed.stdout)["value"]["alert_id"]


def test_a_worker_and_the_commands_use_tls_with_a_client_certificate_end_to_end(
        services, clean_db, tmp_path, certificates):
    plaintext_port, tls_port = free_port(), free_port()
    tls_address = f"127.0.0.1:{tls_port}"
    with_client_cert = KafkaConnection(tls_address, tls_context(certificates["ca"], certificates["cert"],
                                                                certificates["key"]))
    group = f"tls-{secrets.token_hex(4)}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": tls_address, "KAFKA_SECURITY_PROTOCOL": "SSL",
           "KAFKA_SSL_CAFILE": certificates["ca"], "KAFKA_SSL_CERTFILE": certificates["cert"],
           "KAFKA_SSL_KEYFILE": certificates["key"], "WEB_PORT": str(free_port()),
           "DATA_DIR": str(tmp_path / "worker"), "APP_ID": group}
    with TlsTerminator(tls_port, plaintext_port, server_context(certificates)) as terminator:
        broker = start_tansu(plaintext_port, tmp_path / "kafka", advertised_port=tls_port, probe=with_client_cert)
        worker = None
        try:
            # Nothing but TLS with a client certificate of the CA gets in.
            assert refused(tls_address)
            assert refused(KafkaConnection(tls_address, tls_context(certificates["ca"], None, None)))

            worker = topics_created_and_worker_ready(env, tmp_path)

            assert asyncio.run(alert_reaches_webhook(worker.url, services)) == ["over-tls"]

            listed = subprocess.run([alerting_app_executable(), "topics", "--json"], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert listed.returncode == 0, listed.stderr
            [alerts_new] = [t for t in json.loads(listed.stdout)["topics"] if t["topic"] == "alerts.new"]
            assert alerts_new["end_offsets"] == 1
            assert first_alert_on_the_topic(env) == "over-tls"
            assert terminator.handshakes > 0
        finally:
            if worker is not None:
                worker.stop()
            broker.stop()


def test_a_worker_that_does_not_trust_the_brokers_certificate_stops_at_once_naming_the_variable(
        tmp_path, certificates):
    # aiokafka reports a certificate it refuses as "Unable to bootstrap", as for a broker that is not
    # there: the worker waited for ever, alive and never ready, saying only that it waited for the broker.
    plaintext_port, tls_port = free_port(), free_port()
    tls_address = f"127.0.0.1:{tls_port}"
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    only_localhost = trustme.CA()  # a broker certificate that names localhost, not 127.0.0.1
    only_localhost.cert_pem.write_to_path(tmp_path / "localhost-ca.pem")
    only_localhost.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(tmp_path / "localhost.pem")
    client = {"KAFKA_BOOTSTRAP_SERVERS": tls_address, "KAFKA_SECURITY_PROTOCOL": "SSL",
              "KAFKA_SSL_CERTFILE": certificates["cert"], "KAFKA_SSL_KEYFILE": certificates["key"]}
    cases = [(server_context(certificates), {"KAFKA_SSL_CAFILE": str(tmp_path / "other-ca.pem")},
              "KAFKA_SSL_CAFILE: the broker's certificate is not trusted"),
             (server_context({**certificates, "server": str(tmp_path / "localhost.pem")}),
              {"KAFKA_SSL_CAFILE": str(tmp_path / "localhost-ca.pem")},
              "KAFKA_BOOTSTRAP_SERVERS: 127.0.0.1 is not a name the broker's certificate holds")]
    broker = start_tansu(plaintext_port, tmp_path / "kafka")
    try:
        for context, trusted, named in cases:
            with TlsTerminator(tls_port, plaintext_port, context):
                result = subprocess.run(
                    [alerting_app_executable(), "worker"], capture_output=True, text=True, timeout=120,
                    env={**os.environ, **client, **trusted, "WEB_PORT": str(free_port()),
                         "DATA_DIR": str(tmp_path / "worker")})

            assert result.returncode == 1, result.stderr[-2000:]
            assert f"Invalid configuration:\n  {named} ({tls_address})" in result.stderr, result.stderr[-2000:]
    finally:
        broker.stop()
