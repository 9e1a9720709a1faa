"""The edge daemon: a capture thread (source, encoder) feeding the asyncio sender.

The capture thread reads the source and encodes (both block), and hands each access unit to the
event loop through a bounded queue that drops the oldest when the network falls behind. The
daemon ends after ``frames`` access units, after ``duration`` seconds, when the source ends,
on SIGINT/SIGTERM, or when the gateway refuses the device for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from edge import metrics
from edge.encoder import Encoder, make_encoder
from edge.frames import EncodedFrame, StreamShape
from edge.sender import Backoff, FrameQueue, Sender
from edge.sources import PictureSource, RelaySource, SourceError
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
            loop.call_soon_threadsafe(queue.put, item)
            return (limit is not None and self.captured >= limit) or (
                deadline is not None and time.monotonic() >= deadline
            )

        try:
            if isinstance(self.source, PictureSource):
                encoder = self._encoder
                assert encoder is not None
                for picture in self.source.pictures():
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
            loop.call_soon_threadsafe(queue.put, None)

    async def run(self) -> DaemonResult:
        loop = asyncio.get_running_loop()
        c = self.config
        shape = await asyncio.to_thread(self._open)
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
        )
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
            self.source.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            await asyncio.to_thread(capture.join, 10)
        if self._error is not None:
            if isinstance(self._error, SourceError | ValueError | RuntimeError | OSError):
                raise SourceError(str(self._error)) from self._error
            raise self._error
        return DaemonResult(self.captured, sender.frames_sent, sender.sessions)
