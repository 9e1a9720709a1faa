"""The handshake that opens every edge -> gateway connection.

The whole TCP connection is RFC 4571 framed. The first frames are JSON objects (UTF-8, at most
`MAX_CONTROL_SIZE` bytes each):

1. edge -> gateway `Hello` (version, device id, token, stream description, ``edge_time`` = t0);
2. gateway -> edge `Accept` (session id, t0 echoed, ``gateway_recv`` = t1, ``gateway_send`` = t2)
   or `Reject` (a code from `REJECT_CODES` and a reason), after which the gateway closes;
3. edge -> gateway `ClockSync` (NTP-style offset and round-trip time, see `clock_offset`);
4. then RTP/H.264 packets, one per frame, each access unit's first packet carrying the capture
   time extension (`flowcloud.protocol.capture_time`).

After the handshake the gateway may send `KeyframeRequest` on the same connection (in the spirit
of RTCP PLI, RFC 4585 6.3.1): it lost decodable state and asks for an IDR instead of waiting for
the next natural one. On shutdown it sends `GoAway`: reconnect now (through the same address: a
load balancer picks another replica), after ending this connection at a keyframe boundary so that
nothing is lost. A live edge whose stream description says ``delay_reports`` also gets
`DelayReport`s (in the spirit of RTCP receiver reports and transport-wide congestion control): the
one-way delay of its newest access units as the gateway measures it, so that the edge sees a queue
on the path (a router's) that its own socket does not show; a gateway that does not know the field
ignores it and sends none, and an edge that does not ask gets none. A stream description with
``backfill`` opens the device's backfill lane (spooled video, sent beside the live session);
``spooled`` on a live HELLO is how many spooled frames will follow on that lane, so the gateway can
reserve their seqs before the live ones, and ``carried`` how many of them (the oldest) an earlier
live HELLO announced and are still unsent (a reconnect in the middle of a backfill): their seqs,
reserved then, carry over.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from flowcloud import keys
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import read_frame, write_frame
from flowcloud.protocol.h264 import DEFAULT_CLOCK_RATE

PROTOCOL_VERSION = 1
MAX_CONTROL_SIZE = 4096
MAX_TOKEN_LENGTH = 256
MAX_SESSION_ID_LENGTH = 128
MAX_REASON_LENGTH = 1024
MAX_DIMENSION = 16384
MAX_FPS = 1000.0
MAX_SPOOLED = 1 << 32
MAX_REPORTED_DELAY = 86400.0  # seconds, either sign (a clock offset error can make a delay negative)
CODEC_H264 = "H264"
CLOCK_RATE = DEFAULT_CLOCK_RATE  # the only one the stream description may state

REJECT_UNKNOWN_DEVICE = "unknown_device"
REJECT_BAD_TOKEN = "bad_token"
REJECT_REVOKED = "revoked"
REJECT_BUSY = "busy"
REJECT_VERSION = "version"
REJECT_LIMIT = "limit"
REJECT_MALFORMED = "malformed"
REJECT_CERTIFICATE = "certificate"  # mutual TLS: the client certificate does not name the HELLO's device
REJECT_CODES = (
    REJECT_UNKNOWN_DEVICE,
    REJECT_BAD_TOKEN,
    REJECT_REVOKED,
    REJECT_BUSY,
    REJECT_VERSION,
    REJECT_LIMIT,
    REJECT_MALFORMED,
    REJECT_CERTIFICATE,
)


class UnsupportedVersion(ProtocolError):
    """A well-formed message of a protocol version this side does not speak (reject code "version")."""

    def __init__(self, version: object) -> None:
        super().__init__(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
        self.version = version


class HandshakeClosed(ProtocolError):
    """The gateway closed the connection before answering the HELLO."""


class HandshakeRejected(Exception):
    """The gateway refused the connection with one of `REJECT_CODES`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"gateway rejected the connection: {code}: {reason}")
        self.code = code
        self.reason = reason


