"""Talking to the real broker from tests: produce, read a topic, wait for a consumer group, and
wait for a replica of a changelog topic to catch up.

Waiting on the group's committed offsets, rather than sleeping, is what lets a test say
"nothing more was sent" with certainty: once the worker has committed past every message, every
message has been fully processed.
"""
from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from alerting_app.end_offsets import EndOffsetsUnknown, end_offsets


async def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    """Create each topic of `partitions` (name -> partition count), replication factor 1."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


def partition_of(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner (murmur2, like Kafka's) picks for a key."""
    return DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))


def key_on_same_partition(key: bytes, prefix: str, partitions: int) -> bytes:
    target = partition_of(key, partitions)
    n = 0
    while True:
        candidate = f"{prefix}-{n}".encode()
        if partition_of(candidate, partitions) == target:
            return candidate
        n += 1


async def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[tuple[bytes | None, bytes]]:
    """Every message on the topic right now, from the beginning, in partition order.

    `timeout` only bounds a hang (a broker that stops answering fetches, or a partition whose end
    offset is never reached): many helpers poll with this, and one stuck read would stop the run.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        async with asyncio.timeout(timeout):
            return await _read_all(consumer, bootstrap, topic)
    except TimeoutError:
        raise AssertionError(f"could not read {topic} to its end within {timeout:.0f}s") from None
    finally:
        await consumer.stop()


async def _read_all(consumer: AIOKafkaConsumer, bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    partitions = consumer.partitions_for_topic(topic) or set()
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    # The true ends: the Tansu broker answers ListOffsets short of them (alerting_app/end_offsets.py).
    ends = await end_offsets(bootstrap, tps)
    out: list[tuple[bytes | None, bytes]] = []
    for tp in tps:
        while await consumer.position(tp) < ends[tp]:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                out.append((record.key, record.value))
    return out


async def read_json(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(value) for _, value in await read_topic(bootstrap, topic)]


async def wait_until_consumed(bootstrap: str, group: str, topics: list[str], timeout: float = 180.0) -> None:
    """Block until `group` has committed every message now on `topics` (all partitions).

    A new group first reads every earlier test's messages, thousands of them by the end of the suite,
    on a CI machine of 2 shared cores: the bound is generous (it only limits a wait, it times nothing).
    The bound covers the whole wait, start-up and stop included, not only the time between polls: a
    broker that stops answering makes aiokafka retry `committed()` / `end_offsets()` for ever.
    """
    behind = ["(no offsets read yet)"]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        async with asyncio.timeout(timeout):
            await consumer.start()
            while behind:
                behind = await _partitions_behind(consumer, bootstrap, topics)
                if behind:
                    await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(
            f"group {group} did not commit everything on {', '.join(topics)} within {timeout:.0f}s;"
            f" last seen behind: {', '.join(behind)}") from None
    finally:
        await consumer.stop()


async def _partitions_behind(consumer: AIOKafkaConsumer, bootstrap: str, topics: list[str]) -> list[str]:
    """Each partition of `topics` whose committed offset is short of its end, as "topic[p] committed/end"."""
    await consumer._client.force_metadata_update()
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
    # The true ends: taking ListOffsets's answer, which the Tansu broker gives short of the end when
    # the last record batch holds several messages, could call the group done one batch early.
    try:
        ends = await end_offsets(bootstrap, tps)
    except EndOffsetsUnknown as exc:  # a loaded broker: asked again at the next poll
        return [str(exc)]
    behind = []
    for tp in tps:
        committed = await consumer.committed(tp) or 0
        if committed < ends[tp]:
            behind.append(f"{tp.topic}[{tp.partition}] {committed}/{ends[tp]}")
    return behind


async def retire_rules_left_on_topic(bootstrap: str, topic: str = "rule.changed") -> int:
    """Publish a delete for every rule still alive on `topic`; return how many.

    Tests empty Postgres between them (clean_db), which leaves earlier tests' rules alive on the
    topic; retiring them restores what production guarantees: the topic agrees with Postgres.
    """
    from alerting_app.contracts import RuleChanged

    newest: dict[str, RuleChanged] = {}
    for _, value in await read_topic(bootstrap, topic):
        try:
            change = RuleChanged.model_validate_json(value)
        except ValueError:
            continue  # dead-letter material from tests of bad input
        if change.rule_id not in newest or change.version > newest[change.rule_id].version:
            newest[change.rule_id] = change
    deletes = [
        RuleChanged(rule_id=c.rule_id, client_id=c.client_id, version=c.version + 1, action="delete")
        for c in newest.values() if c.action == "upsert"
    ]
    await produce(bootstrap, topic, [(d.rule_id.encode(), d.encode()) for d in deletes])
    return len(deletes)


async def caught_up(replica, running: asyncio.Future, timeout: float = 60.0) -> None:
    """Wait until `replica` has caught up; fail, rather than hang, if its run ended first or it is too slow."""
    waiting = asyncio.ensure_future(replica.wait_until_caught_up())
    await asyncio.wait([waiting, running], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if running.done():
        running.result()  # raises what stopped it
        raise AssertionError(f"{replica.name} stopped before it caught up")
    assert replica.is_caught_up, f"{replica.name} did not catch up in {timeout:.0f}s"
