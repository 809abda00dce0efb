"""Looking inside the broker: `alerting-app topics` and `alerting-app tail` (alerting_app/cli.py).

Both read without a consumer group, so looking never moves anyone's offsets. Topic names are
checked against the broker's full topic list first: a metadata request naming an unknown topic
would create it on a broker that auto-creates topics (Tansu does), with the wrong partition count.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from alerting_app.end_offsets import end_offsets
from alerting_app.kafka_connection import Broker, client_args

POLL_MS = 500


class UnknownTopic(LookupError):
    def __init__(self, topic: str, known: list[str]) -> None:
        super().__init__(f"no such topic: {topic} (topics: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class PartitionFigures:
    partition: int
    start_offset: int
    end_offset: int
    committed: int | None  # the group's committed offset; None when it committed none here

    def lag(self, consumed: bool) -> int | None:
        """Messages the group has still to process; None when the group does not read the topic."""
        if not consumed:
            return None
        # A partition the group never committed is read from its start (auto_offset_reset=earliest);
        # a commit below the start (retention deleted messages since) is read from the start too.
        position = self.start_offset if self.committed is None else max(self.committed, self.start_offset)
        return max(self.end_offset - position, 0)


@dataclass(frozen=True)
class TopicFigures:
    topic: str
    partitions: list[PartitionFigures]
    read_by_design: bool = False  # one of the topics the app's agents consume

    @property
    def consumed(self) -> bool:
        """The group reads this topic: its agents consume it (whether or not the group has committed
        on it yet: a new group's backlog is its whole topic), or it has committed an offset on it."""
        return self.read_by_design or any(p.committed is not None for p in self.partitions)

    @property
    def end_offsets(self) -> int:
        """Sum of the partitions' end offsets: every message ever written to the topic."""
        return sum(p.end_offset for p in self.partitions)

    @property
    def lag(self) -> int | None:
        if not self.consumed:
            return None
        return sum(p.lag(True) for p in self.partitions)

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partitions": len(self.partitions),
            "end_offsets": self.end_offsets,
            "lag": self.lag,
            "by_partition": [
                {"partition": p.partition, "start_offset": p.start_offset, "end_offset": p.end_offset,
                 "committed": p.committed, "lag": p.lag(self.consumed)}
                for p in self.partitions
            ],
        }


async def topic_partitions(broker: Broker) -> dict[str, list[int]]:
    """Every topic on the broker (internal `__` ones aside) and its partitions, from one metadata request."""
    admin = AIOKafkaAdminClient(**client_args(broker))
    await admin.start()
    try:
        # No topic named: the broker describes all of them and creates none.
        described = await admin.describe_topics()
    finally:
        await admin.close()
    return {
        entry["topic"]: sorted(p["partition"] for p in entry["partitions"])
        for entry in described
        if not entry["topic"].startswith("__")
    }


async def topic_figures(broker: Broker, group: str, read: frozenset[str] = frozenset()) -> list[TopicFigures]:
    """Each topic's partitions, start and end offsets, and `group`'s committed offsets; `read`: the
    topics the group consumes, committed on or not."""
    partitions = await topic_partitions(broker)
    tps = [TopicPartition(topic, p) for topic, numbers in sorted(partitions.items()) for p in numbers]
    if not tps:
        return []  # no topic yet (before create-topics); aiokafka's consumer cannot stop at once
    admin = AIOKafkaAdminClient(**client_args(broker))
    consumer = AIOKafkaConsumer(**client_args(broker), enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        # Partitions named: Tansu's answer to "all of the group's offsets" does not decode.
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await end_offsets(broker, tps)
    finally:
        await consumer.stop()
        await admin.close()
    return [
        TopicFigures(topic, [
            PartitionFigures(p, starts[TopicPartition(topic, p)], ends[TopicPartition(topic, p)],
                             _offset(committed.get(TopicPartition(topic, p))))
            for p in numbers
        ], read_by_design=topic in read)
        for topic, numbers in sorted(partitions.items())
    ]


def _offset(committed: Any) -> int | None:
    # The broker answers -1 for a partition the group has no offset for.
    return committed.offset if committed is not None and committed.offset >= 0 else None


def _not_json(constant: str) -> Any:
    # json.loads takes NaN and Infinity, which are not JSON, and json.dumps would print them back.
    raise ValueError(f"{constant} is not JSON")


def decoded(record: ConsumerRecord) -> dict[str, Any]:
    """One message as JSON: where it is, its key, and its value (parsed when it is JSON)."""
    message: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key": None if record.key is None else record.key.decode(errors="backslashreplace"),
    }
    try:
        message["value"] = json.loads(record.value, parse_constant=_not_json) if record.value is not None else None
    except (ValueError, RecursionError):
        # Not JSON (dead-letter material: NaN, nesting deeper than Python parses): shown as text
        # instead of hidden, and the line stays JSON.
        message["value_raw"] = record.value.decode(errors="backslashreplace")
    if record.headers:
        # A header's value may be null; a name given twice keeps its last value.
        message["headers"] = {name: None if value is None else value.decode(errors="backslashreplace")
                              for name, value in record.headers}
    return message


