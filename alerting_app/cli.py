"""The `alerting-app` command: Faust's CLI bound to our app, plus `migrate`, `create-topics` and `up`.

`alerting-app worker|agents|tables|send|models` are Faust's own commands; `worker` additionally
refuses to start until the services it needs are configured.
"""
from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import asyncpg
from aiokafka.errors import KafkaError
import click
from faust.cli import AppCommand, option
from faust.cli.worker import worker as FaustWorkerCommand

import agents  # noqa: F401  registers the agents on the app
import web  # noqa: F401  registers the web views on the app
from alerting_app import kafka_admin, load
from alerting_app.app import app, settings
from alerting_app.embedded import EmbeddedServiceError
from alerting_app.migrate import MigrationError, apply_migrations
from alerting_app.seed import MIXES
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


@app.command(
    option("--clients", type=int, default=100, show_default=True, help="number of clients"),
    option("--rules-per-client", type=int, default=288, show_default=True),
    option("--mix", type=click.Choice(MIXES), default="realistic", show_default=True,
           help="realistic: 1-10 matching clients per generated alert; worst: every client matches"),
    option("--webhook-url", default=None, help="give every rule a webhook endpoint with this URL"),
    base=_ForegroundCommand,
)
def seed(clients: int, rules_per_client: int, mix: str, webhook_url: str | None) -> int:
    """Create many clients and rules (and their rule.changed events), for demos and benchmarks."""
    report = asyncio.run(load.seed_database(_required(settings.database_url, "DATABASE_URL"), clients=clients,
                                            rules_per_client=rules_per_client, mix=mix, webhook_url=webhook_url))
    print(f"seeded {report.clients} clients, {report.rules} rules, {report.endpoints} endpoints "
          f"in {report.seconds:.1f}s; the workers receive the rules through rule.changed")
    return 0


@app.command(
    option("--count", type=int, default=1000, show_default=True, help="how many alerts"),
    option("--rate", type=float, default=0, show_default=True, help="alerts per second; 0: as fast as possible"),
    base=_ForegroundCommand,
)
def produce_alerts(count: int, rate: float) -> int:
    """Send generated alerts (over the seeded sources and names) to alerts.new."""
    sent, seconds = asyncio.run(load.produce_alerts(
        _required(settings.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS"), count=count, rate=rate))
    print(f"sent {sent} alerts in {seconds:.2f}s ({sent / seconds:,.0f}/s)")
    return 0


@app.command(base=_ForegroundCommand)
def republish_rules() -> int:
    """Queue every rule in Postgres for rule.changed (after the topic was recreated or emptied)."""
    count = asyncio.run(load.republish(_required(settings.database_url, "DATABASE_URL")))
    print(f"queued {count} rules for rule.changed; a running worker relays them")
    return 0


def main() -> None:
    app.main()
