"""`alerting-app up`: the whole platform on one machine, with nothing installed but Python.

For each of KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL that is not set, an embedded
service is started under DATA_DIR; then the schema is migrated, the topics are created and a worker
(agents + web API) runs as a child process. Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops
the worker first, then the embedded services, so the worker never loses its services while it is
still committing. So does an embedded service that exits meanwhile (killed, crashed), which `up`
names; the worker exiting stops the rest too. Either way `up` exits non-zero.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import IO, Awaitable, Callable

from agents.rule_outbox import RULE_OUTBOX, SILENCE_OUTBOX
from alerting_app.data_dir import create_data_dir, hold_data_dir_lock
from alerting_app.embedded import (ChildProcess, EmbeddedServices, lock_holder, port_accepts,
                                   process_alive)
from alerting_app.dependencies import (DependencyState, broker_topics_missing, postgres_answers, probe,
                                       redis_answers, redis_probe_client)
from alerting_app.healthcheck import get_directly, setting, worker_url
from alerting_app.kafka_admin import create_topics
from alerting_app.kafka_connection import kafka_connection
from alerting_app.load import emit_undelivered_notifications, publish_current_state
from alerting_app.migrate import apply_migrations
from alerting_app.settings import COMMAND_BROKER_TIMEOUT_S, Settings, without_passwords
from alerting_app.startup_wait import aiokafka_quiet, refuse_misconfigured, retry_delays

_WORKER_READY_TIMEOUT_S = 300.0


def alerting_app_executable() -> str:
    # The console script installed beside this interpreter, so the worker runs the same install.
    script = Path(sys.executable).parent / "alerting-app"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: is alerting-app installed in this environment?")
    return str(script)


class WorkerProcess:
    """`alerting-app worker` as a child process, its output in `log_path`; it logs at LOG_LEVEL."""

    def __init__(self, env: dict[str, str], log_path: Path, holding: IO | None = None):
        self.port = int(env["WEB_PORT"])
        self.url = worker_url(env)  # where it listens (WEB_BIND), as the health check asks it
        self.log_path = log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0  # the log may be appended to
        argv = [alerting_app_executable(), "worker"]
        # `holding`: a lock file the worker keeps open, so the lock lasts as long as the worker does.
        self.child = ChildProcess("worker", argv, log_path, env=env,
                                  pass_fds=(holding.fileno(),) if holding is not None else ())

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_until_ready(self, timeout: float = _WORKER_READY_TIMEOUT_S,
                         meanwhile: Callable[[], None] = lambda: None) -> None:
        """Wait for the worker, calling `meanwhile` at each look (it may raise to stop waiting)."""
        def ready() -> bool:
            meanwhile()
            # /startedz, not Faust's "Ready" log line, which a LOG_LEVEL above info leaves out: 200
            # once the worker has joined its group, recovered its tables and found its dependencies ready.
            return _answers_200(self.url + "/startedz")

        self.child.wait_until(ready, f"ready and serving HTTP on port {self.port}", timeout)

    def log(self) -> str:
        """What this worker wrote (not what earlier runs appended to the same file)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        self.child.stop()


def _answers_200(url: str) -> bool:
    try:
        return get_directly(url, timeout=2)[0] == 200  # whatever proxy the environment names
    except (OSError, ValueError):
        return False


