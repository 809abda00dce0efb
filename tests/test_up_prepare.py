"""`alerting-app up`'s preparation: a worker's table state of a broker that is gone is not kept.

The embedded broker keeps messages in memory, so each run of `up` starts a new one with empty
changelogs; Faust refuses to start on table state that remembers offsets past their end.
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from alerting_app.embedded import EmbeddedServices
from alerting_app.settings import Settings, load_settings
from alerting_app.up import _missing, _prepare, local_run_defaults, worker_environment
from pipe_lines import read_lines_until

# The test's own bound on `up` printing "ready": beyond up's own (its services' start, then 300 s for the
# worker), so that up's message is what a slow start shows, and a hang fails instead of stopping the run.
UP_READY_TIMEOUT_S = 420.0


async def insert_a_client_rule_and_silence(conn, rule_version: int = 1) -> dict[str, str]:
    """A client with a rule (HIGH, payments, *) at `rule_version` and a silence in force for a day,
    written straight into Postgres as a release's data; their ids by kind."""
    ids = {name: str(uuid.uuid4()) for name in ("client", "rule", "silence")}
    await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'up', $2)",
                       ids["client"], uuid.uuid4().hex)
    await conn.execute("INSERT INTO rules (rule_id, client_id, severity, source, name, version)"
                       " VALUES ($1, $2, 'HIGH', 'payments', '*', $3)", ids["rule"], ids["client"], rule_version)
    await conn.execute("INSERT INTO silences (silence_id, client_id, severity, source, name, starts_at,"
                       " ends_at, comment, created_by) VALUES ($1, $2, '*', 'payments', '*', now(),"
                       " now() + interval '1 day', 'maintenance', 'ops')", ids["silence"], ids["client"])
    return ids


def prepare_stopped_by(publish_stopped, env: dict[str, str], monkeypatch) -> None:
    """`up`'s preparation on `env`, stopped (KeyboardInterrupt, a Ctrl-C) by `publish_stopped` standing
    for its publish of the rules or silences."""
    from alerting_app import up

    with monkeypatch.context() as interrupted:
        interrupted.setattr(up, "publish_current_state", publish_stopped)
        with pytest.raises(KeyboardInterrupt):
            _prepare(env, Settings())


def _fetch(database_url: str, query: str, *args: object) -> list:
    """The rows of one query, on a connection of its own."""
    import asyncpg

    async def fetch() -> list:
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()
    return asyncio.run(fetch())


def _prepared_on_a_new_broker(tmp_path, topics: list[str]) -> dict[str, list[tuple[bytes, bytes]]]:
    """What `up`'s preparation put on these topics of a new broker, (key, value) by topic."""
    from kafka_probe import read_topic

    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    with EmbeddedServices(tmp_path / "services") as new_broker:
        env.update(new_broker.start(postgres=False, redis=False))
        _prepare(env, Settings())
        return {topic: asyncio.run(read_topic(env["KAFKA_BOOTSTRAP_SERVERS"], topic)) for topic in topics}


def test_the_table_state_is_kept_for_the_same_broker_and_removed_for_a_new_one(services, tmp_path):
    data_dir = tmp_path / "data"
    table_file = data_dir / "faust" / "alerting-app-data" / "v1" / "tables" / "notification-groups-8.db" / "CURRENT"
    rule_store_file = data_dir / "rules" / "alerting-app" / "CURRENT"
    for path in (table_file, rule_store_file):
        path.parent.mkdir(parents=True)
        path.write_text("MANIFEST-000001\n")
    env = {**os.environ, "DATA_DIR": str(data_dir)}

    _prepare(env, Settings())  # the test session's broker: every topic is there already
    assert table_file.exists()

    with EmbeddedServices(tmp_path / "services") as new_broker:
        env.update(new_broker.start(postgres=False, redis=False))
        _prepare(env, Settings())
    assert not (data_dir / "faust").exists()
    # The rule store checks by itself which broker it read (tables/rule_replica.py).
    assert rule_store_file.exists()


