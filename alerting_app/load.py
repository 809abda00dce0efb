"""The `seed`, `produce-alerts` and `republish-rules` commands, and what `up` puts back on a new
broker: data in, outside any worker."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
from aiokafka import AIOKafkaProducer

from agents.aggregate import mark_emitted
from agents.rule_outbox import Outbox, publish_current_to_new_topic, republish_all_rules
from alerting_app.db import init_connection
from alerting_app.kafka_connection import Broker, client_args
from alerting_app.migrate import naming_the_server
from alerting_app.seed import SeedReport, alert_stream, seed
from tables.group_records import NOTIFICATION_READY_COLUMNS, notification_ready


async def _pool(database_url: str) -> asyncpg.Pool:
    with naming_the_server(database_url):
        return await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=init_connection)


async def seed_database(database_url: str, **options) -> SeedReport:
    pool = await _pool(database_url)
    try:
        return await seed(pool, **options)
    finally:
        await pool.close()


async def republish(database_url: str, queue_all=republish_all_rules) -> int:
    """Queue every rule (or, with republish_all_silences, every silence) for its topic; return how many."""
    pool = await _pool(database_url)
    try:
        return await queue_all(pool)
    finally:
        await pool.close()


# PENDING without a single delivery row: its notifications.ready message was never taken in (the
# deliver stage opens a row per endpoint, or settles the notification, as soon as it takes it in).
# A page at a time, in notification_id order.
_UNDELIVERED = f"""
SELECT {NOTIFICATION_READY_COLUMNS}
FROM notifications n
WHERE status = 'PENDING' AND notification_id > $1::uuid
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.notification_id)
ORDER BY notification_id
LIMIT $2
"""
_UNDELIVERED_PAGE = 1000


async def emit_undelivered_notifications(database_url: str, broker: Broker) -> tuple[int, list[str]]:
    """Send every notification still PENDING without a delivery to notifications.ready again, and mark
    it emitted; return how many were sent, and the ids of those whose row cannot be read (left as they are).

    For a new broker (`up`'s embedded one keeps messages in memory): the messages of those
    notifications went with the old one, so nothing would ever deliver or settle them, and, the
    notification being the deduplication record, the alert would never be notified again. Taking
    one in twice sends nothing twice (agents/deliver.py).
    """
    sent, unreadable = 0, []
    async with _pool_and_producer(database_url, broker) as (pool, producer):
        after = "00000000-0000-0000-0000-000000000000"
        while rows := await pool.fetch(_UNDELIVERED, after, _UNDELIVERED_PAGE):
            after = rows[-1]["notification_id"]
            ready = []
            for row in rows:
                try:
                    ready.append(notification_ready(row))
                except (KeyError, TypeError, ValueError):  # edited by hand (no alert, no rule): not ours to guess
                    unreadable.append(row["notification_id"])
            await _send_all(producer, "notifications.ready",
                            [(notification.client_id.encode(), notification.encode()) for notification in ready])
            await mark_emitted(pool, [notification.notification_id for notification in ready])
            sent += len(ready)
    return sent, unreadable


async def publish_current_state(database_url: str, broker: Broker, outbox: Outbox, *,
                                queued_first: bool = True) -> int:
    """Every rule (RULE_OUTBOX) or silence (SILENCE_OUTBOX) Postgres holds, and every deletion it
    remembers, put on the topic just created for them (`publish_current_to_new_topic`, which says
    when `queued_first` may be False); how many."""
    async with _pool_and_producer(database_url, broker) as (pool, producer):
        return await publish_current_to_new_topic(
            pool, outbox, lambda messages: _send_all(producer, outbox.topic.get_topic_name(), messages),
            queued_first=queued_first)


@contextlib.asynccontextmanager
async def _pool_and_producer(database_url: str, broker: Broker) -> AsyncIterator[tuple[asyncpg.Pool, AIOKafkaProducer]]:
    pool = await _pool(database_url)
    producer = AIOKafkaProducer(**client_args(broker), acks="all")
    try:
        await producer.start()
        yield pool, producer
    finally:
        await producer.stop()
        await pool.close()


async def _send_all(producer: AIOKafkaProducer, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Send keyed messages, in order, and return once the broker acknowledged every one."""
    await asyncio.gather(*[await producer.send(topic, key=key, value=value) for key, value in messages])


async def produce_alerts(broker: Broker, *, count: int, rate: float, random_seed: int = 7,
                         prefix: str | None = None) -> tuple[int, float]:
    """Send `count` generated alerts to alerts.new at about `rate` per second (0: as fast as possible).

    Alert ids are `<prefix>-<n>` (a random prefix by default), so a run's alerts can be told apart.
    """
    producer = AIOKafkaProducer(**client_args(broker), acks="all", linger_ms=5)
    try:
        await producer.start()
    except BaseException:
        await producer.stop()  # else the failed command also printed "Unclosed AIOKafkaProducer"
        raise
    started = time.perf_counter()
    try:
        pending = []
        for n, alert in enumerate(alert_stream(count, random_seed=random_seed, prefix=prefix)):
            pending.append(await producer.send("alerts.new", key=alert.alert_id.encode(), value=alert.encode()))
            if rate > 0:
                ahead = (n + 1) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count, time.perf_counter() - started