def persistent_admin_token(data_dir: Path) -> str:
    """A generated ADMIN_TOKEN, kept in DATA_DIR so a restart does not invalidate the one printed."""
    path = data_dir / "admin-token"
    if path.exists():
        kept = path.read_text().strip()
        if len(kept) >= _GENERATED_TOKEN_CHARS:
            return kept
        # Empty or cut short (a run killed while writing it, or a hand edit): every later run
        # would fail on it, so it is replaced, and the new one printed.
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # Written whole or not at all: a file created, then renamed over the old one.
    written = path.with_name(path.name + ".new")
    written.unlink(missing_ok=True)
    with open(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(token + "\n")
    os.replace(written, path)
    return token


_GENERATED_TOKEN_CHARS = 43  # secrets.token_urlsafe(32)


# Ctrl-C, a stop, and a closed terminal (SIGHUP) all stop the platform in order: the worker first,
# then the services it uses (unhandled, SIGHUP killed `up` and the kernel then stopped them all at
# once, the database under the worker still writing to it).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_on_signals() -> None:
    for stop in _STOP_SIGNALS:
        # Not over an ignore: under `nohup`, a closed terminal must leave the platform running.
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    _ignore_stop_signals()
    raise KeyboardInterrupt


def _ignore_stop_signals() -> None:
    # Once the platform stops, further signals are ignored so that they cannot cut that short.
    for stop in _STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


_PREVIOUS_WORKER_STOP_S = 60.0  # its stop, its services gone with the killed `up`, may wait on their timeouts


def _lock_data_dir(data_dir: Path) -> IO:
    """Hold DATA_DIR for this run: a second `up` on it, with or without embedded services, would
    share the worker's table state (RocksDB) and log with the first.

    The worker holds the lock too (it inherits the file), so it is free only once both are gone.
    An `up` killed outright (kill -9) leaves its worker stopping on its own for a few seconds: a
    new run waits for that, rather than clearing the table state under it and starting a second
    worker beside it. Another `up` still running is refused at once, and so is an `alerting-app
    worker` started by hand on the folder: `up` went on to remove its table state under it, and
    only then did its own worker stop, finding the folder in use.
    """
    path = data_dir / ".up.lock"
    deadline = None
    while (lock_file := hold_data_dir_lock(data_dir, path.name)) is None:
        holder = lock_holder(path)
        if holder is None or process_alive(holder):
            # Its pid: "stop that one" named no process, and one started in the background
            # (`... &`, nohup) has no terminal to press Ctrl-C in; it is stopped with kill <pid>.
            running = f", pid {holder}" if holder is not None else ""
            raise SystemExit(f"DATA_DIR {data_dir} is in use by another `alerting-app up` (`python3 dev.py run`)"
                             f"{running}; stop that one, or set DATA_DIR to another folder.")
        if deadline is None:
            print("waiting for the worker of a run that ended to stop…", flush=True)
            deadline = time.monotonic() + _PREVIOUS_WORKER_STOP_S
        elif time.monotonic() > deadline:
            raise SystemExit(f"DATA_DIR {data_dir} is still held by the worker of a run that ended "
                             f"{_PREVIOUS_WORKER_STOP_S:.0f}s ago (its `alerting-app worker` process"
                             f"{_worker_pid(data_dir)}); stop it.")
        time.sleep(0.2)
    # Free now unless a worker of no `up` holds it (one of an `up` holds that `up`'s lock too).
    worker_lock = hold_data_dir_lock(data_dir, ".worker.lock")
    if worker_lock is None:
        lock_file.close()
        raise SystemExit(f"DATA_DIR {data_dir} is in use by an `alerting-app worker`{_worker_pid(data_dir)}; "
                         "stop it, or set DATA_DIR to another folder.")
    worker_lock.close()  # for this run's worker to take
    return lock_file


def _worker_pid(data_dir: Path) -> str:
    """", pid N" of the worker holding DATA_DIR, as it wrote it, or nothing."""
    holder = lock_holder(data_dir / ".worker.lock")
    return f", pid {holder}" if holder else ""


def run_up(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    create_data_dir(data_dir)
    with _lock_data_dir(data_dir) as lock_file:  # the lock goes with the file: closed, or this process gone
        return _run_up(settings, data_dir, lock_file)


def _run_up(settings: Settings, data_dir: Path, lock_file: IO) -> int:
    if port_accepts(settings.web_port):
        raise SystemExit(f"WEB_PORT {settings.web_port} is already in use; set WEB_PORT to a free port.")
    _stop_on_signals()
    try:
        with EmbeddedServices(data_dir / "services") as services:
            missing = _missing(settings)
            if any(missing.values()):
                names = ", ".join(service for service, wanted in missing.items() if wanted)
                print(f"starting embedded {names} under {services.folder}…", flush=True)
            env = worker_environment(settings, services.start(**missing), data_dir)
            token_generated = settings.admin_token is None
            wait_for_given_services(settings, missing)
            _prepare(env, settings)
            with WorkerProcess(env, data_dir / "worker.log", holding=lock_file) as worker:
                print(f"starting the worker (log: {worker.log_path})…", flush=True)
                worker.wait_until_ready(meanwhile=lambda: _stop_if_a_service_exited(services))
                print(_instructions(env, worker.url, data_dir, token_generated), flush=True)
                print("ready", flush=True)
                return _run_until_one_exits(worker, services)
    except _ServiceExited:
        return 1
    except KeyboardInterrupt:
        try:
            print("stopped", flush=True)
        except OSError:  # the terminal it was printing to is gone (SIGHUP)
            pass
        return 0


_WATCH_INTERVAL_S = 1.0  # how often `up` looks whether its worker and embedded services still run


def _run_until_one_exits(worker: WorkerProcess, services: EmbeddedServices) -> int:
    """Wait until the worker or an embedded service exits: each is meant to run until we stop it.

    Waiting on the worker alone, `up` missed a service that died under it (the OOM killer, a
    kill): the worker went on retrying it, its reasons in worker.log only, the terminal silent.
    The services come first: a worker that exits is more likely to follow one than to precede it.
    """
    while True:
        _stop_if_a_service_exited(services)
        code = worker.child.process.poll()
        if code is not None:
            # The services are stopped next: a Ctrl-C meanwhile cut that short, and `up` said
            # "stopped" and exited 0 for a worker that had failed.
            _ignore_stop_signals()
            print(f"the worker exited with code {code}; see {worker.log_path}", file=sys.stderr)
            return code or 1
        time.sleep(_WATCH_INTERVAL_S)


class _ServiceExited(Exception):
    """An embedded service exited while `up` ran; said on the terminal already."""


def _stop_if_a_service_exited(services: EmbeddedServices) -> None:
    """Raise _ServiceExited, having said which service exited and how, when one did.

    It is not restarted: the broker keeps its topics in memory, so a new one would have none, and
    the worker's table state would refer to the lost one; stopping, saying why, is what is honest.
    """
    exited = services.exited()
    if exited is None:
        return
    _ignore_stop_signals()
    print(f"the embedded {exited.name} {exited.how_it_ended()} (log: {exited.log_path}); "
          f"stopping the worker and the other services", file=sys.stderr, flush=True)
    raise _ServiceExited


def worker_environment(settings: Settings, started: dict[str, str], data_dir: Path) -> dict[str, str]:
    """The environment the worker (and `up`'s preparation) runs with: ours, with the URLs of the
    services `up` started, DATA_DIR, WEB_PORT, a generated ADMIN_TOKEN and the local run's defaults."""
    # The services given, under the names the preparation reads, as the settings read them: in any
    # case (`database_url=...` stopped it with a KeyError), stripped and joined as validated.
    given = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "DATABASE_URL": settings.database_url,
             "REDIS_URL": settings.redis_url}
    env = dict(os.environ)
    written = {**{name: url for name, url in given.items() if url is not None}, **started,
               "DATA_DIR": str(data_dir), "WEB_PORT": str(settings.web_port)}
    # As the worker reads it: "" or whitespace is unset (settings.py), and gets a token.
    if settings.admin_token is None:  # the one printed; not written when one is set
        written["ADMIN_TOKEN"] = persistent_admin_token(data_dir)
    for name, value in written.items():
        put(env, name, value)
    local_run_defaults(env)
    return env


def put(env: dict[str, str], name: str, value: str) -> None:
    """Set `name` in `env` in place of each of its spellings: a worker given the user's `web_port= 7001`
    beside our `WEB_PORT=7001` (or `admin_token=" "`, unset, beside the generated ADMIN_TOKEN) would
    refuse two spellings with different values (settings.load_settings)."""
    for key in [key for key in env if key.lower() == name.lower()]:
        del env[key]
    env[name] = value


def local_run_defaults(env: dict[str, str]) -> None:
    """What the local run sets where `env` leaves it unset, or set empty: the worker reads an empty
    variable as unset (settings.py), so kept as it is, WEB_BIND= served the API on every address
    (its default) while `up` printed 127.0.0.1, private endpoints allowed."""
    local = {
        "ALLOW_PRIVATE_ENDPOINTS": "true",  # the local run's webhooks are local
        # This machine only, unless asked: with private endpoints allowed, the API would let
        # anyone who reaches it make the worker POST into this machine's network.
        "WEB_BIND": "127.0.0.1",
    }
    for name, value in local.items():
        # In any case, as the worker reads it: `allow_private_endpoints=false` is the user's choice.
        if not setting(env, name).strip():
            put(env, name, value)


def _missing(settings: Settings) -> dict[str, bool]:
    return {
        "kafka": settings.kafka_bootstrap_servers is None,
        "postgres": settings.database_url is None,
        "redis": settings.redis_url is None,
    }


def wait_for_given_services(settings: Settings, embedded: dict[str, bool]) -> None:
    """Wait, saying so on the terminal, until each service of a URL the user set answers.

    The migrations came first and failed at once, naming no variable ("up failed: [Errno 111]
    Connect call failed"), while a Redis away made the worker wait silently for 5 minutes, its
    reason only in worker.log. Like the worker, `up` now waits for them, naming each one it
    waits for; what no wait fixes (a refused login, no such database) stops it at once.
    """
    given = {}  # variable: (its value, a probe of it)
    if not embedded["kafka"]:
        given["KAFKA_BOOTSTRAP_SERVERS"] = (settings.kafka_bootstrap_servers,
                                            lambda: broker_topics_missing(kafka_connection(settings)))
    if not embedded["postgres"]:
        given["DATABASE_URL"] = (settings.database_url, lambda: postgres_answers(settings.database_url))
    if not embedded["redis"]:
        given["REDIS_URL"] = (settings.redis_url, lambda: _redis_probe(settings.redis_url))
    delays = retry_delays()
    while given:
        with aiokafka_quiet():
            states = asyncio.run(_probe_all(given))
        refuse_misconfigured(states)
        waiting = [state for state in states if not state.ok]
        if not waiting:
            return
        delay = next(delays)
        print("waiting for " + "; ".join(f"{state.name} {without_passwords(given[state.name][0])} ({state.detail})"
                                         for state in waiting) + f"; retrying in {delay:.1f}s", flush=True)
        time.sleep(delay)


async def _probe_all(given: dict[str, tuple[str, Callable[[], Awaitable[str | None]]]]) -> list[DependencyState]:
    return list(await asyncio.gather(*(probe(variable, check()) for variable, (_, check) in given.items())))


async def _redis_probe(url: str) -> None:
    client = redis_probe_client(url)
    try:
        await redis_answers(client)
    finally:
        await client.aclose()


# In DATA_DIR while `up` sends the notifications a new notifications.ready lacks (`_prepare`).
RESEND_MARK = "notifications-to-send-again"
# In DATA_DIR while `up` puts Postgres's rules (or silences) on a new rule.changed (silence.changed),
# by topic: `_prepare`.
PUBLISH_MARKS = {RULE_OUTBOX.topic.get_topic_name(): "rules-to-publish-again",
                 SILENCE_OUTBOX.topic.get_topic_name(): "silences-to-publish-again"}


def _prepare(env: dict[str, str], settings: Settings) -> None:
    applied = asyncio.run(apply_migrations(env["DATABASE_URL"]))
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}", flush=True)
    # TLS and SASL only for a broker of the settings: the embedded one speaks plaintext (Settings
    # refuses any other KAFKA_SECURITY_PROTOCOL without KAFKA_BOOTSTRAP_SERVERS).
    broker = kafka_connection(settings, env["KAFKA_BOOTSTRAP_SERVERS"], request_timeout_s=COMMAND_BROKER_TIMEOUT_S)
    # Marked in DATA_DIR from before notifications.ready may be created until the notifications it
    # lacks are sent: on a broker of KAFKA_BOOTSTRAP_SERVERS, which keeps its topics, an `up` stopped
    # anywhere in between (the rules' publish below, say) finds notifications.ready there next time,
    # and without the mark left the rest PENDING for ever. Sending one again is harmless
    # (agents/deliver.py). Taken back at once when the topic was there already.
    resend_mark = Path(env["DATA_DIR"]) / RESEND_MARK
    # Likewise rule.changed and silence.changed: an `up` stopped after creating them, before it had
    # queued their rules or silences (its pool or producer still starting, a Ctrl-C), left them
    # empty, and the next one, finding them there, put nothing on them: the worker matched no alert
    # against those rules until someone ran republish-rules. Each is marked until its publish is done.
    publish_marks = {topic: Path(env["DATA_DIR"]) / mark for topic, mark in PUBLISH_MARKS.items()}
    marks = {"notifications.ready": resend_mark, **publish_marks}
    marked_before = {topic for topic, mark in marks.items() if mark.exists()}
    resend_mark.parent.mkdir(parents=True, exist_ok=True)
    for mark in marks.values():
        mark.touch()
    report = asyncio.run(create_topics(broker, settings.topic_partitions, settings.topic_replication_factor))
    for topic, mark in marks.items():
        if topic not in report.created and topic not in marked_before:
            mark.unlink()
    if report.mismatched:
        raise SystemExit(report.mismatch_message(settings.topic_partitions))
    print(f"topics created: {', '.join(report.created) or 'none (all present)'}", flush=True)
    if "rule.changed" in report.created:
        discard_table_state_of_another_broker(Path(env["DATA_DIR"]))
    # A new (or restarted in-memory) broker: the rules and silences Postgres holds go back on their
    # topics before the worker starts, so that it matches no alert before it holds them all.
    # The embedded broker goes with the run: a publish that fails partway leaves nothing behind on
    # it, and the next run publishes everything again. One of the settings keeps what landed.
    embedded_broker = settings.kafka_bootstrap_servers is None
    for outbox, kind in ((RULE_OUTBOX, "rule"), (SILENCE_OUTBOX, "silence")):
        topic = outbox.topic.get_topic_name()
        if publish_marks[topic].exists():  # created now, or by a run stopped before it was done with it
            count = asyncio.run(publish_current_state(env["DATABASE_URL"], broker, outbox,
                                                      queued_first=not embedded_broker))
            publish_marks[topic].unlink()
            # Deletions count too (as republish-rules says): "rules ... 12" of 11 rules read as one too many.
            print(f"{kind} events put on {topic} from Postgres (every {kind}, and every deleted {kind}'s "
                  f"deletion): {count}", flush=True)
    if resend_mark.exists():
        count, unreadable = asyncio.run(emit_undelivered_notifications(env["DATABASE_URL"], broker))
        resend_mark.unlink()
        print(f"notifications sent again to notifications.ready from Postgres (pending, no delivery opened): "
              f"{count}", flush=True)
        if unreadable:
            print(f"left pending, their rows cannot be read: {', '.join(unreadable)}", flush=True)