def test_a_new_broker_holds_every_rule_and_silence_before_the_worker_starts(services, tmp_path):
    # Queued for the relay, the rules reached the new broker only once the worker ran, its rule
    # replica already caught up with the near-empty topic: `up` said "ready" while the worker held
    # 6,898 of 50,005 seeded rules, and matched alerts against those alone.
    import asyncpg

    from alerting_app.contracts import Rule, RuleChanged

    async def insert() -> dict[str, str]:
        conn = await asyncpg.connect(services.database_url)
        try:
            ids = await insert_a_client_rule_and_silence(conn, rule_version=2)
            # Its version 1, queued by the API and not relayed when the last run stopped.
            version_1 = RuleChanged.upsert(Rule(rule_id=ids["rule"], client_id=ids["client"], severity="HIGH",
                                                source="payments", name="*", enabled=False, version=1))
            await conn.execute("INSERT INTO rule_outbox (rule_id, payload) VALUES ($1, $2::jsonb)", ids["rule"],
                               version_1.model_dump_json())
            return ids
        finally:
            await conn.close()

    ids = asyncio.run(insert())
    messages = _prepared_on_a_new_broker(tmp_path, ["rule.changed", "silence.changed"])
    on_topics = {topic: [json.loads(value) for key, value in messages[topic] if key == ids[kind].encode()]
                 for topic, kind in (("rule.changed", "rule"), ("silence.changed", "silence"))}

    [rule] = on_topics["rule.changed"]
    assert (rule["action"], rule["version"], rule["rule"]["enabled"]) == ("upsert", 2, True)
    [silence] = on_topics["silence.changed"]
    assert silence["action"] == "upsert" and silence["silence"]["comment"] == "maintenance"
    # The stale version 1 it supersedes is not relayed after it (compaction would keep that one).
    assert _fetch(services.database_url, "SELECT 1 FROM rule_outbox WHERE rule_id = $1", ids["rule"]) == []


async def _notification(conn, client_id: str, *, status: str = "PENDING", emitted: bool = True,
                        alerts: str | None = None, delivery: str | None = None, group_rule_id: str | None = None) -> str:
    """A notifications row, with one delivery row in status `delivery` (None: no delivery opened)."""
    notification_id = str(uuid.uuid4())
    alert = {"alert_id": f"alert-{notification_id}", "event_ts": 1700000000.0, "severity": "HIGH",
             "source": "payments", "name": "CheckoutLatency"}
    await conn.execute(
        "INSERT INTO notifications (notification_id, client_id, alert_id, alerts, rule_ids, status, emitted,"
        " truncated_alerts, group_rule_id) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)",
        notification_id, client_id, alert["alert_id"], alerts or json.dumps([alert]), [uuid.uuid4()], status,
        emitted, 3 if group_rule_id else 0, group_rule_id)
    if delivery is not None:
        await conn.execute("INSERT INTO deliveries (notification_id, endpoint_id, channel, status)"
                           " VALUES ($1, $2, 'webhook', $3)", notification_id, uuid.uuid4(), delivery)
    return notification_id


def test_a_new_broker_gets_the_notifications_whose_deliveries_were_never_opened(services, tmp_path, capsys):
    # The embedded broker keeps messages in memory: a notification emitted to notifications.ready
    # but not yet taken in by the deliver stage when `up` stopped (or inserted and not yet emitted)
    # stayed PENDING for ever after the next start, nothing left to deliver or settle it, and its
    # alert, deduplicated by it, was never notified again.
    import asyncpg

    async def insert() -> dict[str, str]:
        conn = await asyncpg.connect(services.database_url)
        try:
            client_id = str(uuid.uuid4())
            await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'up', $2)",
                               client_id, uuid.uuid4().hex)
            return {
                "client_id": client_id,
                "emitted": await _notification(conn, client_id),
                "not emitted": await _notification(conn, client_id, emitted=False),
                "group": await _notification(conn, client_id, emitted=False, group_rule_id=str(uuid.uuid4())),
                "being delivered": await _notification(conn, client_id, delivery="PENDING"),
                "settled": await _notification(conn, client_id, status="SENT", delivery="SENT"),
                "unreadable": await _notification(conn, client_id, alerts="[{}]"),
            }
        finally:
            await conn.close()

    ids = asyncio.run(insert())
    messages = [json.loads(value) for _, value in _prepared_on_a_new_broker(tmp_path, ["notifications.ready"])
                ["notifications.ready"]]

    ours = {message["notification_id"]: message for message in messages if message["client_id"] == ids["client_id"]}
    assert set(ours) == {ids["emitted"], ids["not emitted"], ids["group"]}
    assert ours[ids["group"]]["truncated_alerts"] == 3 and ours[ids["group"]]["alerts"][0]["source"] == "payments"
    emitted = _fetch(services.database_url, "SELECT notification_id::text, emitted FROM notifications"
                     " WHERE notification_id = ANY($1::uuid[])", [ids["not emitted"], ids["group"]])
    assert dict(emitted) == {ids["not emitted"]: True, ids["group"]: True}
    # Other tests' rows share the database: ours must be among those named.
    unreadable_line = next(line for line in capsys.readouterr().out.splitlines()
                           if line.startswith("left pending, their rows cannot be read: "))
    assert ids["unreadable"] in unreadable_line.split(": ", 1)[1].split(", ")


