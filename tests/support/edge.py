"""For the edge tests: a tiny real gateway, an asyncio TCP server that speaks the handshake and
depacketizes what arrives (the peer of the edge, not a mock of it: real sockets, the real
protocol, and every byte after the handshake recorded for independent decoders); decoding what
it received with PyAV; the edge daemon's configuration for loopback tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import av

from edge.daemon import DaemonConfig, DaemonResult, EdgeDaemon
from edge.frames import StreamShape
from edge.sender import Backoff
from edge.sources import SyntheticSource
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import MAX_FRAME_SIZE, frame, read_frame, write_frame
from flowcloud.protocol.h264 import AccessUnit, Depacketizer
from flowcloud.protocol.handshake import MAX_CONTROL_SIZE, Accept, ClockSync, Hello, Reject
from flowcloud.protocol.rtp import RtpPacket
from support.frames import frames_on_redis
from support.waiting import eventually

FAST_BACKOFF = Backoff(initial=0.05, maximum=0.2)
SYNTHETIC_SHAPE = StreamShape(96, 64, 30.0)  # small synthetic pictures: the point is the plumbing


def daemon_config(port: int, **changes: object) -> DaemonConfig:
    """The edge daemon's configuration for a gateway on 127.0.0.1:``port``: libx264, small packets,
    a fast reconnect backoff; ``changes`` override any field."""
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "device_id": "cam-1",
        "token": "tok",
        "mtu": 600,
        "bitrate": 300_000,
        "keyframe_interval": 10,
        "encoder": "libx264",
        "backoff": FAST_BACKOFF,
    }
    base.update(changes)
    return DaemonConfig(**base)  # type: ignore[arg-type]


async def run_synthetic_edge(config: DaemonConfig) -> DaemonResult:
    """The edge daemon with a synthetic source of `SYNTHETIC_SHAPE`, run to its end."""
    return await EdgeDaemon(config, SyntheticSource(SYNTHETIC_SHAPE)).run()


async def streaming_edge_with_fallback(
    redis_url: str,
    port: int,
    token: str,
    spool_dir: Path,
    shape: StreamShape,
    duration: float,
    timeout: float,
) -> tuple[EdgeDaemon, asyncio.Task[DaemonResult]]:
    """Device cam-1's edge daemon (synthetic source of ``shape``, a spool in ``spool_dir``, the
    bundled demo fallback model: it segments once 0.3 s offline) streaming to the gateway on
    ``port``, once 10 of its frames are on Redis (within ``timeout`` seconds)."""
    config = daemon_config(
        port, token=token, spool_dir=str(spool_dir), duration=duration, fallback_model="",
        fallback_after=0.3, fallback_fps=5.0,
    )  # fmt: skip
    daemon = EdgeDaemon(config, SyntheticSource(shape))
    edge = asyncio.create_task(daemon.run())
    assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= 10, timeout)
    return daemon, edge


@dataclass
class Session:
    hello: Hello
    clock: ClockSync | None = None
    access_units: list[AccessUnit] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)  # the RFC 4571 bytes after the handshake
    depacketizer: Depacketizer = field(default_factory=Depacketizer)
    errors: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class TestGateway:
    """``async with TestGateway() as gw``: listens on 127.0.0.1 (port 0 or a given one).

    ``rejects``: REJECT codes to answer the first connections with, in order; ``close_after``:
    access units after which the server closes each session (None: never);
    ``clock_skew``: seconds added to this gateway's clock.
    """

    __test__ = False

    def __init__(
        self,
        port: int = 0,
        rejects: list[str] | None = None,
        close_after: int | None = None,
        clock_skew: float = 0.0,
        reject_mid_stream: str | None = None,
    ) -> None:
        self.port = port
        self.rejects = list(rejects or [])
        self.close_after = close_after
        self.clock_skew = clock_skew
        self.reject_mid_stream = reject_mid_stream
        self.sessions: list[Session] = []
        self.connections = 0
        self.changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> TestGateway:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):  # a restart drops live sessions too
            writer.close()

    @property
    def access_units(self) -> list[AccessUnit]:
        return [au for s in self.sessions for au in s.access_units]

    async def wait_for(self, predicate: object, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)  # type: ignore[arg-type]

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _now(self) -> float:
        return time.time() + self.clock_skew

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        session: Session | None = None
        try:
            hello = Hello.parse(await read_frame(reader, MAX_CONTROL_SIZE))
            t1 = self._now()
            if self.rejects:
                code = self.rejects.pop(0)
                await write_frame(writer, Reject(code, f"test gateway says {code}").to_bytes())
                return
            session = Session(hello)
            self.sessions.append(session)
            accept = Accept(f"s{len(self.sessions)}", hello.edge_time, t1, self._now())
            await write_frame(writer, accept.to_bytes())
            session.clock = ClockSync.parse(await read_frame(reader, MAX_CONTROL_SIZE))
            await self._notify()
            while True:
                try:
                    body = await read_frame(reader, MAX_FRAME_SIZE)
                except asyncio.IncompleteReadError:
                    break
                session.raw += frame(body)
                try:
                    session.access_units += session.depacketizer.push(RtpPacket.parse(body))
                except ProtocolError as exc:
                    session.errors.append(str(exc))
                await self._notify()
                if self.close_after is not None and len(session.access_units) >= self.close_after:
                    if self.reject_mid_stream:
                        await write_frame(
                            writer, Reject(self.reject_mid_stream, "revoked by test").to_bytes()
                        )
                    return  # what is in flight is lost, as with a real gateway going away
            session.access_units += session.depacketizer.flush()
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            if session is not None:
                session.errors.append(str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if session is not None:
                session.closed.set()
            await self._notify()


def decode_access_units(aus: list[AccessUnit]) -> list[av.VideoFrame]:
    """Decode with PyAV, one access unit at a time, as a gateway would."""
    codec = av.CodecContext.create("h264", "r")
    frames: list[av.VideoFrame] = []
    for au in aus:
        for packet in codec.parse(au.to_annexb()):
            frames += codec.decode(packet)
    for packet in codec.parse(b""):
        frames += codec.decode(packet)
    return frames + codec.decode(None)
