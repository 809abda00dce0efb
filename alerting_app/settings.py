"""Configuration, read from the environment once and validated at start-up.

A bad value stops the process with a message that names the variable; nothing is
discovered half-way through processing. The three service URLs may be left unset:
`alerting-app up` then starts embedded services, while `alerting-app worker`
refuses to start without them (see `require_services`).
"""
from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from alerting_app.healthcheck import spelling_conflict, spellings
from alerting_app.service_urls import check_postgres_url, check_redis_url

_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def _kafka_servers(value: str) -> str:
    servers = [s.strip() for s in value.split(",")]
    if not servers or any(not _HOST_PORT.match(s) or not 0 < int(s.rsplit(":", 1)[1]) < 65536 for s in servers):
        raise ValueError("must be host:port[,host:port]")
    return ",".join(servers)


def _digits_only(value: object) -> object:
    # As the image's health check reads it (alerting_app/healthcheck.py), which must find the same
    # port: pydantic alone would also take "6066.0", "+6066" or "6_066".
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError("must be a whole number, digits only")
    return value


KafkaServers = Annotated[str, AfterValidator(_kafka_servers)]


def _unset_if_empty(value: object) -> object:
    # VAR= in a compose file or a task definition means "not set", not the current directory.
    return None if isinstance(value, str) and not value.strip() else value


def _default_if_empty(default: str) -> Callable[[object], object]:
    # DATA_DIR= would otherwise be Path(""), the current directory.
    return lambda value: default if isinstance(value, str) and not value.strip() else value


def _stripped_or_unset(value: object) -> object:
    # A token read from a secret store or an env file often ends in a newline, which no
    # Authorization header can carry: kept, it would lock its holder out without a word.
    return (value.strip() or None) if isinstance(value, str) else value


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _listen_address(value: str) -> str:
    """An IP address or a host name; whether this machine has it is checked when the worker starts."""
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        if not _HOST_NAME.match(value):
            raise ValueError("must be an IP address (0.0.0.0, 127.0.0.1, ::) or a host name") from None
        return value
    return value.strip("[]")


