"""Backfill: drain the spool to the gateway's backfill lane without hurting the live stream.

Live goes first. The backfill runs only while a live session is streaming, on a second
connection whose HELLO says ``backfill`` (the gateway publishes its frames to a lane of their own,
with seqs the live session reserved, so results land in capture order). It sends whole GOPs,
oldest first, with their capture times, paced by two token buckets: ``bitrate`` bits/s (its share
of the link) and ``speed`` times the stream's frame rate. It also steps aside whenever the live
queue holds more than a few frames or live video waits in its socket (the link is busy with
live), and writes a frame only once its own socket has sent the last one, so that what it hands
the link cannot pile up in front of live frames. Each GOP written and drained is
marked sent in the spool, so a restart neither repeats nor loses GOPs (a GOP cut by a lost
connection is sent again whole: the gateway can only decode it from its IDR).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edge import metrics
from edge.frames import StreamShape
from edge.sender import Backoff, FrameQueue, Sender, unsent_bytes
from edge.spool import Spool
from flowcloud.protocol.capture_time import capture_time_extension
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import frame
from flowcloud.protocol.h264 import Packetizer
from flowcloud.protocol.handshake import HandshakeRejected, Hello, StreamInfo

log = logging.getLogger(__name__)

LIVE_BACKLOG = 2  # live access units queued above which the backfill waits
LIVE_BACKLOG_SECONDS = 0.1  # nor while live video waits this long to leave (queue and socket)
IDLE_POLL = 0.2  # seconds between looks at the spool and the live session


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; `wait` sleeps until ``n`` are there."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at = time.monotonic()

    async def wait(self, n: float) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Backfill:
    def __init__(
        self,
        spool: Spool,
        sender: Sender,
        live: FrameQueue,
        shape: StreamShape,
        bitrate: int,
        speed: float,
        backoff: Backoff | None = None,
        live_backlog: Callable[[], float] = lambda: 0.0,
        announced: Callable[[], int | None] = lambda: 0,
    ) -> None:
        """``live_backlog``: seconds of live video waiting to leave this machine (the daemon's);
        ``announced``: how many unsent spooled frames the live HELLOs announced (None: not known
        yet, the live session has not taken its first frame)."""
        self.spool = spool
        self.sender = sender
        self.live = live
        self.shape = shape
        self.bytes = TokenBucket(bitrate / 8, max(bitrate / 8, 65536))
        self.frames = TokenBucket(speed * shape.fps, max(1.0, speed * shape.fps / 2))
        self.backoff = backoff or Backoff()
        self.live_backlog = live_backlog
        self.announced = announced
        self.sent = 0

    async def run(self) -> None:
        """Drain the spool whenever a live session is up, until cancelled."""
        attempt = 0
        while True:
            if not (self.sender.live and self._has_pending()) or self.announced() is None:
                self.spool.enforce_caps(time.time())  # the age cap holds while nothing is appended
                metrics.BACKFILL_LAG.set(0)
                await asyncio.sleep(IDLE_POLL)
                continue
            try:
                await self._connection()
                attempt = 0
            except HandshakeRejected as exc:
                log.warning("backfill: %s", exc)
            except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
                log.info(
                    "backfill: connection lost (%s); the spool keeps the rest", exc or type(exc).__name__
                )
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1

    def _has_pending(self) -> bool:
        return self.spool.sealed_frames > 0

    async def _connection(self) -> None:
        # The announced frames keep their reserved seqs; the gateway drops the rest of the
        # reservation (its margin), so frames spooled since (the link fell behind) sort after live.
        carried = self.announced() or 0
        stream = StreamInfo(
            self.shape.width, self.shape.height, self.shape.fps, backfill=True,
            spooled=max(self.spool.frames, carried), carried=carried,
        )  # fmt: skip
        hello = Hello(self.sender.device_id, self.sender.token, stream)
        reader, writer, accept, _ = await self.sender.connect(hello)
        log.info("backfill session %s: %d spooled frames to send", accept.session_id, self.spool.frames)
        packetizer = Packetizer(mtu=self.sender.packetizer.mtu)
        base = time.time()
        watch = asyncio.create_task(self.sender.watch_gateway(reader, live=False))
        try:
            for segment, index, gop in self.spool.pending():
                for item in gop.frames:
                    while (
                        len(self.live) > LIVE_BACKLOG
                        or self.live_backlog() > LIVE_BACKLOG_SECONDS
                        or unsent_bytes(writer) > 0  # (its own last frame still waits for the link)
                        or not self.sender.live
                    ):
                        if watch.done() or not self.sender.live:
                            raise ConnectionError("live session lost: backfill pauses")
                        await asyncio.sleep(0.01)  # live first
                    packets = packetizer.packetize(
                        item.nals,
                        packetizer.timestamp_of(item.capture_time - base),
                        capture_time_extension(item.capture_time),
                    )
                    data = b"".join(frame(bytes(p)) for p in packets)
                    await self.frames.wait(1)
                    await self.bytes.wait(len(data))
                    if watch.done():
                        watch.result()
                        raise ConnectionError("gateway closed the backfill connection")
                    writer.write(data)
                    await writer.drain()
                    self.sent += 1
                    metrics.BACKFILL_FRAMES_SENT.inc()
                    metrics.BACKFILL_BYTES_SENT.inc(len(data))
                    metrics.BACKFILL_LAG.set(time.time() - item.capture_time)
                self.spool.mark_sent(segment, index, gop)
            log.info("backfill: the spool is drained (%d frames sent in all)", self.sent)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
