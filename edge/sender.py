"""The sender: dial the gateway, handshake, then RTP/H.264 in RFC 4571 framing; reconnect on loss.

After every (re)connect the first access unit sent is an IDR: queued access units older than
the queue's ``max_age`` are dropped as stale, and unless the queue then starts at a keyframe the
encoder is asked for one (relayed streams wait for their next), so the gateway's decoder can
start cleanly. Reconnects back off exponentially with jitter, except after a GOAWAY: the gateway is
stopping, so the sender asks its encoder for an IDR, goes on sending until that IDR is next (for
at most ``GOAWAY_CUT_TIMEOUT``), half-closes there, waits until the gateway has closed (it has
then published everything this connection carried) and reconnects at once, through the same
address (a load balancer spreads it to another replica), the IDR first: no frame is lost. What
the new session cannot start with (no IDR came: a relayed stream) is spooled as after a loss.
A live session asks for the gateway's delay reports (``delay_reports``): `PathDelay` turns them
into the queuing delay on the path, which the daemon adds to its backlog (a router's queue that
this machine's socket does not show). A REJECT for a permanent reason (unknown device, bad token,
revoked, version, malformed, certificate) ends the daemon; busy and limit are retried.

With a TLS context the connection is TLS, verified against ``server_name`` (default: the host).
A certificate failure ends the daemon like a permanent REJECT: the gateway's certificate fails
verification (wrong CA, name mismatch, expired), or the gateway refuses this device's client
certificate (missing, untrusted). Reconnecting cannot fix either; a supervisor that restarts the
daemon (systemd ``RestartSec``) retries slowly, in case the operator fixes the other side. Other
TLS errors are retried like any connection loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import random
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn

from edge import metrics
from edge.frames import EncodedFrame, StreamShape
from flowcloud.protocol.capture_time import capture_time_extension
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import frame, read_frame
from flowcloud.protocol.h264 import Packetizer
from flowcloud.protocol.handshake import (
    MAX_CONTROL_SIZE,
    REJECT_BUSY,
    REJECT_LIMIT,
    Accept,
    ClockSync,
    DelayReport,
    GoAway,
    HandshakeClosed,
    HandshakeRejected,
    Hello,
    KeyframeRequest,
    Reject,
    StreamInfo,
    client_handshake,
    parse_control,
)
from flowcloud.protocol.tls import ClientTls, describe_failure, is_certificate_failure

log = logging.getLogger(__name__)

RETRYABLE_REJECTS = (REJECT_BUSY, REJECT_LIMIT)
# A gateway refuses a client certificate from a CA it does not trust by closing the connection
# (asyncio sends no TLS alert), which with TLS 1.3 the edge sees only once it waits for the answer.
MUTUAL_TLS_HINT = (
    " (with mutual TLS, this is also how a gateway refuses a client certificate from a CA it does not trust)"
)
END = None  # queue sentinel: the source has ended
GOAWAY_CUT_TIMEOUT = 1.0  # seconds after a GOAWAY that the sender waits for an IDR to cut before
GOAWAY_CLOSE_TIMEOUT = 10.0  # seconds it then waits for the gateway to close (it publishes meanwhile)
END_CLOSE_TIMEOUT = 3.0  # seconds the sender waits for the gateway to close once the source has ended
REPORT_TTL = 0.5  # seconds a delay report counts: then no live access unit has arrived since
REPORT_WINDOW = 0.15  # seconds the path's delay must have held (reports in a row) to count
SIOCOUTQNSD = 0x894B  # Linux: bytes in a TCP socket's send queue not sent yet (unacked ones excluded)
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter, Accept, ClockSync]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base / 2 + (rng or random).uniform(0, base / 2)


def unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes written to a connection that have not left this machine: asyncio's buffer and the
    kernel's unsent send queue (Linux; bytes in flight, not yet acknowledged, excluded)."""
    size = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is not None and sys.platform == "linux":
        with contextlib.suppress(OSError, ValueError):
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0]
    return size


class PathDelay:
    """The gateway's delay reports on one live session, as the queuing delay on the path: the rise
    above the session's lowest report (the path's base delay and the clock offset's error cancel
    out) that has held for ``window`` seconds, the lowest of the reports since then and of the last
    one before. A lone high report is a receiver that paused (a gateway starting its decoders),
    then read the backlog at once, not a path that cannot keep up: the next report is low again.
    Reports count for ``ttl`` seconds after the newest: none since means no live access unit
    arrived (the edge spools, or the session is new), and a queue that delivers nothing is no
    longer late live video."""

    def __init__(self, ttl: float = REPORT_TTL, window: float = REPORT_WINDOW) -> None:
        self.ttl, self.window = ttl, window
        self.reset()

    def reset(self) -> None:
        """A new session: its path, and its clock offset, may differ."""
        self._lowest = float("inf")
        self._reports: deque[tuple[float, float]] = deque()  # (when, delay), oldest first

    def report(self, delay: float, now: float) -> None:
        self._lowest = min(self._lowest, delay)
        self._reports.append((now, delay))
        while len(self._reports) > 1 and self._reports[1][0] <= now - self.window:
            self._reports.popleft()  # (the newest report from before the window stays)

    def queued(self, now: float) -> float:
        """Seconds live video has been waiting on the path for ``window`` seconds (0: no fresh report)."""
        if not self._reports or now - self._reports[-1][0] > self.ttl:
            return 0.0
        return min(delay for _, delay in self._reports) - self._lowest


