"""A network link on loopback: a TCP proxy with one-way delay, a bandwidth cap, jitter and outages.

The kernel here has no netem, so tests and benches put this proxy between an edge and a gateway
to reproduce the links the original FlowCloud measured (`PROFILES`). Each direction of the link
works like a bottleneck router followed by a long wire:

- bytes are serialised at ``rate`` bits/s, one segment (at most 10 ms of it, or one MSS:
  `segment_size`) after another; all connections through the link share each direction's rate;
- each segment then takes ``delay`` seconds, plus up to ``jitter`` more (uniform, seeded), to
  arrive; segments of one connection arrive in order, as TCP delivers them;
- the link holds at most its bandwidth-delay product plus ``queue_bytes`` per connection and
  direction (and reads ahead a few segments at most); beyond that it stops reading, so TCP pushes
  back on the sender as a full router queue would;
- during an `Outage` nothing arrives: a stalled route holds the bytes and delivers them when it
  ends (TCP retransmits), a ``reset`` one also cuts every connection at its start and closes new
  ones at once until it ends (a NAT or a gateway that forgot the flow).

`flowcloud link` runs one from the command line (`flowcloud.cli.link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from dataclasses import dataclass, field, replace
from types import TracebackType

log = logging.getLogger(__name__)

SEGMENT = 16 * 1024  # bytes read and timed at once at most: 15 ms at 8.5 Mbit/s, 0.4 ms at 313 Mbit/s
SEGMENT_SECONDS = 0.010  # under a rate cap, a segment is at most this long on the wire (or one MSS)
DEFAULT_QUEUE_BYTES = 256 * 1024  # the router queue above the bandwidth-delay product
ETHERNET_MSS = 1460  # TCP payload per segment on an Ethernet link (with socket_buffer)
# asyncio's StreamReader reads its socket ahead until twice its limit is buffered (64 KiB by
# default: 128 KiB, 6.8 s at 154 kbit/s), a queue in front of the link that neither queue_bytes
# bounds nor the sender sees. A small limit keeps the read-ahead to a few segments.
READ_AHEAD_LIMIT = 2 * ETHERNET_MSS


def segment_size(rate: float) -> int:
    """Bytes read and timed as one segment at ``rate`` bits/s (0: no cap): at most
    `SEGMENT_SECONDS` of serialisation, but at least one Ethernet MSS and at most `SEGMENT`. A
    router serialises packet by packet: a segment's first bytes wait for no more than its length
    (a whole 16 KiB at 154 kbit/s would hold them back 0.85 s)."""
    if not rate:
        return SEGMENT
    return max(ETHERNET_MSS, min(SEGMENT, int(rate / 8 * SEGMENT_SECONDS)))


@dataclass(frozen=True)
class LinkProfile:
    name: str
    delay: float  # one-way, seconds
    rate: float  # bits per second; 0: no cap
    jitter: float = 0.0  # seconds of extra delay at most
    description: str = ""


# The three links the original FlowCloud measured (one-way delay, bandwidth), and no link at all.
PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("loopback", 0.0, 0.0, 0.0, "no emulated link: loopback as it is"),
        LinkProfile("local", 0.0015, 313e6, 0.0, "a local computer (1.5 ms, 313 Mbit/s)"),
        LinkProfile("cloud-vm", 0.040, 85e6, 0.0, "a cloud VM (40 ms, 85 Mbit/s)"),
        LinkProfile("far-gpu", 0.350, 8.5e6, 0.0, "a far GPU server (350 ms, 8.5 Mbit/s)"),
    )
}


@dataclass(frozen=True)
class Outage:
    start: float  # seconds after the link started
    duration: float
    reset: bool = False  # cut connections (else: hold the bytes until it ends)

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass
class _Direction:
    """One direction of the link: its serialiser is shared by every connection."""

    free_at: float = 0.0  # loop time at which the serialiser is free
    delivered: int = 0  # bytes delivered in all
    received: int = 0  # bytes read in all (received - delivered: held in the link)


@dataclass(eq=False)  # kept in a set: by identity
class _Connection:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class LinkEmulator:
    """``async with LinkEmulator(target_host, target_port, profile) as link:`` then dial ``link.port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        profile: LinkProfile = PROFILES["loopback"],
        outages: tuple[Outage, ...] = (),
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        seed: int = 0,
        host: str = "127.0.0.1",
        socket_buffer: int | None = None,
    ) -> None:
        """``socket_buffer``: the receive buffer (bytes) of the link's listening end, with segments
        of an Ethernet MSS, as on a real link (loopback's 64 KiB segments do not fit a small
        window). By default the kernel grows it to megabytes: a queue in front of the link that the
        sender cannot see."""
        if profile.delay < 0 or profile.rate < 0 or profile.jitter < 0:
            raise ValueError(f"link profile {profile.name!r} has a negative delay, rate or jitter")
        for outage in outages:
            if outage.start < 0 or outage.duration <= 0:
                raise ValueError(f"outage {outage} must start at 0 or later and last a while")
        self.target = (target_host, target_port)
        self.profile = profile
        self.outages: list[Outage] = sorted(outages, key=lambda o: o.start)
        self.queue_bytes = queue_bytes
        self.socket_buffer = socket_buffer
        self.host = host
        self.port = 0
        self.up = _Direction()  # client -> target
        self.down = _Direction()  # target -> client
        self.connections = 0  # accepted in all
        self.refused = 0  # closed at once during a reset outage
        self._random = random.Random(seed)
        self._live: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._started = 0.0
        self._resets: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self, port: int = 0) -> LinkEmulator:
        self._server = await asyncio.start_server(self._accept, self.host, port, limit=READ_AHEAD_LIMIT)
        if self.socket_buffer is not None:  # (accepted connections inherit both: the window starts small)
            for sock in self._server.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffer)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, ETHERNET_MSS)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started = asyncio.get_running_loop().time()
        self._resets = asyncio.create_task(self._cut_at_resets())
        log.info(
            "link %s on %s:%d -> %s:%d: %.1f ms one way, %s, jitter %.1f ms, %d outages",
            self.profile.name,
            self.host,
            self.port,
            *self.target,
            self.profile.delay * 1000,
            f"{self.profile.rate / 1e6:g} Mbit/s" if self.profile.rate else "no rate cap",
            self.profile.jitter * 1000,
            len(self.outages),
        )
        return self

    async def close(self) -> None:
        if self._resets is not None:
            self._resets.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self._live):
            connection.abort()
            for task in connection.tasks:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- outages -----------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the link started (the time base of outages)."""
        return asyncio.get_running_loop().time() - self._started

    def cut(self, duration: float, reset: bool = False) -> Outage:
        """An outage starting now."""
        outage = Outage(self.elapsed(), duration, reset)
        self.outages = sorted([*self.outages, outage], key=lambda o: o.start)
        if reset:
            self._abort_all()
        return outage

    def set_rate(self, rate: float) -> None:
        """Change the bandwidth cap (bits/s; 0: none) from now on, for every connection."""
        if rate < 0:
            raise ValueError(f"link rate {rate} is negative")
        self.profile = replace(self.profile, rate=rate)

    def outage_at(self, elapsed: float) -> Outage | None:
        """The outage in force ``elapsed`` seconds after the start, if any."""
        return next((o for o in self.outages if o.start <= elapsed < o.end), None)

    def _abort_all(self) -> None:
        if self._live:
            log.info("link %s: outage cuts %d connections", self.profile.name, len(self._live))
        for connection in list(self._live):
            connection.abort()

    async def _cut_at_resets(self) -> None:
        for outage in [o for o in self.outages if o.reset]:
            await asyncio.sleep(max(0.0, outage.start - self.elapsed()))
            self._abort_all()

    # --- forwarding --------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        outage = self.outage_at(self.elapsed())
        if outage is not None and outage.reset:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target, limit=READ_AHEAD_LIMIT)
        except OSError as exc:
            log.info("link %s: target %s:%d refused: %s", self.profile.name, *self.target, exc)
            writer.transport.abort()
            return
        connection = _Connection(writer, target_writer)
        self._live.add(connection)
        connection.tasks = [
            asyncio.create_task(self._carry(reader, target_writer, self.up, connection)),
            asyncio.create_task(self._carry(target_reader, writer, self.down, connection)),
        ]
        try:
            await asyncio.gather(*connection.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the link is closing; streams' callback would log a cancelled handler as an error
        finally:
            self._live.discard(connection)
            connection.abort()

    async def _carry(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: _Direction,
        connection: _Connection,
    ) -> None:
        """One direction of one connection: a reader that times segments, a writer that delivers."""
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Condition()
        held = 0  # bytes read but not yet delivered
        broken = False  # the far side went away: stop waiting for room

        async def deliver() -> None:
            nonlocal held, broken
            try:
                while True:
                    at, data = await in_flight.get()
                    await asyncio.sleep(max(0.0, at - loop.time()))
                    while (outage := self.outage_at(self.elapsed())) is not None:
                        await asyncio.sleep(outage.end - self.elapsed())
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
                    direction.delivered += len(data)
                    async with room:
                        held -= len(data)
                        room.notify_all()
            except (ConnectionError, OSError):
                connection.abort()
                async with room:
                    broken = True
                    room.notify_all()

        def has_room() -> bool:  # (the rate may change: `set_rate`)
            return held <= int(self.profile.rate / 8 * self.profile.delay) + self.queue_bytes or broken

        delivering = asyncio.create_task(deliver())
        last = 0.0
        try:
            while True:
                data = await reader.read(segment_size(self.profile.rate))
                now = loop.time()
                direction.received += len(data)
                profile = self.profile
                if data and profile.rate:
                    direction.free_at = max(now, direction.free_at) + len(data) * 8 / profile.rate
                    sent = direction.free_at
                else:
                    sent = now
                extra = self._random.uniform(0.0, profile.jitter) if profile.jitter else 0.0
                last = max(last, sent + profile.delay + extra)  # in order, as TCP delivers
                in_flight.put_nowait((last, data))
                if not data:
                    break
                async with room:
                    held += len(data)
                    await room.wait_for(has_room)
            await delivering
        except (ConnectionError, OSError):
            connection.abort()
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await delivering