def discard_table_state_of_another_broker(data_dir: Path) -> None:
    """Remove the worker's Faust table state (DATA_DIR/faust) when rule.changed had to be created.

    A new rule.changed means a new broker (the embedded one keeps messages in memory, so every run
    starts one) and an empty changelog. The local tables remember offsets of the old changelog, higher than
    the new one's end, and Faust refuses to start on that (ConsistencyError): a second run crashed
    once any group had been written. What the old state held (open groups) went with the old broker.
    """
    faust_state = data_dir / "faust"
    if faust_state.exists():
        shutil.rmtree(faust_state)
        print(f"the broker is new: removed the worker's table state of the previous one ({faust_state})",
              flush=True)


def _example_alert(alert_id: str) -> str:
    alert = {"alert_id": alert_id, "event_ts": 1700000000, "severity": "HIGH", "source": "payments",
             "name": "CheckoutLatency"}
    return json.dumps(alert, separators=(",", ":"))


def _instructions(env: dict[str, str], api_url: str, data_dir: Path, token_generated: bool = True) -> str:
    """What `up` prints once the platform is up. A token or password the user set is not printed:
    the output may go to a shared terminal or a CI log. (The embedded services have no password.)"""
    kafka = env["KAFKA_BOOTSTRAP_SERVERS"]
    if token_generated:
        shown_token, token_setting = env["ADMIN_TOKEN"], f"ADMIN_TOKEN={shlex.quote(env['ADMIN_TOKEN'])}"
    else:
        shown_token = "yours, from the environment (not shown)"
        token_setting = 'ADMIN_TOKEN="${ADMIN_TOKEN:?export your ADMIN_TOKEN first}"'
    first, second = (_example_alert(alert_id) for alert_id in ("a-1", "a-2"))
    # `alerting-app api`, not curl: Python is all a fresh machine is sure to have.
    return f"""
alerting-app is up.
  API             {api_url}/api/v1      (metrics at {api_url}/metrics)
  Kafka           {kafka}
  PostgreSQL      {without_passwords(env["DATABASE_URL"])}
  Redis           {without_passwords(env["REDIS_URL"])}
  data and logs   {data_dir}
  ADMIN_TOKEN     {shown_token}

Try it (in another shell):
  APP={shlex.quote(alerting_app_executable())} API={api_url}/api/v1 {token_setting}
  # a client; its API key is shown only in this answer
  KEY=$("$APP" api POST $API/clients '{{"name":"acme"}}' --token "$ADMIN_TOKEN" --field api_key)
  # a rule of that client: severity=HIGH, source=payments, any name
  RULE=$("$APP" api POST $API/rules '{{"severity":"HIGH","source":"payments","name":"*"}}' \\
      --token "$KEY" --field rule_id)
  # a webhook endpoint on the rule (any URL that accepts a POST; to watch its notifications arrive,
  # run "$APP" receive --port 9000 in a third shell first, and to check their signatures too,
  # start it again with --secret <the "secret" of this answer>, one --secret per endpoint)
  "$APP" api POST $API/endpoints '{{"rule_id":"'$RULE'","type":"webhook","value":"http://127.0.0.1:9000/hook"}}' \\
      --token "$KEY"
  # an alert, over HTTP ...
  "$APP" api POST $API/alerts '{first}' --token "$ADMIN_TOKEN"
  # ... or with any Kafka client, on topic alerts.new keyed by alert_id
  KAFKA_BOOTSTRAP_SERVERS={kafka} "$APP" send alerts.new \\
      --key-serializer raw --value-serializer raw --key a-2 '{second}'
  # what was notified
  "$APP" api GET $API/notifications --token "$KEY"

Ctrl-C stops the worker and the embedded services.
"""