class FatalRejection(Exception):
    """The gateway refused this device for a reason retrying cannot fix."""


class GoneAway(Exception):
    """The gateway asked us to reconnect elsewhere (GOAWAY), and this connection has ended."""


class FrameQueue:
    """A bounded queue of access units that drops the oldest when full (real time wins).

    Written from the event loop thread only (the capture thread uses call_soon_threadsafe).
    """

    def __init__(self, maxsize: int, max_age: float = 2.0) -> None:
        self.maxsize = maxsize
        self.max_age = max_age
        self._items: deque[EncodedFrame] = deque()
        self._ended = False
        self._ready = asyncio.Event()

    def put(self, item: EncodedFrame | None) -> None:
        if item is None:
            self._ended = True
        else:
            while len(self._items) >= self.maxsize:
                self._items.popleft()
                metrics.FRAMES_DROPPED.labels("queue_full").inc()
            self._items.append(item)
        self._ready.set()

    async def get(self) -> EncodedFrame | None:
        """The oldest access unit; None once the source has ended and the queue is empty."""
        while not self._items:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ended(self) -> bool:
        """The source has ended (access units may still be queued)."""
        return self._ended

    def take(self) -> EncodedFrame:
        """The oldest access unit, now (the queue must not be empty)."""
        return self._items.popleft()

    def unget(self, item: EncodedFrame) -> None:
        """Put an access unit taken with `get` back at the head (it goes out first, elsewhere)."""
        self._items.appendleft(item)
        self._ready.set()

    def head_is_keyframe(self) -> bool:
        return bool(self._items) and self._items[0].keyframe

    def waited(self, now: float) -> float:
        """Seconds the oldest queued access unit has waited since its capture (0: none queued)."""
        return now - self._items[0].capture_time if self._items else 0.0

    def take_last_gop(self) -> list[EncodedFrame]:
        """Remove and return the queued access units from the newest queued IDR on (none unsent: [])."""
        for i in range(len(self._items) - 1, -1, -1):
            if self._items[i].keyframe:
                tail = list(self._items)[i:]
                for _ in tail:
                    self._items.pop()
                return tail
        return []

    def drop_stale(self, now: float) -> int:
        """Drop queued access units captured more than ``max_age`` seconds before ``now``."""
        dropped = 0
        while self._items and self._items[0].capture_time < now - self.max_age:
            self._items.popleft()
            dropped += 1
        return dropped

    def discard_queued(self) -> int:
        dropped = len(self._items)
        self._items.clear()
        return dropped


