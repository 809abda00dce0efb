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
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port, ssl=self.tls))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def __enter__(self):
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