@pytest.mark.parametrize("stopped_while", ["sending the pending notifications", "putting the rules back"])
def test_an_up_stopped_before_it_sent_every_pending_notification_sends_them_at_the_next_run(services, tmp_path,
                                                                                           monkeypatch, stopped_while):
    # On a broker that keeps its topics (one of KAFKA_BOOTSTRAP_SERVERS), the next `up` finds
    # notifications.ready there: before, it sent none, and what the stopped one had not sent stayed
    # PENDING for ever. Stopped while the rules went back on their topic (the longest step before
    # the sending), it had not even marked that anything was left to send.
    import asyncpg

    from alerting_app import load, up
    from alerting_app.up import RESEND_MARK
    from kafka_probe import read_topic

    async def insert() -> tuple[str, str]:
        conn = await asyncpg.connect(services.database_url)
        try:
            client_id = str(uuid.uuid4())
            await conn.execute("INSERT INTO clients (client_id, name, api_key_hash) VALUES ($1, 'up', $2)",
                               client_id, uuid.uuid4().hex)
            return client_id, await _notification(conn, client_id, emitted=False)
        finally:
            await conn.close()

    send_all = load._send_all

    async def sending_stopped(producer, topic: str, messages) -> None:
        if topic == "notifications.ready":
            raise KeyboardInterrupt  # Ctrl-C while the pending notifications are sent
        await send_all(producer, topic, messages)

    async def publish_stopped(*args, **kwargs) -> int:
        raise KeyboardInterrupt  # Ctrl-C while the rules go back on rule.changed

    client_id, pending = asyncio.run(insert())
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    with EmbeddedServices(tmp_path / "services") as kept_broker:
        env.update(kept_broker.start(postgres=False, redis=False))
        with monkeypatch.context() as interrupted:
            if stopped_while == "sending the pending notifications":
                interrupted.setattr(load, "_send_all", sending_stopped)
            else:
                interrupted.setattr(up, "publish_current_state", publish_stopped)
            with pytest.raises(KeyboardInterrupt):
                _prepare(env, Settings())
        assert (tmp_path / "data" / RESEND_MARK).exists()

        _prepare(env, Settings())  # the next run: notifications.ready is there now
        sent = [json.loads(value) for _, value in asyncio.run(read_topic(env["KAFKA_BOOTSTRAP_SERVERS"],
                                                                         "notifications.ready"))]
    assert [message["notification_id"] for message in sent if message["client_id"] == client_id] == [pending]
    assert not (tmp_path / "data" / RESEND_MARK).exists()


