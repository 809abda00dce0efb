"""A server in front of a test broker, as a load balancer or a broker's own listener would be: it
takes each connection on `port` (with TLS if given a context), and `_connection` decides what to do
with it before joining it to the broker on `upstream_port`. Runs on its own thread and event loop,
so it serves clients in other processes and in the test's own loop alike. This module holds no tests."""
from __future__ import annotations

import asyncio
import ssl
import threading


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy `reader` into `writer` until either side closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter) -> None:
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


class BrokerFront:
    def __init__(self, port: int, upstream_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.upstream_port, self.tls = port, upstream_port, tls
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None  # None while not listening
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, ssl=self.tls)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()

    def __enter__(self):
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class OutageFront(BrokerFront):
    """Joins each connection to the broker, as a plain TCP front, until told otherwise: `refuse()` is
    a broker that is down (its connections cut, new ones refused), `hang()` one that is stuck (it
    takes connections, and nothing passes either way: no request is answered), until `let_through()`
    (what was held then passes on, in order). `held` says how many reads wait to pass now: a request
    sent while it hangs is at the front."""

    def __init__(self, port: int, upstream_port: int) -> None:
        super().__init__(port, upstream_port)
        self.address = f"127.0.0.1:{port}"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.held = 0
        self._joined: set[asyncio.StreamWriter] = set()  # both sides of every open connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # refused while this one was being joined
            writer.transport.abort()
            upstream_writer.transport.abort()
            return
        sides = {writer, upstream_writer}
        self._joined |= sides
        try:
            await asyncio.gather(self._pass(reader, upstream_writer), self._pass(upstream_reader, writer))
        finally:
            self._joined -= sides

    async def _pass(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self._flowing.is_set():
                    self.held += 1
                    try:
                        await self._flowing.wait()
                    finally:
                        self.held -= 1
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()  # either side closing ends the connection, as without a front

    def refuse(self) -> None:
        async def down() -> None:
            server, self._server = self._server, None
            if server is not None:
                server.close()  # new connections refused
            for writer in list(self._joined):
                writer.transport.abort()
            if server is not None:
                await server.wait_closed()
        self._in_own_loop(down)

    def hang(self) -> None:
        async def stuck() -> None:
            self._flowing.clear()
        self._in_own_loop(stuck)

    def let_through(self) -> None:
        async def up() -> None:
            if self._server is None:
                await self._listen()
            self._flowing.set()
        self._in_own_loop(up)

    def _in_own_loop(self, change) -> None:
        # Waits until applied: a connection or an answer coming right after the call finds it in force.
        asyncio.run_coroutine_threadsafe(change(), self._loop).result(10)
