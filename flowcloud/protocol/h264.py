"""The H.264 RTP payload format (RFC 6184), packetization-mode 1: single NAL unit, STAP-A, FU-A.

`Packetizer` turns the NAL units of one access unit into RTP packets no larger than its MTU:
runs of NAL units that fit together (SPS, PPS, SEI, small slices) go into one STAP-A, a NAL unit
that fits alone goes as a single NAL unit packet, a larger one is cut into FU-A fragments. The
last packet of an access unit carries the marker bit; sequence numbers continue across calls.

`Depacketizer` is the receiver: it reassembles access units (ended by the marker bit or by a
timestamp change), tracks sequence numbers, and after a loss or a malformed packet drops every
access unit until the next IDR, counting each drop by reason in ``dropped``. Malformed payloads
raise `ProtocolError` after the state is updated, so a caller catches, counts, and goes on.
Both are pure code: no sockets, no clocks.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from flowcloud.protocol.capture_time import CAPTURE_TIME_EXT_ID, SEND_TIME_EXT_ID, decode_capture_time
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.rtp import RTP_HEADER_SIZE, TIMESTAMP_MODULO, RtpPacket, seq_add, seq_diff

NAL_TYPE_SLICE = 1
NAL_TYPE_IDR = 5
NAL_TYPE_SEI = 6
NAL_TYPE_SPS = 7
NAL_TYPE_PPS = 8
NAL_TYPE_AUD = 9
NAL_TYPE_STAP_A = 24
NAL_TYPE_STAP_B = 25
NAL_TYPE_MTAP16 = 26
NAL_TYPE_MTAP24 = 27
NAL_TYPE_FU_A = 28
NAL_TYPE_FU_B = 29

NAL_TYPE_MASK = 0x1F
NAL_NRI_MASK = 0x60
NAL_F_BIT = 0x80
FU_START = 0x80
FU_END = 0x40
FU_HEADER_SIZE = 2  # FU indicator + FU header
STAP_A_HEADER_SIZE = 1
STAP_A_LENGTH_SIZE = 2

DEFAULT_CLOCK_RATE = 90_000
DEFAULT_PAYLOAD_TYPE = 96
DEFAULT_MTU = 1200
MIN_MTU = 64
MAX_MTU = 0xFFFF  # an RFC 4571 frame carries at most 65535 bytes
DEFAULT_MAX_NAL_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_ACCESS_UNIT_SIZE = 8 * 1024 * 1024
ANNEXB_START_CODE = b"\x00\x00\x00\x01"

_NOT_MODE_1 = {
    NAL_TYPE_STAP_B: "STAP-B",
    NAL_TYPE_MTAP16: "MTAP16",
    NAL_TYPE_MTAP24: "MTAP24",
    NAL_TYPE_FU_B: "FU-B",
}

# Reasons an access unit is dropped (keys of Depacketizer.dropped).
DROP_LOSS = "loss"  # packets of it were lost
DROP_AWAIT_IDR = "await_idr"  # it follows a loss or error and is not an IDR, so it cannot be decoded
DROP_MALFORMED = "malformed"  # a packet of it was malformed
DROP_INCOMPLETE = "incomplete"  # it ended while a FU-A NAL unit was still open
DROP_NAL_TOO_LARGE = "nal_too_large"
DROP_ACCESS_UNIT_TOO_LARGE = "access_unit_too_large"
DROP_SSRC_CHANGE = "ssrc_change"
# Reasons a packet is discarded without affecting an access unit (keys of Depacketizer.discarded).
DISCARD_LATE = "late_or_duplicate"


def nal_type(nal: bytes) -> int:
    return nal[0] & NAL_TYPE_MASK


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes and trailing zero bytes removed)."""
    nals: list[bytes] = []
    start = -1
    i = 0
    n = len(data)
    while True:
        j = data.find(b"\x00\x00\x01", i)
        if j < 0:
            break
        if start >= 0:
            nal = data[start:j].rstrip(b"\x00")
            if nal:
                nals.append(nal)
        start = j + 3
        i = start
    if start >= 0 and start < n:
        nal = data[start:].rstrip(b"\x00")
        if nal:
            nals.append(nal)
    return nals


def to_annexb(nals: list[bytes]) -> bytes:
    return b"".join(ANNEXB_START_CODE + nal for nal in nals)


@dataclass
class AccessUnit:
    """One coded picture: its NAL units, RTP timestamp, edge capture and send times (unix seconds)."""

    timestamp: int
    nals: list[bytes]
    keyframe: bool
    capture_time: float | None = None
    send_time: float | None = None

    @property
    def size(self) -> int:
        return sum(len(n) for n in self.nals)

    def to_annexb(self) -> bytes:
        return to_annexb(self.nals)