@pytest.mark.parametrize("stopped_on", ["rule.changed", "silence.changed"])
def test_an_up_stopped_before_it_put_the_rules_or_silences_back_puts_them_back_at_the_next_run(
        services, tmp_path, monkeypatch, stopped_on):
    # On a broker that keeps its topics (one of KAFKA_BOOTSTRAP_SERVERS), an `up` stopped after it
    # created rule.changed and silence.changed, before it had queued what goes on them (its pool or
    # producer still starting, a Ctrl-C), left them empty; the next `up`, finding them there, put
    # nothing on them, and the worker matched no alert against those rules (nor muted by those
    # silences) until someone ran republish-rules.
    import asyncpg

    from alerting_app import up
    from kafka_probe import read_topic

    async def insert() -> dict[str, str]:
        conn = await asyncpg.connect(services.database_url)
        try:
            return await insert_a_client_rule_and_silence(conn)
        finally:
            await conn.close()

    publish = up.publish_current_state

    async def publish_stopped(database_url, broker, outbox, **kwargs) -> int:
        if outbox.topic.get_topic_name() == stopped_on:
            raise KeyboardInterrupt  # Ctrl-C before anything is queued or sent
        return await publish(database_url, broker, outbox, **kwargs)

    ids = asyncio.run(insert())
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    with EmbeddedServices(tmp_path / "services") as kept_broker:
        env.update(kept_broker.start(postgres=False, redis=False))
        prepare_stopped_by(publish_stopped, env, monkeypatch)

        _prepare(env, Settings())  # the next run: both topics are there now
        on_topics = {topic: [key for key, _ in asyncio.run(read_topic(env["KAFKA_BOOTSTRAP_SERVERS"], topic))]
                     for topic in ("rule.changed", "silence.changed")}
    assert ids["rule"].encode() in on_topics["rule.changed"]
    assert ids["silence"].encode() in on_topics["silence.changed"]
    assert not any((tmp_path / "data" / mark).exists() for mark in up.PUBLISH_MARKS.values())


def test_putting_the_rules_back_on_a_topic_an_up_left_marked_keeps_the_tombstones_queued(services, tmp_path,
                                                                                           monkeypatch):
    # The topic an `up` stopped before publishing left marked is not new at the next `up`: a relay may
    # have put a rule's delete on it since, and retention queued its tombstone. The current state
    # supersedes every queued upsert and delete, not that null: dropped, it left the delete on the
    # compacted topic for good.
    import asyncpg

    from agents.rule_outbox import RULE_OUTBOX, queue_tombstones
    from kafka_probe import read_topic

    async def publish_stopped(*args, **kwargs) -> int:
        raise KeyboardInterrupt  # Ctrl-C before anything is queued or sent

    async def queue_forgotten_deletion() -> str:
        conn = await asyncpg.connect(services.database_url)
        try:
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            rule_id, client_id = str(uuid.uuid4()), str(uuid.uuid4())
            await queue_tombstones(conn, RULE_OUTBOX, [{"rule_id": rule_id, "client_id": client_id, "version": 2}])
            return rule_id
        finally:
            await conn.close()

    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    with EmbeddedServices(tmp_path / "services") as kept_broker:
        env.update(kept_broker.start(postgres=False, redis=False))
        prepare_stopped_by(publish_stopped, env, monkeypatch)
        forgotten = asyncio.run(queue_forgotten_deletion())

        _prepare(env, Settings())  # the next run puts the rules on the topic it finds there
        on_topic = asyncio.run(read_topic(env["KAFKA_BOOTSTRAP_SERVERS"], "rule.changed"))
    queued = _fetch(services.database_url, "SELECT tombstone FROM rule_outbox WHERE rule_id = $1", forgotten)
    # Left for the relay, to come after the delete; not sent here, and not dropped.
    assert [row["tombstone"] for row in queued] == [True]
    assert forgotten.encode() not in [key for key, _ in on_topic]


def test_an_up_finding_notifications_ready_present_sends_nothing_again(services, tmp_path):
    # The mark written before the topics are created is taken back when notifications.ready was
    # there already: a restart on a broker that keeps its topics sends no pending notification again.
    from alerting_app.up import RESEND_MARK

    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    with EmbeddedServices(tmp_path / "services") as kept_broker:
        env.update(kept_broker.start(postgres=False, redis=False))
        _prepare(env, Settings())
        assert not (tmp_path / "data" / RESEND_MARK).exists()
        _prepare(env, Settings())
    assert not (tmp_path / "data" / RESEND_MARK).exists()


def test_a_second_up_on_the_same_data_dir_stops_at_once_and_says_why(services, tmp_path):
    # Even with every service given (nothing embedded, so no services folder is locked): two
    # workers would share DATA_DIR's table state and log.
    import fcntl
    import subprocess

    from alerting_app.embedded import free_port
    from alerting_app.up import alerting_app_executable

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / ".up.lock", "w") as running:  # what the first `up` holds, and the pid it wrote
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write(f"{os.getpid()}\n")
        running.flush()
        second = subprocess.run([alerting_app_executable(), "up"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port())})

    assert second.returncode != 0
    # Named, so that it can be stopped: one started in the background has no terminal for a Ctrl-C.
    assert (f"DATA_DIR {data_dir} is in use by another `alerting-app up` (`python3 dev.py run`), pid {os.getpid()}; "
            "stop that one") in second.stderr, second.stderr
    assert not (data_dir / "worker.log").exists()