def _relay_host(value: str) -> str:
    """A host name or an IP address: aiosmtplib takes the port from SMTP_PORT only, so `host:587` or
    a URL was looked up as a host name at every delivery, and every e-mail failed after its retries."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not value or any(c in value for c in ":/@?# \t\r\n"):
        raise ValueError("must be a host name or an IP address, without a scheme or a port (the port is SMTP_PORT)")
    return value


# A domain (RFC 5321 4.1.2: letters, digits and hyphens between dots) or an address literal
# (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
_HELO_NAME = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                        r"|\[[0-9.]+\]|\[IPv6:[0-9A-Fa-f:.]+\])$")


def _helo_name(value: str | None) -> str | None:
    """The name the relay is greeted with (EHLO); refused at start rather than at every email."""
    if value is not None and not _HELO_NAME.match(value):
        raise ValueError("must be a host name (letters, digits and hyphens between dots) or an address literal "
                         "such as [192.0.2.1]: the name the SMTP relay is greeted with (EHLO)")
    return value


def _sender_address(value: str) -> str:
    """An address with a local part and a domain, bare or with a display name. Without one, every
    e-mail was offered with it as MAIL FROM, which relays that check it (SES: 501) refuse, and every
    e-mail failed after its retries."""
    local, at, domain = parseaddr(value)[1].rpartition("@")
    if not (local and at and domain) or any(character in value for character in "\r\n"):
        raise ValueError("must be an e-mail address: alerts@example.com, or Alerts <alerts@example.com>")
    return value


def _not_the_smtps_port(value: int) -> int:
    # 465 is SMTPS, TLS from the first byte; we speak SMTP and upgrade with STARTTLS. Each side
    # waited for the other (our greeting, their TLS handshake) until SMTP_TIMEOUT_S, and every
    # e-mail failed after its retries.
    if value == 465:
        raise ValueError("465 is the port of SMTPS (TLS from the first byte), which is not supported: use the "
                         "relay's STARTTLS port, 587 (or 25), with SMTP_STARTTLS")
    return value


def _sent_alike_by_every_client(value: str) -> str:
    # A header's other characters go as each client encodes them (Python's urllib and requests as
    # Latin-1, curl as the terminal's UTF-8), and the worker reads them as UTF-8: a token holding
    # them answered 401 to `alerting-app api` and Python clients, and 200 to curl.
    if not all(" " <= character <= "~" for character in value):
        raise PydanticCustomError("token_characters", "must be printable ASCII (letters, digits, punctuation, "
                                  "spaces): HTTP clients send other characters in a header differently")
    return value


OptionalFile = Annotated[Path | None, BeforeValidator(_unset_if_empty)]
Token = Annotated[Annotated[str, Field(min_length=16), AfterValidator(_sent_alike_by_every_client)] | None,
                  BeforeValidator(_stripped_or_unset)]
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
_UPPER = BeforeValidator(lambda value: value.strip().upper() if isinstance(value, str) else value)
SecurityProtocol = Annotated[Literal["PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT"], _UPPER]
SaslMechanism = Annotated[Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN", "AWS_MSK_IAM"], _UPPER]
OptionalText = Annotated[str | None, BeforeValidator(_unset_if_empty)]
def _without_final_line_break(value: object) -> object:
    # A password read from a secret file or an env file often ends in a line break, which no
    # password is meant to: kept, every Kafka login or email was refused. Other spaces are kept:
    # they may be the password's own.
    return _unset_if_empty(value.rstrip("\r\n") if isinstance(value, str) else value)


OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_without_final_line_break)]  # shown as ********
# A delivery's Redis claim outlives its send by this much, so that only a dead holder's claim ever
# expires; its lease is made to cover as much right before the send (delivery/lease_fences.py).
CLAIM_MARGIN_S = 5.0
MIN_NOTIFICATION_RETENTION_DAYS = 2
MIN_DELETED_RULE_RETENTION_DAYS = 1
WebPort = Annotated[int, BeforeValidator(_digits_only)]
PostgresUrl = Annotated[str, AfterValidator(check_postgres_url)]
RedisUrl = Annotated[str, AfterValidator(check_redis_url)]

# What a worker runs (`alerting-app worker --roles`, docs/operations.md): each pipeline role is one
# agent (evaluate also keeps the rule replica); `api` alone runs no agent, only the web server.
ROLE_NAMES = ("evaluate", "aggregate", "deliver", "relay", "api")


def roles_of(value: str) -> str:
    """`all`, or a comma-separated subset of ROLE_NAMES, normalised to ROLE_NAMES order."""
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    if names == {"all"}:
        return ",".join(ROLE_NAMES)
    if not names or not names <= set(ROLE_NAMES):
        raise ValueError(f"must be all or a comma-separated list of {', '.join(ROLE_NAMES)}")
    return ",".join(name for name in ROLE_NAMES if name in names)


Roles = Annotated[str, AfterValidator(roles_of)]


def _not_a_relative_folder(value: str) -> str:
    # APP_ID also names the rule store's folder, DATA_DIR/rules/<APP_ID> (tables/rules.py): ".."
    # made it DATA_DIR itself, and discarding that store (a recreated topic) deleted all of DATA_DIR.
    if value in (".", ".."):
        raise ValueError("must not be . or .. (it names a folder under DATA_DIR)")
    return value

# How long the worker's Kafka clients wait for any broker answer (Faust's default, passed to it).
BROKER_REQUEST_TIMEOUT_S = 90.0
# How long the commands' Kafka clients (create-topics, topics, tail, send, produce-alerts, up) wait
# for each broker answer, the connection's first one included: with aiokafka's 40 s a broker that
# takes connections and answers nothing held a command 41 s before it failed. A broker that works
# answers in well under a second, a first metadata request after Tansu starts in a few.
COMMAND_BROKER_TIMEOUT_S = 15.0


class Settings(BaseSettings):
    # env_ignore_empty: VAR= (a compose file's or task definition's way of leaving it out) is not
    # set, for every variable: the default, as the image's health check reads WEB_BIND and WEB_PORT.
    # allow_inf_nan=False: DELIVERY_BACKOFF_INITIAL_S=nan is "not a finite number", not "less than or
    # equal to 3600", which left its reader looking for a value that was too large.
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, env_ignore_empty=True,
                                      allow_inf_nan=False)

    # Empty (`VAR=`) is unset, as for every optional setting: `alerting-app up` then starts one.
    kafka_bootstrap_servers: Annotated[KafkaServers | None, BeforeValidator(_unset_if_empty)] = None
    # PLAINTEXT; SSL: TLS to the brokers, checked against the CA file (default: the system's CAs),
    # optionally with a client certificate; SASL_SSL: the same TLS and a SASL login (MSK's SCRAM
    # listener); SASL_PLAINTEXT: a SASL login without TLS (alerting_app/kafka_connection.py).
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_ssl_cafile: OptionalFile = None
    kafka_ssl_certfile: OptionalFile = None
    kafka_ssl_keyfile: OptionalFile = None
    kafka_sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: OptionalText = None
    kafka_sasl_password: OptionalSecret = None
    # AWS_MSK_IAM signs in with the AWS credentials of the environment (an ECS task's role) for the
    # cluster's region: KAFKA_AWS_REGION, else the task's own (`msk_region`); ECS sets AWS_REGION.
    kafka_aws_region: OptionalText = None
    aws_region: OptionalText = None
    aws_default_region: OptionalText = None
    database_url: Annotated[PostgresUrl | None, BeforeValidator(_unset_if_empty)] = None
    redis_url: Annotated[RedisUrl | None, BeforeValidator(_unset_if_empty)] = None
    admin_token: Token = None
    # A token that may only send alerts (POST /api/v1/alerts), for the monitored systems: they need
    # not hold the admin token, which can delete tenants.
    ingest_token: Token = None

    web_port: WebPort = Field(default=6066, ge=1, le=65535)
    web_bind: ListenAddress = "0.0.0.0"
    topic_partitions: int = Field(default=9, ge=1, le=10_000)
    topic_replication_factor: int = Field(default=1, ge=1, le=10)

    # The Faust application id is also the Kafka consumer group and the prefix of table changelogs.
    # Kafka refuses topic names over 249 characters; the longest we derive from it is
    # "<APP_ID>-notification-groups-changelog", 30 more.
    app_id: Annotated[str, AfterValidator(_not_a_relative_folder)] = Field(
        default="alerting-app", pattern=r"^[A-Za-z0-9._\-]+$", max_length=249 - 30)
    data_dir: Annotated[Path, BeforeValidator(_default_if_empty(".alerting-data"))] = Path(".alerting-data")
    # Exactly these: Faust reads a rocksdb:// URL's path as the table files' name, and an absolute one
    # replaced the folder too (rocksdb://data/tables wrote /tables-0.db), outside DATA_DIR.
    store_url: Literal["rocksdb://", "memory://"] = "rocksdb://"
    # Short rebalance timeouts keep a dev broker (Tansu) joining quickly; Kafka/MSK can use more.
    broker_rebalance_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Kafka refuses sessions shorter than its group.min.session.timeout.ms (6 s by default), and
    # Faust refuses one longer than its request timeout (BROKER_REQUEST_TIMEOUT_S, passed to it).
    broker_session_timeout_s: float = Field(default=10.0, ge=6, le=BROKER_REQUEST_TIMEOUT_S)
    # How long the broker may hold a worker's fetch that found no data: on Tansu, which holds it in
    # full, up to this much per stage hop; Faust alone would fix 1,500 ms (alerting_app/broker_transport.py).
    # 20 gave p99 383 ms vs 993 ms at 100 (docs/performance.md); the price is ~50 empty fetches/s when idle.
    broker_fetch_max_wait_ms: int = Field(default=20, ge=1, le=30_000)
    allow_private_endpoints: bool = False
    log_level: str = Field(default="info", pattern=r"^(?i:debug|info|warning|error)$")
    # json: one JSON object per log line, for log collectors (CloudWatch, Loki); text: for people.
    # Any case, as LOG_LEVEL; kept lower case, which is what the code compares with.
    log_format: Annotated[str, AfterValidator(str.lower)] = Field(default="text", pattern=r"^(?i:text|json)$")
    roles: Roles = Field(default="all", validate_default=True)
    # How long an API request waits for Postgres, per statement and for a connection, before it
    # answers 503 database_unavailable (alerting_app/db.py, api_pool): a frozen server or a network
    # dropping packets keeps the connection open without answering, until TCP gives up minutes later.
    api_database_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Requests per second each client key may make (the admin and ingest tokens are not limited), in
    # bursts of up to API_RATE_BURST, counted across every worker (web/request_limits.py); past it,
    # 429. 0 means unlimited. Far above what a person or a sync script needs: it is there to stop a
    # runaway one from taking the Postgres pool every tenant's calls share.
    api_rate_limit_per_s: float = Field(default=50.0, ge=0, le=100_000)
    api_rate_burst: int = Field(default=500, ge=1, le=1_000_000)
    # Failed authentications (a token that is none of ours) per second each client address may make,
    # in bursts of up to API_FAILED_AUTH_BURST, counted across every worker (web/request_limits.py);
    # past it, every request from that address with a token, any token, answers 429 before its token is
    # looked up, until the allowance refills. A key's own budget above limits one made-up token; this
    # limits a flood of ever new ones. 0 means unlimited.
    api_failed_auth_limit_per_s: float = Field(default=10.0, ge=0, le=100_000)
    api_failed_auth_burst: int = Field(default=100, ge=1, le=1_000_000)
    # How many proxies in front of the workers append the address they were called from to
    # X-Forwarded-For (an ALB: 1): the client address is the N-th from the right. 0 ignores the
    # header, which anyone can write: the address is the connection's own.
    api_trusted_proxies: Annotated[int, BeforeValidator(_digits_only)] = Field(default=0, ge=0, le=10)

    # --- delivery (docs/delivery.md) ---
    # One HTTP request (webhook, Slack), connect to response, before it counts as a retryable failure.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    delivery_max_attempts: int = Field(default=8, ge=1, le=100)
    # Exponential backoff with jitter: after attempt n, initial * 2**(n-1) plus up to `initial` at
    # random, capped at the max; a 429's Retry-After, when longer, is waited instead.
    delivery_backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    delivery_backoff_max_s: float = Field(default=300.0, gt=0, le=86_400)
    # Sends in flight per worker, per endpoint and per client (tenant) per worker: a hanging endpoint
    # holds at most its share, and a tenant whose many endpoints hang at most a quarter of the worker.
    # The SMTP relay, where every tenant's email goes, counts as one endpoint.
    delivery_concurrency: int = Field(default=256, ge=1, le=10_000)
    delivery_endpoint_concurrency: int = Field(default=16, ge=1, le=1_000)
    delivery_client_concurrency: int = Field(default=64, ge=1, le=10_000)
    # Deliveries one worker holds in memory, per endpoint, per client and in all (sending, or waiting
    # for a token or a retry); beyond that they wait in Postgres, so neither one endpoint's backlog
    # nor one tenant's many failing endpoints fill a worker. A rate-limited endpoint's is lower
    # (dispatcher.ENDPOINT_HELD_RATE_S): what its rate sends in 10 s, at least its send slots. So is
    # all email together, the SMTP relay's: what EMAIL_RATE_LIMIT_PER_S sends in 10 s.
    delivery_endpoint_backlog: int = Field(default=1_000, ge=1, le=1_000_000)
    delivery_client_backlog: int = Field(default=5_000, ge=1, le=10_000_000)
    delivery_max_held: int = Field(default=20_000, ge=1, le=10_000_000)
    # A worker renews the leases of the deliveries it holds; a dead worker's expire and any worker
    # resumes them. The sweep also picks up deliveries waiting in Postgres.
    delivery_lease_s: float = Field(default=60.0, ge=1, le=3_600)
    delivery_sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Outcomes are written to Postgres in batches collected for at most this long.
    delivery_record_interval_s: float = Field(default=0.05, gt=0, le=300)
    # How long Redis remembers that a delivery was sent; it must outlive a crash's recovery
    # (a lease) by far, after which Postgres has the record.
    delivery_sent_marker_ttl_s: int = Field(default=3_600, ge=60, le=30 * 86_400)
    # Token bucket per endpoint (an endpoint's own rate_limit_per_s overrides it); 0 means unlimited.
    endpoint_rate_limit_per_s: float = Field(default=100.0, ge=0, le=100_000)
    # Bucket size as seconds of the rate: how large a burst is let through at once.
    endpoint_rate_burst_s: float = Field(default=1.0, gt=0, le=3_600)
    # One bucket for all email, whatever the recipient: what the SMTP relay accepts; 0 means unlimited.
    email_rate_limit_per_s: float = Field(default=10.0, ge=0, le=10_000)

    # --- grouping (docs/grouping.md) ---
    # Alerts one grouped notification lists; the rest are counted in its truncated_alerts.
    group_max_alerts: int = Field(default=100, ge=1, le=1_000)
    # How often each worker closes the groups whose window has passed: how late a group may close.
    group_close_interval_s: float = Field(default=0.5, gt=0, le=60)
    # Settled notifications (with their deliveries and group memberships) older than this are
    # deleted (agents/retention.py); 0 keeps them for ever. It is also the deduplication window:
    # an alert matched again after its notification is gone is notified again.
    notification_retention_days: float = Field(default=30, ge=0, le=3_650)
    # Silences ended longer ago than this are deleted, in Postgres and on every worker (agents/
    # retention.py); 0 keeps them for ever. Alertmanager's default is 5 days too.
    silence_retention_days: float = Field(default=5, ge=0, le=3_650)
    # A deleted rule's deletion is remembered this long after it was made, in Postgres (`deleted_rules`,
    # for republishing) and in every worker's rule replica (agents/retention.py, tables/
    # changelog_replica.py); 0 keeps it for ever.
    deleted_rule_retention_days: float = Field(default=30, ge=0, le=3_650)

    # --- per-tenant quotas (web/quotas.py) ---
    # Every worker holds every rule and every silence (an ended one until retention deletes it),
    # and checks each alert against them: without a bound, one tenant's key could fill every
    # worker's memory and slow every tenant's alerts. Creating past a quota answers 409; the
    # defaults leave room for 35 times the benchmark's 288 rules per tenant.
    max_rules_per_client: int = Field(default=10_000, ge=1, le=1_000_000)
    max_silences_per_client: int = Field(default=1_000, ge=1, le=1_000_000)  # ended ones included
    max_endpoints_per_rule: int = Field(default=20, ge=1, le=1_000)

    # --- email (SMTP via aiosmtplib) ---
    smtp_host: Annotated[str, AfterValidator(_relay_host)] = "localhost"
    smtp_port: Annotated[int, AfterValidator(_not_the_smtps_port)] = Field(default=25, ge=1, le=65535)
    # Unset (the default): STARTTLS whenever the relay offers it, and required once there is a
    # login, so a password never crosses in clear; true: always required; false: never (a relay
    # on the same host, say), the login included.
    smtp_starttls: Annotated[bool | None, BeforeValidator(_unset_if_empty)] = None
    # PEM CA certificates to check the relay's certificate against when TLS is required (a login,
    # or SMTP_STARTTLS=true): a relay with a private CA. Default: the system's CAs.
    smtp_ssl_cafile: OptionalFile = None
    # Empty (SMTP_USER= in a compose file) is "not set": no login, not a login with empty credentials.
    smtp_user: OptionalText = None
    smtp_password: OptionalSecret = None
    smtp_from: Annotated[str, AfterValidator(_sender_address)] = "alerting@localhost"
    smtp_timeout_s: float = Field(default=30.0, gt=0, le=300)
    # The name the relay is greeted with (EHLO). Unset: this machine's name (socket.getfqdn()), which
    # in a container is often a bare container id that relays checking it refuse (Postfix's
    # reject_non_fqdn_helo_hostname: "504 Helo command rejected: need fully-qualified hostname",
    # told at RCPT: every email is retried naming this setting, channels/email.py _REFUSED_US).
    smtp_helo_name: Annotated[str | None, BeforeValidator(_unset_if_empty), AfterValidator(_helo_name)] = None

    @model_validator(mode="after")
    def _kafka_connection_can_be_made(self) -> "Settings":
        protocol = self.kafka_security_protocol
        files = {"KAFKA_SSL_CAFILE": self.kafka_ssl_cafile, "KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
                 "KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile}
        login = {"KAFKA_SASL_USERNAME": self.kafka_sasl_username, "KAFKA_SASL_PASSWORD": self.kafka_sasl_password}
        if self.kafka_sasl_mechanism == "AWS_MSK_IAM":
            if protocol != "SASL_SSL":
                raise ValueError(f"KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs KAFKA_SECURITY_PROTOCOL=SASL_SSL (not "
                                 f"{protocol}): MSK's IAM login is made over TLS")
            if any(login.values()):
                raise ValueError(f"{', '.join(name for name, value in login.items() if value)} set, but "
                                 "KAFKA_SASL_MECHANISM=AWS_MSK_IAM signs in with the AWS credentials of the "
                                 "environment, not a user and password")
            if self.msk_region is None:
                raise ValueError("KAFKA_SASL_MECHANISM=AWS_MSK_IAM needs the cluster's region: KAFKA_AWS_REGION "
                                 "(or AWS_REGION, which ECS sets, or AWS_DEFAULT_REGION)")
        elif protocol.startswith("SASL_"):
            if not all(login.values()):
                raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME and "
                                 "KAFKA_SASL_PASSWORD")
        elif any(login.values()):
            raise ValueError(f"{', '.join(name for name, value in login.items() if value)} set, but "
                             f"KAFKA_SECURITY_PROTOCOL is {protocol}: set it to SASL_SSL to log in with SASL")
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            if any(files.values()):
                raise ValueError(f"{', '.join(name for name, path in files.items() if path)} set, but "
                                 f"KAFKA_SECURITY_PROTOCOL is {protocol}: set it to SSL or SASL_SSL to use TLS")
            if protocol == "PLAINTEXT":
                return self
        if self.kafka_bootstrap_servers is None:
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_BOOTSTRAP_SERVERS: the embedded "
                             "broker that `up` starts otherwise speaks plaintext, with no login")
        if protocol == "SASL_PLAINTEXT":
            return self
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE are set together or not at all")
        # Loaded now, so a missing or unreadable file stops start-up with its variable named
        # instead of failing the first connection.
        from alerting_app.kafka_connection import tls_context

        try:
            tls_context(str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None, None, None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"KAFKA_SSL_CAFILE ({self.kafka_ssl_cafile}) cannot be loaded as CA certificates: "
                             f"{exc}") from None
        if self.kafka_ssl_certfile is not None:
            try:
                tls_context(None, str(self.kafka_ssl_certfile), str(self.kafka_ssl_keyfile))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"KAFKA_SSL_CERTFILE ({self.kafka_ssl_certfile}) and KAFKA_SSL_KEYFILE "
                                 f"({self.kafka_ssl_keyfile}) cannot be loaded as a certificate and its key: "
                                 f"{exc}") from None
        return self

    @property
    def msk_region(self) -> str | None:
        """The region MSK's IAM login signs for: the first of KAFKA_AWS_REGION, AWS_REGION and
        AWS_DEFAULT_REGION that is set (AWS's region names are lower case)."""
        region = self.kafka_aws_region or self.aws_region or self.aws_default_region
        return region.strip().lower() if region else None

    @model_validator(mode="after")
    def _settings_agree_with_each_other(self) -> "Settings":
        if self.ingest_token is not None and self.ingest_token == self.admin_token:
            raise ValueError("INGEST_TOKEN must differ from ADMIN_TOKEN: it is the token that may only send alerts")
        if (self.smtp_user is None) != (self.smtp_password is None):
            raise ValueError("SMTP_USER and SMTP_PASSWORD are set together or not at all")
        if self.smtp_ssl_cafile is not None:
            try:
                ssl.create_default_context(cafile=str(self.smtp_ssl_cafile))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"SMTP_SSL_CAFILE ({self.smtp_ssl_cafile}) cannot be loaded as CA certificates: "
                                 f"{exc}") from None
            # The relay's certificate is checked only where TLS is required: set otherwise, the file
            # was never read, and its operator believed the relay checked when nothing was.
            if self.smtp_starttls is False or (self.smtp_starttls is None and self.smtp_user is None):
                raise ValueError("SMTP_SSL_CAFILE set, but no relay certificate is checked: "
                                 + ("SMTP_STARTTLS is false" if self.smtp_starttls is False else
                                    "with SMTP_STARTTLS unset and no SMTP_USER, TLS is opportunistic (unchecked)")
                                 + "; set SMTP_STARTTLS=true to require TLS and check it")
        if self.delivery_backoff_initial_s > self.delivery_backoff_max_s:
            raise ValueError("DELIVERY_BACKOFF_INITIAL_S must not exceed DELIVERY_BACKOFF_MAX_S")
        # Leases are renewed once per sweep loop, when a third of the lease has passed: a lease
        # shorter than three sweeps expires under a live worker, and another worker sends again.
        if self.delivery_lease_s < 3 * self.delivery_sweep_interval_s:
            raise ValueError(
                f"DELIVERY_LEASE_S ({self.delivery_lease_s:g}) must be at least 3 x DELIVERY_SWEEP_INTERVAL_S "
                f"({self.delivery_sweep_interval_s:g}): leases are renewed once per sweep"
            )
        # The sent marker covers a crash between sending and recording until the lease expires and
        # another worker resumes the delivery: a marker gone before that lets it send again.
        if self.delivery_sent_marker_ttl_s < self.delivery_lease_s:
            raise ValueError(
                f"DELIVERY_SENT_MARKER_TTL_S ({self.delivery_sent_marker_ttl_s}) must be at least "
                f"DELIVERY_LEASE_S ({self.delivery_lease_s:g}): the marker must outlive a lease"
            )
        # A send's lease is made to cover its timeout plus CLAIM_MARGIN_S (delivery/lease_fences.py),
        # however short DELIVERY_LEASE_S: the marker must outlive that lease too.
        longest_cover_s = max(self.webhook_timeout_s, self.smtp_timeout_s) + CLAIM_MARGIN_S
        if self.delivery_sent_marker_ttl_s < longest_cover_s:
            raise ValueError(
                f"DELIVERY_SENT_MARKER_TTL_S ({self.delivery_sent_marker_ttl_s}) must be at least the longest "
                f"send timeout (WEBHOOK_TIMEOUT_S {self.webhook_timeout_s:g}, SMTP_TIMEOUT_S "
                f"{self.smtp_timeout_s:g}) plus {CLAIM_MARGIN_S:g} s: a send's lease lasts that long, and the "
                f"marker must outlive a lease"
            )
        # Two days at least. A redelivered alerts.matched (minutes behind at worst) must still find
        # its notification, or it would be notified twice; and a closed group can stay in its
        # client's table value while another group of the client is open (a window is at most a
        # day: contracts.GroupWindow): the closer takes a group whose notification row is gone for
        # one never closed, and would send it again.
        if 0 < self.notification_retention_days < MIN_NOTIFICATION_RETENTION_DAYS:
            raise ValueError(
                f"NOTIFICATION_RETENTION_DAYS ({self.notification_retention_days:g}) must be 0 (keep for ever) "
                f"or at least {MIN_NOTIFICATION_RETENTION_DAYS}: it is also how long an alert is remembered as "
                "notified, and a closed group as closed"
            )
        # A day at least: a replica's tombstone must outlast by far the few minutes in which an older
        # upsert of the rule can still reach the topic after its delete (a relay that lost its lock
        # with sends in flight: tables/changelog_replica.py).
        if 0 < self.deleted_rule_retention_days < MIN_DELETED_RULE_RETENTION_DAYS:
            raise ValueError(
                f"DELETED_RULE_RETENTION_DAYS ({self.deleted_rule_retention_days:g}) must be 0 (keep for ever) "
                f"or at least {MIN_DELETED_RULE_RETENTION_DAYS}: a late older version of a deleted rule must "
                "still find its deletion remembered"
            )
        return self