def clock_offset(t0: float, t1: float, t2: float, t3: float) -> tuple[float, float]:
    """NTP-style (offset, rtt): gateway_time = edge_time + offset.

    t0 = edge send, t1 = gateway receive, t2 = gateway send, t3 = edge receive.
    """
    return ((t1 - t0) + (t2 - t3)) / 2, (t3 - t0) - (t2 - t1)


def _decode(body: bytes, expected_type: str | None = None) -> dict[str, Any]:
    if len(body) > MAX_CONTROL_SIZE:
        raise ProtocolError(f"control message of {len(body)} bytes exceeds the limit of {MAX_CONTROL_SIZE}")
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("control message is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message is not a JSON object")
    kind = obj.get("type")
    if expected_type is not None and kind != expected_type:
        raise ProtocolError(f"expected a {expected_type!r} message, got type {kind!r}")
    return obj


def _encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_CONTROL_SIZE:
        raise ValueError(f"control message of {len(body)} bytes exceeds the limit of {MAX_CONTROL_SIZE}")
    return body


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise ProtocolError(f"{where} lacks field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ProtocolError(f"{where} field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _time(obj: dict[str, Any], name: str, where: str) -> float:
    value = float(_field(obj, name, (int, float), where))
    if not math.isfinite(value):
        raise ProtocolError(f"{where} field {name!r} is not a finite number")
    return value


def _version(obj: dict[str, Any], where: str) -> int:
    version = _field(obj, "version", int, where)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(version)
    return int(version)


def validate_device_id(device_id: str) -> str:
    """``device_id`` itself if it is a valid identifier (`flowcloud.keys.IDENTIFIER`), else ProtocolError.

    The same rule as the registry's: an id it could never have registered is a malformed HELLO.
    """
    if not keys.is_identifier(device_id):
        raise ProtocolError(f"device id {device_id[:80]!r} is invalid: use {keys.IDENTIFIER_RULE}")
    return device_id


@dataclass(frozen=True)
class StreamInfo:
    width: int
    height: int
    fps: float
    codec: str = CODEC_H264
    clock_rate: int = CLOCK_RATE
    backfill: bool = False  # this connection carries spooled video (the backfill lane), not live
    spooled: int = 0  # live: spooled frames the backfill lane will send (at most)
    masks: bool = False  # this connection carries masks the edge made offline (edge_mask.EdgeMask)
    # live: of the ``spooled`` frames, how many (the oldest) an earlier live HELLO announced and are
    # still unsent: the gateway carries their reserved seqs over instead of reserving new ones.
    carried: int = 0
    delay_reports: bool = False  # live: the edge reads `DelayReport`s (the gateway sends them)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "clock_rate": self.clock_rate,
        }
        if self.backfill:
            out["backfill"] = True
        if self.spooled:
            out["spooled"] = self.spooled
        if self.masks:
            out["masks"] = True
        if self.carried:
            out["carried"] = self.carried
        if self.delay_reports:
            out["delay_reports"] = True
        return out

    @classmethod
    def from_dict(cls, obj: Any) -> StreamInfo:
        where = "hello stream"
        if not isinstance(obj, dict):
            raise ProtocolError("hello field 'stream' must be an object")
        codec = _field(obj, "codec", str, where)
        if codec != CODEC_H264:
            raise ProtocolError(f"codec {codec[:32]!r} is not supported (only {CODEC_H264})")
        width = _field(obj, "width", int, where)
        height = _field(obj, "height", int, where)
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            raise ProtocolError(f"stream size {width}x{height} is out of range [1, {MAX_DIMENSION}]")
        fps = float(_field(obj, "fps", (int, float), where))
        if not 0 < fps <= MAX_FPS:
            raise ProtocolError(f"stream fps {fps} is out of range (0, {MAX_FPS:g}]")
        clock_rate = _field(obj, "clock_rate", int, where)
        if clock_rate != CLOCK_RATE:
            raise ProtocolError(f"clock rate {clock_rate} is not supported (only {CLOCK_RATE})")
        backfill, masks = obj.get("backfill", False), obj.get("masks", False)
        delay_reports = obj.get("delay_reports", False)
        if not all(isinstance(flag, bool) for flag in (backfill, masks, delay_reports)):
            raise ProtocolError(f"{where} fields 'backfill', 'masks' and 'delay_reports' must be bool")
        spooled = _field(obj, "spooled", int, where) if "spooled" in obj else 0
        if not 0 <= spooled < MAX_SPOOLED:
            raise ProtocolError(f"stream spooled {spooled} is out of range [0, {MAX_SPOOLED})")
        carried = _field(obj, "carried", int, where) if "carried" in obj else 0
        if not 0 <= carried <= spooled:
            raise ProtocolError(f"stream carried {carried} is out of range [0, spooled {spooled}]")
        return cls(width, height, fps, codec, clock_rate, backfill, spooled, masks, carried, delay_reports)