class Packetizer:
    """NAL units of one access unit -> RTP packets of at most ``mtu`` bytes each (RFC 6184 mode 1)."""

    def __init__(
        self,
        mtu: int = DEFAULT_MTU,
        payload_type: int = DEFAULT_PAYLOAD_TYPE,
        ssrc: int | None = None,
        clock_rate: int = DEFAULT_CLOCK_RATE,
        first_sequence_number: int | None = None,
        first_timestamp: int | None = None,
    ) -> None:
        """``ssrc``, the first sequence number and the first timestamp are random unless given.

        RFC 3550 5.1 asks for random initial values so that a stream's numbers tell nothing
        about when it started; a restarted sender also gets numbers unrelated to its last ones.
        """
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} is out of range [{MIN_MTU}, {MAX_MTU}]")
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload type {payload_type} is out of range [0, 127]")
        self.mtu = mtu
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.clock_rate = clock_rate
        first = secrets.randbits(16) if first_sequence_number is None else first_sequence_number
        self.sequence_number = first
        self.first_timestamp = secrets.randbits(32) if first_timestamp is None else first_timestamp

    def timestamp_of(self, seconds: float) -> int:
        """The RTP timestamp (modulo 2**32) of a time ``seconds`` after the stream's first sample."""
        return (self.first_timestamp + round(seconds * self.clock_rate)) % TIMESTAMP_MODULO

    def packetize(
        self, nals: list[bytes], timestamp: int, extensions: dict[int, bytes] | None = None
    ) -> list[RtpPacket]:
        """The packets of one access unit; ``extensions`` go on its first packet."""
        nals = [n for n in nals if n]
        if not nals:
            return []
        ext = dict(extensions or {})
        overhead = RtpPacket(extensions=ext).header_size if ext else RTP_HEADER_SIZE
        room = self.mtu - overhead  # the same for every packet, so the first can carry the extension
        if room < FU_HEADER_SIZE + 1:
            raise ValueError(f"MTU {self.mtu} leaves no room for payload after {overhead} header bytes")
        payloads: list[bytes] = []
        pending: list[bytes] = []
        pending_size = STAP_A_HEADER_SIZE

        def flush() -> None:
            nonlocal pending, pending_size
            if len(pending) == 1:
                payloads.append(pending[0])
            elif pending:
                payloads.append(_stap_a(pending))
            pending, pending_size = [], STAP_A_HEADER_SIZE

        for nal in nals:
            if len(nal) > room:
                flush()
                payloads.extend(_fu_a(nal, room))
                continue
            if pending and pending_size + STAP_A_LENGTH_SIZE + len(nal) > room:
                flush()
            pending.append(nal)
            pending_size += STAP_A_LENGTH_SIZE + len(nal)
        flush()

        packets = []
        for i, payload in enumerate(payloads):
            packets.append(
                RtpPacket(
                    payload_type=self.payload_type,
                    sequence_number=self.sequence_number,
                    timestamp=timestamp % TIMESTAMP_MODULO,
                    ssrc=self.ssrc,
                    marker=i == len(payloads) - 1,
                    extensions=ext if i == 0 else {},
                    payload=payload,
                )
            )
            self.sequence_number = seq_add(self.sequence_number, 1)
        return packets


def _stap_a(nals: list[bytes]) -> bytes:
    f = max(n[0] & NAL_F_BIT for n in nals)
    nri = max(n[0] & NAL_NRI_MASK for n in nals)
    out = bytearray((f | nri | NAL_TYPE_STAP_A,))
    for nal in nals:
        out += len(nal).to_bytes(2, "big") + nal
    return bytes(out)


def _fu_a(nal: bytes, room: int) -> list[bytes]:
    indicator = (nal[0] & (NAL_F_BIT | NAL_NRI_MASK)) | NAL_TYPE_FU_A
    kind = nal[0] & NAL_TYPE_MASK
    chunk = room - FU_HEADER_SIZE
    body = nal[1:]
    out = []
    for pos in range(0, len(body), chunk):
        header = kind
        if pos == 0:
            header |= FU_START
        if pos + chunk >= len(body):
            header |= FU_END
        out.append(bytes((indicator, header)) + body[pos : pos + chunk])
    return out


