"""The `alerting-app` command: Faust's CLI bound to our app, plus `migrate`, `create-topics` and `up`.

`alerting-app worker|agents|tables|send|models` are Faust's own commands; `worker` additionally
refuses to start until the services it needs are configured.
"""
from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import asyncpg
from aiokafka.errors import KafkaError
from faust.cli import AppCommand
from faust.cli.worker import worker as FaustWorkerCommand

import agents  # noqa: F401  registers the agents on the app
import web  # noqa: F401  registers the web views on the app
from alerting_app import kafka_admin
from alerting_app.app import app, settings
from alerting_app.embedded import EmbeddedServiceError
from alerting_app.migrate import MigrationError, apply_migrations
from alerting_app.settings import ConfigurationError, require_services
from alerting_app.up import run_up


class worker(FaustWorkerCommand):  # noqa: N801  the class name is the command name; it replaces Faust's
    """Start a worker: the agents and the web API on WEB_PORT."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        require_services(settings)
        super().__call__(*args, **kwargs)


class _ForegroundCommand(AppCommand):
    """A command that runs outside Faust's worker loop: it owns its child processes and signals."""

    abstract: ClassVar[bool] = True  # Faust registers subclasses only

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            code = self.run(*args, **kwargs)
        except (OSError, KafkaError, asyncpg.PostgresError, MigrationError, EmbeddedServiceError) as exc:
            # A service that cannot be reached or a refused migration is a message, not a traceback.
            raise SystemExit(f"{self.__class__.__name__} failed: {exc}") from None
        raise SystemExit(code)


def _required(value: Any, variable: str) -> Any:
    if value is None:
        raise ConfigurationError(f"Missing configuration: {variable} must be set for this command.")
    return value


@app.command(base=_ForegroundCommand)
def migrate() -> int:
    """Apply the migrations/*.sql files not applied yet (recorded in schema_migrations)."""
    applied = asyncio.run(apply_migrations(_required(settings.database_url, "DATABASE_URL")))
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


@app.command(base=_ForegroundCommand)
def create_topics() -> int:
    """Create the pipeline and dead-letter topics with TOPIC_PARTITIONS partitions."""
    report = asyncio.run(kafka_admin.create_topics(
        _required(settings.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS"),
        settings.topic_partitions,
        settings.topic_replication_factor,
    ))
    print(f"created: {', '.join(report.created) or '-'}\nalready there: {', '.join(report.existing) or '-'}")
    if report.mismatched:
        raise SystemExit(report.mismatch_message(settings.topic_partitions))
    return 0


@app.command(base=_ForegroundCommand)
def up() -> int:
    """Run everything locally: embedded Kafka/Postgres/Redis for unset URLs, migrations, topics, a worker."""
    return run_up(settings)


def main() -> None:
    app.main()
