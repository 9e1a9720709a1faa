"""A TCP load balancer on loopback, as in front of gateway replicas (an L4 balancer, a Kubernetes
Service): each new connection goes to the next upstream in turn that accepts it (one that refuses,
a stopped replica, is skipped), and bytes flow both ways untouched, half-closes included."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

READ_CHUNK = 1 << 16


class TcpBalancer:
    def __init__(self, upstreams: list[int]) -> None:
        self.upstreams = upstreams  # ports on 127.0.0.1, tried round robin
        self.routed: list[int] = []  # the upstream port of each connection, in order
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> TcpBalancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.upstreams)):
            port = self.upstreams[self._next % len(self.upstreams)]
            self._next += 1
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # a replica that is not listening: the next one
            self.routed.append(port)
            return upstream
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream = await self._dial()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the end of ``reader``, then half-close ``writer`` (its other direction goes on)."""
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await reader.read(READ_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
