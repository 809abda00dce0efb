"""`alerting-app worker` waits for the broker, Postgres and Redis before Faust starts.

Start-up order must not matter (compose and ECS start containers in any order), but Faust's
worker exits at once when the broker does not answer ("Unable to bootstrap"), and it serves HTTP
only once its producer is connected. So the worker first waits here, retrying with backoff and
logging what it waits for, until all three answer, the pipeline topics exist and the schema is
migrated (at least to the newest migration this release ships). Meanwhile it
answers on WEB_PORT: /healthz 200 (the process is alive: a container health check must not kill
a worker that only waits) and /readyz 503 with each dependency's state. Then it closes that port
and hands over to Faust, whose web server serves the same paths from then on.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Iterable, Iterator

from aiohttp import web

from alerting_app.dependencies import (
    DependencyState,
    broker_topics_missing,
    postgres_ready,
    probe,
    redis_answers,
    redis_probe_client,
    shipped_schema_version,
    shows_full_detail,
)
from alerting_app.kafka_admin import check_before_start
from alerting_app.kafka_connection import kafka_connection
from alerting_app.migrate import MigrationError
from alerting_app.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0


def retry_delays() -> Iterator[float]:
    """The waits between rounds of checks: doubling from FIRST_DELAY_S up to MAX_DELAY_S."""
    delay = FIRST_DELAY_S
    while True:
        yield delay
        delay = min(delay * 2, MAX_DELAY_S)


@contextlib.contextmanager
def aiokafka_quiet() -> Iterator[None]:
    """aiokafka logs an ERROR for every refused connection; whoever waits says once what is missing."""
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)
WAITING = "waiting_for_dependencies"


async def dependency_states(settings: Settings, topics: Iterable[str]) -> list[DependencyState]:
    redis = redis_probe_client(settings.redis_url)
    try:
        return list(await asyncio.gather(
            probe("broker", broker_topics_missing(kafka_connection(settings), topics)),
            probe("postgres", postgres_ready(settings.database_url)),
            probe("redis", redis_answers(redis)),
        ))
    finally:
        await redis.aclose()


class _Probes:
    """/healthz and /readyz while waiting, from the latest round of checks."""

    def __init__(self, states: list[DependencyState], admin_token: str | None) -> None:
        self.states, self._admin_token = states, admin_token

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "phase": WAITING})

    async def readyz(self, request: web.Request) -> web.Response:
        body = {"status": "not_ready", "phase": WAITING,
                "dependencies": {state.name: state.as_json(shows_full_detail(request.headers.get("Authorization"),
                                                                             self._admin_token))
                                 for state in self.states}}
        return web.json_response(body, status=503)

    async def serve(self, bind: str, port: int) -> web.AppRunner:
        application = web.Application()
        application.router.add_get("/healthz", self.healthz)
        application.router.add_get("/readyz", self.readyz)
        application.router.add_get("/startedz", self.readyz)  # never ready yet: not started either
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, bind, port).start()
        return runner


async def wait_for_dependencies(settings: Settings, topics: Iterable[str]) -> None:
    with aiokafka_quiet():
        await _wait(settings, list(topics))


async def _wait(settings: Settings, topics: list[str]) -> None:
    states = await dependency_states(settings, topics)
    if all(state.ok for state in states):
        return
    refuse_misconfigured(states)
    probes = _Probes(states, settings.admin_token)
    runner = await probes.serve(settings.web_bind, settings.web_port)
    try:
        delays = retry_delays()
        while not all(state.ok for state in probes.states):
            waiting = "; ".join(f"{state.name} ({state.detail})" for state in probes.states if not state.ok)
            delay = next(delays)
            log.warning("waiting for %s; retrying in %.1fs", waiting, delay)
            await asyncio.sleep(delay)
            probes.states = await dependency_states(settings, topics)
            refuse_misconfigured(probes.states)
        log.info("broker, postgres and redis answer; starting the worker")
    finally:
        await runner.cleanup()


def refuse_misconfigured(states: list[DependencyState]) -> None:
    wrong = [state.detail for state in states if state.misconfigured]
    if wrong:
        raise ConfigurationError("Invalid configuration:\n" + "\n".join(f"  {detail}" for detail in wrong))


def check_before_waiting(settings: Settings) -> None:
    """What waiting would never fix, refused at once naming the variable: an address or port this
    machine cannot listen on (WEB_BIND, WEB_PORT), and a migrations folder without migrations."""
    try:
        infos = socket.getaddrinfo(settings.web_bind, settings.web_port, type=socket.SOCK_STREAM)
        family, kind, protocol, _, address = infos[0]
        with socket.socket(family, kind, protocol) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's server does
            listener.bind(address)
    except OSError as exc:
        raise ConfigurationError(f"Invalid configuration:\n  WEB_BIND, WEB_PORT: cannot listen on "
                                 f"{settings.web_bind} port {settings.web_port}: {exc.strerror or exc}") from None
    try:
        shipped_schema_version()
    except MigrationError as exc:
        raise ConfigurationError(f"Invalid configuration:\n  MIGRATIONS_DIR: {exc}") from None


def wait_before_start(settings: Settings, topics: Iterable[str], changelogs: Iterable[str] = (),
                      faust_topics: Iterable[str] = ()) -> None:
    """Block until the services answer, on a loop of its own, closed before Faust makes its own;
    then stop, naming TOPIC_PARTITIONS, if `topics` or the existing `changelogs` have another
    partition count, or naming TOPIC_REPLICATION_FACTOR, if one of `faust_topics` (which Faust
    creates as it starts) is missing and the factor is above the broker count (waiting would not
    change either)."""
    topics = list(topics)
    loop = asyncio.new_event_loop()
    try:
        mismatch = loop.run_until_complete(_stopped_by_signals(
            loop, _wait_and_compare(settings, topics, changelogs, list(faust_topics))))
    finally:
        loop.close()
    if mismatch:
        raise ConfigurationError(f"Invalid configuration:\n  TOPIC_PARTITIONS: {mismatch}. Every worker must use the "
                                 "partition count the topics were created with (`alerting-app topics` shows it).")


async def _wait_and_compare(settings: Settings, topics: list[str], changelogs: Iterable[str],
                            faust_topics: list[str]) -> str | None:
    await wait_for_dependencies(settings, topics)
    return await check_before_start(kafka_connection(settings), [*topics, *changelogs], settings.topic_partitions,
                                    faust_topics, settings.topic_replication_factor)


# The stop signals a waiting worker handles, each with the disposition it has when nobody else set
# one: another (an ignore inherited from a shell, a handler of whoever embeds us) is left alone.
_STOP_SIGNALS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


async def _stopped_by_signals(loop: asyncio.AbstractEventLoop, waiting: Awaitable[str | None]) -> str | None:
    """`waiting`, ended by SIGTERM or SIGINT (Ctrl-C): the process exits (143 or 130, as killed by
    it) after closing its port.

    Without a handler of its own, PID 1 of a container that has no init (compose, Kubernetes,
    `docker run`) never gets SIGTERM: the kernel drops it, and a worker still waiting would be
    killed only after the stop timeout. Ctrl-C raised KeyboardInterrupt out of the loop with the
    wait still pending: click's "Aborted!", exit code 1, "Task was destroyed but it is pending!" and
    a traceback. (Faust installs its own handlers once it runs.)
    """
    handled = [stop for stop, default in _STOP_SIGNALS.items() if signal.getsignal(stop) is default]
    if not handled:
        return await waiting
    task = asyncio.ensure_future(_refusal_returned(waiting))
    received: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        received.append(signum)
        task.cancel()

    for signum in handled:
        loop.add_signal_handler(signum, stop, signum)
    try:
        outcome = await task
    except asyncio.CancelledError:
        if not received:  # cancelled by whoever runs us, not by a signal
            raise
        log.warning("%s while waiting for the services: stopping", received[0].name)
        raise SystemExit(128 + received[0]) from None
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)  # back to the default (SIGINT's too): Faust installs its own
    if isinstance(outcome, SystemExit):
        raise outcome
    return outcome


async def _refusal_returned(waiting: Awaitable[str | None]) -> str | None | SystemExit:
    """`waiting`, its SystemExit (a ConfigurationError) returned instead of raised.

    Raised inside a task, a SystemExit leaves the loop at once and the task holding it, which
    asyncio then logged as "Task exception was never retrieved" with a traceback, after the message.
    """
    try:
        return await waiting
    except SystemExit as exc:
        return exc
