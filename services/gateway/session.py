"""One edge connection: the handshake, then RTP/H.264 in, decoded frames out to the publisher.

Order of trust: nothing but the handshake is parsed until the device has authenticated. The
handshake has a deadline (``handshake_timeout``) and each control message a size cap
(`MAX_CONTROL_SIZE`); a device that is unknown, revoked, has a wrong token, speaks another
version, sends a malformed HELLO, declares a frame size above the cap, or would exceed the
session limit gets a REJECT with a code and a reason, then the connection is closed.

**One live session per device: the newest wins.** When a device that already has a live
session completes a new handshake, the old session is closed (reason ``replaced``) and the new
one takes over its stream: at once on the same gateway, and through the "connected" device event
(`DeviceRegistry.announce_session`) on any other gateway replica, since a reconnecting edge may
land on another one behind the load balancer. An edge whose link dropped without a FIN (a
half-open TCP connection behind NAT is the common case) can therefore reconnect at once instead
of being refused ``busy`` until the old connection times out; only a holder of the device's
current token can take the stream over, and frame seqs stay unique and increasing across the
switch, whichever replicas publish (see publisher.py).

After the handshake, packets go through the protocol's `Depacketizer` (which bounds NAL-unit
and access-unit sizes and drops broken access units until the next IDR), per-device token
buckets (bytes/s: the reader pauses, TCP pushes back, nothing is lost; frames/s: excess access
units are dropped and decoding resumes at the next IDR), and the session's own decoder process.
Every drop is counted in ``flowcloud_gateway_frames_dropped_total`` by reason. A decoder crash
loses only the access units in flight; the decoder restarts and resumes at the next IDR.

**Frame sizes are checked before decoding.** Each SPS (NAL type 7) in an access unit is parsed
(`flowcloud.protocol.sps`) before the unit may reach the decoder. An SPS that announces a picture
above the session's cap (``max_width`` x ``max_height``, the cap of the handshake and of the
decoder) is refused, not the session: its access unit and every one after it are dropped with
reason ``dimensions`` until an acceptable SPS with the same id arrives, and then until the next
IDR (``await_idr``), as after a loss. An SPS that does not parse drops its access unit as
``malformed`` and decoding resumes at the next IDR with a valid SPS. The edge may change its
size within the cap at any IDR (the decoder resizes); the decoder's own check of each decoded
picture stays as the second line of defence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder, read_frame, write_frame
from flowcloud.protocol.h264 import DROP_MALFORMED, NAL_TYPE_SPS, AccessUnit, Depacketizer, nal_type
from flowcloud.protocol.handshake import (
    MAX_CONTROL_SIZE,
    REJECT_BUSY,
    REJECT_LIMIT,
    REJECT_MALFORMED,
    REJECT_VERSION,
    Accept,
    ClockSync,
    Hello,
    Reject,
    UnsupportedVersion,
)
from flowcloud.protocol.rtp import RtpPacket
from flowcloud.protocol.sps import SequenceParameterSet
from flowcloud.registry import Device, DeviceAuthError, DeviceRegistry
from flowcloud.settings import GatewaySettings
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
from services.gateway.limits import TokenBucket
from services.gateway.publisher import UNASSIGNED_SEQ, FramePublisher
from services.gateway.recorder import SessionRecorder

log = logging.getLogger(__name__)

# Why a session ended (label values of flowcloud_gateway_session_ends_total).
END_EOF = "eof"
END_REPLACED = "replaced"
END_REVOKED = "revoked"
END_ROTATED = "rotated"
END_SHUTDOWN = "shutdown"
END_MALFORMED = "malformed"

# SPSs one access unit may carry: one is the norm; more than a few is an attack on the parser.
MAX_SPS_PER_ACCESS_UNIT = 4

READ_CHUNK = 1 << 16
DRAIN_READ_TIMEOUT = 0.1
FLUSH_TIMEOUT = 5.0  # how long a session that ends waits for its frames in flight


class Refused(Exception):
    """The handshake failed; ``code`` is a REJECT code (None: close without a REJECT)."""

    def __init__(self, code: str | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class DeviceLimits:
    """Token buckets of one device; kept across its reconnects so that reconnecting resets nothing."""

    bytes: TokenBucket
    frames: TokenBucket


@dataclass
class SessionServices:
    """What sessions share: one of each per gateway."""

    settings: GatewaySettings
    registry: DeviceRegistry
    publisher: FramePublisher
    decoders: DecoderPool
    live: dict[str, Session] = field(default_factory=dict)  # device id -> its live session
    limits: dict[str, DeviceLimits] = field(default_factory=dict)
    ended: Counter[str] = field(default_factory=Counter)  # device id -> sessions that have ended

    def device_limits(self, device_id: str) -> DeviceLimits:
        if device_id not in self.limits:
            s = self.settings
            self.limits[device_id] = DeviceLimits(
                TokenBucket(s.max_bytes_per_second, s.max_bytes_per_second),
                # Two seconds of frames: a stall on our side (GC, a busy core) must not cost a good stream.
                TokenBucket(s.max_frames_per_second, max(1.0, 2 * s.max_frames_per_second)),
            )
        return self.limits[device_id]


class Session:
    def __init__(self, services: SessionServices, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.services = services
        self.settings = services.settings
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session_id = secrets.token_hex(8)
        self.device: Device | None = None
        self.hello: Hello | None = None
        self.clock: ClockSync | None = None
        self.end_reason: str | None = None
        self.dropped: Counter[str] = Counter()
        self.decoded = 0
        self._token = ""
        self._decoder: DecoderProcess | None = None
        self._recorder: SessionRecorder | None = None
        self._depacketizer = Depacketizer(
            self.settings.max_nal_size, self.settings.max_access_unit_size, on_drop=self._drop
        )
        self._need_idr = False
        self._oversized_sps: set[int] = set()  # ids of refused SPSs not yet replaced by acceptable ones
        self._last_sps: bytes | None = None  # the last SPS parsed: its repeats need no parsing
        self._next_tag = 0
        self._in_flight = 0
        self._pending: dict[int, tuple[float, float]] = {}  # tag -> (capture_ts, recv_ts)
        self._last_output = time.monotonic()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._stream_task: asyncio.Task[None] | None = None
        self._main_task: asyncio.Task[object] | None = None
        self._draining = False
        self._closing = False
        self._ended = asyncio.Event()

    @property
    def device_id(self) -> str | None:
        return self.device.device_id if self.device else None

    @property
    def in_flight(self) -> int:
        """Access units sent to the decoder that it has not finished with yet."""
        return self._in_flight

    @property
    def decoder_pid(self) -> int | None:
        """The process id of this session's decoder (None before the handshake)."""
        return self._decoder.pid if self._decoder is not None else None

    # --- handshake --------------------------------------------------------------------------

    async def handshake(self) -> None:
        """Authenticate and sync clocks within the deadline; Refused when the device may not stream."""
        try:
            async with asyncio.timeout(self.settings.handshake_timeout):
                await self._handshake()
        except TimeoutError:
            raise Refused(
                REJECT_MALFORMED, f"handshake not completed within {self.settings.handshake_timeout:g} s"
            ) from None
        except asyncio.IncompleteReadError:
            raise Refused(None, "connection closed during the handshake") from None

    async def _handshake(self) -> None:
        try:
            body = await read_frame(self.reader, MAX_CONTROL_SIZE)
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"handshake: {exc}") from None
        gateway_recv = time.time()
        try:
            hello = Hello.parse(body)
        except UnsupportedVersion as exc:
            raise Refused(REJECT_VERSION, str(exc)) from None
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"hello: {exc}") from None
        try:
            device = await self.services.registry.verify(hello.device_id, hello.token)
        except DeviceAuthError as exc:
            raise Refused(exc.code, exc.reason) from None
        except (RedisError, OSError) as exc:
            log.warning("device registry unavailable: %s", exc)
            raise Refused(REJECT_BUSY, "the device registry is unavailable; retry later") from None
        s = self.settings
        if hello.stream.width > s.max_width or hello.stream.height > s.max_height:
            raise Refused(
                REJECT_LIMIT,
                f"stream size {hello.stream.width}x{hello.stream.height} is above the cap "
                f"{s.max_width}x{s.max_height}",
            )
        live = self.services.live
        if device.device_id not in live and len(live) >= s.max_sessions:
            raise Refused(REJECT_LIMIT, f"the gateway holds its maximum of {s.max_sessions} sessions")
        accept = Accept(self.session_id, hello.edge_time, gateway_recv, time.time())
        await write_frame(self.writer, accept.to_bytes())
        try:
            self.clock = ClockSync.parse(await read_frame(self.reader, MAX_CONTROL_SIZE))
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"clock: {exc}") from None
        self.hello, self.device, self._token = hello, device, hello.token

    # --- streaming --------------------------------------------------------------------------

    async def stream(self) -> None:
        """Receive until the edge closes or `close` is called; then flush and clean up."""
        assert self.device is not None and self.hello is not None and self.clock is not None
        device, hello = self.device, self.hello
        previous = self.services.live.get(device.device_id)
        self.services.live[device.device_id] = self
        if previous is not None:
            log.info(
                "device %s: new session %s replaces %s",
                device.device_id,
                self.session_id,
                previous.session_id,
            )
            await previous.close(END_REPLACED)
        try:  # other gateway replicas close any session of this device they still hold
            await self.services.registry.announce_session(device.device_id, self.session_id)
        except (RedisError, OSError) as exc:
            log.warning("session %s: could not announce it to other gateways: %s", self.session_id, exc)
        metrics.SESSIONS.inc()
        started = self.services.publisher.clock.now()  # on Redis's clock, like every time it publishes
        self.services.publisher.set_meta(
            device.device_id,
            {
                keys.M_DEVICE: device.device_id,
                keys.M_TENANT: device.tenant,
                keys.M_WIDTH: hello.stream.width,
                keys.M_HEIGHT: hello.stream.height,
                keys.M_FPS: hello.stream.fps,
                keys.M_STARTED: repr(started),
                keys.M_STATUS: keys.STATUS_LIVE,
            },
        )
        if self.settings.record_dir:
            self._recorder = self._open_recorder(started)
        log.info(
            "session %s: device %s (tenant %s) from %s, %dx%d at %g fps, clock offset %+.3f s (rtt %.3f s)",
            self.session_id,
            device.device_id,
            device.tenant,
            self.peer,
            hello.stream.width,
            hello.stream.height,
            hello.stream.fps,
            self.clock.offset,
            self.clock.rtt,
        )
        self._main_task = asyncio.current_task()
        results: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        try:
            self._decoder = await self.services.decoders.acquire()
            results = asyncio.create_task(self._receive_decoded(), name=f"decoded:{self.session_id}")
            watchdog = asyncio.create_task(self._watch_decoder(), name=f"watchdog:{self.session_id}")
            self._stream_task = asyncio.create_task(self._read_packets(), name=f"packets:{self.session_id}")
            await self._stream_task
            self.end_reason = self.end_reason or END_EOF
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except ProtocolError as exc:
            log.warning("session %s: %s", self.session_id, exc)
            self.end_reason = self.end_reason or END_MALFORMED
        except (ConnectionError, OSError) as exc:
            log.info("session %s: connection error: %s", self.session_id, exc)
            self.end_reason = self.end_reason or END_EOF
        finally:
            if watchdog is not None:
                watchdog.cancel()
            try:
                await self._finish(results)
            finally:
                self._ended.set()

    async def close(self, reason: str) -> None:
        """End the session (from outside: replaced, revoked, shutdown) and wait until it has ended."""
        if not self._closing:
            self._closing = True
            self.end_reason = reason
            if self._stream_task is not None:
                self._stream_task.cancel()
            elif reason in (END_REVOKED, END_ROTATED):
                if self._main_task is not None:
                    self._main_task.cancel()  # still setting up (waiting for its decoder): stop now
            else:
                self._draining = True  # still setting up: decode what has arrived, then end
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT + 1.0):
                await self._ended.wait()

    def _open_recorder(self, started: float) -> SessionRecorder | None:
        assert self.device is not None and self.hello is not None and self.clock is not None
        description = {
            "device": self.device.device_id,
            "tenant": self.device.tenant,
            "session": self.session_id,
            "peer": self.peer,
            "started": started,
            "stream": self.hello.stream.to_dict(),
            "clock_offset": self.clock.offset,
            "clock_rtt": self.clock.rtt,
        }
        try:
            return SessionRecorder(
                self.settings.record_dir or ".", self.device.device_id, self.session_id, description
            )
        except OSError as exc:
            log.warning("session %s: cannot record: %s", self.session_id, exc)
            return None

    async def _read_packets(self) -> None:
        assert self.device is not None
        limits = self.services.device_limits(self.device.device_id)
        framer = Rfc4571Decoder()  # reads whole chunks: far fewer awaits than one per packet
        malformed = 0
        while True:
            if self._draining:
                try:
                    async with asyncio.timeout(DRAIN_READ_TIMEOUT):  # only what has arrived already
                        chunk = await self.reader.read(READ_CHUNK)
                except TimeoutError:
                    return
            else:
                chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                return
            recv_ts = time.time()
            metrics.BYTES.inc(len(chunk))
            if self._recorder is not None:
                self._recorder.write(chunk)
            delay = limits.bytes.take(len(chunk))
            if delay > 0:
                metrics.THROTTLED_SECONDS.inc(delay)
                await asyncio.sleep(delay)
            packets = framer.feed(chunk)
            metrics.PACKETS.inc(len(packets))
            for data in packets:
                try:
                    access_units = self._depacketizer.push(RtpPacket.parse(data))
                    malformed = 0
                except ProtocolError as exc:
                    malformed += 1
                    metrics.PACKETS_REJECTED.labels("malformed").inc()
                    log.debug("session %s: packet refused: %s", self.session_id, exc)
                    if malformed >= self.settings.max_malformed:
                        raise ProtocolError(f"{malformed} malformed packets in a row (last: {exc})") from None
                    continue
                for au in access_units:
                    await self._decode(au, recv_ts, limits)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count
        metrics.drop(reason, count)

    def _size_allowed(self, au: AccessUnit) -> bool:
        """Check the access unit's SPS against the size cap; False (counted) when it may not be decoded."""
        s = self.settings
        sps_nals = [nal for nal in au.nals if nal_type(nal) == NAL_TYPE_SPS]
        if len(sps_nals) > MAX_SPS_PER_ACCESS_UNIT:
            log.debug("session %s: access unit with %d SPSs dropped", self.session_id, len(sps_nals))
            self._drop(DROP_MALFORMED)
            self._need_idr = True
            return False
        for nal in sps_nals:
            if nal == self._last_sps:
                continue  # encoders repeat their SPS at every IDR: it was checked when it first came
            try:
                sps = SequenceParameterSet.parse(nal)
            except ProtocolError as exc:
                log.debug("session %s: access unit dropped: %s", self.session_id, exc)
                self._drop(DROP_MALFORMED)
                self._need_idr = True
                return False
            self._last_sps = nal
            if sps.width <= s.max_width and sps.height <= s.max_height:
                self._oversized_sps.discard(sps.sps_id)
                continue
            if sps.sps_id not in self._oversized_sps:
                log.info(
                    "session %s: SPS %d announces %dx%d, above the cap %dx%d; dropping until a smaller one",
                    self.session_id,
                    sps.sps_id,
                    sps.width,
                    sps.height,
                    s.max_width,
                    s.max_height,
                )
            self._oversized_sps.add(sps.sps_id)
        if self._oversized_sps:
            self._drop(metrics.DROP_DIMENSIONS)
            self._need_idr = True
            return False
        return True

    async def _decode(self, au: AccessUnit, recv_ts: float, limits: DeviceLimits) -> None:
        if not limits.frames.try_take():  # first: it also bounds the parsing work a device can cause
            self._drop(metrics.DROP_RATE_LIMIT)
            self._need_idr = True
            return
        if not self._size_allowed(au):
            return
        if self._need_idr and not au.keyframe:
            self._drop(metrics.DROP_AWAIT_IDR)
            return
        if self._in_flight >= self.settings.decoder_backlog:
            self._drop(metrics.DROP_DECODER_BACKLOG)
            self._need_idr = True
            return
        decoder = self._decoder
        if decoder is None or not decoder.alive:
            self._drop(metrics.DROP_DECODER_CRASH)
            self._need_idr = True
            return
        assert self.clock is not None
        capture_ts = au.capture_time + self.clock.offset if au.capture_time is not None else recv_ts
        tag = self._next_tag
        self._next_tag += 1
        self._pending[tag] = (capture_ts, recv_ts)
        if len(self._pending) > 4 * self.settings.decoder_backlog:
            self._pending.pop(next(iter(self._pending)))
        self._need_idr = False
        if self._in_flight == 0:
            self._last_output = time.monotonic()
        self._in_flight += 1
        self._all_done.clear()
        # On a crash _receive_decoded sees it too, counts what was in flight and restarts the decoder.
        with contextlib.suppress(DecoderCrashed):
            await decoder.decode(tag, au.to_annexb())

    async def _receive_decoded(self) -> None:
        assert self.device is not None
        stream = self.device.device_id
        while True:
            decoder = self._decoder
            assert decoder is not None
            try:
                out = await decoder.receive()
                self._last_output = time.monotonic()
            except DecoderCrashed as exc:
                if self._closing:
                    return
                lost = len(self._pending)  # in flight, or decoded and held back for reordering
                self._in_flight = 0
                self._pending.clear()
                self._all_done.set()
                if lost:
                    self._drop(metrics.DROP_DECODER_CRASH, lost)
                self._need_idr = True
                metrics.DECODER_RESTARTS.inc()
                log.warning("session %s: %s; %d frames lost, restarting it", self.session_id, exc, lost)
                self._decoder = await self.services.decoders.acquire()
                continue
            if isinstance(out, DecodedFrame):
                capture_ts, recv_ts = self._pending.pop(out.tag, (time.time(), time.time()))
                self.decoded += 1
                metrics.FRAMES_DECODED.inc()
                metrics.DECODE_SECONDS.observe(out.seconds)
                self.services.publisher.submit(
                    Frame(
                        stream=stream,
                        seq=UNASSIGNED_SEQ,
                        capture_ts=capture_ts,
                        recv_ts=recv_ts,
                        width=out.width,
                        height=out.height,
                        encoding=self.settings.frame_encoding,
                        data=out.data,
                    )
                )
            elif isinstance(out, DecodeFailure):
                self._pending.pop(out.tag, None)
                self._drop(
                    metrics.DROP_DIMENSIONS if out.code == ERROR_DIMENSIONS else metrics.DROP_DECODE_ERROR
                )
                self._need_idr = True
                log.info("session %s: %s: %s", self.session_id, out.code, out.message)
            elif isinstance(out, AccessUnitDone):
                self._in_flight = max(0, self._in_flight - 1)
                if self._in_flight == 0:
                    self._all_done.set()

    async def _end_of_stream(self) -> None:
        """The access unit the depacketizer still holds, then the pictures the decoder holds back
        to reorder B-frames: without this the last frames of every such stream are lost."""
        assert self.device is not None
        limits = self.services.device_limits(self.device.device_id)
        for au in self._depacketizer.flush():
            await self._decode(au, time.time(), limits)
        decoder = self._decoder
        if decoder is None or not decoder.alive:
            return
        tag = self._next_tag
        self._next_tag += 1
        self._in_flight += 1
        self._all_done.clear()
        self._last_output = time.monotonic()
        with contextlib.suppress(DecoderCrashed):
            await decoder.flush(tag)

    async def _watch_decoder(self) -> None:
        """Kill a decoder that has work but has said nothing for a while (it then restarts)."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.decoder_stall_timeout / 2))
            decoder = self._decoder
            stalled = time.monotonic() - self._last_output > self.settings.decoder_stall_timeout
            if decoder is not None and decoder.alive and self._in_flight and stalled:
                log.warning("session %s: decoder %d stalled with %d frames; killing it", self.session_id,
                            decoder.pid, self._in_flight)  # fmt: skip
                decoder.kill()
                self._last_output = time.monotonic()

    async def _finish(self, results: asyncio.Task[None] | None) -> None:
        assert self.device is not None
        device_id = self.device.device_id
        self._close_writer()
        try:
            if self.end_reason not in (END_REVOKED, END_ROTATED):
                # Let the frames in flight come out of the decoder (a revoked device's are discarded).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_TIMEOUT):
                        await self._end_of_stream()
                        await self._all_done.wait()
            self._closing = True
            if results is not None:
                results.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await results
            if self._decoder is not None:
                await self._decoder.close()
        finally:
            # Bookkeeping happens even when the gateway's shutdown cancels the cleanup above.
            if self._pending:  # access units whose picture never came out
                self._drop(metrics.DROP_SESSION_CLOSED, len(self._pending))
            if self._recorder is not None:
                self._recorder.close()
            if self.services.live.get(device_id) is self:
                del self.services.live[device_id]
                if self.end_reason != END_REPLACED:  # else the replacing session (maybe elsewhere) owns it
                    self.services.publisher.set_meta(device_id, {keys.M_STATUS: keys.STATUS_IDLE})
            metrics.SESSIONS.dec()
            self.services.ended[device_id] += 1
            metrics.SESSION_ENDS.labels(self.end_reason or END_EOF).inc()
            log.info(
                "session %s: device %s ended (%s): %d packets, %d frames decoded, dropped %s",
                self.session_id,
                device_id,
                self.end_reason,
                self._depacketizer.packets,
                self.decoded,
                dict(self.dropped) or "none",
            )

    def _close_writer(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def reject(self, refused: Refused) -> None:
        """Send a REJECT (when there is a code) and close; for a handshake that failed."""
        metrics.CONNECTIONS.labels(refused.code or "closed").inc()
        log.info("connection from %s refused: %s: %s", self.peer, refused.code or "closed", refused.reason)
        if refused.code is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await write_frame(self.writer, Reject(refused.code, refused.reason).to_bytes())
        if self._decoder is not None:
            await self._decoder.close()
        self._close_writer()

    async def still_authorized(self) -> bool:
        """Whether the device and its token are still valid (after missed revocation events)."""
        if self.device is None:
            return True
        try:
            await self.services.registry.verify(self.device.device_id, self._token)
        except DeviceAuthError:
            return False
        return True
