"""A session's decoder process, supervised: restarted after a crash or a stall, flushed at the end.

`SessionDecoder` owns one `services.gateway.decoder.DecoderProcess` (from the `DecoderPool`) for
one session, and the bookkeeping of the access units it holds: each gets a tag, and its times
(`UnitTimes`) wait here until its picture comes out. Pictures come out through ``on_frame``; what
is lost is counted through ``on_drop``:

- a decode error or a picture above the size cap: ``decode_error`` / ``dimensions``;
- a crash (or a stall: a decoder with work that says nothing for ``stall_timeout`` is killed):
  every access unit whose picture had not come out, ``decoder_crash``. A started spare takes over;
- at the end of the session, whatever never came out: ``session_closed`` (`discard`).

After any of these, ``on_trouble`` (with the drop reason) tells the packet pipeline to wait for
the next IDR. At the end
of a stream, `flush` lets the decoder give out the pictures it holds back to reorder B-frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from services.gateway import metrics
from services.gateway.decoder import (
    ERROR_DIMENSIONS,
    AccessUnitDone,
    DecodedFrame,
    DecodeFailure,
    DecoderCrashed,
    DecoderPool,
    DecoderProcess,
)
from services.gateway.pipeline import ClearedUnit, UnitTimes

log = logging.getLogger(__name__)


class SessionDecoder:
    def __init__(
        self,
        pool: DecoderPool,
        backlog: int,
        stall_timeout: float,
        on_frame: Callable[[DecodedFrame, UnitTimes], object],
        on_drop: Callable[[str, int], object],
        on_trouble: Callable[[str], object],
        name: str = "session",
    ) -> None:
        self.pool = pool
        self.backlog = backlog
        self.stall_timeout = stall_timeout
        self.name = name
        self.decoded = 0
        self._on_frame = on_frame
        self._on_drop = on_drop
        self._on_trouble = on_trouble
        self._process: DecoderProcess | None = None
        self._next_tag = 0
        self._in_flight = 0  # access units sent that the child has not answered DONE for
        self._pending: dict[int, UnitTimes] = {}  # tag -> times, until its picture comes out
        self._last_output = time.monotonic()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._closing = False
        self._receiver: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        self._process = await self.pool.acquire()
        self._receiver = asyncio.create_task(self._receive(), name=f"decoded:{self.name}")
        self._watchdog = asyncio.create_task(self._watch(), name=f"watchdog:{self.name}")

    def refusal(self) -> str | None:
        """Why no access unit may be sent now (a drop reason), or None."""
        if self._in_flight >= self.backlog:
            return metrics.DROP_DECODER_BACKLOG
        if self._process is None or not self._process.alive:
            return metrics.DROP_DECODER_CRASH
        return None

    async def decode(self, unit: ClearedUnit) -> None:
        process = self._process
        assert process is not None
        tag = self._send_tag()
        self._pending[tag] = unit.times
        if len(self._pending) > 4 * self.backlog:
            self._pending.pop(next(iter(self._pending)))
        # On a crash _receive sees it too, counts what was in flight and restarts the decoder.
        with contextlib.suppress(DecoderCrashed):
            await process.decode(tag, unit.data)

    async def flush(self) -> None:
        """End of the stream: ask for the pictures the decoder holds back (`wait` until they are out)."""
        process = self._process
        if process is None or not process.alive:
            return
        tag = self._send_tag()
        with contextlib.suppress(DecoderCrashed):
            await process.flush(tag)

    def _send_tag(self) -> int:
        tag = self._next_tag
        self._next_tag += 1
        if self._in_flight == 0:
            self._last_output = time.monotonic()
        self._in_flight += 1
        self._all_done.clear()
        return tag

    async def wait(self) -> None:
        """Until the decoder has answered every access unit sent."""
        await self._all_done.wait()

    def stop_watching(self) -> None:
        """No more stall checks (the session is ending; its flush has its own deadline)."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def close(self) -> None:
        """Stop receiving and end the process (what it still held: `discard`)."""
        self._closing = True
        self.stop_watching()
        if self._receiver is not None:
            self._receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        if self._process is not None:
            await self._process.close()

    def discard(self) -> int:
        """Count every access unit whose picture never came out as ``session_closed``; how many."""
        lost = len(self._pending)
        self._pending.clear()
        if lost:
            self._on_drop(metrics.DROP_SESSION_CLOSED, lost)
        return lost

    async def _receive(self) -> None:
        while True:
            process = self._process
            assert process is not None
            try:
                out = await process.receive()
                self._last_output = time.monotonic()
            except DecoderCrashed as exc:
                if self._closing:
                    return
                await self._restart(exc)
                continue
            if isinstance(out, DecodedFrame):
                times = self._pending.pop(out.tag, None) or UnitTimes(time.time(), time.time())
                self.decoded += 1
                metrics.FRAMES_DECODED.inc()
                metrics.DECODE_SECONDS.observe(out.seconds)
                self._on_frame(out, times)
            elif isinstance(out, DecodeFailure):
                self._pending.pop(out.tag, None)
                dimensions = out.code == ERROR_DIMENSIONS
                reason = metrics.DROP_DIMENSIONS if dimensions else metrics.DROP_DECODE_ERROR
                self._on_drop(reason, 1)
                self._on_trouble(reason)
                log.info("%s: %s: %s", self.name, out.code, out.message)
            elif isinstance(out, AccessUnitDone):
                self._in_flight = max(0, self._in_flight - 1)
                if self._in_flight == 0:
                    self._all_done.set()

    async def _restart(self, exc: DecoderCrashed) -> None:
        lost = len(self._pending)  # in flight, or decoded and held back for reordering
        self._in_flight = 0
        self._pending.clear()
        self._all_done.set()
        if lost:
            self._on_drop(metrics.DROP_DECODER_CRASH, lost)
        self._on_trouble(metrics.DROP_DECODER_CRASH)
        metrics.DECODER_RESTARTS.inc()
        log.warning("%s: %s; %d frames lost, restarting it", self.name, exc, lost)
        self._process = await self.pool.acquire()

    async def _watch(self) -> None:
        """Kill a decoder that has work but has said nothing for a while (it then restarts)."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_timeout / 2))
            process = self._process
            stalled = time.monotonic() - self._last_output > self.stall_timeout
            if process is not None and process.alive and self._in_flight and stalled:
                log.warning("%s: decoder %d stalled with %d frames; killing it", self.name, process.pid,
                            self._in_flight)  # fmt: skip
                process.kill()
                self._last_output = time.monotonic()