@dataclass(frozen=True)
class Hello:
    device_id: str
    token: str = field(repr=False)
    stream: StreamInfo
    edge_time: float = 0.0
    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return _encode(
            {
                "type": "hello",
                "version": self.version,
                "device_id": self.device_id,
                "token": self.token,
                "stream": self.stream.to_dict(),
                "edge_time": self.edge_time,
            }
        )

    @classmethod
    def parse(cls, body: bytes) -> Hello:
        """Validate a HELLO; `UnsupportedVersion` for another version, `ProtocolError` otherwise."""
        obj = _decode(body, "hello")
        version = _version(obj, "hello")
        device_id = validate_device_id(_field(obj, "device_id", str, "hello"))
        token = _field(obj, "token", str, "hello")
        if not 1 <= len(token) <= MAX_TOKEN_LENGTH:
            raise ProtocolError(f"token must have 1 to {MAX_TOKEN_LENGTH} characters, got {len(token)}")
        stream = StreamInfo.from_dict(obj.get("stream"))
        return cls(device_id, token, stream, _time(obj, "edge_time", "hello"), version)


@dataclass(frozen=True)
class Accept:
    session_id: str
    edge_time: float
    gateway_recv: float
    gateway_send: float
    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return _encode(
            {
                "type": "accept",
                "version": self.version,
                "session_id": self.session_id,
                "edge_time": self.edge_time,
                "gateway_recv": self.gateway_recv,
                "gateway_send": self.gateway_send,
            }
        )

    @classmethod
    def parse(cls, body: bytes) -> Accept:
        obj = _decode(body, "accept")
        version = _version(obj, "accept")
        session_id = _field(obj, "session_id", str, "accept")
        if not 1 <= len(session_id) <= MAX_SESSION_ID_LENGTH:
            raise ProtocolError(f"session id must have 1 to {MAX_SESSION_ID_LENGTH} characters")
        return cls(
            session_id,
            _time(obj, "edge_time", "accept"),
            _time(obj, "gateway_recv", "accept"),
            _time(obj, "gateway_send", "accept"),
            version,
        )


@dataclass(frozen=True)
class Reject:
    code: str
    reason: str

    def to_bytes(self) -> bytes:
        return _encode({"type": "reject", "code": self.code, "reason": self.reason[:MAX_REASON_LENGTH]})

    @classmethod
    def parse(cls, body: bytes) -> Reject:
        obj = _decode(body, "reject")
        code = _field(obj, "code", str, "reject")
        if code not in REJECT_CODES:
            raise ProtocolError(f"unknown reject code {code[:32]!r}")
        reason = _field(obj, "reason", str, "reject")
        return cls(code, reason[:MAX_REASON_LENGTH])


@dataclass(frozen=True)
class ClockSync:
    offset: float
    rtt: float

    def to_bytes(self) -> bytes:
        return _encode({"type": "clock", "offset": self.offset, "rtt": self.rtt})

    @classmethod
    def parse(cls, body: bytes) -> ClockSync:
        obj = _decode(body, "clock")
        rtt = _time(obj, "rtt", "clock")
        if rtt < 0:
            raise ProtocolError(f"clock rtt {rtt} is negative")
        return cls(_time(obj, "offset", "clock"), rtt)


