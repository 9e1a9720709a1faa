"""The edge daemon: a capture thread (source, encoder) feeding the asyncio sender.

The capture thread reads the source and encodes (both block), and hands each access unit to the
event loop through a bounded queue that drops the oldest when the network falls behind. The
daemon ends after ``frames`` access units, after ``duration`` seconds, when the source ends,
on SIGINT/SIGTERM, or when the gateway refuses the device for good.

With a spool directory the edge keeps working offline: while no live session is streaming,
access units go to the spool (`edge.spool`) from the next IDR on (the encoder is asked for one),
and so do those a lost session left queued; after a reconnect the GOP being spooled is finished
there, live resumes at the next IDR, and `edge.backfill` drains the spool beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge import metrics
from edge.backfill import Backfill
from edge.encoder import Encoder, make_encoder
from edge.fallback import BUNDLED_MODEL, FallbackModel, FallbackRunner, sync_masks
from edge.frames import EncodedFrame, StreamShape
from edge.sender import Backoff, FrameQueue, Sender
from edge.sources import PictureSource, RelaySource, SourceError
from edge.spool import Spool
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.tls import ClientTls

log = logging.getLogger(__name__)


@dataclass
class DaemonConfig:
    host: str
    port: int
    device_id: str
    token: str
    mtu: int = 1200
    bitrate: int = 2_000_000
    keyframe_interval: int = 30
    encoder: str = "libx264"
    frames: int | None = None
    duration: float | None = None
    queue_size: int = 60
    handshake_timeout: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    tls: ClientTls | None = None  # None: plain TCP
    tls_server_name: str | None = None  # default: host
    spool_dir: str | None = None  # None: no spool (frames captured offline are dropped)
    spool_max_bytes: int = 1 << 30
    spool_max_age: float = 3600.0
    spool_segment_seconds: float = 10.0
    spool_backlog: float = 0.5  # seconds live may be late while connected (queue, socket, path): GOPs spool
    backfill_bitrate: int = 2_000_000  # the backfill's share of the link, bits/s
    backfill_speed: float = 2.0  # at most this many times the capture frame rate
    fallback_model: str | None = None  # None: off; "": the bundled demo model; else an ONNX file
    fallback_after: float = 10.0  # seconds without a live session before the fallback runs
    fallback_fps: float = 1.0  # masks per second at most (fewer when the CPU allows fewer)
    fallback_dir: str | None = None  # default: SPOOL_DIR/masks, else a directory in /tmp


@dataclass
class DaemonResult:
    captured: int
    sent: int
    sessions: int


class EdgeDaemon:
    def __init__(self, config: DaemonConfig, source: PictureSource | RelaySource) -> None:
        self.config = config
        self.source = source
        self.captured = 0
        self._encoder: Encoder | None = None
        self._keyframe_wanted = threading.Event()
        self._error: BaseException | None = None
        self.spool: Spool | None = None
        self.backfill: Backfill | None = None
        self._queue: FrameQueue | None = None
        self._sender: Sender | None = None
        self.fallback: FallbackRunner | None = None
        # The capture time of the first frame the newest live session took (and that session's
        # number): the spooled frames captured before it were announced in a live HELLO.
        self._live_from: float | None = None
        self._live_session = 0
        self._congested = False  # spooling GOPs while connected: the link cannot keep up

    def _fallback_dir(self) -> Path:
        c = self.config
        if c.fallback_dir:
            return Path(c.fallback_dir)
        if c.spool_dir:
            return Path(c.spool_dir) / "masks"
        return Path(tempfile.gettempdir()) / f"flowcloud-edge-{c.device_id}" / "masks"

    def _open_fallback(self) -> FallbackRunner | None:
        c = self.config
        if c.fallback_model is None:
            return None
        model = FallbackModel(Path(c.fallback_model) if c.fallback_model else BUNDLED_MODEL)
        i = model.identity
        log.info("fallback model %s %s (%dx%d) after %g s offline, at most %g masks/s",
                 i.name, i.version, i.width, i.height, c.fallback_after, c.fallback_fps)  # fmt: skip
        return FallbackRunner(model, self._fallback_dir(), c.fallback_fps)

    def _offline_long(self) -> bool:
        """The cloud has been unreachable for ``fallback_after`` seconds (read from the capture thread)."""
        sender = self._sender
        return (
            sender is not None
            and not sender.live
            and (time.monotonic() - sender.offline_since >= self.config.fallback_after)
        )

    async def _sync_masks(self, shape: StreamShape) -> None:
        """While a live session streams, send the fallback's masks to the cloud (retrying)."""
        sender, directory = self._sender, self._fallback_dir()
        assert sender is not None
        while True:
            await asyncio.sleep(0.5)
            if not sender.live or not any(directory.glob("*.json")):
                continue
            try:
                await sync_masks(directory, sender, shape)
            except (OSError, ProtocolError, asyncio.IncompleteReadError, TimeoutError) as exc:
                log.info("fallback: mask sync interrupted (%s); retrying", exc or type(exc).__name__)

    def _keyframe_requested(self) -> None:
        """The gateway lost decodable state: an IDR from the encoder now, when it can make one."""
        if self._encoder is not None:
            metrics.KEYFRAME_REQUESTS.labels("honoured").inc()
            self._keyframe_wanted.set()
        else:  # a relayed stream cannot make one: it waits for its next IDR
            metrics.KEYFRAME_REQUESTS.labels("unsupported").inc()

    def _spooled(self) -> int:
        """Spooled frames to announce in a live HELLO: those held, and a GOP's worth that may still
        come (the GOP being spooled, or begun during the handshake, goes on until the live
        session's first IDR). Seqs reserved and not used are gaps, which the timeline allows."""
        if self.spool is None:
            return 0
        return self.spool.frames + self.config.keyframe_interval

    def _carried(self) -> int:
        """Spooled frames to announce as carried over in a live HELLO: those an earlier live HELLO
        announced (captured before the newest live session's first frame) and still unsent."""
        if self.spool is None or self._live_from is None:
            return 0
        return self.spool.frames_before(self._live_from)

    def _announced(self) -> int | None:
        """For a backfill connection: the unsent spooled frames the live HELLOs announced, once the
        current live session has taken its first frame (None before)."""
        sender = self._sender
        if sender is None or self._live_session != sender.sessions:
            return None
        return self._carried()

    def _live_backlog(self) -> float:
        """Seconds live video is late: the oldest queued frame's wait, then what the socket has not
        sent yet (at the configured bitrate) or the queuing delay the gateway reports on the path
        (a router's queue, which the socket does not show), whichever is longer (a report includes
        the time its frame waited in the socket)."""
        queue, sender = self._queue, self._sender
        assert queue is not None and sender is not None
        unsent = sender.unsent_bytes() * 8 / max(self.config.bitrate, 1)
        return queue.waited(time.time()) + max(unsent, sender.path.queued(time.monotonic()))

    def _route(self, item: EncodedFrame | None) -> None:
        """On the event loop: an access unit goes live while a live session streams and the link
        keeps up, else to the spool (whole GOPs)."""
        queue, spool, sender = self._queue, self.spool, self._sender
        assert queue is not None and sender is not None
        if item is None or spool is None:
            queue.put(item)
            return
        self._congested = self._congested and sender.live  # (an outage is no congestion)
        if not sender.live or (spool.in_gop and not item.keyframe):
            self._to_spool(item, self._congested)
            return
        waited = self._live_backlog()
        if waited > self.config.spool_backlog:
            # The link is slower than the encoder: this GOP goes to the spool, with its frames still
            # queued (from their IDR on; else it starts at this IDR, or at the next one).
            moved = [] if item.keyframe else queue.take_last_gop()
            if item.keyframe or moved:
                if not self._congested:
                    log.info("the link cannot keep up (live %.2f s late): spooling GOPs", waited)
                self._congested = True
                for frame in [*moved, item]:
                    self._to_spool(frame, congested=True)
                return
        if spool.in_gop:
            spool.seal()  # live resumes at this IDR: the spooled GOP ends before it
            if self._congested:
                log.info("the link keeps up again: live resumes")
            self._congested = False
        if self._live_session != sender.sessions:
            self._live_session, self._live_from = sender.sessions, item.capture_time
        queue.put(item)

    def _to_spool(self, item: EncodedFrame, congested: bool = False) -> None:
        """``congested``: spooled while connected (the link cannot keep up), counted as such."""
        spool = self.spool
        assert spool is not None
        try:
            if not spool.append(item):
                self._keyframe_wanted.set()  # a spool starts at an IDR: ask for one
            elif congested:
                metrics.SPOOL_CONGESTION_FRAMES.inc()
        except OSError as exc:  # a full or failing disk costs the frame, never the daemon
            metrics.FRAMES_DROPPED.labels("spool_error").inc()
            log.warning("spool: cannot write: %s", exc)

    def _open(self) -> StreamShape:
        """Blocking: open the source (a relay waits for its first keyframe) and the encoder."""
        if isinstance(self.source, PictureSource):
            shape = self.source.shape
            c = self.config
            self._encoder = make_encoder(c.encoder, shape, c.bitrate, c.keyframe_interval)
            return shape
        return self.source.open()

    def _capture(self, loop: asyncio.AbstractEventLoop, queue: FrameQueue) -> None:
        """The capture thread: source -> (encoder) -> queue, until a limit or the source ends."""
        deadline = time.monotonic() + self.config.duration if self.config.duration else None
        limit = self.config.frames

        def deliver(item: EncodedFrame) -> bool:
            self.captured += 1
            metrics.FRAMES_CAPTURED.inc()
            loop.call_soon_threadsafe(self._route, item)
            return (limit is not None and self.captured >= limit) or (
                deadline is not None and time.monotonic() >= deadline
            )

        try:
            if isinstance(self.source, PictureSource):
                encoder = self._encoder
                assert encoder is not None
                for picture in self.source.pictures():
                    if self.fallback is not None and self._offline_long():
                        self.fallback.offer(picture)
                    if self._keyframe_wanted.is_set():
                        self._keyframe_wanted.clear()
                        encoder.request_keyframe()
                    started = time.perf_counter()
                    encoded = encoder.encode(picture)
                    metrics.ENCODE_SECONDS.observe(time.perf_counter() - started)
                    if any(deliver(item) for item in encoded):
                        break
                else:
                    for item in encoder.flush():
                        if deliver(item):
                            break
            else:
                for item in self.source.access_units():
                    if deliver(item):
                        break
        except BaseException as exc:  # reported by run(); the thread must always send END
            self._error = exc
        finally:
            self.source.stop()
            if self._encoder is not None:
                self._encoder.close()
            loop.call_soon_threadsafe(self._route, None)

    async def run(self) -> DaemonResult:
        loop = asyncio.get_running_loop()
        c = self.config
        shape = await asyncio.to_thread(self._open)
        self.fallback = await asyncio.to_thread(self._open_fallback)
        log.info(
            "stream %dx%d at %g fps to %s:%d as %s (%s)",
            shape.width,
            shape.height,
            shape.fps,
            c.host,
            c.port,
            c.device_id,
            "plain TCP" if c.tls is None else "TLS",
        )
        queue = FrameQueue(c.queue_size)
        if c.spool_dir is not None:
            self.spool = await asyncio.to_thread(
                Spool, c.spool_dir, shape, c.spool_max_bytes, c.spool_max_age, c.spool_segment_seconds
            )
        sender = Sender(
            c.host,
            c.port,
            c.device_id,
            c.token,
            c.mtu,
            request_keyframe=self._keyframe_wanted.set,
            backoff=c.backoff,
            handshake_timeout=c.handshake_timeout,
            tls=c.tls,
            server_name=c.tls_server_name,
            on_keyframe_request=self._keyframe_requested,
            spooled=self._spooled,
            carried=self._carried,
            on_unsent=self._to_spool if self.spool is not None else None,
        )
        self._queue, self._sender = queue, sender
        backfill_task: asyncio.Task[None] | None = None
        if self.spool is not None:
            self.backfill = Backfill(
                self.spool, sender, queue, shape, c.backfill_bitrate, c.backfill_speed, c.backoff,
                live_backlog=self._live_backlog, announced=self._announced,
            )  # fmt: skip
            backfill_task = asyncio.create_task(self.backfill.run(), name="backfill")
        sync_task = asyncio.create_task(self._sync_masks(shape)) if self.fallback is not None else None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        capture = threading.Thread(target=self._capture, args=(loop, queue), name="edge-capture", daemon=True)
        capture.start()
        send = asyncio.create_task(sender.run(queue, shape))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({send, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                log.info("stopping: finishing the frames in flight")
                self.source.stop()
                try:
                    async with asyncio.timeout(5):
                        await asyncio.shield(send)
                except TimeoutError:
                    send.cancel()
            if send.done() and not send.cancelled():
                send.result()  # raises FatalRejection
        finally:
            stopper.cancel()
            for task in (backfill_task, sync_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self.source.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            await asyncio.to_thread(capture.join, 10)
            await asyncio.sleep(0)  # the capture thread's last hand-overs
            if self.spool is not None:
                self.spool.close()
            if self.fallback is not None:
                await asyncio.to_thread(self.fallback.stop)
        if self._error is not None:
            if isinstance(self._error, SourceError | ValueError | RuntimeError | OSError):
                raise SourceError(str(self._error)) from self._error
            raise self._error
        return DaemonResult(self.captured, sender.frames_sent, sender.sessions)
