"""PipelinedRedis against the real Redis: commands queued in one turn share one round trip, and each
caller gets its own answer or its own error."""
from __future__ import annotations

import asyncio
import os
import signal
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError, TimeoutError as RedisTimeoutError

from alerting_app.redis_pipelining import PipelinedRedis


@pytest.fixture
async def redis(services):
    client = Redis.from_url(services.redis_url)
    yield client
    await client.aclose()


async def test_commands_of_one_turn_share_one_connection(redis):
    pipelined = PipelinedRedis(redis)
    ids = await asyncio.gather(*(pipelined.call(lambda pipe: pipe.client_id()) for _ in range(50)))
    assert len(set(ids)) == 1

    # Without it, the same concurrent calls check out connections of their own.
    ids = await asyncio.gather(*(redis.client_id() for _ in range(50)))
    assert len(set(ids)) > 1


async def test_each_caller_gets_its_own_answer(redis):
    pipelined = PipelinedRedis(redis)
    keys = [f"test:pipelining:{uuid.uuid4()}" for _ in range(20)]
    await asyncio.gather(*(pipelined.call(lambda pipe, k=k, n=n: pipe.set(k, n, ex=60))
                           for n, k in enumerate(keys)))
    values = await asyncio.gather(*(pipelined.call(lambda pipe, k=k: pipe.get(k)) for k in keys))
    assert values == [str(n).encode() for n in range(20)]


async def test_a_failing_command_fails_only_its_caller(redis):
    pipelined = PipelinedRedis(redis)
    text_key, counter_key = f"test:pipelining:{uuid.uuid4()}", f"test:pipelining:{uuid.uuid4()}"
    await redis.set(text_key, "not a number", ex=60)
    bad = pipelined.call(lambda pipe: pipe.incr(text_key))
    good = pipelined.call(lambda pipe: pipe.incr(counter_key))
    with pytest.raises(ResponseError):
        await bad
    assert await good == 1
    await redis.delete(counter_key)


async def test_an_unreachable_redis_fails_every_caller():
    client = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    pipelined = PipelinedRedis(client)
    answers = await asyncio.gather(*(pipelined.call(lambda pipe: pipe.get("x")) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(answer, RedisConnectionError) for answer in answers), answers
    await client.aclose()


async def test_a_script_redis_does_not_know_is_loaded_and_run(redis):
    pipelined = PipelinedRedis(redis)
    # A script text no one loaded before (a fresh comment), as after a Redis restart.
    script = redis.register_script(f"-- {uuid.uuid4()}\nreturn ARGV[1] .. KEYS[1]")
    assert await pipelined.script(script, ["k"], ["v"]) == b"vk"
    assert await pipelined.script(script, ["k2"], ["v"]) == b"vk2"


async def test_a_redis_that_stops_answering_fails_its_callers_instead_of_holding_them(tmp_path):
    # A paused Redis VM, or a failover that leaves the connection open: the deliveries waiting on
    # it must fail (to be retried later), not hold their send slots for ever.
    from alerting_app import redis_client
    from alerting_app.embedded import EmbeddedServices

    with EmbeddedServices(tmp_path) as services:
        url = services.start(kafka=False, postgres=False)["REDIS_URL"]
        [server] = services.children
        client = redis_client.client_for(url)
        pipelined = PipelinedRedis(client)
        assert await pipelined.call(lambda pipe: pipe.ping())
        os.kill(server.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(60):  # a guard for the suite; REDIS_TIMEOUT_S fails it far sooner
                with pytest.raises(RedisTimeoutError):
                    await pipelined.call(lambda pipe: pipe.set("test:paused", 1, ex=60))
        finally:
            os.kill(server.pid, signal.SIGCONT)
            await client.aclose()
