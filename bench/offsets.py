"""Watching a consumer group's committed offsets, and the rate at which they advance."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from figures import steady_rate


async def end_offsets(bootstrap: str, topic: str) -> int:
    """The sum of the topic's end offsets: how many messages it has ever held."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await consumer.stop()


@dataclass
class CommitProgress:
    """(seconds since watching started, messages committed) samples."""

    samples: list[tuple[float, int]]

    def rate_between(self, low: int, high: int) -> float:
        """Messages per second between the first samples at or past `low` and at or past `high`.

        Faust commits every ~2.8 s, so the committed offset moves in steps: measure across many steps
        (TooFewToMeasure when there is only one).
        """
        return steady_rate(self.samples, low, high)

    def seconds_until(self, count: int) -> float:
        return next(t for t, done in self.samples if done >= count)


async def watch_commits(bootstrap: str, group: str, topic: str, until: int, *, timeout: float = 600.0,
                        poll_s: float = 0.1) -> CommitProgress:
    """Sample the group's total committed offset on `topic` until it reaches `until`."""
    # A group member that never subscribes only reads the group's offsets; it does not join.
    # (The admin client's list_consumer_group_offsets fails against Tansu: a protocol version mismatch.)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    started = time.monotonic()
    samples: list[tuple[float, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        while True:
            done = sum([await consumer.committed(tp) or 0 for tp in tps])
            now = time.monotonic() - started
            samples.append((now, done))
            if done >= until:
                return CommitProgress(samples)
            if now > timeout:
                raise TimeoutError(f"group {group} committed {done} of {until} on {topic} in {timeout:.0f}s")
            await asyncio.sleep(poll_s)
    finally:
        await consumer.stop()
