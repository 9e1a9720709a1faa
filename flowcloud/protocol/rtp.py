"""RTP packets (RFC 3550) with RFC 8285 header extensions, and 16-bit sequence arithmetic.

`RtpPacket.parse(data)` checks every length against the bytes it has and raises `ProtocolError`
with a precise message; `bytes(packet)` writes the packet back. Header extensions travel as
``extensions: dict[int, bytes]``: written in the one-byte form (RFC 8285 section 4.2) when every
id is 1..14 and every body 1..16 bytes long, else in the two-byte form (section 4.3). A header
extension with another profile is skipped on parse, as RFC 3550 allows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from flowcloud.protocol.errors import ProtocolError

RTP_VERSION = 2
RTP_HEADER_SIZE = 12
MAX_CSRC_COUNT = 15
SEQ_MODULO = 1 << 16
TIMESTAMP_MODULO = 1 << 32

EXTENSION_PROFILE_ONE_BYTE = 0xBEDE
EXTENSION_PROFILE_TWO_BYTE = 0x1000  # the low 4 bits ("appbits") may be anything
EXTENSION_PROFILE_TWO_BYTE_MASK = 0xFFF0
ONE_BYTE_ID_RESERVED = 15  # RFC 8285: stop parsing the extension block
ONE_BYTE_MAX_ID = 14
ONE_BYTE_MAX_LENGTH = 16
TWO_BYTE_MAX_ID = 255
TWO_BYTE_MAX_LENGTH = 255


def seq_add(seq: int, delta: int) -> int:
    """``seq + delta`` modulo 2**16."""
    return (seq + delta) % SEQ_MODULO


def seq_diff(a: int, b: int) -> int:
    """The signed distance from ``b`` to ``a`` in 16-bit sequence space, in [-32768, 32767]."""
    d = (a - b) % SEQ_MODULO
    return d - SEQ_MODULO if d >= SEQ_MODULO // 2 else d


def timestamp_diff(a: int, b: int) -> int:
    """The signed distance from ``b`` to ``a`` in 32-bit RTP timestamp space."""
    d = (a - b) % TIMESTAMP_MODULO
    return d - TIMESTAMP_MODULO if d >= TIMESTAMP_MODULO // 2 else d


def seq_newer(a: int, b: int) -> bool:
    """True when sequence number ``a`` comes after ``b`` (RFC 1982 style comparison)."""
    return seq_diff(a, b) > 0


@dataclass(slots=True)
class RtpPacket:
    payload_type: int = 96
    sequence_number: int = 0
    timestamp: int = 0
    ssrc: int = 0
    marker: bool = False
    csrc: list[int] = field(default_factory=list)
    extensions: dict[int, bytes] = field(default_factory=dict)
    payload: bytes = b""
    padding_size: int = 0  # padding bytes at the end (the count byte included); 0 = no padding

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) < RTP_HEADER_SIZE:
            raise ProtocolError(
                f"RTP packet too short: {len(data)} bytes, the header needs {RTP_HEADER_SIZE}"
            )
        b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
        version = b0 >> 6
        if version != RTP_VERSION:
            raise ProtocolError(f"RTP version {version}, expected {RTP_VERSION}")
        has_padding = bool(b0 & 0x20)
        has_extension = bool(b0 & 0x10)
        cc = b0 & 0x0F
        pos = RTP_HEADER_SIZE
        if len(data) < pos + 4 * cc:
            raise ProtocolError(f"RTP packet too short for {cc} CSRCs: {len(data)} bytes")
        csrc = list(struct.unpack_from(f"!{cc}I", data, pos)) if cc else []
        pos += 4 * cc
        extensions: dict[int, bytes] = {}
        if has_extension:
            if len(data) < pos + 4:
                raise ProtocolError(f"RTP packet too short for its header extension: {len(data)} bytes")
            profile, words = struct.unpack_from("!HH", data, pos)
            pos += 4
            end = pos + 4 * words
            if end > len(data):
                raise ProtocolError(
                    f"RTP header extension of {4 * words} bytes overruns the packet ({len(data) - pos} left)"
                )
            block = data[pos:end]
            if profile == EXTENSION_PROFILE_ONE_BYTE:
                extensions = _parse_elements(block, two_byte=False)
            elif profile & EXTENSION_PROFILE_TWO_BYTE_MASK == EXTENSION_PROFILE_TWO_BYTE:
                extensions = _parse_elements(block, two_byte=True)
            pos = end
        end = len(data)
        padding_size = 0
        if has_padding:
            if end <= pos:
                raise ProtocolError("RTP padding bit set but the packet has no payload bytes")
            padding_size = data[-1]
            if padding_size == 0:
                raise ProtocolError("RTP padding count is zero")
            if padding_size > end - pos:
                raise ProtocolError(
                    f"RTP padding of {padding_size} bytes exceeds the {end - pos} payload bytes"
                )
            end -= padding_size
        return cls(
            payload_type=b1 & 0x7F,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            marker=bool(b1 & 0x80),
            csrc=csrc,
            extensions=extensions,
            payload=data[pos:end],
            padding_size=padding_size,
        )

    def _extension_block(self) -> bytes:
        if not self.extensions:
            return b""
        one_byte = all(
            1 <= i <= ONE_BYTE_MAX_ID and 1 <= len(v) <= ONE_BYTE_MAX_LENGTH
            for i, v in self.extensions.items()
        )
        body = bytearray()
        if one_byte:
            profile = EXTENSION_PROFILE_ONE_BYTE
            for ext_id, value in sorted(self.extensions.items()):
                body.append((ext_id << 4) | (len(value) - 1))
                body += value
        else:
            profile = EXTENSION_PROFILE_TWO_BYTE
            for ext_id, value in sorted(self.extensions.items()):
                if not 1 <= ext_id <= TWO_BYTE_MAX_ID or len(value) > TWO_BYTE_MAX_LENGTH:
                    raise ValueError(f"header extension {ext_id} with {len(value)} bytes cannot be encoded")
                body += bytes((ext_id, len(value))) + value
        body += b"\x00" * (-len(body) % 4)
        return struct.pack("!HH", profile, len(body) // 4) + bytes(body)

    @property
    def header_size(self) -> int:
        """Bytes before the payload: fixed header, CSRCs and the header extension."""
        return RTP_HEADER_SIZE + 4 * len(self.csrc) + len(self._extension_block())

    def __bytes__(self) -> bytes:
        if len(self.csrc) > MAX_CSRC_COUNT:
            raise ValueError(f"{len(self.csrc)} CSRCs, at most {MAX_CSRC_COUNT}")
        if not 0 <= self.padding_size <= 255:
            raise ValueError(f"padding of {self.padding_size} bytes, at most 255")
        ext = self._extension_block()
        b0 = (RTP_VERSION << 6) | (0x20 if self.padding_size else 0) | (0x10 if ext else 0) | len(self.csrc)
        b1 = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        out = bytearray(struct.pack("!BBHII", b0, b1, self.sequence_number, self.timestamp, self.ssrc))
        for c in self.csrc:
            out += struct.pack("!I", c)
        out += ext
        out += self.payload
        if self.padding_size:
            out += b"\x00" * (self.padding_size - 1) + bytes((self.padding_size,))
        return bytes(out)


def _parse_elements(block: bytes, two_byte: bool) -> dict[int, bytes]:
    """The elements of an RFC 8285 one-byte or two-byte header extension block, by id."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(block):
        if block[pos] == 0:  # padding between elements
            pos += 1
            continue
        if two_byte:
            ext_id = block[pos]
            if pos + 2 > len(block):
                raise ProtocolError(f"header extension element {ext_id} lacks its length byte")
            length = block[pos + 1]
            pos += 2
        else:
            ext_id, length = block[pos] >> 4, (block[pos] & 0x0F) + 1
            if ext_id == ONE_BYTE_ID_RESERVED:
                break
            pos += 1
        if pos + length > len(block):
            raise ProtocolError(
                f"header extension element {ext_id} of {length} bytes overruns the block "
                f"({len(block) - pos} left)"
            )
        out[ext_id] = block[pos : pos + length]
        pos += length
    return out
