"""A session's packet path as pure code: RTP bytes in, access units cleared for decoding out.

`PacketPipeline` takes the bytes an authenticated edge sends after the handshake (RFC 4571-framed
RTP/H.264) and gives out the access units the decoder may have, each with its times. In order:

1. `flowcloud.protocol.access_units.AccessUnitReader`: framing, RTP, depacketizing; it bounds NAL
   and access-unit sizes, drops broken access units until the next IDR, and ends the session
   after ``max_malformed`` malformed packets in a row;
2. the device's frames/s token bucket (first: it also bounds the parsing work a device can cause);
   above it, access units are dropped (``rate_limit``) and decoding resumes at the next IDR. Each
   unit counts as of its send time (a stall of this side's reader is no burst of the device's);
   ``try_take`` keeps a lying send time from buying more than the rate;
3. the SPS gate: each SPS is parsed (`flowcloud.protocol.sps`) before its access unit may reach the
   decoder. An SPS above the cap drops its access unit and every later one (``dimensions``) until
   an acceptable SPS with the same id arrives, then until the next IDR; an SPS that does not parse
   (or more than `MAX_SPS_PER_ACCESS_UNIT` of them) is a ``malformed`` drop;
4. after any drop or decoder trouble (`await_idr`), only an IDR goes on (``await_idr``);
5. the decoder's own refusal (its backlog is full, it has crashed), asked through ``decoder_refusal``.

Every drop is reported by reason through ``on_drop`` and counted in ``dropped``. No sockets, no
sleeping: the session does the I/O, and tests drive the pipeline with bytes
(`tests/unit/test_packet_pipeline.py`). Whatever a frame should carry from here on (per-stage
times, say) goes in `UnitTimes`. ``on_keyframe_wanted`` hears (with the reason) each time the
stream starts to need an IDR (a stream joined mid-GOP too: `WANTED_STREAM_START`), and
``want_keyframe`` is true until one passes: what a keyframe request back to the edge needs
(services.gateway.keyframes).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flowcloud.protocol.access_units import AccessUnitReader
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.h264 import DROP_AWAIT_IDR, DROP_MALFORMED, NAL_TYPE_SPS, AccessUnit, nal_type
from flowcloud.protocol.sps import SequenceParameterSet
from flowcloud.settings import GatewaySettings
from services.gateway.limits import TokenBucket
from services.gateway.metrics import DROP_DIMENSIONS, DROP_RATE_LIMIT

log = logging.getLogger(__name__)

# SPSs one access unit may carry: one is the norm; more than a few is an attack on the parser.
MAX_SPS_PER_ACCESS_UNIT = 4
# The reason ``on_keyframe_wanted`` hears when the stream began without an IDR (joined mid-GOP).
WANTED_STREAM_START = "stream_start"


@dataclass(frozen=True)
class PipelineLimits:
    max_width: int
    max_height: int
    max_nal_size: int
    max_access_unit_size: int
    max_malformed: int

    @classmethod
    def of(cls, s: GatewaySettings) -> PipelineLimits:
        return cls(s.max_width, s.max_height, s.max_nal_size, s.max_access_unit_size, s.max_malformed)


@dataclass
class UnitTimes:
    """What the gateway knows of an access unit's times (this machine's clock, unix seconds)."""

    capture_ts: float  # the edge's capture time mapped by the handshake's offset (else recv_ts)
    recv_ts: float  # when its last bytes were read
    sent_ts: float | None = None  # the edge's send time mapped the same way (None: an older edge)


@dataclass(frozen=True)
class ClearedUnit:
    """An access unit the decoder may have."""

    data: bytes  # Annex B
    keyframe: bool
    times: UnitTimes


class PacketPipeline:
    def __init__(
        self,
        limits: PipelineLimits,
        frames: TokenBucket,
        clock_offset: float,
        on_drop: Callable[[str, int], object] | None = None,
        on_malformed: Callable[[ProtocolError], object] | None = None,
        decoder_refusal: Callable[[], str | None] = lambda: None,
        on_keyframe_wanted: Callable[[str], object] | None = None,
        name: str = "session",
    ) -> None:
        """``clock_offset`` maps edge capture times to this machine's clock (the handshake's);
        ``decoder_refusal`` names why the decoder cannot take an access unit now (None: it can)."""
        self.limits = limits
        self.frames = frames
        self.clock_offset = clock_offset
        self.name = name
        self.dropped: Counter[str] = Counter()
        self._on_drop = on_drop
        self._decoder_refusal = decoder_refusal
        self._on_keyframe_wanted = on_keyframe_wanted
        self.want_keyframe = False  # something was lost since the last IDR went to the decoder
        self._cleared_any = False  # an access unit has gone to the decoder
        self.reader = AccessUnitReader(
            limits.max_nal_size,
            limits.max_access_unit_size,
            on_drop=self._drop,
            on_malformed=on_malformed,
            max_malformed=limits.max_malformed,
        )
        self._need_idr = False  # the depacketizer itself waits for the first IDR
        self._oversized_sps: set[int] = set()  # ids of refused SPSs not yet replaced by acceptable ones
        self._last_sps: bytes | None = None  # the last SPS parsed: its repeats need no parsing

    @property
    def packets(self) -> int:
        return self.reader.packets

    def feed(self, data: bytes, recv_ts: float) -> Iterator[ClearedUnit]:
        """The access units ``data`` completes that may be decoded. Lazy: a drop decided while the
        caller handles one unit (`await_idr`) applies to the next. `ProtocolError`: end the session."""
        return self._clear(self.reader.feed(data), recv_ts)

    def finish(self, now: float) -> Iterator[ClearedUnit]:
        """End of the stream: the access unit the depacketizer still holds, if it may be decoded."""
        return self._clear(self.reader.flush(), now)

    def await_idr(self, reason: str) -> None:
        """Nothing but an IDR may be decoded next (after a drop, a decode error, a decoder restart)."""
        self._need_idr = True
        self._wanted(reason)

    def _wanted(self, reason: str) -> None:
        if not self.want_keyframe:
            self.want_keyframe = True
            if self._on_keyframe_wanted is not None:
                self._on_keyframe_wanted(reason)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count
        if self._on_drop is not None:
            self._on_drop(reason, count)
        if reason != DROP_AWAIT_IDR:  # the depacketizer's own losses want a keyframe too
            self._wanted(reason)
        elif not self._cleared_any:  # the depacketizer waits for the stream's first IDR
            self._wanted(WANTED_STREAM_START)

    def _clear(self, units: Iterable[AccessUnit], recv_ts: float) -> Iterator[ClearedUnit]:
        for au in units:
            sent_ts = au.send_time + self.clock_offset if au.send_time is not None else None
            # Counted when the edge sent it: frames that waited in the socket while this side was
            # stalled (a busy machine) are not a burst of the device's (`TokenBucket.try_take`).
            if not self.frames.try_take(late=recv_ts - sent_ts if sent_ts is not None else 0.0):
                self._drop(DROP_RATE_LIMIT)
                self.await_idr(DROP_RATE_LIMIT)
                continue
            if not self._size_allowed(au):
                continue
            if self._need_idr and not au.keyframe:
                self._drop(DROP_AWAIT_IDR)
                continue
            refusal = self._decoder_refusal()
            if refusal is not None:
                self._drop(refusal)
                self.await_idr(refusal)
                continue
            self._need_idr = False
            self._cleared_any = True
            if au.keyframe:
                self.want_keyframe = False
            capture_ts = au.capture_time + self.clock_offset if au.capture_time is not None else recv_ts
            yield ClearedUnit(au.to_annexb(), au.keyframe, UnitTimes(capture_ts, recv_ts, sent_ts))

    def _size_allowed(self, au: AccessUnit) -> bool:
        """Check the access unit's SPSs against the size cap; False (counted) when it may not be decoded."""
        limits = self.limits
        sps_nals = [nal for nal in au.nals if nal_type(nal) == NAL_TYPE_SPS]
        if len(sps_nals) > MAX_SPS_PER_ACCESS_UNIT:
            log.debug("%s: access unit with %d SPSs dropped", self.name, len(sps_nals))
            self._drop(DROP_MALFORMED)
            self.await_idr(DROP_MALFORMED)
            return False
        for nal in sps_nals:
            if nal == self._last_sps:
                continue  # encoders repeat their SPS at every IDR: it was checked when it first came
            try:
                sps = SequenceParameterSet.parse(nal)
            except ProtocolError as exc:
                log.debug("%s: access unit dropped: %s", self.name, exc)
                self._drop(DROP_MALFORMED)
                self.await_idr(DROP_MALFORMED)
                return False
            self._last_sps = nal
            if sps.width <= limits.max_width and sps.height <= limits.max_height:
                self._oversized_sps.discard(sps.sps_id)
                continue
            if sps.sps_id not in self._oversized_sps:
                log.info(
                    "%s: SPS %d announces %dx%d, above the cap %dx%d; dropping until a smaller one",
                    self.name,
                    sps.sps_id,
                    sps.width,
                    sps.height,
                    limits.max_width,
                    limits.max_height,
                )
            self._oversized_sps.add(sps.sps_id)
        if self._oversized_sps:
            self._drop(DROP_DIMENSIONS)
            self.await_idr(DROP_DIMENSIONS)
            return False
        return True