class Sender:
    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        token: str,
        mtu: int,
        request_keyframe: Callable[[], None] = lambda: None,
        backoff: Backoff | None = None,
        handshake_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        tls: ClientTls | None = None,
        server_name: str | None = None,
        on_keyframe_request: Callable[[], None] = lambda: None,
        spooled: Callable[[], int] = lambda: 0,
        on_unsent: Callable[[EncodedFrame], None] | None = None,
        carried: Callable[[], int] = lambda: 0,
    ) -> None:
        """``spooled`` says how many spooled frames will follow on the backfill lane (announced in
        each live HELLO), ``carried`` how many of them an earlier HELLO announced; ``on_unsent``
        takes the access units a lost session leaves queued (the spool), instead of dropping them;
        ``on_keyframe_request`` answers the gateway's requests."""
        self.host, self.port = host, port
        self.on_keyframe_request = on_keyframe_request
        self.spooled = spooled
        self.carried = carried
        self.on_unsent = on_unsent
        self.live = False  # a live session is streaming (else the daemon spools)
        self.offline_since = time.monotonic()  # when the last live session ended (or the start)
        self.tls = tls
        self.server_name = (server_name or host) if tls is not None else None
        self.device_id, self._token = device_id, token
        self.packetizer = Packetizer(mtu=mtu)
        self.request_keyframe = request_keyframe
        self.backoff = backoff or Backoff()
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.frames_sent = 0
        self.sessions = 0
        self._live_writer: asyncio.StreamWriter | None = None
        self._clock_base = time.time()
        self.path = PathDelay()  # the live session's path, from the gateway's delay reports

    @property
    def token(self) -> str:
        return self._token

    def unsent_bytes(self) -> int:
        """Bytes written to the live connection that have not left this machine (`unsent_bytes`)."""
        return unsent_bytes(self._live_writer) if self._live_writer is not None else 0

    def _rtp_timestamp(self, capture_time: float) -> int:
        return self.packetizer.timestamp_of(capture_time - self._clock_base)

    async def run(self, queue: FrameQueue, shape: StreamShape) -> None:
        """Send until the queue yields its end marker; raises FatalRejection."""
        stream = StreamInfo(shape.width, shape.height, shape.fps, delay_reports=True)
        hello = Hello(self.device_id, self._token, stream)
        attempt = 0
        while True:
            if queue.ended and not len(queue):
                return  # the source ended during the backoff with nothing left to send
            gone_away = False
            try:
                done = await self._session(queue, hello)
            except GoneAway:
                gone_away = True
                metrics.GOAWAYS.inc()
            except HandshakeRejected as exc:
                metrics.CONNECTS.labels(f"rejected_{exc.code}").inc()
                if exc.code not in RETRYABLE_REJECTS:
                    raise FatalRejection(str(exc)) from None
                log.warning("%s; retrying", exc)
            except ssl.SSLError as exc:
                if is_certificate_failure(exc):
                    metrics.CONNECTS.labels("tls_certificate").inc()
                    where = f"gateway {self.host}:{self.port} (TLS name {self.server_name})"
                    raise FatalRejection(f"{where}: {describe_failure(exc)}") from None
                metrics.CONNECTS.labels("tls_error").inc()
                log.warning("gateway %s:%d: %s", self.host, self.port, describe_failure(exc))
            except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
                client_certificate = self.tls is not None and self.tls.cert is not None
                hint = MUTUAL_TLS_HINT if isinstance(exc, HandshakeClosed) and client_certificate else ""
                log.warning("gateway %s:%d: %s%s", self.host, self.port, exc or type(exc).__name__, hint)
            else:
                if done:
                    return
                attempt = 0
            finally:
                metrics.CONNECTED.set(0)
                # Going away at an IDR, the queue is the next session's start: it stays live and queued.
                if not (gone_away and queue.head_is_keyframe()):
                    if self.live:
                        self.offline_since = time.monotonic()
                    self.live = False
                    if self.on_unsent is not None:
                        while len(queue):
                            self.on_unsent(queue.take())
            if gone_away:
                log.info("gateway %s:%d went away; reconnecting now", self.host, self.port)
                attempt = 0
                continue
            if queue.ended:
                # Queued frames would be stale by the next session (it starts at a fresh IDR).
                left = queue.discard_queued()
                metrics.FRAMES_DROPPED.labels("disconnected").inc(left)
                log.info("the source has ended while disconnected; %d frame(s) not sent", left)
                return
            delay = self.backoff.delay(attempt)
            attempt += 1
            log.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def connect(self, hello: Hello) -> Connection:
        """Dial, then the handshake (the writer is closed if it fails); raises like `run` reports."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.tls.context() if self.tls is not None else None,
                    server_hostname=self.server_name,
                    ssl_handshake_timeout=self.handshake_timeout if self.tls is not None else None,
                )
        except TimeoutError:
            metrics.CONNECTS.labels("timeout").inc()
            raise OSError(f"connect timed out after {self.connect_timeout:g} s") from None
        except ssl.SSLError:
            raise  # counted by run()
        except OSError:
            metrics.CONNECTS.labels("refused").inc()
            raise
        try:
            accept, clock = await client_handshake(reader, writer, hello, self.handshake_timeout)
        except BaseException:
            writer.close()
            raise
        return reader, writer, accept, clock

    async def _session(self, queue: FrameQueue, hello: Hello) -> bool:
        """One connection; True when the source has ended and everything was sent."""
        spooled = self.spooled()
        if spooled:
            carried = min(self.carried(), spooled)
            hello = replace(hello, stream=replace(hello.stream, spooled=spooled, carried=carried))
        reader, writer, accept, clock = await self.connect(hello)
        try:
            metrics.CONNECTS.labels("accepted").inc()
            metrics.CONNECTED.set(1)
            metrics.CLOCK_OFFSET.set(clock.offset)
            metrics.RTT.set(clock.rtt)
            self.sessions += 1
            log.info(
                "session %s with %s:%d (clock offset %+.4f s, rtt %.1f ms)",
                accept.session_id,
                self.host,
                self.port,
                clock.offset,
                clock.rtt * 1000,
            )
            stale = queue.drop_stale(time.time())
            if stale:
                metrics.FRAMES_DROPPED.labels("stale").inc(stale)
            if not queue.head_is_keyframe():
                self.request_keyframe()  # sessions start at an IDR: ask for one instead of waiting
            self.path.reset()
            metrics.PATH_DELAY.set(0)
            self.live, self._live_writer = True, writer
            return await self._stream(queue, reader, writer)
        finally:
            self._live_writer = None
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _stream(
        self, queue: FrameQueue, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        going_away = asyncio.Event()
        watch = asyncio.create_task(self.watch_gateway(reader, go_away=going_away))
        need_keyframe = True
        cut_by: float | None = None  # going away: cut before the next IDR, or at this time at the latest
        item: EncodedFrame | None = None
        try:
            while True:
                item = None
                get = asyncio.create_task(queue.get())
                finished, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if watch in finished:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        item = await get  # it may have completed in the same turn
                    if item is not None and going_away.is_set():
                        queue.unget(item)
                    elif item is not None:
                        metrics.FRAMES_DROPPED.labels("disconnected").inc()
                    watch.result()  # raises why the gateway went away
                    if going_away.is_set():
                        raise GoneAway()  # it stopped before we cut (an old edge's wait is over)
                    raise ConnectionError("gateway closed the connection")
                item = get.result()
                if item is None:
                    await self._end(writer, watch)
                    return True
                if going_away.is_set():
                    if cut_by is None:
                        cut_by = time.monotonic() + GOAWAY_CUT_TIMEOUT
                        self.request_keyframe()  # the next session starts at an IDR: make one now
                    if need_keyframe or item.keyframe or time.monotonic() >= cut_by:
                        queue.unget(item)
                        item = None
                        await self._leave(writer, watch)
                if need_keyframe and not item.keyframe:
                    metrics.FRAMES_DROPPED.labels("await_keyframe").inc()
                    continue
                need_keyframe = False
                packets = self.packetizer.packetize(
                    item.nals,
                    self._rtp_timestamp(item.capture_time),
                    capture_time_extension(item.capture_time, sent=time.time()),  # sent: flowcloud.stages
                )
                data = b"".join(frame(bytes(p)) for p in packets)
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    metrics.FRAMES_DROPPED.labels("disconnected").inc()
                    raise
                item = None
                self.frames_sent += 1
                metrics.FRAMES_SENT.inc()
                metrics.PACKETS_SENT.inc(len(packets))
                metrics.BYTES_SENT.inc(len(data))
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch

    async def _end(self, writer: asyncio.StreamWriter, watch: asyncio.Task[None]) -> None:
        """The source has ended: over plain TCP, half-close and wait (at most ``END_CLOSE_TIMEOUT``)
        until the gateway, having read to the end, closes. Closing at once with a delay report
        unread would reset the connection, and a reset can cost the frames still on their way
        (TLS has no half-close: it closes at once, as before delay reports)."""
        await writer.drain()
        if not writer.can_write_eof():
            return
        writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(END_CLOSE_TIMEOUT):
                await asyncio.wait({watch})

    async def _leave(self, writer: asyncio.StreamWriter, watch: asyncio.Task[None]) -> NoReturn:
        """Going away: end the stream here and raise GoneAway once the gateway has closed (it has
        published our frames by then, so none can be fenced by the session we open next)."""
        await writer.drain()
        if writer.can_write_eof():  # plain TCP: the gateway reads to the end at once (TLS: silence)
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOAWAY_CLOSE_TIMEOUT):
                await asyncio.wait({watch})
        if not watch.done():
            log.warning("gateway %s:%d did not close within %g s", self.host, self.port, GOAWAY_CLOSE_TIMEOUT)
        raise GoneAway()

    async def watch_gateway(
        self, reader: asyncio.StreamReader, live: bool = True, go_away: asyncio.Event | None = None
    ) -> None:
        """Returns when the gateway closes; raises HandshakeRejected on a REJECT (e.g. revoked);
        sets ``go_away`` on a GOAWAY."""
        while True:
            try:
                body = await read_frame(reader, MAX_CONTROL_SIZE)
            except asyncio.IncompleteReadError:
                return
            message = parse_control(body)
            if isinstance(message, Reject):
                raise HandshakeRejected(message.code, message.reason)
            if isinstance(message, KeyframeRequest) and live:
                log.debug("the gateway asks for a keyframe (%s)", message.reason)
                self.on_keyframe_request()
                continue
            if isinstance(message, DelayReport) and live:
                self.path.report(message.delay, time.monotonic())
                metrics.PATH_DELAY.set(self.path.queued(time.monotonic()))
                continue
            if isinstance(message, GoAway) and go_away is not None:
                log.info("gateway asks to reconnect elsewhere (%s)", message.reason)
                go_away.set()
                continue
            log.debug("ignoring a %s message from the gateway", type(message).__name__)
