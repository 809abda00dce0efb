"""Redis commands of many concurrent callers, sent as one pipeline per turn of the event loop.

Every delivery makes two or three small Redis calls (its rate-limit token, its claim, its sent mark).
Made one by one, each costs a connection checkout, a write, a read and a release: at a thousand
deliveries a second that was a third of a worker's CPU (docs/delivery.md). Commands queued during
one turn of the event loop go to Redis together, in one round trip, and each caller still awaits
its own answer, so the code making the call reads as if it had Redis to itself.

Errors stay per command: a command that fails gets its own exception; a lost connection fails every
command of that pipeline. Commands are not a transaction (MULTI): each is atomic on its own.

A write refused READONLY came over a connection to a server that is a replica now: a failover moved
the Redis address to the promoted replica and demoted the old primary, which keeps its clients'
connections open. The pool's idle connections are then dropped, so that the next commands connect
to the address anew, reaching the new primary; kept, they reached the old one until the worker
restarted, and no delivery went out.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

# A pipeline much longer than this waits for its last answer while callers could already go on.
MAX_PIPELINE = 500


class PipelinedRedis:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._queued: list[tuple[Callable[[Pipeline], Any], asyncio.Future]] = []

    def call(self, queue_command: Callable[[Pipeline], Any]) -> asyncio.Future:
        """Queue the one command that `queue_command` puts on a pipeline; await its answer."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queued.append((queue_command, answer))
        if len(self._queued) == 1:
            # Runs after the callbacks already due in this turn, so their commands join this pipeline.
            loop.call_soon(self._send_queued)
        return answer

    async def script(self, script: AsyncScript, keys: list, args: list) -> Any:
        """EVALSHA `script`, loading it first when Redis does not have it (a new or restarted Redis)."""
        try:
            return await self.call(lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args))
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await self.call(lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args))

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), MAX_PIPELINE):
            asyncio.ensure_future(self._send(queued[start:start + MAX_PIPELINE]))

    async def _send(self, batch: list[tuple[Callable[[Pipeline], Any], asyncio.Future]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue_command, _ in batch:
                    queue_command(pipe)
                answers = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): nobody is left to answer
            for _, answer in batch:
                answer.cancel()
            raise
        if any(refused_by_a_replica(value) for value in answers):
            # Before the callers hear of it: their retries must not take a connection to the replica.
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        for (_, answer), value in zip(batch, answers, strict=True):
            if answer.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(value, Exception):
                answer.set_exception(value)
            else:
                answer.set_result(value)


def refused_by_a_replica(answer: Any) -> bool:
    """A write refused by a read-only replica: ReadOnlyError for a command, a ResponseError quoting
    READONLY for a script's write (a rate limit's token)."""
    return isinstance(answer, ReadOnlyError) or (isinstance(answer, ResponseError) and "READONLY" in str(answer))