def parse_payload(payload: bytes) -> list[tuple[int, bytes]]:
    """Split an RTP payload into (kind, bytes) units without state; kind is the payload's NAL type.

    Single NAL units and STAP-A yield whole NAL units (kind = their own type, never 24); a FU-A
    yields one unit of kind 28 whose bytes are the payload itself (indicator and header kept).
    """
    if not payload:
        raise ProtocolError("empty RTP payload")
    kind = payload[0] & NAL_TYPE_MASK
    if payload[0] & NAL_F_BIT:
        raise ProtocolError("NAL unit header has the forbidden_zero_bit set")
    if kind == 0 or kind >= 30:
        raise ProtocolError(f"unsupported NAL unit type {kind}")
    if kind in _NOT_MODE_1:
        raise ProtocolError(
            f"NAL unit type {kind} ({_NOT_MODE_1[kind]}) is not allowed in packetization-mode 1"
        )
    if kind == NAL_TYPE_FU_A:
        if len(payload) < FU_HEADER_SIZE + 1:
            raise ProtocolError(f"FU-A packet of {len(payload)} bytes is too short")
        header = payload[1]
        if header & FU_START and header & FU_END:
            raise ProtocolError("FU-A fragment has both the start and the end bit set")
        inner = header & NAL_TYPE_MASK
        if inner in (0, NAL_TYPE_STAP_A, NAL_TYPE_FU_A) or inner in _NOT_MODE_1 or inner >= 30:
            raise ProtocolError(f"FU-A carries NAL unit type {inner}, which cannot be fragmented")
        return [(NAL_TYPE_FU_A, payload)]
    if kind == NAL_TYPE_STAP_A:
        units: list[tuple[int, bytes]] = []
        pos = STAP_A_HEADER_SIZE
        while pos < len(payload):
            if pos + STAP_A_LENGTH_SIZE > len(payload):
                left = len(payload) - pos
                raise ProtocolError(f"STAP-A has {left} trailing byte(s), too few for a NAL unit size")
            size = int.from_bytes(payload[pos : pos + 2], "big")
            pos += STAP_A_LENGTH_SIZE
            if size == 0:
                raise ProtocolError("STAP-A contains a zero-length NAL unit")
            if pos + size > len(payload):
                raise ProtocolError(
                    f"STAP-A NAL unit length {size} exceeds the {len(payload) - pos} bytes left in the packet"
                )
            nal = payload[pos : pos + size]
            inner = nal[0] & NAL_TYPE_MASK
            if inner in (0, NAL_TYPE_STAP_A, NAL_TYPE_FU_A) or inner in _NOT_MODE_1 or inner >= 30:
                raise ProtocolError(f"STAP-A contains NAL unit type {inner}, which cannot be aggregated")
            units.append((inner, nal))
            pos += size
        if not units:
            raise ProtocolError("STAP-A contains no NAL units")
        return units
    return [(kind, payload)]


@dataclass
class _Assembly:
    """The access unit being reassembled."""

    timestamp: int
    nals: list[bytes] = field(default_factory=list)
    size: int = 0
    fragment: bytearray | None = None  # the FU-A NAL unit being reassembled
    capture_time: float | None = None
    send_time: float | None = None
    broken: str | None = None  # drop reason once it cannot be delivered


