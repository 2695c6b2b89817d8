"""A TCP forwarder that tests can cut and restore, to take a real service (Redis) away and back.

    proxy = TcpProxy("127.0.0.1", 6379); await proxy.start()   # redis://127.0.0.1:{proxy.port}
    await proxy.stop()      # listener closed, live connections reset: "Redis is down"
    await proxy.start()     # the same port again: "Redis is back"
    proxy.silent = True     # connections are accepted and read, never answered: "Redis hangs"
    proxy.sent              # every byte clients sent through it: what a code path asked Redis
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.silent = False
        self.sent = bytearray()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.silent:
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer, self.sent), _pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                record: bytearray | None = None) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if record is not None:
                record += data
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


def unused_port() -> int:
    """A local port nothing listens on (bound and released; the OS hands ports out in turn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
