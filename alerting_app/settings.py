"""Configuration, read from the environment once and validated at start-up.

A bad value stops the process with a message that names the variable; nothing is
discovered half-way through processing. The three service URLs may be left unset:
`alerting-app up` then starts embedded services, while `alerting-app worker`
refuses to start without them (see `require_services`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def _kafka_servers(value: str) -> str:
    servers = [s.strip() for s in value.split(",")]
    if not servers or any(not _HOST_PORT.match(s) or not 0 < int(s.rsplit(":", 1)[1]) < 65536 for s in servers):
        raise ValueError("must be host:port[,host:port]")
    return ",".join(servers)


def _url_with_scheme(*schemes: str):
    def check(value: str) -> str:
        if not value.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
        return value

    return check


KafkaServers = Annotated[str, AfterValidator(_kafka_servers)]
PostgresUrl = Annotated[str, AfterValidator(_url_with_scheme("postgresql", "postgres"))]
RedisUrl = Annotated[str, AfterValidator(_url_with_scheme("redis", "rediss", "unix"))]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: KafkaServers | None = None
    database_url: PostgresUrl | None = None
    redis_url: RedisUrl | None = None
    admin_token: str | None = Field(default=None, min_length=16)

    web_port: int = Field(default=6066, ge=1, le=65535)
    web_bind: str = "0.0.0.0"
    topic_partitions: int = Field(default=9, ge=1, le=10_000)
    topic_replication_factor: int = Field(default=1, ge=1, le=10)

    # The Faust application id is also the Kafka consumer group and the prefix of table changelogs.
    app_id: str = Field(default="alerting-app", pattern=r"^[A-Za-z0-9._\-]+$")
    data_dir: Path = Path(".alerting-data")
    store_url: str = Field(default="rocksdb://", pattern=r"^(rocksdb|memory)://")
    # Short rebalance timeouts keep a dev broker (Tansu) joining quickly; Kafka/MSK can use more.
    broker_rebalance_timeout_s: float = Field(default=10.0, gt=0, le=600)
    broker_session_timeout_s: float = Field(default=10.0, gt=0, le=600)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    allow_private_endpoints: bool = False
    log_level: str = Field(default="info", pattern=r"^(?i:debug|info|warning|error)$")


class ConfigurationError(SystemExit):
    """Start-up stops with a readable message naming each bad variable."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            variable = str(error["loc"][0]).upper() if error["loc"] else "?"
            lines.append(f"  {variable}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigurationError("Invalid configuration:\n" + "\n".join(lines)) from None


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
