"""Command-line input that makes no sense is refused naming the option, before anything is done, and a
service that cannot be reached is named in a one-line error."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from alerting_app.embedded import free_port
from alerting_app.settings import COMMAND_BROKER_TIMEOUT_S
from alerting_app.up import alerting_app_executable
from broker_front import BrokerFront, pipe

COMMAND_TIMEOUT_S = 120


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([alerting_app_executable(), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


@pytest.mark.parametrize("args, option", [
    # A negative count "sent -3 alerts"; a negative or nan rate sent as fast as possible.
    (["--count", "-3"], "--count"),
    (["--count", "2", "--rate", "-5"], "--rate"),
    (["--count", "2", "--rate", "nan"], "--rate"),
    (["--count", "2", "--rate", "inf"], "--rate"),
])
def test_produce_alerts_refuses_a_count_or_rate_below_zero_or_not_a_number(args, option):
    result = run("produce-alerts", *args)

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Invalid value for '{option}'" in result.stderr and "sent" not in result.stdout


def test_produce_alerts_sending_one_alert_says_one_alert(services):
    # It said "sent 1 alerts". Its sources (svc-NN) are the seeded ones, which no other test's rule names.
    result = run("produce-alerts", "--count", "1", KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap_servers)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent 1 alert in "), result.stdout


@pytest.mark.parametrize("command, variable", [(["topics"], "KAFKA_BOOTSTRAP_SERVERS"),
                                               (["tail", "alerts.new"], "KAFKA_BOOTSTRAP_SERVERS"),
                                               (["migrate"], "DATABASE_URL")])
def test_a_command_without_its_service_variable_says_where_up_shows_it(command, variable):
    # Beside `alerting-app up`, whose worker alone gets the embedded services' addresses, a new shell
    # has none: the message named the variable but not where its value is.
    unset = {name: value for name, value in os.environ.items() if name.upper() != variable}
    result = subprocess.run([alerting_app_executable(), *command], env=unset, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)

    assert result.returncode != 0
    assert result.stderr.strip() == (f"Missing configuration: {variable} must be set for this command (for the "
                                     f"embedded services of `alerting-app up`, the address it printed)."), result.stderr


@pytest.mark.parametrize("command", ["migrate", "republish-rules", "republish-silences", "seed"])
def test_a_command_whose_postgres_refuses_names_the_command_as_typed_and_the_server(command):
    # It said "republish_rules failed: [Errno 111] Connect call failed ('127.0.0.1', 5432)".
    url = f"postgresql://alerting:secret@127.0.0.1:{free_port()}/alerting"

    result = run(command, DATABASE_URL=url)

    assert result.returncode == 1, result.stdout
    [line] = result.stderr.splitlines()
    hidden = url.replace(":secret@", ":***@")
    assert line.startswith(f"{command} failed: Postgres at {hidden} (DATABASE_URL): "), line
    assert "Connect call failed" in line


@pytest.mark.parametrize("command", [["topics"], ["tail", "alerts.new"], ["create-topics"], ["produce-alerts"],
                                     ["send", "alerts.new", "{}"]])
def test_a_command_whose_broker_refuses_names_the_variable_and_leaves_no_warnings(command):
    # It said "topics failed: KafkaConnectionError: Unable to bootstrap from [...]"; produce-alerts
    # then also printed "Unclosed AIOKafkaProducer" and the producer's repr.
    address = f"127.0.0.1:{free_port()}"

    result = run(*command, KAFKA_BOOTSTRAP_SERVERS=address)

    assert result.returncode == 1, result.stdout
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"{command[0]} failed: {no_broker(address)}"), result.stderr
    assert "Unclosed" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def no_broker(address: str) -> str:
    return (f"no connection to the broker (KAFKA_BOOTSTRAP_SERVERS={address}), or no answer from it within "
            f"{COMMAND_BROKER_TIMEOUT_S:g} s: KafkaConnectionError: Unable to bootstrap")


class SilentBroker(BrokerFront):
    """Takes connections and never answers: a stuck broker, or a port some other program listens on."""

    def __init__(self, port: int) -> None:
        super().__init__(port, upstream_port=0)
        self.address = f"127.0.0.1:{port}"
        self.first_connection_at: float | None = None  # time.monotonic()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.first_connection_at is None:
            self.first_connection_at = time.monotonic()
        await reader.read()  # until the client gives up


BROKER_COMMANDS = [["topics"], ["tail", "alerts.new"], ["create-topics"], ["produce-alerts", "--count", "1"],
                   ["send", "alerts.new", "{}"]]


def test_a_command_whose_broker_never_answers_gives_up_after_the_command_timeout_naming_the_variable():
    # Each waited 41 s (aiokafka's 40 s request timeout) before it failed.
    with contextlib.ExitStack() as stack:
        brokers = [stack.enter_context(SilentBroker(free_port())) for _ in BROKER_COMMANDS]

        def run_timed(command: list[str], broker: SilentBroker) -> tuple[subprocess.CompletedProcess, float]:
            result = run(*command, KAFKA_BOOTSTRAP_SERVERS=broker.address)
            return result, time.monotonic()

        # At once: each takes the timeout, which is what is measured from its broker's first connection.
        with ThreadPoolExecutor(len(BROKER_COMMANDS)) as commands:
            outcomes = list(commands.map(run_timed, BROKER_COMMANDS, brokers))

    for command, broker, (result, ended_at) in zip(BROKER_COMMANDS, brokers, outcomes):
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        last = result.stderr.splitlines()[-1]
        assert last.startswith(f"{command[0]} failed: {no_broker(broker.address)}"), (command, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        waited = ended_at - broker.first_connection_at
        assert COMMAND_BROKER_TIMEOUT_S - 1 < waited < COMMAND_BROKER_TIMEOUT_S + 10, (command, waited)


# Well above what a working broker takes, below the commands' timeout.
SLOW_ANSWER_S = 6.0


class SlowBroker(BrokerFront):
    """The session's broker, whose first answer on each connection through here comes SLOW_ANSWER_S late:
    a broker slow to answer a new client (Tansu's first metadata after it starts can take seconds)."""

    connections = 0  # how many clients came through here

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(pipe(reader, upstream_writer), self._answers(upstream_reader, writer))

    async def _answers(self, upstream_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await upstream_reader.read(65536)
        await asyncio.sleep(SLOW_ANSWER_S)
        writer.write(first)
        await pipe(upstream_reader, writer)


def test_a_command_whose_broker_answers_slowly_but_within_the_timeout_still_works(services):
    # The bootstrap's answers (API versions, then the first metadata) come through the slow front;
    # the broker's metadata then names its own address, which the rest of the command uses.
    upstream_port = int(services.kafka_bootstrap_servers.rsplit(":", 1)[1])
    with SlowBroker(free_port(), upstream_port) as slow:
        started = time.monotonic()
        result = run("topics", "--json", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{slow.port}")

    assert result.returncode == 0, result.stderr
    assert '"alerts.new"' in result.stdout
    assert slow.connections and time.monotonic() - started > SLOW_ANSWER_S


@pytest.mark.parametrize("command", [["topics"], ["topics", "--json"],
                                     ["tail", "rule.changed", "--from-beginning", "--limit", "1"]])
def test_a_command_whose_reader_stopped_reading_ends_without_an_error_message(services, command):
    # `alerting-app topics | head -1` said "topics failed: [Errno 32] Broken pipe": a reader that has
    # what it wants is no failure of the broker's. A pipe whose reading end is closed stands for it.
    if command[0] == "tail":  # one message there at least, whatever ran before
        run("send", "rule.changed", "--key", f"broken-pipe-{uuid.uuid4()}",
            KAFKA_BOOTSTRAP_SERVERS=services.kafka_bootstrap_servers)
    reading, writing = os.pipe()
    os.close(reading)
    try:
        result = subprocess.run([alerting_app_executable(), *command], stdout=writing, stderr=subprocess.PIPE,
                                text=True, timeout=COMMAND_TIMEOUT_S,
                                env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers})
    finally:
        os.close(writing)

    assert [line for line in result.stderr.splitlines() if not line.startswith("tailing ")] == [], result.stderr
    assert result.returncode == 1  # as Python's own recipe for EPIPE exits: what was asked was not all printed


@pytest.mark.e2e
def test_reset_refuses_the_table_state_of_a_running_worker_and_removes_it_once_the_worker_stopped(start_worker):
    """`alerting-app reset` (Faust's, listed in `--help`) removed the RocksDB table files of the worker
    running on the same DATA_DIR from under it, which every other command that touches that state
    (`up`, a second worker) refuses while a worker holds the folder."""
    worker = start_worker(STORE_URL="rocksdb://")
    data_dir = worker.log_path.with_suffix("")  # the fixture's DATA_DIR, beside the worker's log
    tables = data_dir / "faust" / "v1" / "tables"
    assert list(tables.iterdir()), "the worker's table state"

    refused = run("reset", DATA_DIR=str(data_dir), STORE_URL="rocksdb://")

    assert refused.returncode != 0
    # Under no "Invalid configuration" heading, as it was: nothing is wrong with the settings.
    assert refused.stderr.strip() == (f"reset: DATA_DIR {data_dir} is in use by a running worker (pid "
                                      f"{worker.child.process.pid}); stop the worker first (reset would remove its "
                                      f"table files from under it)"), refused.stderr
    assert list(tables.iterdir())

    worker.stop()
    done = run("reset", DATA_DIR=str(data_dir), STORE_URL="rocksdb://")

    assert done.returncode == 0, done.stderr
    assert not tables.exists()
