"""KAFKA_SECURITY_PROTOCOL=SASL_SSL / SASL_PLAINTEXT and the KAFKA_SASL_* login are checked at
start-up, each error naming its variable; what they give our clients and Faust's
(alerting_app/kafka_connection.py). The login itself, against a broker: tests/test_e2e_kafka_sasl.py."""
from __future__ import annotations

import ssl

import faust
import pytest

from alerting_app.kafka_connection import MskIamToken, client_args, faust_credentials, kafka_connection
from alerting_app.settings import load_settings
from test_settings_kafka_tls import refusal
from tls_certificates import certificate_files

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def sasl_env(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "b-1.msk.example.com:9096")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "alerting")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    for name in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE", "KAFKA_SASL_MECHANISM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_sasl_ssl_logs_in_with_scram_sha_512_over_tls_by_default(sasl_env):
    settings = load_settings()

    args = client_args(kafka_connection(settings))
    assert {name: args[name] for name in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                          "sasl_plain_password")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "alerting",
        "sasl_plain_password": PASSWORD}
    assert args["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value, credentials.username, credentials.password) == (
        "SASL_SSL", "SCRAM-SHA-512", "alerting", PASSWORD)
    assert credentials.ssl_context is args["ssl_context"]


def test_sasl_plaintext_logs_in_without_tls_with_the_mechanism_asked_for(sasl_env):
    sasl_env.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
    sasl_env.setenv("KAFKA_SASL_MECHANISM", "scram-sha-256")
    settings = load_settings()

    args = client_args(kafka_connection(settings))
    assert (args["security_protocol"], args["sasl_mechanism"], "ssl_context" in args) == (
        "SASL_PLAINTEXT", "SCRAM-SHA-256", False)
    credentials = faust_credentials(settings)
    assert (credentials.protocol.value, credentials.mechanism.value, credentials.ssl_context) == (
        "SASL_PLAINTEXT", "SCRAM-SHA-256", None)


def test_plaintext_and_ssl_give_faust_no_login(sasl_env, tmp_path):
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
        sasl_env.delenv(name)
    sasl_env.setenv("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    assert faust_credentials(load_settings()) is None
    sasl_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    assert isinstance(faust_credentials(load_settings()), faust.SSLCredentials)
    assert "sasl_mechanism" not in client_args(kafka_connection(load_settings()))


@pytest.mark.parametrize("missing", ["KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"])
def test_a_sasl_protocol_without_its_login_is_refused_naming_both_variables(sasl_env, missing):
    sasl_env.setenv(missing, "")  # VAR= means not set

    message = refusal()
    assert "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD" in message and "SASL_SSL" in message


def test_a_login_without_a_sasl_protocol_is_refused_by_name(sasl_env):
    sasl_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")

    message = refusal()
    assert "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set" in message and "SASL_SSL" in message
    assert PASSWORD not in message


def test_tls_files_with_sasl_plaintext_are_refused_by_name(sasl_env, tmp_path):
    sasl_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    sasl_env.setenv("KAFKA_SSL_CAFILE", certificate_files(tmp_path)["ca"])

    assert "KAFKA_SSL_CAFILE set, but KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT" in refusal()


def test_a_mechanism_we_do_not_support_is_refused_by_name_and_the_password_is_not_shown(sasl_env):
    sasl_env.setenv("KAFKA_SASL_MECHANISM", "GSSAPI")

    message = refusal()
    assert "KAFKA_SASL_MECHANISM" in message
    assert PASSWORD not in message


def test_sasl_needs_a_broker_of_the_settings(sasl_env):
    sasl_env.delenv("KAFKA_BOOTSTRAP_SERVERS")

    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_BOOTSTRAP_SERVERS" in refusal()


def test_the_password_stays_out_of_the_reprs_of_the_settings_and_the_connection(sasl_env):
    settings = load_settings()
    connection = kafka_connection(settings)

    assert PASSWORD not in repr(connection) and "alerting" in repr(connection)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())
    assert PASSWORD not in repr(faust_credentials(settings))


@pytest.fixture
def iam_env(sasl_env):
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_AWS_REGION", "AWS_DEFAULT_REGION"):
        sasl_env.delenv(name, raising=False)
    sasl_env.setenv("KAFKA_SASL_MECHANISM", "aws_msk_iam")
    sasl_env.setenv("AWS_REGION", "eu-west-1")  # as ECS sets it
    return sasl_env


def test_msk_iam_signs_in_with_an_oauthbearer_token_for_the_tasks_region(iam_env):
    settings = load_settings()

    args = client_args(kafka_connection(settings))
    assert (args["security_protocol"], args["sasl_mechanism"]) == ("SASL_SSL", "OAUTHBEARER")
    provider = args["sasl_oauth_token_provider"]
    assert isinstance(provider, MskIamToken) and provider.region == "eu-west-1"
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.OAuthCredentials)
    assert (credentials.protocol.value, credentials.oauth_cb) == ("SASL_SSL", provider)
    iam_env.setenv("KAFKA_AWS_REGION", " US-East-2 ")  # the cluster's region, when it is not the task's
    assert client_args(kafka_connection(load_settings()))["sasl_oauth_token_provider"].region == "us-east-2"
    iam_env.setenv("KAFKA_AWS_REGION", "")  # VAR= means not set: the task's region again
    assert client_args(kafka_connection(load_settings()))["sasl_oauth_token_provider"].region == "eu-west-1"
    iam_env.delenv("AWS_REGION")
    iam_env.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert client_args(kafka_connection(load_settings()))["sasl_oauth_token_provider"].region == "ap-south-1"


def test_msk_iam_is_refused_without_a_region_without_tls_or_with_a_password(iam_env):
    iam_env.delenv("AWS_REGION")
    assert "KAFKA_AWS_REGION" in refusal()
    iam_env.setenv("AWS_REGION", "eu-west-1")
    for protocol in ("SASL_PLAINTEXT", "SSL", "PLAINTEXT"):  # never a silent connection without the login
        iam_env.setenv("KAFKA_SECURITY_PROTOCOL", protocol)
        assert f"needs KAFKA_SECURITY_PROTOCOL=SASL_SSL (not {protocol})" in refusal()
    iam_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    iam_env.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    message = refusal()
    assert "KAFKA_SASL_PASSWORD set" in message and PASSWORD not in message
