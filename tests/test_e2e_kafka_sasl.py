"""Kafka with a SASL login (KAFKA_SECURITY_PROTOCOL=SASL_SSL or SASL_PLAINTEXT), end to end: our
own clients and a worker's Faust clients log in with SCRAM, or with MSK's IAM token, and an alert
goes from the API to a webhook through a broker that lets nobody else in.

Tansu 0.6.0 cannot hold SCRAM users here, so the login is checked in front of it
(tests/kafka_sasl_proxy.py): the broker listens in plaintext on a port this test alone knows and
advertises the login port, so every client, after its first request, is sent back to log in.
"""
from __future__ import annotations

import asyncio
import contextlib
import base64
import os
import re
import secrets
import ssl
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from alerting_app.dependencies import broker_topics_missing
from alerting_app.embedded import free_port
from alerting_app.kafka_connection import KafkaConnection, MskIamToken, SaslLogin, tls_context
from alerting_app.up import alerting_app_executable
from kafka_sasl_proxy import LoginRefused, SaslLoginBroker
from operations_support import start_tansu
from test_e2e_kafka_tls import (  # noqa: F401  (certificates: a fixture)
    alert_reaches_webhook, certificates, first_alert_on_the_topic, refused, topics_created_and_worker_ready)

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alerting-app", "a-scram-password-" + secrets.token_hex(8)


@contextlib.contextmanager
def scram_broker(tmp_path) -> Iterator[tuple[str, KafkaConnection, SaslLoginBroker]]:
    """Tansu behind a SCRAM-SHA-256 login for USER; yields its address, a connection logged in as
    USER, and the login server (its logins and refusals)."""
    plaintext_port, login_port = free_port(), free_port()
    address = f"127.0.0.1:{login_port}"
    logged_in = KafkaConnection(address, sasl=SaslLogin("SCRAM-SHA-256", USER, PASSWORD))
    with SaslLoginBroker(login_port, plaintext_port, {USER: PASSWORD}, mechanism="SCRAM-SHA-256") as login:
        broker = start_tansu(plaintext_port, tmp_path / "kafka", advertised_port=login_port, probe=logged_in)
        try:
            yield address, logged_in, login
        finally:
            broker.stop()


def test_our_kafka_clients_log_in_with_scram_and_nothing_else_gets_in(tmp_path):
    with scram_broker(tmp_path) as (address, logged_in, login):
        assert "alerts.new" in asyncio.run(broker_topics_missing(logged_in, ["alerts.new"]))
        assert login.logins and set(login.logins) == {USER}

        assert refused(KafkaConnection(address, sasl=SaslLogin("SCRAM-SHA-256", USER, "not-the-password")))
        assert login.refusals > 0
        assert refused(KafkaConnection(address, sasl=SaslLogin("SCRAM-SHA-256", "someone-else", PASSWORD)))
        assert refused(KafkaConnection(address, sasl=SaslLogin("SCRAM-SHA-512", USER, PASSWORD)))  # wrong mechanism
        assert refused(address)  # no login at all


def test_a_worker_and_the_commands_log_in_with_scram_over_tls_end_to_end(services, clean_db, tmp_path, certificates):
    plaintext_port, login_port = free_port(), free_port()
    address = f"127.0.0.1:{login_port}"
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificates["server"])  # MSK's SCRAM listener: TLS, no client certificate
    logged_in = KafkaConnection(address, tls_context(certificates["ca"], None, None),
                                SaslLogin("SCRAM-SHA-512", USER, PASSWORD))
    group = f"sasl-{secrets.token_hex(4)}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": address, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "KAFKA_SSL_CAFILE": certificates["ca"], "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": PASSWORD, "WEB_PORT": str(free_port()),
           "DATA_DIR": str(tmp_path / "worker"), "APP_ID": group}
    with SaslLoginBroker(login_port, plaintext_port, {USER: PASSWORD}, tls=server_tls) as login:
        broker = start_tansu(plaintext_port, tmp_path / "kafka", advertised_port=login_port, probe=logged_in)
        worker = None
        try:
            worker = topics_created_and_worker_ready(env, tmp_path)

            assert asyncio.run(alert_reaches_webhook(worker.url, services, alert_id="over-sasl")) == ["over-sasl"]
            assert first_alert_on_the_topic(env) == "over-sasl"
            assert login.refusals == 0 and set(login.logins) == {USER}
            assert PASSWORD not in worker.log_path.read_text()
        finally:
            if worker is not None:
                worker.stop()
            broker.stop()