@dataclass(frozen=True)
class KeyframeRequest:
    """Gateway -> edge: send an IDR now (``reason``: why decodable state was lost)."""

    reason: str

    def to_bytes(self) -> bytes:
        return _encode({"type": "keyframe", "reason": self.reason[:MAX_REASON_LENGTH]})

    @classmethod
    def parse(cls, body: bytes) -> KeyframeRequest:
        obj = _decode(body, "keyframe")
        return cls(_field(obj, "reason", str, "keyframe")[:MAX_REASON_LENGTH])


@dataclass(frozen=True)
class GoAway:
    """Gateway -> edge: this gateway is stopping; end the stream at an access unit boundary (best
    before an IDR), half-close, and once the gateway has closed, reconnect at once (``reason``)."""

    reason: str

    def to_bytes(self) -> bytes:
        return _encode({"type": "goaway", "reason": self.reason[:MAX_REASON_LENGTH]})

    @classmethod
    def parse(cls, body: bytes) -> GoAway:
        obj = _decode(body, "goaway")
        return cls(_field(obj, "reason", str, "goaway")[:MAX_REASON_LENGTH])


@dataclass(frozen=True)
class DelayReport:
    """Gateway -> edge (only to an edge whose HELLO asked, ``delay_reports``): the one-way delay,
    in seconds, of the newest live access unit received: its receipt minus the edge's send time
    (the capture time extension's), mapped by the handshake's clock offset. An offset error shifts
    every report alike; the edge reads changes of it."""

    delay: float

    def to_bytes(self) -> bytes:
        return _encode({"type": "delay", "delay": round(self.delay, 6)})

    @classmethod
    def parse(cls, body: bytes) -> DelayReport:
        delay = _time(_decode(body, "delay"), "delay", "delay")
        if abs(delay) > MAX_REPORTED_DELAY:
            limit = MAX_REPORTED_DELAY
            raise ProtocolError(f"reported delay {delay:g} s is out of range [-{limit:g}, {limit:g}]")
        return cls(delay)


ControlMessage = Hello | Accept | Reject | ClockSync | KeyframeRequest | GoAway | DelayReport
_BY_TYPE: dict[str, Any] = {
    "hello": Hello,
    "accept": Accept,
    "reject": Reject,
    "clock": ClockSync,
    "keyframe": KeyframeRequest,
    "goaway": GoAway,
    "delay": DelayReport,
}


def parse_control(body: bytes) -> ControlMessage:
    """Any control message, by its ``type`` field."""
    kind = _decode(body).get("type")
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise ProtocolError(f"unknown control message type {str(kind)[:32]!r}")
    message: ControlMessage = _BY_TYPE[kind].parse(body)
    return message


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: Hello, timeout: float
) -> tuple[Accept, ClockSync]:
    """The edge's side: send HELLO (stamped now), await ACCEPT, send CLOCK.

    Raises `HandshakeRejected` on a REJECT and `ProtocolError` on anything else that goes wrong,
    including a timeout and a connection closed early.
    """
    try:
        async with asyncio.timeout(timeout):
            hello = replace(hello, edge_time=time.time())
            await write_frame(writer, hello.to_bytes())
            body = await read_frame(reader, MAX_CONTROL_SIZE)
            t3 = time.time()
            answer = parse_control(body)
            if isinstance(answer, Reject):
                raise HandshakeRejected(answer.code, answer.reason)
            if not isinstance(answer, Accept):
                raise ProtocolError(f"expected 'accept' or 'reject', got {type(answer).__name__}")
            if answer.edge_time != hello.edge_time:
                raise ProtocolError(f"accept echoes edge_time {answer.edge_time!r}, sent {hello.edge_time!r}")
            offset, rtt = clock_offset(hello.edge_time, answer.gateway_recv, answer.gateway_send, t3)
            clock = ClockSync(offset, max(rtt, 0.0))
            await write_frame(writer, clock.to_bytes())
            return answer, clock
    except TimeoutError:
        raise ProtocolError(f"handshake not completed within {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        raise HandshakeClosed("gateway closed the connection during the handshake") from None