class ConfigurationError(SystemExit):
    """Start-up stops with a readable message naming each bad variable."""


_SECRETS = ("ADMIN_TOKEN", "INGEST_TOKEN", "SMTP_PASSWORD", "KAFKA_SASL_PASSWORD")
# pydantic error types whose message states the rule broken, never the value: "String should have at
# least 16 characters". Without it, a refused secret said only "a value that is not shown".
_MESSAGES_WITHOUT_THE_VALUE = frozenset({"string_too_short", "string_too_long", "string_pattern_mismatch",
                                         "string_type", "token_characters"})
# Up to the last '@': a password may hold another (not URL-encoded, which service_urls.py refuses).
_URL_PASSWORD = re.compile(r"(://[^:/@]*:).*@")
# A user holding '@' (Azure's `user@server`), its password running to an '@' before any '/' or space:
# `user@host:5432/db` has none, and a line naming several URLs keeps its hosts.
_URL_PASSWORD_OF_AN_AT_USER = re.compile(r"(://[^:/@\s]*@[^:/@\s]*:)[^/\s]*@")
_QUERY_PASSWORD = re.compile(r"(password=)[^&#]*")  # postgresql://db/alerts?user=app&password=...


def without_passwords(text: str) -> str:
    """`text` with the passwords of the URLs in it (`user:***@`, `password=***`) left out."""
    text = _URL_PASSWORD_OF_AN_AT_USER.sub(r"\1***@", _URL_PASSWORD.sub(r"\1***@", text))
    return _QUERY_PASSWORD.sub(r"\1***", text)