ACCESS_KEY_ID = "AKIAALERTINGTEST0001"


def msk_iam_token_check(region: str) -> Callable[[str], str]:
    """What MSK checks of an IAM token, as far as a test can without AWS: a URL signed with SigV4 for
    `kafka-cluster:Connect` in `region`, with the access key of the environment; names that key."""
    def check(token: str) -> str:
        url = urllib.parse.urlsplit(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.hostname != f"kafka.{region}.amazonaws.com" or query.get("Action") != "kafka-cluster:Connect":
            raise LoginRefused(f"not an MSK IAM token for {region}: {url.geturl()}")
        access_key, _date, token_region, service, _ = query["X-Amz-Credential"].split("/")
        if (token_region, service, query.get("X-Amz-Algorithm")) != (region, "kafka-cluster", "AWS4-HMAC-SHA256"):
            raise LoginRefused(f"signed for {token_region}/{service}")
        if not re.fullmatch(r"[0-9a-f]{64}", query.get("X-Amz-Signature", "")):
            raise LoginRefused("no signature")
        return access_key
    return check


def test_a_worker_and_the_commands_sign_in_to_msk_with_iam_end_to_end(services, clean_db, tmp_path, certificates,
                                                                      monkeypatch):
    plaintext_port, login_port = free_port(), free_port()
    address = f"127.0.0.1:{login_port}"
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificates["server"])
    aws = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
           "AWS_REGION": "eu-west-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for name, value in aws.items():
        monkeypatch.setenv(name, value)  # for this process's own probes, as for the worker
    tls = tls_context(certificates["ca"], None, None)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": address, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "KAFKA_SSL_CAFILE": certificates["ca"], "KAFKA_SASL_MECHANISM": "AWS_MSK_IAM",
           "WEB_PORT": str(free_port()), "DATA_DIR": str(tmp_path / "worker"),
           "APP_ID": f"iam-{secrets.token_hex(4)}"}
    with SaslLoginBroker(login_port, plaintext_port, mechanism="OAUTHBEARER",
                         check_token=msk_iam_token_check("eu-west-1"), tls=server_tls) as login:
        broker = start_tansu(plaintext_port, tmp_path / "kafka", advertised_port=login_port,
                             probe=KafkaConnection(address, tls, MskIamToken("eu-west-1")))
        worker = None
        try:
            assert refused(KafkaConnection(address, tls, MskIamToken("us-east-1")))  # signed for another region
            assert login.refusals > 0

            worker = topics_created_and_worker_ready(env, tmp_path)

            assert asyncio.run(alert_reaches_webhook(worker.url, services, alert_id="over-iam")) == ["over-iam"]
            assert first_alert_on_the_topic(env) == "over-iam"
            assert set(login.logins) == {ACCESS_KEY_ID}
            assert aws["AWS_SECRET_ACCESS_KEY"] not in worker.log_path.read_text()
        finally:
            if worker is not None:
                worker.stop()
            broker.stop()


def test_a_worker_whose_login_the_broker_refuses_stops_at_once_naming_the_variables(tmp_path):
    # aiokafka reports a refused login as "Unable to bootstrap", as for a broker that is not there (the
    # reason went only to its own log, which the wait silences): the worker waited for ever, alive and
    # never ready, and said only that it waited for the broker. A refused login is refused again at
    # every try, as Postgres's and Redis's are, which stop the worker at once naming the variable.
    with scram_broker(tmp_path) as (address, _, login):
        login_settings = {"KAFKA_BOOTSTRAP_SERVERS": address, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                          "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
        for wrong, named in (({"KAFKA_SASL_PASSWORD": "not-the-password"},
                              "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD: the broker refused the login"),
                             ({"KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
                              "KAFKA_SASL_MECHANISM: the broker does not take SCRAM-SHA-512")):
            result = subprocess.run(
                [alerting_app_executable(), "worker"], capture_output=True, text=True, timeout=120,
                env={**os.environ, **login_settings, **wrong, "WEB_PORT": str(free_port()),
                     "DATA_DIR": str(tmp_path / "worker")})

            assert result.returncode == 1, result.stderr[-2000:]
            assert f"Invalid configuration:\n  {named}" in result.stderr, result.stderr[-2000:]
            assert "not-the-password" not in result.stderr
        assert login.refusals > 0