def test_up_on_a_data_dir_a_worker_runs_on_stops_at_once_and_leaves_its_table_state(services, tmp_path):
    # `up` removed the running worker's table state (a new broker's, as the embedded one is at
    # each start), and only then did its own worker stop, finding the folder in use.
    import fcntl
    import subprocess

    from alerting_app.embedded import free_port
    from alerting_app.up import alerting_app_executable

    data_dir = tmp_path / "data"
    table_file = data_dir / "faust" / "v1" / "tables" / "CURRENT"
    table_file.parent.mkdir(parents=True)
    table_file.write_text("MANIFEST-000001\n")
    environment = {name: value for name, value in os.environ.items() if name != "KAFKA_BOOTSTRAP_SERVERS"}
    with open(data_dir / ".worker.lock", "w") as running:  # what `alerting-app worker` holds
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write("4242\n")
        running.flush()
        up = subprocess.run([alerting_app_executable(), "up"], capture_output=True, text=True, timeout=120,
                            env={**environment, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port())})

    assert up.returncode != 0
    assert f"DATA_DIR {data_dir} is in use by an `alerting-app worker`, pid 4242;" in up.stderr, up.stderr
    assert table_file.exists()
    assert not (data_dir / "services").exists() and not (data_dir / "worker.log").exists()


def test_the_generated_admin_token_is_kept_and_one_cut_short_is_replaced(tmp_path):
    from alerting_app.up import persistent_admin_token

    token = persistent_admin_token(tmp_path)
    assert persistent_admin_token(tmp_path) == token  # a restart keeps the one printed
    assert (tmp_path / "admin-token").stat().st_mode & 0o777 == 0o600

    (tmp_path / "admin-token").write_text("\n")  # a run killed while writing it
    replaced = persistent_admin_token(tmp_path)
    assert len(replaced) >= 32 and replaced != token
    assert (tmp_path / "admin-token").read_text() == replaced + "\n"
    assert [path.name for path in tmp_path.iterdir()] == ["admin-token"]


def test_up_with_a_blank_admin_token_generates_one_and_a_closed_terminal_stops_it_in_order(services, tmp_path):
    # ADMIN_TOKEN=" " is unset to the worker (settings.py): `up` must see it the same way, or the
    # worker refuses to start. SIGHUP (the terminal closed) stops it like Ctrl-C: worker first.
    import signal
    import subprocess

    from alerting_app.embedded import free_port
    from alerting_app.up import alerting_app_executable

    data_dir = tmp_path / "data"
    up = subprocess.Popen([alerting_app_executable(), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port()),
                                          "ADMIN_TOKEN": " ", "APP_ID": f"up-hup-{os.getpid()}"},
                          # As from a terminal: the suite itself may run under nohup, which `up` respects.
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        output = read_lines_until(up.stdout, lambda line: line.strip() == "ready", '"ready"', UP_READY_TIMEOUT_S)
        printed = next(line.split()[1] for line in output if line.strip().startswith("ADMIN_TOKEN "))
        assert printed == (data_dir / "admin-token").read_text().strip()

        up.send_signal(signal.SIGHUP)
        rest, _ = up.communicate(timeout=120)  # a guard: ignored, SIGHUP would leave it running
        assert up.returncode == 0, rest
    finally:
        if up.poll() is None:
            up.kill()
    assert rest.strip().endswith("stopped"), rest
    assert "Traceback" not in (data_dir / "worker.log").read_text()