class Depacketizer:
    """RTP packets -> access units, with loss detection and recovery at the next IDR."""

    def __init__(
        self,
        max_nal_size: int = DEFAULT_MAX_NAL_SIZE,
        max_access_unit_size: int = DEFAULT_MAX_ACCESS_UNIT_SIZE,
        on_drop: Callable[[str], object] | None = None,
    ) -> None:
        """``on_drop`` is called with the reason of each access unit dropped, as it is dropped."""
        self.max_nal_size = max_nal_size
        self.max_access_unit_size = max_access_unit_size
        self.packets = 0  # packets pushed
        self.lost_packets = 0  # packets missing from the sequence
        self.access_units = 0  # access units delivered
        self.dropped: Counter[str] = Counter()  # access units dropped, by reason
        self._on_drop = on_drop
        self.discarded: Counter[str] = Counter()  # packets ignored, by reason
        self._ssrc: int | None = None
        self._last_seq: int | None = None
        self._au: _Assembly | None = None
        self._need_idr = True  # nothing decodes before the first IDR
        self._ready: list[AccessUnit] = []

    @property
    def awaiting_idr(self) -> bool:
        return self._need_idr

    def push(self, packet: RtpPacket) -> list[AccessUnit]:
        """Feed one packet; returns the access units it completed (oldest first).

        Raises `ProtocolError` for a malformed payload, after dropping the access unit it belonged
        to; access units completed before the error come out of the next call (or `flush()`).
        """
        self.packets += 1
        if self._ssrc is not None and packet.ssrc != self._ssrc:
            self._drop_current(DROP_SSRC_CHANGE)
            self._last_seq = None
            self._need_idr = True
        self._ssrc = packet.ssrc
        lost = False
        if self._last_seq is not None:
            gap = seq_diff(packet.sequence_number, self._last_seq)
            if gap <= 0:
                self.discarded[DISCARD_LATE] += 1
                return self._take_ready()
            if gap > 1:
                self.lost_packets += gap - 1
                lost = True
        self._last_seq = packet.sequence_number

        au = self._au
        if lost:
            # The lost packets may end the unit in progress or begin this one: both are broken.
            if au is not None:
                au.broken = au.broken or DROP_LOSS
            self._need_idr = True
        if au is not None and au.timestamp != packet.timestamp:
            self._finish()  # a timestamp change ends the access unit (its marker packet may be lost)
            au = None
        if au is None:
            au = self._au = _Assembly(timestamp=packet.timestamp)
            if lost:
                au.broken = DROP_LOSS
        try:
            self._add(au, packet)
        except ProtocolError:
            au.broken = au.broken or DROP_MALFORMED
            self._need_idr = True
            if packet.marker:
                self._finish()
            raise
        if packet.marker:
            self._finish()
        return self._take_ready()

    def flush(self) -> list[AccessUnit]:
        """End the access unit in progress (e.g. at end of stream) and return what is ready."""
        if self._au is not None:
            self._finish()
        return self._take_ready()

    def _take_ready(self) -> list[AccessUnit]:
        out, self._ready = self._ready, []
        return out

    def _drop_current(self, reason: str) -> None:
        if self._au is not None:
            self._count_drop(self._au.broken or reason)
            self._au = None

    def _count_drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._on_drop is not None:
            self._on_drop(reason)

    def _add(self, au: _Assembly, packet: RtpPacket) -> None:
        if au.capture_time is None and CAPTURE_TIME_EXT_ID in packet.extensions:
            au.capture_time = decode_capture_time(packet.extensions[CAPTURE_TIME_EXT_ID])
        if au.send_time is None and SEND_TIME_EXT_ID in packet.extensions:
            au.send_time = decode_capture_time(packet.extensions[SEND_TIME_EXT_ID], "send-time")
        units = parse_payload(packet.payload)
        if au.broken is not None:
            return  # the unit is already lost; keep consuming its packets without work
        for kind, data in units:
            if kind == NAL_TYPE_FU_A:
                self._add_fragment(au, data)
                continue
            if au.fragment is not None:
                au.fragment = None
                au.broken = DROP_MALFORMED
                raise ProtocolError(f"NAL unit of type {kind} arrived inside an unfinished FU-A")
            self._add_nal(au, data)

    def _add_fragment(self, au: _Assembly, payload: bytes) -> None:
        header = payload[1]
        body = payload[2:]
        if header & FU_START:
            if au.fragment is not None:
                au.fragment = None
                au.broken = DROP_MALFORMED
                raise ProtocolError("FU-A start fragment before the previous FU-A ended")
            au.fragment = bytearray(((payload[0] & (NAL_F_BIT | NAL_NRI_MASK)) | (header & NAL_TYPE_MASK),))
        elif au.fragment is None:
            au.broken = DROP_MALFORMED
            raise ProtocolError("FU-A fragment without a start fragment")
        elif au.fragment[0] & NAL_TYPE_MASK != header & NAL_TYPE_MASK:
            kinds = (au.fragment[0] & NAL_TYPE_MASK, header & NAL_TYPE_MASK)
            au.fragment = None
            au.broken = DROP_MALFORMED
            raise ProtocolError(
                f"FU-A fragment of NAL type {kinds[1]} continues a NAL unit of type {kinds[0]}"
            )
        if len(au.fragment) + len(body) > self.max_nal_size:
            size = len(au.fragment) + len(body)
            au.fragment = None
            au.broken = DROP_NAL_TOO_LARGE
            raise ProtocolError(f"NAL unit of at least {size} bytes exceeds the limit of {self.max_nal_size}")
        au.fragment += body
        if header & FU_END:
            nal = bytes(au.fragment)
            au.fragment = None
            self._add_nal(au, nal)

    def _add_nal(self, au: _Assembly, nal: bytes) -> None:
        if len(nal) > self.max_nal_size:
            au.broken = DROP_NAL_TOO_LARGE
            raise ProtocolError(f"NAL unit of {len(nal)} bytes exceeds the limit of {self.max_nal_size}")
        if au.size + len(nal) > self.max_access_unit_size:
            au.broken = DROP_ACCESS_UNIT_TOO_LARGE
            raise ProtocolError(
                f"access unit of at least {au.size + len(nal)} bytes exceeds the limit of "
                f"{self.max_access_unit_size}"
            )
        au.nals.append(nal)
        au.size += len(nal)

    def _finish(self) -> None:
        au = self._au
        self._au = None
        if au is None:
            return
        if au.broken is None and au.fragment is not None:
            au.broken = DROP_INCOMPLETE
        if au.broken is not None:
            self._count_drop(au.broken)
            self._need_idr = True
            return
        if not au.nals:
            return
        keyframe = any(nal_type(n) == NAL_TYPE_IDR for n in au.nals)
        if self._need_idr and not keyframe:
            self._count_drop(DROP_AWAIT_IDR)
            return
        self._need_idr = False
        self.access_units += 1
        self._ready.append(AccessUnit(au.timestamp, au.nals, keyframe, au.capture_time, au.send_time))