class TopicTail:
    """`async with TopicTail(...) as tail`: positioned on entry (at the start or the end of every
    partition), so whatever is produced after entering is read; `messages()` yields them."""

    def __init__(self, broker: Broker, topic: str, *, from_beginning: bool) -> None:
        self.broker = broker
        self.topic = topic
        self.from_beginning = from_beginning
        self.partitions: list[TopicPartition] = []
        self.ends_at_entry: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> "TopicTail":
        known = await topic_partitions(self.broker)
        if self.topic not in known:
            raise UnknownTopic(self.topic, sorted(known))
        self.partitions = [TopicPartition(self.topic, p) for p in known[self.topic]]
        self._consumer = AIOKafkaConsumer(**client_args(self.broker), enable_auto_commit=False,
                                          fetch_max_wait_ms=POLL_MS)
        await self._consumer.start()
        try:
            self._consumer.assign(self.partitions)
            self.ends_at_entry = await end_offsets(self.broker, self.partitions)
            if self.from_beginning:
                await self._consumer.seek_to_beginning(*self.partitions)
                for tp in self.partitions:
                    await self._consumer.position(tp)  # seeking is lazy: resolved now, at entry
            else:
                # Not `seek_to_end`: that is ListOffsets alone, which the Tansu broker answers short
                # of the end when the last record batch holds several messages, and the rest of that
                # batch was printed as if produced after entering.
                for tp in self.partitions:
                    self._consumer.seek(tp, self.ends_at_entry[tp])
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def messages(self, limit: int | None = None, *, until_end: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Decoded messages, partition by partition within each fetch, until `limit` (None: for ever);
        with `until_end`, also stop once every message there was at entry is read."""
        assert self._consumer is not None, "use inside `async with`"
        count = 0
        while limit is None or count < limit:
            if until_end and await self._read_to_the_end_at_entry():
                return
            batches = await self._consumer.getmany(timeout_ms=POLL_MS)
            for tp in sorted(batches, key=lambda tp: tp.partition):
                for record in batches[tp]:
                    yield decoded(record)
                    count += 1
                    if limit is not None and count >= limit:
                        return

    async def _read_to_the_end_at_entry(self) -> bool:
        assert self._consumer is not None
        for tp in self.partitions:
            if await self._consumer.position(tp) < self.ends_at_entry.get(tp, 0):
                return False
        return True


def figures_table(figures: list[TopicFigures], group: str, *, by_partition: bool = False) -> str:
    """The `topics` command's text: one line per topic (and per partition when asked); `-`: not read."""
    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    width = max([len("topic")] + [len(f.topic) for f in figures])
    lines = [f"consumer group: {group}", f"{'topic':<{width}}  {'partitions':>10}  {'end offsets':>11}  {'lag':>8}"]
    for topic in figures:
        lines.append(f"{topic.topic:<{width}}  {len(topic.partitions):>10}  {topic.end_offsets:>11}  "
                     f"{cell(topic.lag):>8}")
        if by_partition:
            for p in topic.partitions:
                lines.append(f"  [{p.partition}] start {p.start_offset}, end {p.end_offset}, "
                             f"committed {cell(p.committed)}, lag {cell(p.lag(topic.consumed))}")
    return "\n".join(lines)