def test_after_up_is_killed_a_new_run_waits_for_its_worker_to_stop(services, tmp_path, monkeypatch):
    # kill -9 of `up` leaves its worker stopping on its own (PR_SET_PDEATHSIG): a new run must not
    # clear the table state under it, nor start a second worker beside it, until it is gone.
    import signal
    import subprocess
    import threading

    import pytest

    from alerting_app import up as up_module
    from alerting_app.embedded import free_port, process_alive
    from alerting_app.up import _lock_data_dir, alerting_app_executable

    data_dir = tmp_path / "data"
    first = subprocess.Popen([alerting_app_executable(), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port()),
                                             "APP_ID": f"up-kill-{os.getpid()}"})
    worker = None
    try:
        read_lines_until(first.stdout, lambda line: line.strip() == "ready", '"ready"', UP_READY_TIMEOUT_S)
        [worker] = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True,
                                                       text=True).stdout.split()]
        os.kill(worker, signal.SIGSTOP)  # so that it is surely still there when the next run starts
        first.send_signal(signal.SIGKILL)
        first.wait()

        taken = []
        next_run = threading.Thread(target=lambda: taken.append(_lock_data_dir(data_dir)), daemon=True)
        next_run.start()
        next_run.join(2.0)
        assert not taken and process_alive(worker)  # waiting for the worker, not refused, not taken
        # A worker that never stops is named, so that it can be stopped.
        monkeypatch.setattr(up_module, "_PREVIOUS_WORKER_STOP_S", 0.0)
        with pytest.raises(SystemExit, match=rf"the worker of a run that ended .*, pid {worker}\); stop it"):
            _lock_data_dir(data_dir)

        os.kill(worker, signal.SIGCONT)  # it now stops, on the signal its parent's death sent
        next_run.join(60)
        assert taken and not process_alive(worker)
        taken[0].close()
    finally:
        if first.poll() is None:
            first.kill()
        if worker is not None and process_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_under_nohup_a_closed_terminal_leaves_up_running():
    import signal

    from alerting_app.up import _interrupt, _stop_on_signals

    saved = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        # As from a terminal under nohup: SIGINT and SIGTERM at their defaults (the suite itself may
        # run as a background job, whose SIGINT its shell ignores, and up keeps an ignore it inherits).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
        _stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is _interrupt and signal.getsignal(signal.SIGINT) is _interrupt
    finally:
        for stop, handler in saved.items():
            signal.signal(stop, handler)


def test_the_local_run_binds_to_this_machine_also_when_web_bind_is_set_empty():
    # The worker reads WEB_BIND= as unset, i.e. every address: the API (private endpoints allowed)
    # was served to the whole network while `up` printed 127.0.0.1.
    env = {"WEB_BIND": "", "ALLOW_PRIVATE_ENDPOINTS": " "}
    local_run_defaults(env)
    assert env == {"WEB_BIND": "127.0.0.1", "ALLOW_PRIVATE_ENDPOINTS": "true"}

    chosen = {"WEB_BIND": "0.0.0.0", "ALLOW_PRIVATE_ENDPOINTS": "false"}
    local_run_defaults(chosen)
    assert chosen == {"WEB_BIND": "0.0.0.0", "ALLOW_PRIVATE_ENDPOINTS": "false"}


def test_the_local_run_keeps_settings_chosen_in_lower_case():
    # The worker reads them in any case: ALLOW_PRIVATE_ENDPOINTS=true added after the user's
    # allow_private_endpoints=false came later in the environment, and won.
    chosen = {"web_bind": "0.0.0.0", "allow_private_endpoints": "false"}
    local_run_defaults(chosen)
    assert chosen == {"web_bind": "0.0.0.0", "allow_private_endpoints": "false"}


