"""Settings are validated at start-up, and a bad or missing variable is named in the error."""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from alerting_app.embedded import free_port
from alerting_app.settings import ConfigurationError, load_settings, require_services, without_passwords
from alerting_app.up import alerting_app_executable
from tls_certificates import certificate_files

BAD_VALUES = [
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost:99999"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost:65536"),
    ("KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092,"),
    ("DATABASE_URL", "mysql://db/alerting"),
    ("REDIS_URL", "http://cache:6379"),
    ("WEB_PORT", "0"),
    ("WEB_PORT", "http"),
    # Faust, reading WEB_PORT itself, stopped on this with a bare ValueError; the health check too.
    ("WEB_PORT", "6066.0"),
    ("WEB_PORT", "+6066"),
    ("TOPIC_PARTITIONS", "0"),
    ("TOPIC_REPLICATION_FACTOR", "none"),
    ("APP_ID", "two words"),
    # Its table's changelog topic would be longer than Kafka takes: the worker failed to start its table.
    ("APP_ID", "a" * 220),
    # It names the rule store's folder under DATA_DIR/rules: ".." made that DATA_DIR itself, and
    # discarding the store (a recreated topic) deleted everything in DATA_DIR.
    ("APP_ID", ".."),
    ("APP_ID", "."),
    ("STORE_URL", "redis://"),
    # Faust takes a rocksdb:// URL's path as the table files' name, an absolute one in place of the
    # folder: the tables went to /tables-0.db, outside DATA_DIR (its lock, `up`'s clearing of a
    # previous broker's table state), and the image's worker failed to open them on its read-only root.
    ("STORE_URL", "rocksdb://data/tables"),
    ("STORE_URL", "rocksdb:///var/lib/alerting"),
    ("BROKER_REBALANCE_TIMEOUT_S", "-1"),
    ("WEBHOOK_TIMEOUT_S", "soon"),
    # 0 would fail every API call touching Postgres; over 5 minutes is the wait it exists to cut short.
    ("API_DATABASE_TIMEOUT_S", "0"),
    ("API_DATABASE_TIMEOUT_S", "301"),
    # The API's request rate limit: 0 is "unlimited"; below it, or a burst of no request, means nothing.
    ("API_RATE_LIMIT_PER_S", "-1"),
    ("API_RATE_LIMIT_PER_S", "fast"),
    ("API_RATE_BURST", "0"),
    ("API_RATE_BURST", "2.5"),
    ("API_FAILED_AUTH_LIMIT_PER_S", "-1"),
    ("API_FAILED_AUTH_LIMIT_PER_S", "many"),
    ("API_FAILED_AUTH_BURST", "0"),
    # Proxies in front of the workers, each appending to X-Forwarded-For: a count, no fraction of one,
    # and no chain longer than any deployment has.
    ("API_TRUSTED_PROXIES", "-1"),
    ("API_TRUSTED_PROXIES", "1.0"),
    ("API_TRUSTED_PROXIES", "yes"),
    ("API_TRUSTED_PROXIES", "alb"),
    ("API_TRUSTED_PROXIES", "11"),
    ("ALLOW_PRIVATE_ENDPOINTS", "perhaps"),
    ("LOG_LEVEL", "loud"),
    # `all` stands alone: beside roles it would silently mean every one of them.
    ("ROLES", "all,deliver"),
    # Faust refuses more than its request timeout (90 s), Kafka less than 6 s: both only at start.
    ("BROKER_SESSION_TIMEOUT_S", "600"),
    ("BROKER_SESSION_TIMEOUT_S", "90.5"),
    ("BROKER_SESSION_TIMEOUT_S", "5"),
    # Malformed beyond the scheme: the worker would wait forever or fail without naming the variable.
    ("DATABASE_URL", "postgresql://alerting@db:abc/alerting"),
    ("DATABASE_URL", "postgresql://alerting@db:5432/alerting?sslmode=bogus"),
    ("DATABASE_URL", "postgresql://alerting@db:70000/alerting"),
    # asyncpg would ask for a database named "alerting/extra", which no server has: a wait for ever.
    ("DATABASE_URL", "postgresql://alerting@db:5432/alerting/extra"),
    ("DATABASE_URL", "postgresql://alerting@/alerting"),
    ("DATABASE_URL", "postgresql://alerting@db1:5432,/alerting"),
    ("DATABASE_URL", "postgresql://alerting@db/alerting?target_session_attrs=leader"),
    ("REDIS_URL", "redis://cache:abc/0"),
    ("REDIS_URL", "redis://cache:6379/first"),
    ("REDIS_URL", "redis://"),
    ("REDIS_URL", "redis://cache:6379/0?socket_timeout=soon"),
    # redis-py passes it on as text, and the TLS context it builds at each connection cannot take it.
    ("REDIS_URL", "rediss://cache:6379/0?ssl_min_version=TLSv1_2"),
    # libpq options asyncpg would send to the server as settings: the worker would wait for ever.
    ("DATABASE_URL", "postgresql://alerting@db/alerting?connect_timeout=10"),
    ("DATABASE_URL", "postgresql://alerting@db/alerting?sslmode=require&keepalives=1"),
    # The worker failed to listen with a traceback, after 200 lines of log.
    ("WEB_BIND", "not an address"),
    ("WEB_BIND", "-leading.example"),
    # aiosmtplib looked these up as host names at every delivery: every e-mail failed after its retries.
    ("SMTP_HOST", "email-smtp.eu-west-1.amazonaws.com:587"),
    ("SMTP_HOST", "smtp://mail.example.com"),
    # Offered as MAIL FROM with every e-mail and refused by the relay: every e-mail failed after its retries.
    ("SMTP_FROM", "alerting"),
    ("SMTP_FROM", "Alerting Platform"),
    # A line break (an env file's, say) would end the From: header early: every e-mail malformed.
    ("SMTP_FROM", "alerts@example.com\r\nBcc: everyone@example.com"),
    # SMTPS (TLS from the first byte): each side waited for the other until the timeout, every e-mail failed.
    ("SMTP_PORT", "465"),
    # Refused by aiosmtplib (whitespace) or by the relay as no host name, at every e-mail.
    ("SMTP_HELO_NAME", "mail relay"),
    ("SMTP_HELO_NAME", "mail.example.com:25"),
    ("SMTP_HELO_NAME", "-leading.example"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_stops_start_up_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    message = str(error.value)
    assert f"{variable}:" in message
    assert repr(value) in message


def test_a_bad_secret_is_named_but_not_shown(monkeypatch):
    monkeypatch.setenv("ADMIN_TOKEN", "too-short")

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert "ADMIN_TOKEN: String should have at least 16 characters" in str(error.value)  # what is wrong
    assert "too-short" not in str(error.value)


@pytest.mark.parametrize("variable", ["ADMIN_TOKEN", "INGEST_TOKEN"])
def test_a_token_only_some_http_clients_could_present_is_refused(monkeypatch, variable):
    # Python's clients (`alerting-app api` among them) send a header's non-ASCII characters as
    # Latin-1, curl as UTF-8, and the worker reads UTF-8: such a token answered 401 to some.
    monkeypatch.setenv(variable, "pässwörter-für-den-admin")

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert f"{variable}: must be printable ASCII" in str(error.value)
    assert "pässwörter" not in str(error.value)


def test_a_bad_service_url_is_shown_without_its_password(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://alerting:s3cret@db:abc/alerting")

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert "DATABASE_URL:" in str(error.value) and "'db:abc'" in str(error.value)
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize(("variable", "url", "password"), [
    ("DATABASE_URL", "postgresql://alerting:Xq7z/Wk3v@db/alerting", "Xq7z/Wk3v"),
    ("DATABASE_URL", "postgresql://alerting:Xq7z@Wk3v@db/alerting", "Xq7z@Wk3v"),
    ("DATABASE_URL", "postgresql://alerting:Xq7z?Wk3v#Jm5r@db/alerting", "Xq7z?Wk3v#Jm5r"),
    ("REDIS_URL", "rediss://:Xq7z/Wk3v@cache.example.com:6379/0", "Xq7z/Wk3v"),
    # A password whose part before the '/' is digits: the login looked like host:port.
    ("REDIS_URL", "redis://user:1234/5678@host:6379/0", "1234/5678"),
    ("DATABASE_URL", "postgresql://app:1234/pw99@db:5432/alerts", "1234/pw99"),
    ("DATABASE_URL", "postgresql://app:1234#5678@db.example/alerts", "1234#5678"),
    # A user holding '@' (Azure's `user@server` form): the password after it was shown as it is.
    ("DATABASE_URL", "postgresql://alerting@myserver:Xq7zWk3v@db/alerting", "Xq7zWk3v"),
    # An '@' and then a '#', '/' or '?': the login ended at the first '@' and the rest passed as a
    # fragment, path or query, so the URL was taken, and its "host" was part of the password.
    ("DATABASE_URL", "postgresql://alerting:Xq7z@Wk3v#Jm5r@db/alerting", "Xq7z@Wk3v#Jm5r"),
    ("DATABASE_URL", "postgresql://alerting:Xq7z@Wk3v/Jm5r@db/alerting", "Xq7z@Wk3v/Jm5r"),
    ("DATABASE_URL", "postgresql://alerting:Xq7z@Wk3v?Jm5r@db/alerting", "Xq7z@Wk3v?Jm5r"),
    ("REDIS_URL", "redis://:Xq7z@Wk3v#Jm5r@cache:6379/0", "Xq7z@Wk3v#Jm5r"),
])
def test_a_password_that_is_not_url_encoded_is_refused_without_showing_any_of_it(monkeypatch, variable, url,
                                                                                 password):
    monkeypatch.setenv(variable, url)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    message = str(error.value)
    assert f"{variable}:" in message and "URL-encode" in message
    assert not any(part in message for part in re.split(r"[@/?#]", password)), message


def test_urls_without_a_password_keep_their_hosts_where_another_one_has_one():
    # As `up` prints what it waits for: every URL on one line.
    line = "postgres postgresql://postgres@db:5432/alerting (refused); redis redis://:Xq7z@cache:6379/0 (refused)"

    assert without_passwords(line) == ("postgres postgresql://postgres@db:5432/alerting (refused); "
                                       "redis redis://:***@cache:6379/0 (refused)")


def test_a_password_in_the_query_is_not_shown_with_an_error(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.internal/alerts?user=app&password=Xq7z@Wk3v&sslmode=maybe")

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert "sslmode" in str(error.value) and "Xq7z" not in str(error.value) and "Wk3v" not in str(error.value)


@pytest.mark.parametrize(("variable", "value"), [
    ("DATABASE_URL", "postgresql://alerting:pw@db.example.com:5432/alerting?sslmode=require"),
    ("DATABASE_URL", "postgresql://alerting:p%40ss%2Fw@db.example.com/alerting"),
    # '@' after the host, in a query value, is no login
    ("DATABASE_URL", "postgresql://app:pw@db/alerts?application_name=worker@eu-1"),
    ("DATABASE_URL", "postgresql://app:pw@db/alerts?sslrootcert=/certs/ca@2024.pem"),
    ("DATABASE_URL", "postgresql://db.internal/alerts?user=app&password=s3cr@t"),
    ("REDIS_URL", "redis://cache:6379/0?client_name=alerting@eu"),
    ("DATABASE_URL", "postgres://alerting@[::1]:5432/alerting"),
    ("DATABASE_URL", "postgresql://alerting@db1:5432,db2:5433/alerting?target_session_attrs=read-write"),
    ("DATABASE_URL", "postgresql:///alerting?host=/var/run/postgresql&application_name=worker"),
    ("REDIS_URL", "rediss://:token@cache.example.com:6379/0?ssl_cert_reqs=none"),
    ("REDIS_URL", "redis://[::1]:6379"),
    ("REDIS_URL", "unix:///var/run/redis.sock?db=2"),
])
def test_well_formed_service_urls_are_accepted(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    assert getattr(load_settings(), variable.lower()) == value


@pytest.mark.parametrize(("variable", "query", "refusal"), [
    # asyncpg loads these at every connection attempt: the worker waited for ever on
    # "FileNotFoundError: [Errno 2] No such file or directory", naming neither the file nor the variable.
    ("DATABASE_URL", "?sslmode=verify-full&sslrootcert={missing}", "sslrootcert='{missing}' cannot be loaded"),
    ("DATABASE_URL", "?sslmode=require&sslcrl={not_pem}", "sslcrl='{not_pem}' cannot be loaded"),
    ("DATABASE_URL", "?sslcert={cert}&sslkey={missing}", "sslcert='{cert}' and sslkey='{missing}' cannot be loaded"),
    # redis-py: "Error 2 connecting to host:port. No such file or directory", as if no server were there.
    ("REDIS_URL", "?ssl_ca_certs={missing}", "ssl_ca_certs='{missing}' cannot be loaded"),
    ("REDIS_URL", "?ssl_certfile={cert}&ssl_keyfile={not_pem}", "ssl_certfile='{cert}', ssl_keyfile='{not_pem}'"),
])
def test_a_certificate_file_of_a_service_url_that_cannot_be_loaded_is_refused_naming_it(monkeypatch, tmp_path,
                                                                                        variable, query, refusal):
    files = {**certificate_files(tmp_path), "missing": str(tmp_path / "missing.pem"), "not_pem": "/etc/hostname"}
    url = {"DATABASE_URL": "postgresql://alerting@db.example.com/alerting", "REDIS_URL": "rediss://cache:6379/0"}

    monkeypatch.setenv(variable, url[variable] + query.format(**files))
    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert f"{variable}:" in str(error.value) and refusal.format(**files) in str(error.value), str(error.value)


@pytest.mark.parametrize(("environment", "refusal"), [
    # asyncpg reads these when the URL does not give them: every connection failed with
    # "FileNotFoundError: [Errno 2] No such file or directory", or named DATABASE_URL's sslmode.
    ({"PGSSLMODE": "verify-full", "PGSSLROOTCERT": "{missing}"}, "PGSSLROOTCERT='{missing}' (the environment's"),
    ({"PGSSLMODE": "require", "PGSSLCRL": "{not_pem}"}, "PGSSLCRL='{not_pem}' (the environment's"),
    ({"PGSSLCERT": "{missing}"}, "PGSSLCERT='{missing}' (the environment's"),
    ({"PGSSLCERT": "{cert}", "PGSSLKEY": "{missing}"}, "PGSSLKEY='{missing}' (the environment's"),
    ({"PGSSLMODE": "bogus"}, "PGSSLMODE='bogus' (the environment's, as the URL gives no sslmode) is not one of"),
    ({"PGSSLMODE": ""}, "PGSSLMODE='' (the environment's"),
    # Read unless the URL has port=: every connection failed with "invalid literal for int()".
    ({"PGPORT": "abc"}, "PGPORT='abc' (the environment's, read when the URL has no port= option) is not a port"),
])
def test_a_libpq_variable_the_url_leaves_to_the_environment_that_cannot_be_used_is_refused_naming_it(
        monkeypatch, tmp_path, environment, refusal):
    files = {**certificate_files(tmp_path), "missing": str(tmp_path / "missing.pem"), "not_pem": "/etc/hostname"}
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value.format(**files))
    monkeypatch.setenv("DATABASE_URL", "postgresql://alerting@db.example.com/alerting")

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert "DATABASE_URL:" in str(error.value) and refusal.format(**files) in str(error.value), str(error.value)


def test_libpq_variables_the_url_overrides_or_that_load_are_accepted(monkeypatch, tmp_path):
    files = certificate_files(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql files to fall back on
    for variable, value in {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": files["ca"], "PGSSLCERT": files["cert"],
                            "PGSSLKEY": files["key"]}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("DATABASE_URL", "postgresql://alerting@db.example.com/alerting")
    load_settings()
    # The URL's own options win: the environment's missing file is never read.
    monkeypatch.setenv("PGSSLROOTCERT", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("DATABASE_URL", f"postgresql://alerting@db.example.com/alerting?sslrootcert={files['ca']}")
    load_settings()
    monkeypatch.setenv("DATABASE_URL", "postgresql://alerting@db.example.com/alerting?sslmode=disable")
    monkeypatch.setenv("PGSSLMODE", "bogus")
    load_settings()


def test_a_redis_client_key_that_needs_a_pass_phrase_is_refused_unless_the_url_gives_it(monkeypatch, tmp_path):
    # OpenSSL asked for it on the terminal, holding every command at "Enter PEM pass phrase:".
    files = certificate_files(tmp_path)
    key = serialization.load_pem_private_key(Path(files["key"]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"phrase")))
    url = f"rediss://cache:6379/0?ssl_certfile={files['cert']}&ssl_keyfile={encrypted}"

    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigurationError, match="the key is encrypted: give its pass phrase as ssl_password"):
        load_settings()
    monkeypatch.setenv("REDIS_URL", url + "&ssl_password=phrase")
    assert load_settings().redis_url == url + "&ssl_password=phrase"


def test_certificate_files_of_service_urls_that_load_are_accepted(monkeypatch, tmp_path):
    files = certificate_files(tmp_path)
    database_url = (f"postgresql://alerting@db.example.com/alerting?sslmode=verify-full&sslrootcert={files['ca']}"
                    f"&sslcert={files['cert']}&sslkey={files['key']}")
    redis_url = f"rediss://cache:6379/0?ssl_ca_certs={files['ca']}&ssl_certfile={files['cert']}&ssl_keyfile={files['key']}"
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)

    assert (load_settings().database_url, load_settings().redis_url) == (database_url, redis_url)
    # asyncpg reads no CA file below sslmode=require: one that is not there stops nothing.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://alerting@db.example.com/alerting?sslrootcert={tmp_path}/none.pem")
    load_settings()


def test_a_postgres_client_certificate_whose_key_is_given_by_pgsslkey_is_accepted(monkeypatch, tmp_path):
    # asyncpg takes the key of a URL's sslcert from PGSSLKEY when the URL gives no sslkey: the check
    # loading the certificate without it refused a configuration that connects.
    files = certificate_files(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/postgresql.key to fall back on
    monkeypatch.setenv("PGSSLKEY", files["key"])
    database_url = f"postgresql://alerting@db.example.com/alerting?sslmode=require&sslcert={files['cert']}"
    monkeypatch.setenv("DATABASE_URL", database_url)

    assert load_settings().database_url == database_url


@pytest.mark.parametrize("url", [
    "redis://cache:6379/0?ssl_ca_certs=/certs/ca.pem",  # TLS options on a plaintext connection
    "redis://cache:6379/0?sockettimeout=5",  # misspelt
    "unix:///var/run/redis.sock?ssl_certfile=/certs/client.pem",
])
def test_a_redis_url_option_its_connection_does_not_take_is_refused_naming_it(monkeypatch, url):
    # redis-py hands an option it has no parser for to the connection, which refused it with a
    # TypeError at every connection attempt: the worker waited for ever.
    monkeypatch.setenv("REDIS_URL", url)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    option = url.partition("?")[2].partition("=")[0]
    assert f"REDIS_URL: {option!r} is not an option of a" in str(error.value), str(error.value)


def test_a_bad_value_is_told_in_our_validators_words_without_pydantics_value_error(monkeypatch):
    # It read "WEB_PORT: Value error, must be a whole number, digits only (got 'abc')".
    monkeypatch.setenv("WEB_PORT", "abc")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "  WEB_PORT: must be a whole number, digits only (got 'abc')" in str(error.value).splitlines()


@pytest.mark.parametrize(("env", "named"), [
    # A lease renewed once per sweep must last several sweeps, or it expires under a live worker.
    ({"DELIVERY_LEASE_S": "2", "DELIVERY_SWEEP_INTERVAL_S": "1"}, ("DELIVERY_LEASE_S", "DELIVERY_SWEEP_INTERVAL_S")),
    # The sent marker must outlive a lease, or a crashed worker's delivery is sent twice.
    ({"DELIVERY_LEASE_S": "600", "DELIVERY_SENT_MARKER_TTL_S": "300"},
     ("DELIVERY_SENT_MARKER_TTL_S", "DELIVERY_LEASE_S")),
    # ... and the lease a send's fence makes (its timeout plus 5 s), however short DELIVERY_LEASE_S.
    ({"DELIVERY_LEASE_S": "30", "WEBHOOK_TIMEOUT_S": "120", "DELIVERY_SENT_MARKER_TTL_S": "60"},
     ("DELIVERY_SENT_MARKER_TTL_S", "WEBHOOK_TIMEOUT_S")),
    # ... an e-mail's send too, whose timeout is SMTP_TIMEOUT_S.
    ({"DELIVERY_LEASE_S": "30", "SMTP_TIMEOUT_S": "120", "DELIVERY_SENT_MARKER_TTL_S": "60"},
     ("DELIVERY_SENT_MARKER_TTL_S", "SMTP_TIMEOUT_S")),
])
def test_delivery_timings_that_contradict_each_other_are_refused_naming_both(monkeypatch, env, named):
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert all(variable in str(error.value) for variable in named)


def test_delivery_timings_at_their_limits_are_accepted(monkeypatch):
    monkeypatch.setenv("DELIVERY_SWEEP_INTERVAL_S", "0.5")
    monkeypatch.setenv("DELIVERY_LEASE_S", "1.5")
    monkeypatch.setenv("DELIVERY_SENT_MARKER_TTL_S", "60")

    assert load_settings().delivery_lease_s == 1.5


@pytest.mark.parametrize(("value", "host"), [
    ("email-smtp.eu-west-1.amazonaws.com", "email-smtp.eu-west-1.amazonaws.com"),
    ("mail_relay", "mail_relay"),  # a compose service name may hold '_'
    ("10.0.0.25", "10.0.0.25"), ("[::1]", "::1"),
])
def test_an_smtp_host_name_or_address_is_accepted(monkeypatch, value, host):
    monkeypatch.setenv("SMTP_HOST", value)

    assert load_settings().smtp_host == host


@pytest.mark.parametrize("value", ["alerts@example.com", "Alerts <alerts@example.com>", "alerting@localhost"])
def test_an_smtp_sender_address_with_or_without_a_display_name_is_accepted(monkeypatch, value):
    monkeypatch.setenv("SMTP_FROM", value)

    assert load_settings().smtp_from == value


def test_defaults_are_the_documented_ones(monkeypatch):
    for variable in ("WEB_PORT", "TOPIC_PARTITIONS", "APP_ID", "DATA_DIR", "STORE_URL"):
        monkeypatch.delenv(variable, raising=False)

    settings = load_settings()

    assert (settings.web_port, settings.topic_partitions) == (6066, 9)
    assert (settings.app_id, str(settings.data_dir), settings.store_url) == (
        "alerting-app", ".alerting-data", "rocksdb://"
    )


def test_the_trusted_proxies_are_a_count_of_them_0_by_default(monkeypatch):
    monkeypatch.delenv("API_TRUSTED_PROXIES", raising=False)
    assert load_settings().api_trusted_proxies == 0  # X-Forwarded-For, which anyone can write, ignored
    monkeypatch.setenv("API_TRUSTED_PROXIES", "2")
    assert load_settings().api_trusted_proxies == 2


def test_several_kafka_servers_are_accepted(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092, broker-2:9093")

    assert load_settings().kafka_bootstrap_servers == "broker-1:9092,broker-2:9093"


def test_require_services_names_every_missing_variable(monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("REDIS_URL")

    with pytest.raises(ConfigurationError) as error:
        require_services(load_settings())

    message = str(error.value)
    assert "DATABASE_URL" in message and "REDIS_URL" in message
    assert "KAFKA_BOOTSTRAP_SERVERS" not in message and "ADMIN_TOKEN" not in message


def test_require_services_names_a_missing_admin_token(monkeypatch):
    # Without it, a worker would start with no one able to create a client.
    monkeypatch.delenv("ADMIN_TOKEN")

    with pytest.raises(ConfigurationError, match="Missing configuration: ADMIN_TOKEN must be set"):
        require_services(load_settings())


def test_require_services_accepts_a_complete_configuration():
    require_services(load_settings())  # the session's environment has every service


def _run_worker(**env: str | None) -> subprocess.CompletedProcess:
    # A free WEB_PORT unless the test names one: the default, 6066, may be a running platform's
    # (`python3 dev.py run` beside the suite), and the worker would stop on that instead.
    environment = {**os.environ, "WEB_PORT": str(free_port()), **env}
    for name in [name for name, value in env.items() if value is None]:
        del environment[name]
    # The timeout only guards the suite against a worker that wrongly starts and keeps running.
    return subprocess.run([alerting_app_executable(), "worker", "-l", "info"], env=environment,
                          capture_output=True, text=True, timeout=120)


def test_worker_given_a_port_in_two_spellings_with_different_values_exits_naming_both():
    # Which one counted depended on the environment's order: the health check could ask another port.
    result = _run_worker(WEB_PORT="7000", web_port="7001")

    assert result.returncode != 0
    assert "WEB_PORT: set twice with different values, as WEB_PORT='7000' and web_port='7001'" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_with_a_bad_kafka_address_exits_naming_the_variable():
    result = _run_worker(KAFKA_BOOTSTRAP_SERVERS="no-port-here")

    assert result.returncode != 0
    assert "KAFKA_BOOTSTRAP_SERVERS" in result.stderr


def test_worker_with_a_count_of_trusted_proxies_that_is_none_exits_naming_it():
    # Behind a load balancer, the one setting that says which X-Forwarded-For entry is the client's.
    result = _run_worker(API_TRUSTED_PROXIES="alb")

    assert result.returncode != 0
    assert re.search(r"API_TRUSTED_PROXIES: .*must be a whole number.*\(got 'alb'\)", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_worker_with_a_malformed_database_url_exits_naming_it_instead_of_waiting():
    result = _run_worker(DATABASE_URL="postgresql://alerting@127.0.0.1:abc/alerting")

    assert result.returncode != 0
    assert "DATABASE_URL:" in result.stderr and "Traceback" not in result.stderr


def test_worker_without_a_database_url_exits_naming_it():
    result = _run_worker(DATABASE_URL=None)

    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


def test_commands_that_keep_no_state_create_no_data_folder(tmp_path):
    environment = {name: value for name, value in os.environ.items() if name != "DATA_DIR"}
    for command in (["--help"], ["agents"], ["worker", "--help"]):
        result = subprocess.run([alerting_app_executable(), *command], env=environment, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr

    assert list(tmp_path.iterdir()) == []  # no ./.alerting-data


@pytest.mark.parametrize("command", [["-D", "{folder}", "worker"], ["--datadir={folder}", "worker"],
                                     ["--datadir", "{folder}", "up"]])
def test_fausts_datadir_option_is_refused_naming_data_dir(tmp_path, command):
    # `alerting-app --help` lists Faust's -D/--datadir; it was ignored, the state going to DATA_DIR.
    # DATA_DIR is a file here, so a command that went on would fail on it, naming something else.
    data_dir = tmp_path / "not-a-folder"
    data_dir.write_text("")
    folder = tmp_path / "asked-for"
    environment = {**{name: value for name, value in os.environ.items() if name != "DATABASE_URL"},
                   "DATA_DIR": str(data_dir)}

    result = subprocess.run([alerting_app_executable(), *(arg.format(folder=folder) for arg in command)],
                            env=environment, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1, result.stdout
    assert "-D/--datadir: not read here" in result.stderr and "set DATA_DIR" in result.stderr, result.stderr
    assert not folder.exists()


@pytest.mark.parametrize("options, named, remedy", [
    (["-p", "7000"], "-p/--web-port", "set WEB_PORT"), (["--web-port=7000"], "-p/--web-port", "set WEB_PORT"),
    (["-b", "0.0.0.0"], "-b/--web-bind", "set WEB_BIND"), (["--web-bind", "0.0.0.0"], "-b/--web-bind", "set WEB_BIND"),
    (["--web-transport", "unix:///tmp/alerting.sock"], "--web-transport", "set WEB_BIND and WEB_PORT"),
    (["--without-web"], "--with-web/--without-web", "every worker serves the REST API")],
    ids=["-p", "--web-port=", "-b", "--web-bind", "--web-transport", "--without-web"])
def test_fausts_web_options_are_refused_by_the_worker_naming_the_settings(options, named, remedy):
    # Taken, `--web-port 7000` served the API and the probes on 7000 while the health check asked
    # WEB_PORT, and `--web-bind 0.0.0.0` served on every address where WEB_BIND kept it to one.
    # Without DATABASE_URL, a worker that went on would stop naming that instead.
    environment = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}

    result = subprocess.run([alerting_app_executable(), "worker", *options], env=environment,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 1, result.stdout
    assert f"{named}: not read here" in result.stderr and remedy in result.stderr, result.stderr


def test_an_ingest_token_is_a_secret_of_its_own(monkeypatch):
    monkeypatch.setenv("ADMIN_TOKEN", "admin-token-of-the-platform")
    monkeypatch.setenv("INGEST_TOKEN", "tiny-secret")
    with pytest.raises(ConfigurationError, match="INGEST_TOKEN") as short:
        load_settings()
    assert "tiny-secret" not in str(short.value)  # not shown, like the admin token

    monkeypatch.setenv("INGEST_TOKEN", "admin-token-of-the-platform")
    with pytest.raises(ConfigurationError, match="INGEST_TOKEN must differ from ADMIN_TOKEN"):
        load_settings()

    monkeypatch.setenv("INGEST_TOKEN", "ingest-token-of-the-monitors")
    assert load_settings().ingest_token == "ingest-token-of-the-monitors"


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"])
def test_a_service_url_set_empty_counts_as_unset(monkeypatch, variable):
    # As for every optional setting (VAR= in a compose file): `alerting-app up` then starts one.
    monkeypatch.setenv(variable, "  ")

    assert getattr(load_settings(), variable.lower()) is None


@pytest.mark.parametrize("variable", ["ADMIN_TOKEN", "INGEST_TOKEN"])
def test_a_token_set_empty_is_unset_and_one_with_a_trailing_newline_is_stripped(monkeypatch, variable):
    # README: `up` generates ADMIN_TOKEN when it is not set, and VAR= is "not set" everywhere.
    monkeypatch.setenv(variable, "")
    assert getattr(load_settings(), variable.lower()) is None
    # From a secret store or an env file: no Authorization header can carry the newline, so the
    # token kept as given could never be presented.
    monkeypatch.setenv(variable, "token-from-a-secret-file\n")
    assert getattr(load_settings(), variable.lower()) == "token-from-a-secret-file"


@pytest.mark.parametrize("variable", ["SMTP_PASSWORD", "KAFKA_SASL_PASSWORD"])
def test_a_password_from_a_secret_file_loses_its_final_line_break_and_keeps_its_spaces(monkeypatch, variable):
    # Before, the line break was sent as part of the password: every login was refused.
    monkeypatch.setenv("SMTP_USER", "alerts")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker.example.com:9096")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "alerts")
    monkeypatch.setenv("SMTP_PASSWORD", "placeholder")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "placeholder")
    monkeypatch.setenv(variable, " pass word \n")
    assert getattr(load_settings(), variable.lower()).get_secret_value() == " pass word "
    monkeypatch.setenv(variable, "\r\n")
    with pytest.raises(SystemExit, match=variable):
        load_settings()  # set empty: its user is set, and it is not


@pytest.mark.parametrize(("variable", "field", "default"), [
    ("WEB_PORT", "web_port", 6066), ("WEB_BIND", "web_bind", "0.0.0.0"), ("LOG_LEVEL", "log_level", "info"),
    ("TOPIC_PARTITIONS", "topic_partitions", 9),
])
def test_any_variable_set_empty_is_its_default(monkeypatch, variable, field, default):
    # VAR= in a compose file or a task definition; the health check (healthcheck.py) reads
    # WEB_BIND and WEB_PORT the same way, so the two agree on where the worker listens.
    monkeypatch.setenv(variable, "")
    assert getattr(load_settings(), field) == default


def test_data_dir_set_empty_is_the_default_not_the_current_folder(monkeypatch):
    monkeypatch.setenv("DATA_DIR", "")
    assert str(load_settings().data_dir) == ".alerting-data"


@pytest.mark.parametrize(("env", "named"), [
    ({"WEB_BIND": "192.0.2.1"}, "WEB_BIND, WEB_PORT: cannot listen on 192.0.2.1"),  # not this machine's
    ({"MIGRATIONS_DIR": "/nonexistent/migrations"}, "MIGRATIONS_DIR: migrations folder /nonexistent/migrations"),
    # In any case, as every setting: read in upper case only, it was not read at all.
    ({"migrations_dir": "/nonexistent/migrations"}, "MIGRATIONS_DIR: migrations folder /nonexistent/migrations"),
    ({"MIGRATIONS_DIR": "/a/migrations", "migrations_dir": "/b/migrations"},
     "MIGRATIONS_DIR: set twice with different values, as MIGRATIONS_DIR='/a/migrations' and "
     "migrations_dir='/b/migrations'"),
    ({"DATA_DIR": "/proc/no-such-folder"}, "DATA_DIR: cannot create /proc/no-such-folder"),
    # A folder that exists but takes no file (a volume owned by another user than the worker's).
    ({"DATA_DIR": "/proc"}, "DATA_DIR: cannot write in /proc"),
])
def test_worker_stops_at_once_naming_what_waiting_would_not_fix(env, named, tmp_path):
    result = _run_worker(**{"DATA_DIR": str(tmp_path / "data"), **env})

    assert result.returncode == 1
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_worker_stops_naming_web_port_when_another_process_listens_on_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_worker(WEB_BIND="127.0.0.1", WEB_PORT=str(port))

    assert result.returncode == 1
    assert f"WEB_BIND, WEB_PORT: cannot listen on 127.0.0.1 port {port}" in result.stderr, result.stderr[-2000:]


def test_a_second_worker_on_the_data_dir_of_a_running_one_stops_at_once_naming_it(start_worker, tmp_path):
    # It found the first one's RocksDB stores locked, retried for ever without becoming ready, and
    # the partitions it was assigned were not processed.
    shared = tmp_path / "shared"
    first = start_worker(DATA_DIR=shared)

    result = _run_worker(DATA_DIR=str(shared), WEB_PORT=str(free_port()))

    assert result.returncode == 1
    assert (f"DATA_DIR: {shared} is in use by another worker (pid {first.child.process.pid})"
            in result.stderr), result.stderr[-2000:]


@pytest.mark.parametrize(("env", "reason"), [
    ({"SMTP_STARTTLS": "false"}, "SMTP_STARTTLS is false"),
    ({}, "TLS is opportunistic (unchecked)"),
])
def test_an_smtp_ca_file_that_would_check_nothing_is_refused(monkeypatch, tmp_path, env, reason):
    # It was never read: the relay's certificate is checked only where TLS is required.
    monkeypatch.setenv("SMTP_SSL_CAFILE", certificate_files(tmp_path)["ca"])
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as error:
        load_settings()

    assert "SMTP_SSL_CAFILE set, but no relay certificate is checked" in str(error.value)
    assert reason in str(error.value)


@pytest.mark.parametrize("env", [{"SMTP_STARTTLS": "true"}, {"SMTP_USER": "alerts", "SMTP_PASSWORD": "s3cret"}])
def test_an_smtp_ca_file_is_accepted_where_tls_is_required(monkeypatch, tmp_path, env):
    ca = certificate_files(tmp_path)["ca"]
    monkeypatch.setenv("SMTP_SSL_CAFILE", ca)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)

    assert str(load_settings().smtp_ssl_cafile) == ca


@pytest.mark.parametrize("value", ["JSON", "Json", "TEXT"])
def test_log_format_is_read_in_any_case_as_log_level_is(monkeypatch, value):
    monkeypatch.setenv("LOG_FORMAT", value)

    assert load_settings().log_format == value.lower()
