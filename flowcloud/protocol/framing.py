"""RFC 4571 framing: each packet on the TCP stream is preceded by its 2-byte big-endian length.

This is the framing GStreamer's ``rtpstreampay`` writes and ``rtpstreamdepay`` reads. The
incremental `Rfc4571Decoder` buffers at most one frame (header included), whatever it is fed.
"""

from __future__ import annotations

import asyncio

from flowcloud.protocol.errors import ProtocolError

LENGTH_SIZE = 2
MAX_FRAME_SIZE = 0xFFFF
# A recorded session (the gateway's --record, replayed by the edge): the framed bytes in one file,
# and the session's description (JSON; its "stream" is the HELLO's stream description) beside it.
RECORDING_SUFFIX = ".rfc4571"
DESCRIPTION_SUFFIX = ".json"


def frame(packet: bytes) -> bytes:
    """``packet`` with its RFC 4571 length prefix."""
    if len(packet) > MAX_FRAME_SIZE:
        raise ProtocolError(
            f"packet of {len(packet)} bytes does not fit an RFC 4571 frame (max {MAX_FRAME_SIZE})"
        )
    return len(packet).to_bytes(LENGTH_SIZE, "big") + bytes(packet)


class Rfc4571Decoder:
    """Incremental RFC 4571 reframer: bytes in any chunking -> whole frame bodies.

    A length above ``max_frame_size`` raises `ProtocolError`; the stream is then out of sync, so
    every later `feed` raises the same error.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size {max_frame_size} is out of range [1, {MAX_FRAME_SIZE}]")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by ``data``. A bad length raises `ProtocolError`, at once when no
        frame came before it in ``data``, else on the next call (the good frames are returned)."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            self._buffer += data
            buf = bytes(self._buffer)
        else:
            buf = bytes(data)
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while n - pos >= LENGTH_SIZE:
            size = (buf[pos] << 8) | buf[pos + 1]
            if size > self.max_frame_size:
                self._error = ProtocolError(
                    f"RFC 4571 frame of {size} bytes exceeds the limit of {self.max_frame_size} bytes"
                )
                self._buffer = bytearray()
                if out:
                    return out
                raise self._error
            end = pos + LENGTH_SIZE + size
            if end > n:
                break
            out.append(buf[pos + LENGTH_SIZE : end])
            pos = end
        self._buffer = bytearray(buf[pos:])
        return out


async def read_frame(reader: asyncio.StreamReader, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """Read one RFC 4571 frame body of at most ``max_size`` bytes.

    Raises `ProtocolError` when the length exceeds ``max_size`` (before reading the body) and
    `asyncio.IncompleteReadError` when the stream ends first (``partial == b""`` at a frame boundary).
    """
    header = await reader.readexactly(LENGTH_SIZE)
    size = int.from_bytes(header, "big")
    if size > max_size:
        raise ProtocolError(f"RFC 4571 frame of {size} bytes exceeds the limit of {max_size} bytes")
    return await reader.readexactly(size)


def send_frame(writer: asyncio.StreamWriter, body: bytes) -> bool:
    """Queue one small framed message without waiting for the buffer to drain; False when the
    connection is closing or lost (never raises for that)."""
    if writer.is_closing():
        return False
    try:
        writer.write(frame(body))
    except (OSError, RuntimeError, AttributeError):
        # AttributeError: asyncio's TLS transport, once its connection is lost, fails a write with
        # "'NoneType' object has no attribute '_write_appdata'" (CPython 3.11).
        return False
    return True


async def write_frame(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Write one framed packet and wait until the transport's buffer drains."""
    writer.write(frame(body))
    await writer.drain()
