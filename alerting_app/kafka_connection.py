"""Where and how every Kafka client of ours connects: plaintext, or TLS (KAFKA_SECURITY_PROTOCOL=SSL).

Faust's own consumer and producer get the TLS context as its `broker_credentials`
(alerting_app/app.py); our other clients (the replicas' consumers, topic creation, probes, topic
inspection, the load generator) take a `Broker`: a bootstrap string (plaintext, as tests and the
embedded broker use) or a `KafkaConnection`, built once from the settings. `client_args` turns
either into aiokafka's keyword arguments, so no client can be created without the TLS settings
by accident of a forgotten parameter.

TLS covers Amazon MSK's TLS listener (port 9094) and any Kafka with an SSL listener: the broker's
certificate is checked against KAFKA_SSL_CAFILE (default: the system's trusted CAs, which include
the Amazon roots MSK's certificates chain to), with its host name; KAFKA_SSL_CERTFILE and
KAFKA_SSL_KEYFILE add a client certificate (MSK's mutual TLS). SASL is not supported.
"""
from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.helpers import create_ssl_context

if TYPE_CHECKING:
    from alerting_app.settings import Settings


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap_servers: str
    ssl_context: ssl.SSLContext | None = None  # None: plaintext


Broker = str | KafkaConnection


def client_args(broker: Broker) -> dict[str, Any]:
    """aiokafka's connection arguments (bootstrap_servers, and the TLS ones) for `broker`."""
    if isinstance(broker, str):
        return {"bootstrap_servers": broker}
    args: dict[str, Any] = {"bootstrap_servers": broker.bootstrap_servers}
    if broker.ssl_context is not None:
        args.update(security_protocol="SSL", ssl_context=broker.ssl_context)
    return args


@functools.lru_cache(maxsize=8)
def tls_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """The client TLS context; raises ssl.SSLError or OSError for a file that is missing or not PEM.

    One per set of files for the process (a context serves any number of connections): the
    settings' check, Faust, the replicas and every readiness probe share it instead of each loading
    the CA bundle again. Certificates replaced on disk are read at the next start.
    """
    return create_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)


def tls_context_of(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol != "SSL":
        return None
    return tls_context(*(str(path) if path else None for path in
                         (settings.kafka_ssl_cafile, settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)))


def kafka_connection(settings: Settings) -> KafkaConnection:
    """The settings' broker, with the settings' TLS."""
    if settings.kafka_bootstrap_servers is None:
        raise ValueError("KAFKA_BOOTSTRAP_SERVERS is not set")
    return KafkaConnection(settings.kafka_bootstrap_servers, tls_context_of(settings))
