"""KAFKA_SECURITY_PROTOCOL and the KAFKA_SSL_* files are checked at start-up, each error naming its
variable; what they give every Kafka client (alerting_app/kafka_connection.py)."""
from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from alerting_app.kafka_connection import KafkaConnection, client_args, kafka_connection, tls_context_of
from alerting_app.settings import ConfigurationError, load_settings
from tls_certificates import certificate_files


@pytest.fixture
def files(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return {**certificate_files(tmp_path), "junk": str(tmp_path / "junk.pem")}


def test_a_client_key_that_needs_a_pass_phrase_is_refused_saying_so_without_asking_for_one(tls_env, files, tmp_path):
    # OpenSSL asked for the pass phrase on the terminal ("Enter PEM pass phrase:"), holding every
    # command, even `alerting-app agents`; without a terminal the refusal said "[Errno 22] Invalid argument".
    key = serialization.load_pem_private_key(Path(files["key"]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pass phrase")))
    tls_env.setenv("KAFKA_SSL_CERTFILE", files["cert"])
    tls_env.setenv("KAFKA_SSL_KEYFILE", str(encrypted))

    assert "KAFKA_SSL_KEYFILE" in refusal() and "the key is encrypted" in refusal()


@pytest.fixture
def tls_env(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b-1.msk.example.com:9094")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    for name in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def refusal() -> str:
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    return str(refused.value)


def test_tls_with_the_systems_cas_checks_the_brokers_certificate_and_name(tls_env):
    context = tls_context_of(load_settings())

    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert kafka_connection(load_settings()).bootstrap_servers == "b-1.msk.example.com:9094"


def test_tls_with_a_ca_file_and_a_client_certificate_is_accepted(tls_env, files):
    for name, key in (("KAFKA_SSL_CAFILE", "ca"), ("KAFKA_SSL_CERTFILE", "cert"), ("KAFKA_SSL_KEYFILE", "key")):
        tls_env.setenv(name, files[key])

    args = client_args(kafka_connection(load_settings()))

    assert (args["bootstrap_servers"], args["security_protocol"]) == ("b-1.msk.example.com:9094", "SSL")
    assert isinstance(args["ssl_context"], ssl.SSLContext)


def test_a_bootstrap_string_is_plaintext():
    assert client_args("127.0.0.1:9092") == {"bootstrap_servers": "127.0.0.1:9092"}
    assert client_args(KafkaConnection("127.0.0.1:9092")) == {"bootstrap_servers": "127.0.0.1:9092"}


def test_a_ca_file_that_is_missing_or_not_pem_is_refused_by_name(tls_env, files, tmp_path):
    tls_env.setenv("KAFKA_SSL_CAFILE", str(tmp_path / "absent.pem"))
    assert "KAFKA_SSL_CAFILE" in refusal()
    tls_env.setenv("KAFKA_SSL_CAFILE", files["junk"])
    assert "KAFKA_SSL_CAFILE" in refusal()


def test_a_client_certificate_needs_its_key_and_both_must_load(tls_env, files):
    tls_env.setenv("KAFKA_SSL_CERTFILE", files["cert"])
    assert "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE are set together" in refusal()
    tls_env.setenv("KAFKA_SSL_KEYFILE", files["junk"])
    assert "KAFKA_SSL_KEYFILE" in refusal()


def test_tls_files_without_ssl_are_refused_rather_than_ignored(tls_env, files):
    tls_env.setenv("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    tls_env.setenv("KAFKA_SSL_CAFILE", files["ca"])

    assert "KAFKA_SSL_CAFILE set, but KAFKA_SECURITY_PROTOCOL is PLAINTEXT" in refusal()


def test_ssl_needs_a_broker_of_its_own_since_the_embedded_one_is_plaintext(tls_env):
    tls_env.delenv("KAFKA_BOOTSTRAP_SERVERS")

    assert "KAFKA_SECURITY_PROTOCOL=SSL needs KAFKA_BOOTSTRAP_SERVERS" in refusal()


@pytest.mark.parametrize("protocol", ["TLS", "SASL_SSL", "SSL,PLAINTEXT"])
def test_an_unknown_security_protocol_is_refused_by_name(tls_env, protocol):
    tls_env.setenv("KAFKA_SECURITY_PROTOCOL", protocol)

    assert "KAFKA_SECURITY_PROTOCOL" in refusal()


def test_the_protocol_is_read_in_any_case_and_an_empty_file_variable_is_unset(tls_env):
    tls_env.setenv("KAFKA_SECURITY_PROTOCOL", " ssl")
    tls_env.setenv("KAFKA_SSL_CAFILE", "")

    settings = load_settings()

    assert (settings.kafka_security_protocol, settings.kafka_ssl_cafile) == ("SSL", None)


def test_every_kafka_client_of_the_app_takes_its_connection_from_client_args():
    # A client given bootstrap_servers= directly would connect in plaintext whatever the settings say.
    # The one exception probes the embedded broker, which is plaintext (Settings refuses SSL without
    # KAFKA_BOOTSTRAP_SERVERS).
    root = Path(__file__).parent.parent
    direct = [str(path.relative_to(root)) for folder in ("alerting_app", "agents", "tables", "web")
              for path in sorted((root / folder).rglob("*.py"))
              for line in path.read_text().splitlines() if "bootstrap_servers=" in line]
    assert direct == ["alerting_app/embedded.py"]
