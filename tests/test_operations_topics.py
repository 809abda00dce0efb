"""`alerting-app topics` and `alerting-app tail`, run as commands against the real broker."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from alerting_app.up import alerting_app_executable
from kafka_probe import create_topics
from pipe_lines import read_lines_until

COMMAND_TIMEOUT_S = 120


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([alerting_app_executable(), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


async def create_topic(bootstrap: str, partitions: int) -> str:
    name = f"ops-test-{secrets.token_hex(4)}"
    await create_topics(bootstrap, {name: partitions})
    return name


async def produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes | None, bytes]],
                  headers: list[tuple[str, bytes | None]] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key, partition=partition, headers=headers)
    finally:
        await producer.stop()


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


async def test_topics_prints_partitions_end_offsets_and_the_groups_lag(services):
    bootstrap = services.kafka_bootstrap_servers
    topic = await create_topic(bootstrap, partitions=3)
    await produce(bootstrap, topic, [(0, b"k", b"{}")] * 2 + [(1, b"k", b"{}")] * 3)
    group = f"ops-group-{secrets.token_hex(4)}"
    # The group has processed one message of partition 0 and none of partition 1.
    await commit(bootstrap, group, {TopicPartition(topic, 0): 1})

    result = run("topics", "--json", APP_ID=group)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["group"] == group
    figures = {entry["topic"]: entry for entry in report["topics"]}
    assert figures[topic]["partitions"] == 3
    assert figures[topic]["end_offsets"] == 5
    assert figures[topic]["lag"] == 1 + 3
    assert [(p["end_offset"], p["committed"], p["lag"]) for p in figures[topic]["by_partition"]] == [
        (2, 1, 1), (3, None, 3), (0, None, 0)]
    # The app's agents read alerts.new: a group that has committed nothing there yet (a new one)
    # has all of it still to process, not "does not read it".
    alerts_new = figures["alerts.new"]
    assert alerts_new["lag"] == sum(p["end_offset"] - p["start_offset"] for p in alerts_new["by_partition"])
    assert alerts_new["partitions"] == 9

    table = run("topics", APP_ID=group)

    assert table.returncode == 0, table.stderr
    assert f"consumer group: {group}" in table.stdout
    assert [line.split() for line in table.stdout.splitlines() if line.startswith(topic)] == [[topic, "3", "5", "4"]]
    assert ["alerts.new", "9"] == next(line.split()[:2] for line in table.stdout.splitlines()
                                      if line.startswith("alerts.new "))


async def test_topics_counts_every_message_of_a_batch(services):
    # Tansu answers ListOffsets with the first offset of the last batch + 1: messages sent in one
    # batch showed as one.
    bootstrap = services.kafka_bootstrap_servers
    topic = await create_topic(bootstrap, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=b"{}", partition=0) for _ in range(20)]  # one batch
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    result = run("topics", "--json", APP_ID=f"ops-fresh-{secrets.token_hex(4)}")

    assert result.returncode == 0, result.stderr
    [figures] = [entry for entry in json.loads(result.stdout)["topics"] if entry["topic"] == topic]
    assert (figures["end_offsets"], figures["by_partition"][0]["end_offset"]) == (20, 20)


async def test_end_offsets_unknown_in_time_is_an_error_not_the_short_answer(services):
    # ListOffsets alone may be short of the end on Tansu: taken as the end, a replica would count
    # itself caught up early. With no time to fetch, there is no answer but an error.
    from alerting_app.end_offsets import EndOffsetsUnknown, end_offsets

    topic = await create_topic(services.kafka_bootstrap_servers, partitions=2)
    broker = services.kafka_bootstrap_servers
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]

    with pytest.raises(EndOffsetsUnknown, match=rf"{topic}\[0\], {topic}\[1\]"):
        await end_offsets(broker, tps, timeout_s=0)
    assert await end_offsets(broker, tps) == {tps[0]: 0, tps[1]: 0}


async def test_tail_from_the_beginning_prints_each_message_as_one_json_line(services):
    bootstrap = services.kafka_bootstrap_servers
    topic = await create_topic(bootstrap, partitions=1)
    await produce(bootstrap, topic, [(0, b"a-1", b'{"alert_id": "a-1"}'), (0, None, b"[1, 2]"),
                                     (0, b"a-3", b"not json")])

    result = run("tail", topic, "--from-beginning", "--limit", "3")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(m["partition"], m["offset"], m["key"]) for m in lines] == [(0, 0, "a-1"), (0, 1, None), (0, 2, "a-3")]
    assert lines[0]["value"] == {"alert_id": "a-1"}
    assert lines[1]["value"] == [1, 2]
    assert lines[2]["value_raw"] == "not json" and "value" not in lines[2]
    assert all(m["topic"] == topic for m in lines)


async def test_tail_from_the_beginning_ends_when_the_topic_holds_fewer_than_the_limit(services):
    # The dead-letter check of docs/operations.md: `tail <topic>.dlq --from-beginning --limit 20`.
    bootstrap = services.kafka_bootstrap_servers
    topic = await create_topic(bootstrap, partitions=3)
    await produce(bootstrap, topic, [(0, b"one", b"1"), (2, b"two", b"2")],
                  headers=[("reason", b"refused"), ("empty", None)])  # a header's value may be null

    result = run("tail", topic, "--from-beginning", "--limit", "20")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(m["key"] for m in lines) == ["one", "two"]
    assert all(m["headers"] == {"reason": "refused", "empty": None} for m in lines)


async def test_tail_alerts_new_prints_the_alerts_produced_after_it_started(services):
    bootstrap = services.kafka_bootstrap_servers
    tail = subprocess.Popen([alerting_app_executable(), "tail", "alerts.new", "--limit", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The command says on stderr when it is positioned at the end; what follows is what it prints.
        [first_line] = read_lines_until(tail.stderr, lambda line: True, "first line on stderr", COMMAND_TIMEOUT_S)
        assert first_line.startswith("tailing alerts.new (9 partitions) from the end"), first_line
        alerts = [{"alert_id": f"tail-{n}-{secrets.token_hex(3)}", "schema_version": 1, "event_ts": time.time(),
                   "severity": "LOW", "source": "ops-test", "name": "Tail"} for n in range(3)]
        await produce(bootstrap, "alerts.new", [(None, a["alert_id"].encode(), json.dumps(a).encode())
                                                for a in alerts])
        out, err = tail.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        tail.kill()
        tail.wait()

    assert tail.returncode == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert sorted((m["key"], m["value"]["alert_id"]) for m in printed) == sorted(
        (a["alert_id"], a["alert_id"]) for a in alerts)
    assert all(m["topic"] == "alerts.new" and 0 <= m["partition"] < 9 for m in printed)


async def test_tail_from_the_end_skips_all_of_a_last_batch_of_several_messages(services):
    # The Tansu broker answers ListOffsets with the first offset of the last record batch + 1: a
    # tail positioned there printed the rest of that batch as if it had just been produced.
    bootstrap = services.kafka_bootstrap_servers
    topic = await create_topic(bootstrap, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=b'"old"', key=f"old-{n}".encode(), partition=0) for n in range(3)]
        assert [(await write).offset for write in sent] == [0, 1, 2]
    finally:
        await producer.stop()
    tail = subprocess.Popen([alerting_app_executable(), "tail", topic, "--limit", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(tail.stderr, lambda line: line.startswith("tailing"), "the tailing line", COMMAND_TIMEOUT_S)
        await produce(bootstrap, topic, [(0, b"new", b'"new"')])
        out, err = tail.communicate(timeout=COMMAND_TIMEOUT_S)
    finally:
        tail.kill()
        tail.wait()

    assert tail.returncode == 0, err
    assert [(m["key"], m["offset"]) for m in map(json.loads, out.splitlines())] == [("new", 3)]


async def test_tail_of_an_unknown_topic_fails_without_creating_it(services):
    name = f"ops-no-such-{secrets.token_hex(4)}"

    result = run("tail", name, "--limit", "1")

    assert result.returncode == 1
    assert f"no such topic: {name}" in result.stderr
    assert "alerts.new" in result.stderr  # the message lists the topics there are
    assert name not in await list_topics(services.kafka_bootstrap_servers)


@pytest.mark.parametrize("limit", ["0", "many"])
def test_tail_refuses_a_limit_that_is_not_a_positive_number(limit):
    result = run("tail", "alerts.new", "--limit", limit)

    assert result.returncode == 2
    assert "--limit" in result.stderr


def test_topics_on_a_broker_without_topics_prints_none_and_succeeds(tmp_path):
    # What an operator sees before `create-topics` has run.
    from alerting_app.embedded import EmbeddedServices

    with EmbeddedServices(tmp_path / "services") as empty:
        bootstrap = empty.start(postgres=False, redis=False)["KAFKA_BOOTSTRAP_SERVERS"]
        result = run("topics", "--json", KAFKA_BOOTSTRAP_SERVERS=bootstrap)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["topics"] == []


def test_fausts_global_json_option_gives_topics_as_json(services):
    # `alerting-app --help` lists Faust's global --json ("Return output in machine-readable JSON
    # format"); `alerting-app --json topics` printed the table.
    global_option = run("--json", "topics")
    own_option = run("topics", "--json")

    assert global_option.returncode == own_option.returncode == 0, global_option.stderr
    assert {t["topic"] for t in json.loads(global_option.stdout)["topics"]} == \
        {t["topic"] for t in json.loads(own_option.stdout)["topics"]}


@pytest.mark.parametrize("value", [b'{"event_ts": NaN}', b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000])
def test_a_value_that_is_not_json_after_all_is_shown_raw_and_the_line_stays_json(value):
    from aiokafka.structs import ConsumerRecord

    from alerting_app.topic_inspection import decoded

    record = ConsumerRecord(topic="alerts.new", partition=0, offset=7, timestamp=0, timestamp_type=0, key=b"k",
                            value=value, checksum=None, serialized_key_size=1, serialized_value_size=len(value),
                            headers=())
    line = json.dumps(decoded(record), allow_nan=False)
    assert json.loads(line)["value_raw"] == value.decode()


async def test_send_puts_a_corrected_message_on_a_topic_as_docs_operations_says(services):
    # docs/operations.md, "Dead-letter topics": a corrected message is sent again with `send`.
    topic = await create_topic(services.kafka_bootstrap_servers, partitions=1)

    sent = run("send", topic, "--key-serializer", "raw", "--value-serializer", "raw", "--key", "a-1",
               '{"alert_id": "a-1"}')
    assert sent.returncode == 0, sent.stderr[-2000:]

    tailed = run("tail", topic, "--from-beginning", "--limit", "1")
    [line] = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert (line["key"], line["value"]) == ("a-1", {"alert_id": "a-1"})


async def test_send_without_a_value_sends_a_tombstone_as_docs_operations_says(services):
    # docs/operations.md, "Dead-letter topics": a bad record whose key names nothing is removed with a
    # tombstone. Without a value Faust sent the JSON text `null`: a dead letter at every worker, and
    # a record compaction keeps.
    topic = await create_topic(services.kafka_bootstrap_servers, partitions=1)

    sent = run("send", topic, "--key", "names-nothing")
    assert sent.returncode == 0, sent.stderr[-2000:]

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=services.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"names-nothing", None)


def test_send_without_a_value_or_a_key_sends_nothing():
    before = end_offsets_of_alerts_new()

    result = run("send", "alerts.new")

    assert result.returncode == 1, result.stdout
    assert "needs --key" in result.stderr and "Traceback" not in result.stderr
    assert end_offsets_of_alerts_new() == before


def test_send_without_a_broker_set_stops_naming_the_variable():
    environment = {name: value for name, value in os.environ.items() if name != "KAFKA_BOOTSTRAP_SERVERS"}
    result = subprocess.run([alerting_app_executable(), "send", "alerts.new", "{}"], env=environment,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)

    assert result.returncode == 1
    assert "KAFKA_BOOTSTRAP_SERVERS must be set" in result.stderr and "Traceback" not in result.stderr


async def test_send_to_an_unknown_topic_fails_without_creating_it(services):
    # Tansu creates a topic on first use, with its own partition count: a misspelt name got the
    # message, and the command exited 0.
    name = f"ops-no-such-{secrets.token_hex(4)}"

    result = run("send", name, "--key-serializer", "raw", "--value-serializer", "raw", "--key", "k", "{}")

    assert result.returncode == 1, result.stdout
    assert f"no such topic: {name}" in result.stderr and "Traceback" not in result.stderr
    assert name not in await list_topics(services.kafka_bootstrap_servers)


@pytest.mark.parametrize("args, named", [
    (["--key-serializer", "bogus"], "--key-serializer: 'bogus'"),
    (["--value-serializer", "json|nope"], "--value-serializer: 'json|nope'"),
    # Faust's form for an agent ended in a traceback: our agents are not modules it can import.
    (["@evaluate"], "@evaluate"),
    (["--partition", "99"], "--partition: alerts.new has no partition 99"),  # a traceback too
    (["--repeat", "0"], "--repeat: must be 1 or more"),  # sent nothing, exit 0
])
def test_send_refuses_what_it_cannot_send_naming_it(args, named):
    before = end_offsets_of_alerts_new()
    topic = [] if args[0].startswith("@") else ["alerts.new"]

    result = run("send", *topic, *args, "--key", "k", "{}")

    assert result.returncode == 1, result.stdout
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert end_offsets_of_alerts_new() == before  # nothing was sent


def end_offsets_of_alerts_new() -> int:
    result = run("topics", "--json")
    assert result.returncode == 0, result.stderr
    return next(t["end_offsets"] for t in json.loads(result.stdout)["topics"] if t["topic"] == "alerts.new")


def test_create_topics_with_more_replicas_than_brokers_is_refused_naming_the_variable(tmp_path):
    # Kafka refuses such a topic with an error that did not name TOPIC_REPLICATION_FACTOR; Tansu,
    # one broker, created every topic with it.
    from alerting_app.embedded import EmbeddedServices

    with EmbeddedServices(tmp_path / "services") as empty:
        bootstrap = empty.start(postgres=False, redis=False)["KAFKA_BOOTSTRAP_SERVERS"]
        result = run("create-topics", KAFKA_BOOTSTRAP_SERVERS=bootstrap, TOPIC_REPLICATION_FACTOR="2")
        topics = asyncio.run(list_topics(bootstrap))

    assert result.returncode == 1, result.stdout
    assert "TOPIC_REPLICATION_FACTOR: 2 is more than the 1 broker of the cluster" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert [name for name in topics if not name.startswith("__")] == []


def test_a_partitions_lag_counts_only_the_messages_still_there_to_read():
    from alerting_app.topic_inspection import PartitionFigures

    # Retention deleted messages the group never read: it reads from the start offset now.
    assert PartitionFigures(partition=0, start_offset=100, end_offset=150, committed=40).lag(True) == 50
    # A topic recreated under a group's old offsets: nothing to read, not a negative lag.
    assert PartitionFigures(partition=0, start_offset=0, end_offset=10, committed=15).lag(True) == 0
    assert PartitionFigures(partition=0, start_offset=0, end_offset=10, committed=4).lag(True) == 6
