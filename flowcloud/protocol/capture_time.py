"""The edge's time RTP header extensions (RFC 8285 elements): capture time and send time.

Each element's body is a big-endian uint64 of unix microseconds on the edge clock. Every access
unit's first packet carries the capture time (id 1) and, from edges that stamp it, the time the
edge handed the access unit to its socket (id 2, for the per-stage times of `flowcloud.stages`).
Both fit the one-byte form, so the two together add 20 bytes to the packet. A receiver that knows
only id 1 skips id 2 (RFC 8285), and a packet without id 2 simply has no send time, so edges and
gateways of either age work together. The gateway maps both to its own clock with the offset
measured in the handshake.
"""

from __future__ import annotations

import struct

from flowcloud.protocol.errors import ProtocolError

# Every RFC 8285 element id the project uses, here so that none is used twice.
CAPTURE_TIME_EXT_ID = 1
SEND_TIME_EXT_ID = 2
SPOOL_CHECKSUM_EXT_ID = 3  # the edge spool's CRC-32 on an access unit's last packet (edge/spool.py)
CAPTURE_TIME_SIZE = 8  # the size of either element's body
_MAX_MICROS = 2**64 - 1


def encode_capture_time(unix_seconds: float) -> bytes:
    """Unix seconds as the 8-byte body of either element."""
    micros = round(unix_seconds * 1_000_000)
    if not 0 <= micros <= _MAX_MICROS:
        raise ValueError(f"capture time {unix_seconds!r} is out of range")
    return struct.pack("!Q", micros)


def decode_capture_time(body: bytes, what: str = "capture-time") -> float:
    """An element's body as unix seconds."""
    if len(body) != CAPTURE_TIME_SIZE:
        raise ProtocolError(f"{what} extension has {len(body)} bytes, expected {CAPTURE_TIME_SIZE}")
    return int(struct.unpack("!Q", body)[0]) / 1_000_000


def capture_time_extension(unix_seconds: float, sent: float | None = None) -> dict[int, bytes]:
    """The ``extensions`` mapping of an RTP packet carrying this capture time (and send time)."""
    out = {CAPTURE_TIME_EXT_ID: encode_capture_time(unix_seconds)}
    if sent is not None:
        out[SEND_TIME_EXT_ID] = encode_capture_time(sent)
    return out
