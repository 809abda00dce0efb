"""The end offsets of partitions, as they are: what `alerting-app topics` and `tail` show and the
replicas (tables/changelog_replica.py) read up to."""
from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from alerting_app.kafka_connection import Broker, client_args


class EndOffsetsUnknown(KafkaError):
    """The broker answered no fetch for some partition in time: their ends are not known."""


async def end_offsets(broker: Broker, tps: list[TopicPartition],
                      timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """The offset after the last message of each partition.

    Asked with ListOffsets, and raised to the high watermark of a fetch from there: the Tansu broker
    answers ListOffsets with the first offset of the partition's last record batch + 1, which is
    below the true end whenever that batch holds several messages. Taken as the end, it made a
    restarted worker think the topic was recreated and throw its store away, could let
    matching start before the last rules were read, and had `alerting-app topics` show an end of
    9 for 200 messages (and a committed offset past the end).
    """
    probe = AIOKafkaConsumer(**client_args(broker), enable_auto_commit=False, fetch_max_wait_ms=10)
    await probe.start()
    try:
        probe.assign(tps)
        ends = await probe.end_offsets(tps)
        for tp in tps:
            probe.seek(tp, ends[tp])
        deadline = time.monotonic() + timeout_s
        # Every fetch response carries the partition's high watermark, records or not.
        while any(probe.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            await probe.getmany(*tps, timeout_ms=50)
        unknown = sorted(f"{tp.topic}[{tp.partition}]" for tp in tps if probe.highwater(tp) is None)
        if unknown:
            # ListOffsets alone may be short of the end (above): a replica taking it would count
            # itself caught up before the last rules were read. Its caller tries again instead.
            raise EndOffsetsUnknown(f"no fetch answer within {timeout_s:g}s for {', '.join(unknown)}")
        return {tp: max(ends[tp], probe.highwater(tp)) for tp in tps}
    finally:
        await probe.stop()
