"""The capture-time RTP header extension (RFC 8285 element carrying the edge capture time).

The element's body is a big-endian uint64 of unix microseconds on the edge clock. Every access
unit's first packet carries it; the gateway maps it to its own clock with the offset measured in
the handshake.
"""

from __future__ import annotations

import struct

from flowcloud.protocol.errors import ProtocolError

CAPTURE_TIME_EXT_ID = 1
CAPTURE_TIME_SIZE = 8
_MAX_MICROS = 2**64 - 1


def encode_capture_time(unix_seconds: float) -> bytes:
    """Unix seconds as the extension's 8-byte body."""
    micros = round(unix_seconds * 1_000_000)
    if not 0 <= micros <= _MAX_MICROS:
        raise ValueError(f"capture time {unix_seconds!r} is out of range")
    return struct.pack("!Q", micros)


def decode_capture_time(body: bytes) -> float:
    """The extension's body as unix seconds."""
    if len(body) != CAPTURE_TIME_SIZE:
        raise ProtocolError(f"capture-time extension has {len(body)} bytes, expected {CAPTURE_TIME_SIZE}")
    return int(struct.unpack("!Q", body)[0]) / 1_000_000


def capture_time_extension(unix_seconds: float) -> dict[int, bytes]:
    """The ``extensions`` mapping of an RTP packet carrying this capture time."""
    return {CAPTURE_TIME_EXT_ID: encode_capture_time(unix_seconds)}
