"""Redis commands of many concurrent callers, sent as one pipeline per turn of the event loop.

Every delivery makes two or three small Redis calls (its rate-limit token, its claim, its sent mark).
Made one by one, each costs a connection checkout, a write, a read and a release: at a thousand
deliveries a second that was a third of a worker's CPU (docs/delivery.md). Commands queued during
one turn of the event loop go to Redis together, in one round trip, and each caller still awaits
its own answer, so the code making the call reads as if it had Redis to itself.

Errors stay per command: a command that fails gets its own exception; a lost connection fails every
command of that pipeline. Commands are not a transaction (MULTI): each is atomic on its own.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

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
        for (_, answer), value in zip(batch, answers, strict=True):
            if answer.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(value, Exception):
                answer.set_exception(value)
            else:
                answer.set_result(value)
