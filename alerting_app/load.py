"""The `seed`, `produce-alerts` and `republish-rules` commands: data in, outside any worker."""
from __future__ import annotations

import asyncio
import time

import asyncpg
from aiokafka import AIOKafkaProducer

from agents.rule_outbox import republish_all_rules
from alerting_app.db import init_connection
from alerting_app.kafka_connection import Broker, client_args
from alerting_app.migrate import naming_the_server
from alerting_app.seed import SeedReport, alert_stream, seed


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
