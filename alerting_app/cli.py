"""The `alerting-app` command: Faust's CLI bound to our app, plus `migrate`, `create-topics`, `up`,
`republish-rules`, `republish-silences`, `topics`, `tail` and the load commands.

`alerting-app worker|agents|tables|send|models` are Faust's own commands; `worker` additionally
refuses to start until the services it needs are configured, waits until they answer, and runs
only the agents of its `--roles`.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from typing import IO, Any, ClassVar

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
import click
from click.core import ParameterSource
from faust.cli import AppCommand, argument, option
from faust.cli.reset import reset as FaustResetCommand
from faust.cli.send import send as FaustSendCommand
from faust.cli.worker import worker as FaustWorkerCommand
from faust.serializers.codecs import codecs, get_codec

import agents  # noqa: F401  registers the agents on the app
from agents.rule_outbox import republish_all_silences
import web  # noqa: F401  registers the web views on the app
import web.operations  # noqa: F401  registers /healthz, /readyz and /metrics
from web.endpoints import checked_value
from web.errors import ValidationFailed
from alerting_app import api_call, kafka_admin, load, topic_inspection
from alerting_app.app import app, settings
from alerting_app.data_dir import create_data_dir, hold_data_dir_lock
from alerting_app.embedded import EmbeddedServiceError, lock_holder
from alerting_app.gc_tuning import tune_garbage_collector
from alerting_app.json_logs import faust_logging_config, log_to_stderr
from alerting_app.kafka_connection import KafkaConnection, client_args, kafka_connection
from alerting_app.migrate import MigrationError, apply_migrations
from alerting_app.roles import apply_roles, parse_roles
from alerting_app.seed import (MAX_CLIENTS as seed_clients_limit, MAX_RULES as seed_total_limit,
                                MAX_RULES_PER_CLIENT as seed_rules_limit, MIXES, SEVERITIES)
from alerting_app.settings import (COMMAND_BROKER_TIMEOUT_S, ROLE_NAMES, ConfigurationError, require_services,
                                   roles_of)
from alerting_app.startup_wait import check_before_waiting, wait_before_start
from alerting_app.up import run_up


class worker(FaustWorkerCommand):  # noqa: N801  the class name is the command name; it replaces Faust's
    """Start a worker: the agents of its roles (default: all) and the web server on WEB_PORT.

    It first waits for the broker, Postgres and Redis (alerting_app/startup_wait.py): Faust itself
    exits when the broker is not there yet.
    """

    options = FaustWorkerCommand.options + [
        option("--roles", default=None, show_default=False,
               help=f"what this worker runs: all, or some of {', '.join(ROLE_NAMES)} (default: ROLES, else all)"),
    ]

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_datadir_option(self.ctx)
        _refuse_web_options(self.ctx)
        require_services(settings)
        roles = self.kwargs.pop("roles", None)
        if roles is not None:
            try:
                settings.roles = roles_of(roles)
            except ValueError as exc:
                raise ConfigurationError(f"Invalid configuration:\n  --roles: {exc} (got {roles!r})") from None
        if not _loglevel_given(self.ctx):
            self.loglevel = settings.log_level.upper()
        log_to_stderr(settings.log_format, self.loglevel)
        if settings.log_format == "json":
            app.conf.logging_config = faust_logging_config(settings.log_format)
        apply_roles(app, parse_roles(settings.roles))
        # Only the worker keeps state on disk; Faust creates its folder inside DATA_DIR, not DATA_DIR.
        create_data_dir(settings.data_dir)
        _hold_data_dir()
        check_before_waiting(settings)
        wait_before_start(settings, kafka_admin.topic_names(), kafka_admin.changelog_topic_names(),
                          kafka_admin.faust_topic_names())
        tune_garbage_collector()
        super().__call__(*args, **kwargs)

    def on_worker_created(self, worker: Any) -> None:
        if settings.log_format == "text":  # Faust's banner is a table: not for a JSON log stream
            super().on_worker_created(worker)


# The lock on DATA_DIR, held while this worker runs (the file stays open until the process ends).
_data_dir_lock: IO | None = None


def _hold_data_dir() -> None:
    """One worker per DATA_DIR. A second one found the RocksDB stores (its rule replica's, Faust's
    tables') locked by the first: it retried for ever without becoming ready, and the partitions it
    was assigned were not processed."""
    global _data_dir_lock
    _data_dir_lock = _worker_lock_on_data_dir()
    if _data_dir_lock is None:
        raise ConfigurationError(f"Invalid configuration:\n  DATA_DIR: {_data_dir_in_use('another worker')}; "
                                 "give each worker a DATA_DIR of its own")


def _worker_lock_on_data_dir() -> IO | None:
    """The lock a worker holds on DATA_DIR while it runs, held now; None while another process holds it."""
    return hold_data_dir_lock(settings.data_dir, ".worker.lock")


def _data_dir_in_use(holder_is: str) -> str:
    """`<DATA_DIR> is in use by <holder_is> (pid N)`, the worker holding the folder's lock."""
    holder = lock_holder(settings.data_dir / ".worker.lock")
    return f"{settings.data_dir} is in use by {holder_is}{f' (pid {holder})' if holder else ''}"


class reset(FaustResetCommand):  # noqa: N801  the class name is the command name; it replaces Faust's
    """Delete the local table state in DATA_DIR (a worker rebuilds it from the changelogs as it starts).

    Refused while a worker runs on DATA_DIR: Faust removed that worker's table files from under it.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_datadir_option(self.ctx)
        if not settings.data_dir.is_dir():  # Faust's reset would create it, to remove nothing
            print(f"nothing to reset: DATA_DIR {settings.data_dir} does not exist")
            return None
        held = _worker_lock_on_data_dir()
        if held is None:
            # Not "Invalid configuration", as it said: the folder is right, and taken for now.
            raise SystemExit(f"reset: DATA_DIR {_data_dir_in_use('a running worker')}; stop the worker first "
                             "(reset would remove its table files from under it)")
        try:
            return super().__call__(*args, **kwargs)
        finally:
            held.close()


class send(FaustSendCommand):  # noqa: N801  the class name is the command name; it replaces Faust's
    """Send a message to a topic (Faust's `send`), to the broker of KAFKA_BOOTSTRAP_SERVERS.

    Without the variable Faust would try its own default, localhost:9092, and end in a traceback.
    The topic must exist: sent to a misspelt name, a broker that auto-creates topics (Tansu does)
    created it with its own partition count and the message went there, exit 0.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _required(settings.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
        for option_name, serializer in (("--key-serializer", self.key_serializer),
                                        ("--value-serializer", self.value_serializer)):
            _check_codec(option_name, serializer)
        topic = self.kwargs["entity"]
        if topic.startswith("@"):
            # Faust's form for an agent, which it looks up as a module of the app: never one here.
            raise SystemExit(f"send: {topic}: sending to an agent is not supported; give its topic's name")
        try:
            known = asyncio.run(topic_inspection.topic_partitions(_broker()))
        except KafkaConnectionError as exc:
            raise SystemExit(_no_broker("send", exc)) from None
        except (OSError, KafkaError) as exc:
            raise SystemExit(f"send failed: {exc}") from None
        if topic not in known:
            raise SystemExit(f"send: {topic_inspection.UnknownTopic(topic, sorted(known))}")
        partition = self.kwargs.get("partition")
        if partition is not None and partition not in known[topic]:  # aiokafka's assertion was a traceback
            raise SystemExit(f"send: --partition: {topic} has no partition {partition} "
                             f"(it has 0 to {max(known[topic])})")
        if self.kwargs.get("repeat", 1) < 1:  # sent nothing, and exited 0
            raise SystemExit(f"send: --repeat: must be 1 or more (got {self.kwargs['repeat']})")
        return super().__call__(*args, **kwargs)

    async def run(self, entity: str, value: str | None, *args: Any, key: str | None = None,
                  partition: int | None = None, repeat: int = 1, **kwargs: Any) -> Any:
        if value is not None:
            return await super().run(entity, value, *args, key=key, partition=partition, repeat=repeat, **kwargs)
        # Without a value Faust sent the JSON text `null`, which every worker dead-letters and which
        # compaction keeps; docs/operations.md has a key that names nothing removed with a tombstone.
        if key is None:
            raise SystemExit("send: a message without a value is a tombstone, and needs --key")
        producer = AIOKafkaProducer(**client_args(_broker()), acks="all")
        try:
            await producer.start()
            for _ in range(repeat):
                meta = await producer.send_and_wait(entity, key=key.encode(), value=None, partition=partition)
                self.say(self.dumps(meta._asdict()))
        finally:
            await producer.stop()


def _check_codec(option_name: str, codec: Any) -> None:
    """Faust ignored a serializer it does not know for a text value and sent the text as it is."""
    if not isinstance(codec, str):
        return
    try:
        get_codec(codec)
    except KeyError:
        raise SystemExit(f"send: {option_name}: {codec!r} is not one of {', '.join(codecs)} "
                         "(or several joined by |)") from None


def _loglevel_given(ctx: click.Context | None) -> bool:
    """Was -l/--loglevel given, before or after `worker`? Else LOG_LEVEL applies.

    Asked of click, not of Faust's state, which cannot tell `-l warn` from no option at all.
    """
    return _option_given(ctx, "loglevel")


def _option_given(ctx: click.Context | None, name: str) -> bool:
    while ctx is not None:
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            return True
        ctx = ctx.parent
    return False


def _refuse_datadir_option(ctx: click.Context | None) -> None:
    """Faust's global -D/--datadir, which `--help` lists, was ignored: the state went to DATA_DIR."""
    if _option_given(ctx, "datadir"):
        raise ConfigurationError("Invalid configuration:\n  -D/--datadir: not read here (the state, the lock "
                                 "and the rule store live in DATA_DIR); set DATA_DIR instead")


# Faust's worker options that move or stop the web server, with what says where it listens: taken,
# `--web-port 7000` served the API and the probes on 7000 while the health check and `alerting-app api`
# asked WEB_PORT (every check failed), `--web-bind 0.0.0.0` served on every address where
# WEB_BIND=127.0.0.1 (`up`'s, with private endpoints allowed) kept the API to this machine, and
# `--without-web` served no probe at all.
_WEB_OPTIONS = {"web_port": ("-p/--web-port", "set WEB_PORT instead"),
                "web_bind": ("-b/--web-bind", "set WEB_BIND instead"),
                "web_transport": ("--web-transport", "set WEB_BIND and WEB_PORT instead"),
                "with_web": ("--with-web/--without-web", "every worker serves the REST API and the probes")}


def _refuse_web_options(ctx: click.Context | None) -> None:
    refused = [f"  {flags}: not read here (the API and the probes listen on WEB_BIND:WEB_PORT, where the health "
               f"check asks); {remedy}" for name, (flags, remedy) in _WEB_OPTIONS.items() if _option_given(ctx, name)]
    if refused:
        raise ConfigurationError("Invalid configuration:\n" + "\n".join(refused))


class _ReaderGone(Exception):
    """Standard output's reader stopped reading (`alerting-app topics | head -1`)."""


def _out(text: str) -> None:
    """Print `text` to standard output, flushed: a reader that has stopped reading ends the command
    quietly (_ForegroundCommand), not as `topics failed: [Errno 32] Broken pipe`, which read as the
    broker's failure."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise _ReaderGone() from None


class _ForegroundCommand(AppCommand):
    """A command that runs outside Faust's worker loop: it owns its child processes and signals."""

    abstract: ClassVar[bool] = True  # Faust registers subclasses only

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            # The decorated function itself, given the parsed options (as a method, `run` would
            # take the first option for `self`).
            code = type(self).__wrapped__(*self.args, **{**self.kwargs, **kwargs})
        except _ReaderGone:
            # As Python's own recipe for EPIPE: exit 1 (not all was printed), without a message, and with
            # standard output on /dev/null, so that the interpreter's last flush cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        except asyncpg.ClientConfigurationError as exc:
            # Refused by asyncpg before connecting (sslmode=verify-full without a root certificate).
            raise SystemExit(f"{self._name} failed: DATABASE_URL: {exc}") from None
        except KafkaConnectionError as exc:
            raise SystemExit(_no_broker(self._name, exc)) from None
        except (OSError, KafkaError, asyncpg.PostgresError, MigrationError, EmbeddedServiceError) as exc:
            # A service that cannot be reached or a refused migration is a message, not a traceback.
            raise SystemExit(f"{self._name} failed: {exc or type(exc).__name__}") from None
        raise SystemExit(code)

    @property
    def _name(self) -> str:
        # As it is typed (create-topics), not the function's name (create_topics).
        return self.ctx.info_name or type(self).__name__


def _no_broker(command: str, exc: KafkaConnectionError) -> str:
    """One line for a broker a command could not start with. aiokafka says the same "Unable to
    bootstrap" for a broker that refuses the connection and one that takes it and never answers, and
    names the address, not where it came from (`up`'s embedded broker: no variable)."""
    given = settings.kafka_bootstrap_servers
    where = f" (KAFKA_BOOTSTRAP_SERVERS={given})" if given is not None else ""
    return (f"{command} failed: no connection to the broker{where}, or no answer from it within "
            f"{COMMAND_BROKER_TIMEOUT_S:g} s: {exc}")


def _required(value: Any, variable: str) -> Any:
    if value is None:
        # `up` sets these for its worker only: a new shell beside it has none, and the message did not
        # say where the value is to be found.
        raise ConfigurationError(f"Missing configuration: {variable} must be set for this command "
                                 f"(for the embedded services of `alerting-app up`, the address it printed).")
    return value


def _counted(count: int, noun: str) -> str:
    """`1 event`, `2 events`: the commands said "queued 1 events", which read as a slip."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _broker() -> KafkaConnection:
    _required(settings.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    return kafka_connection(settings, request_timeout_s=COMMAND_BROKER_TIMEOUT_S)


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
        _broker(),
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
    _refuse_datadir_option(click.get_current_context())
    return run_up(settings)


@app.command(
    option("--clients", type=click.IntRange(0, seed_clients_limit), default=100, show_default=True,
           help=f"number of clients (clients x rules per client: at most {seed_total_limit:,})"),
    option("--rules-per-client", type=click.IntRange(0, seed_rules_limit), default=288, show_default=True),
    option("--mix", type=click.Choice(MIXES), default="realistic", show_default=True,
           help="realistic: 1-10 matching clients per generated alert; worst: every client matches"),
    option("--webhook-url", default=None, help="give every rule a webhook endpoint with this URL"),
    base=_ForegroundCommand,
)
def seed(clients: int, rules_per_client: int, mix: str, webhook_url: str | None) -> int:
    """Create many clients and rules (and their rule.changed events), for demos and benchmarks."""
    if clients * rules_per_client > seed_total_limit:
        raise SystemExit(f"seed: --clients {clients} x --rules-per-client {rules_per_client} is "
                         f"{clients * rules_per_client:,} rules, more than {seed_total_limit:,} at once "
                         "(every row is held in memory until written); seed in several runs")
    if mix == "worst" and 0 < rules_per_client < len(SEVERITIES):
        raise SystemExit(f"seed: --mix worst needs --rules-per-client {len(SEVERITIES)} or more (one per "
                         f"severity, so that every client matches every alert); got {rules_per_client}")
    if webhook_url is not None:
        # Checked as the API checks an endpoint's address: unchecked, any text was stored in every
        # endpoint, and each delivery to it failed (or, unnoticed, went to a private address).
        try:
            webhook_url = asyncio.run(checked_value("webhook", webhook_url))
        except ValidationFailed as exc:
            raise SystemExit(f"seed: --webhook-url: {exc.extra_context['fields'][0]['message']} "
                             f"(got {webhook_url!r})") from None
    report = asyncio.run(load.seed_database(_required(settings.database_url, "DATABASE_URL"), clients=clients,
                                            rules_per_client=rules_per_client, mix=mix, webhook_url=webhook_url))
    print(f"seeded {_counted(report.clients, 'client')}, {_counted(report.rules, 'rule')}, "
          f"{_counted(report.endpoints, 'endpoint')} "
          f"in {report.seconds:.1f}s; the workers receive the rules through rule.changed")
    return 0


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # A range check lets nan through (no comparison with it is true): --rate nan sent as fast as possible.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of alerts per second")
    return value


@app.command(
    option("--count", type=click.IntRange(min=0), default=1000, show_default=True, help="how many alerts"),
    option("--rate", type=click.FloatRange(min=0), callback=_finite, default=0, show_default=True,
           help="alerts per second; 0: as fast as possible"),
    base=_ForegroundCommand,
)
def produce_alerts(count: int, rate: float) -> int:
    """Send generated alerts (over the seeded sources and names) to alerts.new."""
    sent, seconds = asyncio.run(load.produce_alerts(
        _broker(), count=count, rate=rate))
    print(f"sent {_counted(sent, 'alert')} in {seconds:.2f}s ({sent / seconds:,.0f}/s)")
    return 0


@app.command(base=_ForegroundCommand)
def republish_rules() -> int:
    """Queue every rule in Postgres for rule.changed (after the topic was recreated or emptied)."""
    count = asyncio.run(load.republish(_required(settings.database_url, "DATABASE_URL")))
    print(f"queued {_counted(count, 'event')} (every rule, and every deleted rule's deletion) for rule.changed; "
          "a running worker relays them")
    return 0


@app.command(base=_ForegroundCommand)
def republish_silences() -> int:
    """Queue every silence in Postgres for silence.changed (after the topic was recreated or emptied)."""
    count = asyncio.run(load.republish(_required(settings.database_url, "DATABASE_URL"), republish_all_silences))
    print(f"queued {_counted(count, 'event')} (every silence, and every deleted silence's deletion) for "
          "silence.changed; a running worker relays them")
    return 0


@app.command(
    option("--partitions", "by_partition", is_flag=True, default=False,
           help="also one line per partition: start, end, committed offset, lag"),
    option("--json", "as_json", is_flag=True, default=False, help="one JSON document, per partition too"),
    base=_ForegroundCommand,
)
def topics(by_partition: bool, as_json: bool) -> int:
    """Each topic: partitions, end offsets and the lag of this app's consumer group (APP_ID)."""
    figures = asyncio.run(topic_inspection.topic_figures(_broker(), settings.app_id,
                                                         web.operations.agent_topics()))
    # Faust's global --json (`alerting-app --json topics`), which `--help` lists, asks for the same.
    if as_json or _option_given(click.get_current_context(), "json"):
        _out(json.dumps({"group": settings.app_id, "topics": [f.as_json() for f in figures]}))
    else:
        _out(topic_inspection.figures_table(figures, settings.app_id, by_partition=by_partition))
    return 0


@app.command(
    argument("topic"),
    option("--from-beginning", is_flag=True, default=False,
           help="start at the oldest message instead of the newest"),
    option("--limit", type=click.IntRange(min=1), default=None, show_default=False,
           help="stop after N messages, or with --from-beginning once every message there was is printed "
                "(default: follow until Ctrl-C)"),
    base=_ForegroundCommand,
)
def tail(topic: str, from_beginning: bool, limit: int | None) -> int:
    """Print the messages of TOPIC, decoded, one JSON object per line (key, partition, offset, value)."""
    try:
        asyncio.run(_tail(_broker(), topic, from_beginning, limit))
    except topic_inspection.UnknownTopic as exc:
        raise SystemExit(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


async def _tail(broker: KafkaConnection, topic: str, from_beginning: bool, limit: int | None) -> None:
    async with topic_inspection.TopicTail(broker, topic, from_beginning=from_beginning) as tail:
        # On stderr, so stdout stays one JSON object per line; it also says when producing is safe.
        where = "the oldest message" if from_beginning else "the end"
        print(f"tailing {topic} ({len(tail.partitions)} partitions) from {where}", file=sys.stderr, flush=True)
        # --from-beginning --limit N on a topic holding fewer (a few dead letters): print them and end.
        async for message in tail.messages(limit, until_end=from_beginning and limit is not None):
            _out(json.dumps(message))


@app.command(
    option("--port", type=click.IntRange(1, 65535), default=9000, show_default=True,
           help="the port to listen on (the \"Try it\" endpoint posts to 9000)"),
    option("--bind", default="127.0.0.1", show_default=True, help="the address to listen on"),
    option("--secret", "secrets", multiple=True,
           help="an endpoint's secret, to check each POST's signature; repeat it for several endpoints "
                "(a POST is valid when one verifies it, shown by its position: valid (--secret #2))"),
    base=_ForegroundCommand,
)
def receive(port: int, bind: str, secrets: tuple[str, ...]) -> int:
    """A webhook receiver to watch notifications arrive locally: each POST answered 200 and printed
    as one JSON line (path, Idempotency-Key, signature checked with each --secret, the notification)."""
    from aiohttp import web

    from alerting_app.webhook_receiver import receiver_app

    def listening(text: str) -> None:
        print(f"receiving webhooks on http://{bind}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)

    web.run_app(receiver_app(secrets, lambda received: _out(json.dumps(received))), host=bind, port=port,
                print=listening)
    return 0


def _headers(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    # A malformed -H is a usage error, before anything is sent.
    try:
        return api_call.parse_headers(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@app.command(
    argument("method", type=click.Choice(api_call.METHODS, case_sensitive=False)),
    argument("url"),
    argument("body", required=False),
    option("--token", default=None, help="the bearer token (default: ADMIN_TOKEN)"),
    option("--field", default=None, help="print only this field of the JSON answer (e.g. api_key)"),
    option("-H", "--header", "headers", multiple=True, callback=_headers, metavar="'NAME: VALUE'",
           help="a header to send, such as 'If-Match: \"<etag>\"'; repeatable (one given as Authorization "
                "replaces --token)"),
    base=_ForegroundCommand,
)
def api(method: str, url: str, body: str | None, token: str | None, field: str | None,
        headers: dict[str, str]) -> int:
    """One request to the REST API: METHOD URL [JSON BODY]; URL may be a path (/api/v1/clients) on
    this machine's worker. Prints the JSON answer (and its ETag, on stderr); exits 1 unless it is a
    2xx, or a 304 to an If-None-Match."""
    # The default is the token the worker checks, as the settings read it: $ADMIN_TOKEN as given
    # may end in a secret file's newline, which no header can carry (urllib refused it, showing it).
    token = token if token is not None else settings.admin_token
    try:
        # A path is this machine's worker (WEB_BIND, WEB_PORT), asked directly whatever its address.
        status, answer, etag = api_call.request(method, api_call.target(url, os.environ), body, token,
                                                direct=url.startswith("/"), headers=headers)
    except ValueError as exc:
        raise SystemExit(f"api: {exc}") from None
    except ConnectionRefusedError as exc:
        if not url.startswith("/"):
            raise
        # A shell other than the one `up` was started from with its own WEB_PORT asked 6066: the
        # refusal alone did not say which setting chose that port.
        raise SystemExit(f"api failed: {exc}: no worker listens at this shell's WEB_BIND and WEB_PORT; "
                         f"set them as the worker has them, or give the API URL `up` printed") from None
    if status == 304:
        # What an If-None-Match asked, answered: the resource still has that ETag. Not a failure.
        print("HTTP 304: not modified (the resource still has the ETag If-None-Match names)", file=sys.stderr)
        if etag is not None:
            print(f"ETag: {etag}", file=sys.stderr)
        return 0
    if not 200 <= status < 300:
        print(f"HTTP {status}: {json.dumps(answer) if not isinstance(answer, str) else answer}", file=sys.stderr)
        sent_authorization = (token or "").strip() or any(name.lower() == "authorization" for name in headers)
        if status == 401 and not sent_authorization:
            # A shell other than the one `up` was started from has no ADMIN_TOKEN: the 401 alone read
            # as a wrong token.
            print("api: no token was sent: give --token, or set ADMIN_TOKEN (`alerting-app up` prints it, "
                  "and keeps it in DATA_DIR/admin-token)", file=sys.stderr)
        return 1
    if field is not None:
        if not isinstance(answer, dict) or field not in answer:
            raise SystemExit(f"api: the answer has no field {field!r}: {json.dumps(answer)}")
        answer = answer[field]
    elif etag is not None:
        # On stderr, so that standard output stays the JSON answer alone: what an If-Match or
        # If-None-Match names next (docs/api.md). Not with --field, which asks for one value.
        print(f"ETag: {etag}", file=sys.stderr)
    if answer is not None:
        _out(answer if isinstance(answer, str) else json.dumps(answer, indent=2))
    return 0


def main() -> None:
    app.main()
