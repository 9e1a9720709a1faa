"""One edge connection: the handshake, then RTP/H.264 in, decoded frames out to the publisher.

Order of trust: nothing but the handshake is parsed until the device has authenticated. The
handshake has a deadline (``handshake_timeout``) and each control message a size cap
(`MAX_CONTROL_SIZE`); a device that is unknown, revoked, has a wrong token, speaks another
version, sends a malformed HELLO, declares a frame size above the cap, or would exceed the
session limit gets a REJECT with a code and a reason, then the connection is closed.

**One live session per device: the newest wins.** A live session owns its stream through a lease
(services.gateway.lease), taken with a new, higher generation during the handshake, before the
ACCEPT. The old session is closed (reason ``replaced``) and the new one takes over its stream:
at once on the same gateway, and on any other gateway replica through the "connected" device
event (`DeviceRegistry.announce_session`, carrying the generation; an announcement of an older
generation arriving late closes nothing), or at the latest at its next lease renewal, since a
reconnecting edge may land on another replica behind the load balancer. Every frame carries the
session's generation, so nothing the old session still decodes is published (fencing). An edge
whose link dropped without a FIN (a half-open TCP connection behind NAT is the common case) can
therefore reconnect at once instead of being refused ``busy`` until the old connection times
out; only a holder of the device's
current token can take the stream over, and frame seqs stay unique and increasing across the
switch, whichever replicas publish (see publisher.py).

The session is the I/O around three pieces of pure or self-contained code:

- `services.gateway.admission.Admission`: the handshake's rules (HELLO, size cap, session limit,
  CLOCK), driven with the frames this module reads under the handshake deadline;
- `services.gateway.pipeline.PacketPipeline`: RTP bytes to access units cleared for decoding
  (depacketizing, frames/s bucket, SPS gate, waiting for an IDR), every drop counted by reason in
  ``flowcloud_gateway_frames_dropped_total``;
- `services.gateway.decoding.SessionDecoder`: the session's decoder process, restarted after a
  crash or stall, flushed when the stream ends.

What stays here: reading the socket (the bytes/s bucket pauses the reader, so TCP pushes back and
nothing is lost), recording, replacing an older session of the device, the stream's metadata
hash, and ending the session in order. A per-session step added later (a lease, a message back
to the edge) goes into `Session.stream` around the read loop, or into one of the three pieces.

**Going away.** When the gateway stops (`go_away`), a live session sends the edge a GOAWAY and
reads on until the edge, having ended its stream at an access unit boundary (before an IDR),
half-closes; it then decodes and flushes as usual, and keeps the connection open until the
gateway has published its frames (`release`), so that the edge reconnects (to another replica)
only once nothing of this session can be fenced any more.

Two lanes per device (services.gateway.backfill): a live HELLO that announces ``spooled`` frames
reserves their seqs before its ACCEPT; a second connection whose HELLO says ``backfill`` carries
that spooled video beside the live session, with its own rate limits and no keyframe requests (its
GOPs start at IDRs). A live session asks the edge for an IDR (services.gateway.keyframes) whenever
its pipeline starts to need one. A ``masks`` connection only uploads the masks the edge's fallback
model made offline (`Session.receive_edge_masks`).
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
from flowcloud.protocol.framing import read_frame, send_frame
from flowcloud.protocol.h264 import DROP_AWAIT_IDR
from flowcloud.protocol.handshake import (
    MAX_CONTROL_SIZE,
    REJECT_BUSY,
    REJECT_MALFORMED,
    ClockSync,
    GoAway,
    Hello,
)
from flowcloud.registry import Device, DeviceAuthError, DeviceRegistry
from flowcloud.results import MaskStore
from flowcloud.settings import GatewaySettings
from flowcloud.streams import StreamMeta
from services.gateway import metrics
from services.gateway.admission import Admission, AdmissionLimits, Refused, reject_frame
from services.gateway.backfill import BackfillDedup, backfill_key, reserve_backfill_seqs
from services.gateway.decoder import DecodedFrame, DecoderPool
from services.gateway.decoding import SessionDecoder
from services.gateway.delay_reports import DelayReporter
from services.gateway.edge_masks import receive_edge_masks
from services.gateway.keyframes import (
    REASON_DECODER_RESTART,
    REASON_DROP,
    REASON_SESSION_START,
    KeyframeRequester,
)
from services.gateway.lease import StreamLease
from services.gateway.limits import TokenBucket
from services.gateway.pipeline import WANTED_STREAM_START, PacketPipeline, PipelineLimits, UnitTimes
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
END_GOAWAY = "goaway"  # the gateway is stopping: the edge left at our GOAWAY to reconnect elsewhere

# How a session learned that a newer session of its device took the lease over (label values of
# flowcloud_gateway_lease_lost_total).
NOTICED_EVENT = "event"
NOTICED_RENEWAL = "renewal"

_background: set[asyncio.Task[None]] = set()  # lease releases in flight (a task needs a reference)

READ_CHUNK = 1 << 16
DRAIN_READ_TIMEOUT = 0.1
GOAWAY_SILENCE = 1.0  # going away over TLS: seconds without a byte after which the edge has left
FLUSH_TIMEOUT = 5.0  # how long a session that ends waits for its frames in flight


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
    backfill: dict[str, Session] = field(default_factory=dict)  # device id -> its backfill session
    limits: dict[str, DeviceLimits] = field(default_factory=dict)
    ended: Counter[str] = field(default_factory=Counter)  # device id -> sessions that have ended
    going_away: bool = False  # the gateway is stopping: a session that starts streaming now goes away

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
        self.admission = Admission(AdmissionLimits.of(self.settings), self.session_id)
        self.device: Device | None = None
        self.hello: Hello | None = None
        self.clock: ClockSync | None = None
        self.end_reason: str | None = None
        self.dropped: Counter[str] = Counter()
        self._token = ""
        self._pipeline: PacketPipeline | None = None
        self._decoder: SessionDecoder | None = None
        self._recorder: SessionRecorder | None = None
        self._stream_task: asyncio.Task[None] | None = None
        self._main_task: asyncio.Task[object] | None = None
        self._draining = False
        self._closing = False
        self._ended = asyncio.Event()
        self._keyframes: KeyframeRequester | None = None  # a live session's, once it streams
        self._delays: DelayReporter | None = None  # a live session's whose edge asked for reports
        self._keyframe_reason = REASON_DROP  # why the pending keyframe request was made
        self.lease: StreamLease | None = None  # a live session's, from the handshake on
        self._lease_task: asyncio.Task[None] | None = None
        self.going_away = False  # sent GOAWAY: the edge ends the stream and reconnects elsewhere
        self._released = asyncio.Event()  # going away: the gateway has published our frames
        self._tls = writer.get_extra_info("sslcontext") is not None
        self._read_deadline: asyncio.Timeout | None = None  # of the TLS read waiting now
        self._dedup: BackfillDedup | None = None  # a backfill session's: frames sent twice are dropped

    @property
    def is_backfill(self) -> bool:
        """This connection carries the device's spooled video (the backfill lane), not live."""
        return self.hello is not None and self.hello.stream.backfill

    @property
    def device_id(self) -> str | None:
        return self.device.device_id if self.device else None

    @property
    def decoder_pid(self) -> int | None:
        """The process id of this session's decoder (None before the handshake)."""
        return self._decoder.pid if self._decoder is not None else None

    @property
    def decoded(self) -> int:
        """Frames decoded in this session."""
        return self._decoder.decoded if self._decoder is not None else 0

    @property
    def in_flight(self) -> int:
        """Access units sent to the decoder that it has not finished with yet."""
        return self._decoder.in_flight if self._decoder is not None else 0

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

    async def _read_control(self, what: str) -> bytes:
        try:
            return await read_frame(self.reader, MAX_CONTROL_SIZE)
        except ProtocolError as exc:
            raise Refused(REJECT_MALFORMED, f"{what}: {exc}") from None

    async def _handshake(self) -> None:
        hello = self.admission.receive_hello(await self._read_control("handshake"))
        try:
            device = await self.services.registry.verify(hello.device_id, hello.token)
        except DeviceAuthError as exc:
            raise Refused(exc.code, exc.reason) from None
        except (RedisError, OSError) as exc:
            log.warning("device registry unavailable: %s", exc)
            raise Refused(REJECT_BUSY, "the device registry is unavailable; retry later") from None
        accept = self.admission.admit(device, self.services.live.keys())
        if not hello.stream.backfill and not hello.stream.masks:
            await self._acquire_lease(device.device_id)
        if hello.stream.spooled:
            # Live: before any live frame of this session gets a seq, so backfill sorts in capture
            # order. Backfill: only the announced frames keep reserved seqs (the margin goes).
            stream = hello.stream
            spooled = stream.carried if stream.backfill else stream.spooled
            try:
                await reserve_backfill_seqs(
                    self.services.publisher.redis, device.device_id, spooled, stream.carried
                )
            except (RedisError, OSError) as exc:
                log.warning("cannot reserve backfill seqs: %s", exc)
                raise Refused(REJECT_BUSY, "the frame store is unavailable; retry later") from None
        self.writer.write(accept)
        await self.writer.drain()
        self.clock = self.admission.receive_clock(await self._read_control("clock"))
        self.hello, self.device, self._token = hello, device, hello.token

    async def _acquire_lease(self, device_id: str) -> None:
        """Own the device's live stream with a new generation (every other session of it is fenced)."""
        publisher = self.services.publisher
        lease = StreamLease(
            publisher.redis, publisher.clock, device_id, self.session_id, self.settings.lease_ttl
        )
        try:
            acquired = await lease.acquire()
        except (RedisError, OSError) as exc:
            log.warning("cannot take the lease of %s: %s", device_id, exc)
            raise Refused(REJECT_BUSY, "the frame store is unavailable; retry later") from None
        if acquired.took_over(publisher.clock.now()):
            metrics.LEASE_TAKEOVERS.inc()
            log.info(
                "session %s: device %s taken over from %s (lease generation %d)",
                self.session_id,
                device_id,
                acquired.previous_owner,
                acquired.generation,
            )
        self.lease = lease

    # --- streaming --------------------------------------------------------------------------

    async def stream(self) -> None:
        """Receive until the edge closes or `close` is called; then flush and clean up."""
        assert self.device is not None and self.hello is not None and self.clock is not None
        device, hello = self.device, self.hello
        lane = self.services.backfill if self.is_backfill else self.services.live
        previous = lane.get(device.device_id)
        lane[device.device_id] = self
        if previous is not None:
            log.info(
                "device %s: new session %s replaces %s",
                device.device_id,
                self.session_id,
                previous.session_id,
            )
            await previous.close(END_REPLACED)
        try:  # other gateway replicas close any older session of this device they still hold
            if self.lease is not None:  # (a backfill lane is never replaced from afar: no announcement)
                await self.services.registry.announce_session(
                    device.device_id, self.session_id, self.lease.generation
                )
        except (RedisError, OSError) as exc:
            log.warning("session %s: could not announce it to other gateways: %s", self.session_id, exc)
        if self.lease is not None:  # renewed while we live; the fallback that notices a takeover
            self._lease_task = asyncio.create_task(self._hold_lease(), name=f"lease:{self.session_id}")
        if self.is_backfill:  # (after the session it replaces has ended: it saw what that one published)
            try:
                self._dedup = await BackfillDedup.load(self.services.publisher.redis, device.device_id)
            except (RedisError, OSError) as exc:
                log.warning("session %s: cannot read the backfill's progress: %s", self.session_id, exc)
                self._dedup = BackfillDedup(device.device_id)
        metrics.SESSIONS.inc()
        started = self.services.publisher.clock.now()  # on Redis's clock, like every time it publishes
        if not self.is_backfill:  # the stream's status and size are the live session's
            meta = StreamMeta(
                device=device.device_id,
                tenant=device.tenant,
                width=hello.stream.width,
                height=hello.stream.height,
                fps=hello.stream.fps,
                started=started,
                status=keys.STATUS_LIVE,
            )
            self.services.publisher.set_meta(device.device_id, meta.to_fields())
        if self.settings.record_dir:
            self._recorder = self._open_recorder(started)
        log.info(
            "session %s%s: device %s (tenant %s) from %s, %dx%d at %g fps, clock offset %+.3f s (rtt %.3f s)",
            self.session_id,
            " (backfill)" if self.is_backfill else "",
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
        if not self.is_backfill:  # a spooled GOP starts at an IDR: nothing to ask for
            self._keyframes = KeyframeRequester(self.writer, self.session_id)
            if hello.stream.delay_reports:
                self._delays = DelayReporter(self.writer, self.session_id)
        if self.services.going_away:  # the gateway began to stop during our handshake
            self.go_away()
        self._pipeline, self._decoder = self._packet_path(device)
        try:
            await self._decoder.start()
            if self._closing and self.end_reason in (END_REVOKED, END_ROTATED):
                return  # revoked while setting up (before there was a task to cancel): read nothing
            self._stream_task = asyncio.create_task(self._read_packets(), name=f"packets:{self.session_id}")
            await self._stream_task
            self.end_reason = self.end_reason or (END_GOAWAY if self.going_away else END_EOF)
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
            self._decoder.stop_watching()
            try:
                await self._finish()
            finally:
                self._ended.set()
                if self._lease_task is not None:
                    self._lease_task.cancel()
        if self.going_away:  # the edge reconnects once we close: only after our frames are published
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_timeout + FLUSH_TIMEOUT):
                    await self._released.wait()
            await self._count_unread()
            self._close_writer()

    async def _count_unread(self) -> None:
        """Going away, the session stopped reading before the connection closed (over TLS at the
        edge's silence, or at the drain deadline): the access units the edge sent since are never
        decoded, so count them, else they would be lost without a trace."""
        if self._pipeline is None:
            return
        reader, units = self._pipeline.reader, 0
        with contextlib.suppress(TimeoutError, OSError, ProtocolError):
            async with asyncio.timeout(DRAIN_READ_TIMEOUT):  # only what has arrived already
                while chunk := await self.reader.read(READ_CHUNK):
                    units += len(reader.feed(chunk))
        units += len(reader.flush())
        if units:
            self._drop(metrics.DROP_GOAWAY_UNREAD, units)
            log.warning(
                "session %s: %d access units arrived after it stopped reading", self.session_id, units
            )

    async def _hold_lease(self) -> None:
        """Renew the lease every ``lease_renew_interval``; close the session once a newer one has it."""
        lease = self.lease
        assert lease is not None
        failing = False
        while True:
            await asyncio.sleep(self.settings.lease_renew_interval)
            try:
                held = await lease.renew()
            except (RedisError, OSError) as exc:  # the publisher cannot write either: keep the session
                if not failing:
                    log.warning("session %s: cannot renew its lease: %s", self.session_id, exc)
                failing = True
                continue
            if failing:
                log.info("session %s: lease renewed again", self.session_id)
            failing = False
            if not held:
                if self.superseded(lease.newer, NOTICED_RENEWAL):
                    await self.close(END_REPLACED)
                return

    def superseded(self, generation: int, noticed: str) -> bool:
        """Whether a session of lease ``generation`` replaces this one (counted once, by how it was
        ``noticed``); the caller closes this session then."""
        if self.lease is None or not self.lease.superseded_by(generation):
            return False
        if not self._closing:
            metrics.LEASE_LOST.labels(noticed).inc()
            log.info(
                "session %s: device %s taken over by lease generation %d (ours %d, noticed by %s)",
                self.session_id,
                self.device_id,
                generation,
                self.lease.generation,
                noticed,
            )
        return True

    def go_away(self) -> bool:
        """The gateway is stopping: ask the edge to end this stream and reconnect elsewhere (GOAWAY);
        the session reads on until the edge half-closes. False when it is no live stream (any more)."""
        if self._keyframes is None or self._closing or self.going_away:
            return False
        if not send_frame(self.writer, GoAway("the gateway is stopping").to_bytes()):
            log.debug("session %s: GOAWAY not sent: the connection is closing", self.session_id)
            return False
        self.going_away = True
        if self._read_deadline is not None:  # the edge may cut at once and send nothing more
            self._read_deadline.reschedule(asyncio.get_running_loop().time() + GOAWAY_SILENCE)
        metrics.GOAWAYS.inc()
        log.info("session %s: asked the edge to reconnect elsewhere (GOAWAY)", self.session_id)
        return True

    def release(self) -> None:
        """Going away: the gateway has published this session's frames; close the connection."""
        self._released.set()

    def _packet_path(self, device: Device) -> tuple[PacketPipeline, SessionDecoder]:
        assert self.clock is not None
        s = self.settings
        name = f"session {self.session_id}"
        decoder = SessionDecoder(
            self.services.decoders,
            s.decoder_backlog,
            s.decoder_stall_timeout,
            on_frame=self._publish,
            on_drop=self._drop,
            on_trouble=lambda reason: pipeline.await_idr(reason),
            name=name,
        )
        pipeline = PacketPipeline(
            PipelineLimits.of(s),
            self.services.device_limits(backfill_key(device.device_id, self.is_backfill)).frames,
            self.clock.offset,
            on_drop=self._drop,
            on_malformed=self._malformed,
            decoder_refusal=decoder.refusal,
            on_keyframe_wanted=self._keyframe_wanted if self._keyframes is not None else None,
            name=name,
        )
        return pipeline, decoder

    async def receive_edge_masks(self) -> None:
        """A ``masks`` connection: store the masks the edge made offline (services.gateway.edge_masks)."""
        assert self.device is not None and self.clock is not None
        publisher = self.services.publisher
        store = MaskStore(publisher.redis, tenant_max_bytes=self.settings.results_tenant_max_bytes)
        try:
            stored = await receive_edge_masks(
                self.reader, self.device.device_id, self.clock.offset, store, publisher.clock.offset
            )
            log.info("session %s: %d edge masks of %s stored", self.session_id, stored, self.device.device_id)
        finally:
            self._close_writer()

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

    @property
    def task(self) -> asyncio.Task[object] | None:
        """The task serving this connection (None before it streams)."""
        return self._main_task

    async def wait_ended(self) -> None:
        """Until the session has ended (decoded and flushed; a going-away one may still linger)."""
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
        assert self.device is not None and self._pipeline is not None and self._decoder is not None
        pipeline, decoder = self._pipeline, self._decoder
        limits = self.services.device_limits(backfill_key(self.device.device_id, self.is_backfill))
        while True:
            if self._draining:
                try:
                    async with asyncio.timeout(DRAIN_READ_TIMEOUT):  # only what has arrived already
                        chunk = await self.reader.read(READ_CHUNK)  # whole chunks: far fewer awaits
                except TimeoutError:
                    return
            elif self._tls:
                # TLS has no half-close: once going away, the edge's silence says it has cut its
                # stream (`go_away` sets the deadline of a read already waiting).
                silence = GOAWAY_SILENCE if self.going_away else None
                try:
                    async with asyncio.timeout(silence) as self._read_deadline:
                        chunk = await self.reader.read(READ_CHUNK)
                except TimeoutError:
                    return
                finally:
                    self._read_deadline = None
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
            received = pipeline.reader.received
            try:
                for unit in pipeline.feed(chunk, recv_ts):
                    if unit.keyframe and self._keyframes is not None:
                        self._keyframes.keyframe_arrived()
                    if self._delays is not None:
                        self._delays.observe(unit.times)
                    await decoder.decode(unit)
            finally:
                metrics.PACKETS.inc(pipeline.reader.received - received)

    async def _end_of_stream(self) -> None:
        """The access unit the depacketizer still holds, then the pictures the decoder holds back
        to reorder B-frames: without this the last frames of every such stream are lost."""
        assert self._pipeline is not None and self._decoder is not None
        for unit in self._pipeline.finish(time.time()):
            await self._decoder.decode(unit)
        await self._decoder.flush()
        await self._decoder.wait()

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count
        metrics.drop(reason, count)
        if reason == DROP_AWAIT_IDR and self._pipeline is not None and self._pipeline.want_keyframe:
            self._ask_for_keyframe()  # still none: ask again (rate limited)

    def _keyframe_wanted(self, reason: str) -> None:
        """The pipeline starts to need an IDR: ask the edge for one now, not at its next GOP."""
        if reason == metrics.DROP_DECODER_CRASH:
            self._keyframe_reason = REASON_DECODER_RESTART
        elif reason == WANTED_STREAM_START:
            self._keyframe_reason = REASON_SESSION_START
        else:
            self._keyframe_reason = REASON_DROP
        self._ask_for_keyframe()

    def _ask_for_keyframe(self) -> None:
        # Not while the decoder restarts: an IDR arriving before its replacement is ready would be
        # refused too. The first await_idr drop after the restart asks.
        restarting = self._decoder is not None and self._decoder.refusal() == metrics.DROP_DECODER_CRASH
        if self._keyframes is None or restarting:
            return
        self._keyframes.request(self._keyframe_reason)

    def _malformed(self, exc: ProtocolError) -> None:
        metrics.PACKETS_REJECTED.labels("malformed").inc()
        log.debug("session %s: packet refused: %s", self.session_id, exc)

    def _publish(self, out: DecodedFrame, times: UnitTimes) -> None:
        assert self.device is not None and self.clock is not None
        if self._dedup is not None and not self._dedup.admit(times.capture_ts - self.clock.offset):
            return
        if self.is_backfill:
            metrics.BACKFILL_FRAMES.inc()
        self.services.publisher.submit(
            Frame(
                stream=self.device.device_id,
                seq=UNASSIGNED_SEQ,
                capture_ts=times.capture_ts,
                recv_ts=times.recv_ts,
                width=out.width,
                height=out.height,
                encoding=self.settings.frame_encoding,
                data=out.data,
                backfill=self.is_backfill,
                sent_ts=times.sent_ts,
                decoded_ts=time.time(),  # its picture has just come out of the decoder
                generation=self.lease.generation if self.lease is not None else 0,  # fencing
            )
        )
        if self._dedup is not None:  # written with the frame
            self.services.publisher.set_meta(self.device.device_id, self._dedup.fields())

    async def _finish(self) -> None:
        assert self.device is not None and self._decoder is not None
        device_id = self.device.device_id
        if not self.going_away:  # (going away, the edge has half-closed and waits for our close)
            self._close_writer()
        try:
            if self.end_reason not in (END_REVOKED, END_ROTATED):
                # Let the frames in flight come out of the decoder (a revoked device's are discarded).
                with contextlib.suppress(TimeoutError, ProtocolError):
                    async with asyncio.timeout(FLUSH_TIMEOUT):
                        await self._end_of_stream()
            self._closing = True
            await self._decoder.close()
        finally:
            # Bookkeeping happens even when the gateway's shutdown cancels the cleanup above.
            self._decoder.discard()
            if self._recorder is not None:
                self._recorder.close()
            if self.services.backfill.get(device_id) is self:
                del self.services.backfill[device_id]
            if self.services.live.get(device_id) is self:
                del self.services.live[device_id]
                if self.end_reason != END_REPLACED:  # else the replacing session (maybe elsewhere) owns it
                    idle = StreamMeta(status=keys.STATUS_IDLE)
                    self.services.publisher.set_meta(device_id, idle.to_fields())
                    self._release_lease_soon()
            metrics.SESSIONS.dec()
            self.services.ended[device_id] += 1
            metrics.SESSION_ENDS.labels(self.end_reason or END_EOF).inc()
            log.info(
                "session %s: device %s ended (%s): %d packets, %d frames decoded, dropped %s",
                self.session_id,
                device_id,
                self.end_reason,
                self._pipeline.packets if self._pipeline is not None else 0,
                self.decoded,
                dict(self.dropped) or "none",
            )

    def _release_lease_soon(self) -> None:
        """Clear the lease's owner (kept when a newer session holds it); in the background, since
        this runs in cleanup that shutdown may cancel. The generation stays: it only ever rises."""
        lease = self.lease
        if lease is None:
            return

        async def release() -> None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await lease.release()

        task = asyncio.create_task(release(), name=f"release:{self.session_id}")
        _background.add(task)
        task.add_done_callback(_background.discard)

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
                    self.writer.write(reject_frame(refused))
                    await self.writer.drain()
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
