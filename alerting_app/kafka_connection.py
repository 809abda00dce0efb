"""Where and how every Kafka client of ours connects: plaintext, TLS (KAFKA_SECURITY_PROTOCOL=SSL),
or a SASL login, with TLS (SASL_SSL) or without (SASL_PLAINTEXT).

Faust's own consumer and producer get the TLS context and the login as its `broker_credentials`
(`faust_credentials`, alerting_app/app.py); our other clients (the replicas' consumers, topic
creation, probes, topic inspection, the load generator) take a `Broker`: a bootstrap string
(plaintext, as tests and the embedded broker use) or a `KafkaConnection`, built once from the
settings. `client_args` turns either into aiokafka's keyword arguments, so no client can be created
without the TLS or SASL settings by accident of a forgotten parameter.

TLS covers Amazon MSK's TLS listener (port 9094) and any Kafka with an SSL listener: the broker's
certificate is checked against KAFKA_SSL_CAFILE (default: the system's trusted CAs, which include
the Amazon roots MSK's certificates chain to), with its host name; KAFKA_SSL_CERTFILE and
KAFKA_SSL_KEYFILE add a client certificate (MSK's mutual TLS). SASL covers MSK's SCRAM listener
(SASL_SSL, SCRAM-SHA-512, port 9096) and any Kafka with SCRAM-SHA-256/512 or PLAIN logins, and
MSK's IAM login (SASL_SSL, AWS_MSK_IAM, port 9098): an OAUTHBEARER token that AWS's signer
(aws-msk-iam-sasl-signer-python) makes from the environment's AWS credentials, an ECS task's role.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust
from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

if TYPE_CHECKING:
    from alerting_app.settings import Settings


@dataclass(frozen=True)
class SaslLogin:
    mechanism: str  # SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN
    username: str
    password: str = field(repr=False)  # kept out of logs and tracebacks


class MskIamToken(AbstractTokenProvider):
    """MSK's IAM login: a token signed with the AWS credentials of the environment, at each connection
    (a token is valid 15 minutes; a connection signs in once)."""

    def __init__(self, region: str) -> None:
        self.region = region

    async def token(self) -> str:
        # Imported here: boto3 takes 0.4 s to import, which no command without this login should pay.
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

        # Signing may first fetch credentials (an ECS task's role, over HTTP): off the event loop.
        token, _expires_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token, self.region)
        return token

    def __repr__(self) -> str:
        return f"MskIamToken(region={self.region!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MskIamToken) and other.region == self.region

    def __hash__(self) -> int:
        return hash(self.region)


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap_servers: str
    ssl_context: ssl.SSLContext | None = None  # None: no TLS
    sasl: SaslLogin | MskIamToken | None = None  # None: no login
    # How long each request waits for the broker's answer, the bootstrap's connection and first
    # metadata request included (each address in turn); None: aiokafka's own, 40 s.
    request_timeout_s: float | None = None


Broker = str | KafkaConnection


def client_args(broker: Broker) -> dict[str, Any]:
    """aiokafka's connection arguments (bootstrap_servers, and the TLS and SASL ones) for `broker`."""
    if isinstance(broker, str):
        return {"bootstrap_servers": broker}
    args: dict[str, Any] = {"bootstrap_servers": broker.bootstrap_servers}
    if broker.request_timeout_s is not None:
        args["request_timeout_ms"] = int(broker.request_timeout_s * 1000)
    if broker.ssl_context is not None:
        args.update(security_protocol="SSL", ssl_context=broker.ssl_context)
    if isinstance(broker.sasl, MskIamToken):
        args.update(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=broker.sasl)
    elif broker.sasl is not None:
        args.update(security_protocol="SASL_SSL" if broker.ssl_context is not None else "SASL_PLAINTEXT",
                    sasl_mechanism=broker.sasl.mechanism, sasl_plain_username=broker.sasl.username,
                    sasl_plain_password=broker.sasl.password)
    return args


class EncryptedKey(OSError):
    """KAFKA_SSL_KEYFILE needs a pass phrase, which no setting gives."""


def _no_pass_phrase() -> str:
    # Without a password callback OpenSSL asks for the pass phrase on the terminal: every command
    # (even `alerting-app agents`) waited at "Enter PEM pass phrase:", and without a terminal the
    # key was refused with "[Errno 22] Invalid argument". Called only for an encrypted key.
    raise EncryptedKey("the key is encrypted (it needs a pass phrase, which no setting gives): "
                       "give the key unencrypted, in a file only the worker can read")


@functools.lru_cache(maxsize=8)
def tls_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """The client TLS context; raises ssl.SSLError or OSError for a file that is missing or not PEM,
    and EncryptedKey for a key that needs a pass phrase.

    One per set of files for the process (a context serves any number of connections): the
    settings' check, Faust, the replicas and every readiness probe share it instead of each loading
    the CA bundle again. Certificates replaced on disk are read at the next start.
    """
    context = create_ssl_context(cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile, password=_no_pass_phrase)
    return context


def tls_context_of(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return tls_context(*(str(path) if path else None for path in
                         (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)))


def sasl_login_of(settings: Settings) -> SaslLogin | MskIamToken | None:
    if not settings.kafka_security_protocol.startswith("SASL_"):
        return None
    if settings.kafka_sasl_mechanism == "AWS_MSK_IAM":
        assert settings.msk_region  # the settings check it
        return MskIamToken(settings.msk_region)
    assert settings.kafka_sasl_username and settings.kafka_sasl_password  # the settings check it
    return SaslLogin(settings.kafka_sasl_mechanism, settings.kafka_sasl_username,
                     settings.kafka_sasl_password.get_secret_value())


def kafka_connection(settings: Settings, bootstrap_servers: str | None = None, *,
                     request_timeout_s: float | None = None) -> KafkaConnection:
    """The settings' broker (or `bootstrap_servers`), with the settings' TLS and SASL login."""
    bootstrap_servers = bootstrap_servers or settings.kafka_bootstrap_servers
    if bootstrap_servers is None:
        raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set")
    return KafkaConnection(bootstrap_servers, tls_context_of(settings), sasl_login_of(settings), request_timeout_s)


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's `broker_credentials` for the settings: what `client_args` gives our own clients."""
    tls, login = tls_context_of(settings), sasl_login_of(settings)
    if isinstance(login, MskIamToken):
        return faust.OAuthCredentials(oauth_cb=login, ssl_context=tls)
    if login is not None:
        return faust.SASLCredentials(username=login.username, password=login.password, ssl_context=tls,
                                     mechanism=login.mechanism)
    return faust.SSLCredentials(tls) if tls is not None else None