def test_service_urls_given_in_lower_case_are_the_ones_up_prepares_and_the_worker_uses(monkeypatch, tmp_path):
    # The worker's settings read them in any case; up's preparation read env["DATABASE_URL"] (and
    # the broker's, Redis's), and stopped with a KeyError on `database_url=...`.
    urls = {name: os.environ[name] for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")}
    for name, url in urls.items():
        monkeypatch.delenv(name)
        monkeypatch.setenv(name.lower(), url)
    settings = Settings()
    assert not any(_missing(settings).values())  # none started: they are given

    env = worker_environment(settings, {}, tmp_path / "data")

    assert {name: env.get(name) for name in urls} == urls


def test_the_worker_takes_the_environment_up_gives_it_when_the_user_spelt_settings_in_lower_case(
        monkeypatch, tmp_path):
    # up writes WEB_PORT, DATA_DIR, ADMIN_TOKEN, the service URLs as it read them: beside the user's
    # `web_port= 7001` (or an `admin_token` of spaces, unset), two spellings with different values,
    # which the worker refuses.
    for name in list(os.environ):
        if name.lower() in ("web_port", "admin_token", "data_dir", "web_bind"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("web_port", " 7001")
    monkeypatch.setenv("admin_token", "   ")
    monkeypatch.setenv("data_dir", f"{tmp_path}/data/")
    settings = load_settings()

    env = worker_environment(settings, {}, settings.data_dir)
    for name in set(os.environ) - set(env):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    given = load_settings()  # as the worker reads it
    assert (given.web_port, given.data_dir, given.web_bind) == (7001, tmp_path / "data", "127.0.0.1")
    assert given.admin_token == env["ADMIN_TOKEN"]


def test_up_waits_for_a_service_url_that_does_not_answer_naming_it_and_ctrl_c_stops_it(services, tmp_path):
    # The migrations came first and failed at once without naming the variable ("up failed: [Errno
    # 111] Connect call failed"); a Redis away made the worker wait silently, its reason in worker.log.
    import signal
    import subprocess

    from alerting_app.embedded import free_port
    from alerting_app.up import alerting_app_executable

    data_dir = tmp_path / "data"
    nothing_there = f"postgresql://postgres@127.0.0.1:{free_port()}/alerting"
    up = subprocess.Popen([alerting_app_executable(), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port()),
                                          "DATABASE_URL": nothing_there},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        output = read_lines_until(up.stdout, lambda line: line.startswith("waiting for"), '"waiting for"', 120)
        assert output[-1].startswith(f"waiting for DATABASE_URL {nothing_there} ("), output
        read_lines_until(up.stdout, lambda line: line.startswith("waiting for"), 'a second "waiting for"', 60)

        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0 and rest.strip().endswith("stopped"), rest
    assert not (data_dir / "worker.log").exists()


def test_up_refuses_a_database_that_does_not_exist_at_once_naming_database_url(services, tmp_path):
    import subprocess

    from alerting_app.embedded import free_port, with_database
    from alerting_app.up import alerting_app_executable

    no_database = with_database(os.environ["DATABASE_URL"], f"no_such_database_{os.getpid()}")
    up = subprocess.run([alerting_app_executable(), "up"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), "WEB_PORT": str(free_port()),
                             "DATABASE_URL": no_database})
    assert up.returncode == 1
    assert "DATABASE_URL: the server refused the login" in up.stderr and "does not exist" in up.stderr, up.stderr


def test_a_data_dir_that_cannot_be_a_folder_is_named_as_data_dir(tmp_path):
    # It was "up failed: [Errno 17] File exists: '…'", naming neither the setting nor the problem.
    import subprocess

    from alerting_app.embedded import free_port
    from alerting_app.up import alerting_app_executable

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for data_dir, problem in ((a_file, f"DATA_DIR: {a_file} is a file, not a folder"),
                              (a_file / "data", f"DATA_DIR: cannot create {a_file / 'data'}: Not a directory")):
        up = subprocess.run([alerting_app_executable(), "up"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DATA_DIR": str(data_dir), "WEB_PORT": str(free_port())})
        assert up.returncode == 1 and up.stderr.strip() == f"Invalid configuration:\n  {problem}", up.stderr


def test_up_sees_its_worker_ready_whatever_proxy_the_environment_names():
    # `up` (and the tests' workers) wait for /startedz with urllib, which went through $HTTP_PROXY:
    # a proxy cannot reach this machine's loopback, so `python3 dev.py run` on a machine with a proxy
    # configured waited its 300 s for a worker that was ready, then stopped it.
    import http.server
    import subprocess
    import sys
    import threading

    class Started(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            self.send_response(200 if self.path == "/startedz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    worker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Started)  # a stand-in for the worker's /startedz
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    try:
        check = "import sys; from alerting_app.up import _answers_200; sys.exit(0 if _answers_200(sys.argv[1]) else 1)"
        proxy = "http://127.0.0.1:9"  # nothing listens there
        result = subprocess.run([sys.executable, "-c", check, f"http://127.0.0.1:{worker.server_address[1]}/startedz"],
                                env={**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy},
                                capture_output=True, text=True, timeout=60)
    finally:
        worker.shutdown()
        worker.server_close()

    assert result.returncode == 0, result.stderr