def _shown(variable: str, value: object) -> str:
    """A bad value as the error shows it: secrets, and passwords inside URLs, left out of logs."""
    if variable in _SECRETS:
        return "a value that is not shown"
    if isinstance(value, str):
        value = without_passwords(value)
    return repr(value)


def _spelling_conflicts(environ: Mapping[str, str]) -> list[str]:
    """A line for each setting given in two spellings with different values (healthcheck.py)."""
    lines = []
    for name in Settings.model_fields:
        variable = name.upper()
        conflict = spelling_conflict(name, spellings(environ, name),
                                     None if variable in _SECRETS else lambda value: _shown(variable, value))
        if conflict:
            lines.append(f"  {conflict}")
    return lines


def load_settings() -> Settings:
    lines = _spelling_conflicts(os.environ)
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            if error["loc"]:
                variable = str(error["loc"][0]).upper()
                # The message may quote part of the value too (a URL's database, say); for a secret it is
                # shown only where pydantic's message never holds the value (a length, a pattern).
                # Our validators' own message, without the "Value error, " pydantic puts before it.
                text = error["msg"].removeprefix("Value error, ")
                if variable not in _SECRETS:
                    message = without_passwords(text)
                elif error["type"] in _MESSAGES_WITHOUT_THE_VALUE:
                    message = text
                else:
                    message = "a value that is not shown"
                lines.append(f"  {variable}: {message} (got {_shown(variable, error.get('input'))})")
            else:
                # A check across settings: its message names the variables, and its input would be
                # every setting given, secrets included.
                lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
    if lines:
        raise ConfigurationError("Invalid configuration:\n" + "\n".join(lines)) from None
    return settings


def require_services(settings: Settings) -> None:
    """A worker needs real services; say which variables are missing instead of failing later."""
    missing = [
        name.upper()
        for name in ("kafka_bootstrap_servers", "database_url", "redis_url", "admin_token")
        if getattr(settings, name) is None
    ]
    if missing:
        raise ConfigurationError(
            "Missing configuration: " + ", ".join(missing) + " must be set "
            "(or use `alerting-app up`, which starts embedded services when they are not)."
        )
