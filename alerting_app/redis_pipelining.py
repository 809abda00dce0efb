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

from alerting_app.turn_batches import TurnBatches

# A pipeline much longer than this waits for its last answer while callers could already go on.
MAX_PIPELINE = 500


class PipelinedRedis:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._commands = TurnBatches(self._send, MAX_PIPELINE)
        self._loading: dict[str, asyncio.Future] = {}  # script sha -> its SCRIPT LOAD in flight

    def call(self, queue_command: Callable[[Pipeline], Any]) -> asyncio.Future:
        """Queue the one command that `queue_command` puts on a pipeline; await its answer."""
        return self._commands.submit(queue_command)

    async def script(self, script: AsyncScript, keys: list, args: list) -> Any:
        """EVALSHA `script`, loading it first when Redis does not have it (a new or restarted Redis)."""
        try:
            return await self.call(lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args))
        except NoScriptError:
            await self._load(script)
            return await self.call(lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args))

    async def _load(self, script: AsyncScript) -> None:
        """Load `script` into Redis once for every caller that found it missing meanwhile.

        After a Redis restart or a failover every delivery in hand finds the token's script missing
        at once. Each loaded it itself, on a connection of its own (outside the pipeline): a worker
        holding thousands of deliveries opened thousands of connections to Redis in that moment
        (Redis refuses clients past its maxclients, 10,000 by default), one SCRIPT LOAD each.
        """
        loading = self._loading.get(script.sha)
        if loading is None:
            loading = self._loading[script.sha] = asyncio.ensure_future(self.redis.script_load(script.script))
            loading.add_done_callback(self._loaded)
        # Shielded: a caller cancelled (its worker stopping) does not cancel the others' load.
        await asyncio.shield(loading)

    def _loaded(self, loading: asyncio.Future) -> None:
        for sha, future in list(self._loading.items()):
            if future is loading:
                del self._loading[sha]  # a later NOSCRIPT (Redis restarted again) loads it again
        if not loading.cancelled():
            loading.exception()  # read: asyncio logs an exception nobody retrieved (every waiter cancelled)

    async def _send(self, batch: list[Callable[[Pipeline], Any]]) -> list[Any]:
        """One pipeline's answers, a command's failure among them as its exception."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue_command in batch:
                queue_command(pipe)
            answers = await pipe.execute(raise_on_error=False)
        if any(refused_by_a_replica(value) for value in answers):
            # Before the callers hear of it: their retries must not take a connection to the replica.
            await self.redis.connection_pool.disconnect(inuse_connections=False)
        return answers


def refused_by_a_replica(answer: Any) -> bool:
    """A write refused by a read-only replica: ReadOnlyError for a command, a ResponseError quoting
    READONLY for a script's write (a rate limit's token)."""
    return isinstance(answer, ReadOnlyError) or (isinstance(answer, ResponseError) and "READONLY" in str(answer))
