"""RTP packets (RFC 3550) and header extensions (RFC 8285): parse, write, and exact errors."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from flowcloud.protocol.capture_time import (
    CAPTURE_TIME_EXT_ID,
    capture_time_extension,
    decode_capture_time,
    encode_capture_time,
)
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.rtp import RtpPacket, seq_add, seq_diff, seq_newer

DATA = Path(__file__).parent.parent / "data"


def gst_packets(name: str) -> list[bytes]:
    return Rfc4571Decoder().feed((DATA / name).read_bytes())


def test_gstreamer_packets_parse_and_write_back_bit_exact() -> None:
    raw = gst_packets("gst_smpte_mtu300.bin")
    assert len(raw) == 95
    packets = [RtpPacket.parse(b) for b in raw]
    assert [bytes(p) for p in packets] == raw
    assert {p.payload_type for p in packets} == {96}
    assert len({p.ssrc for p in packets}) == 1
    assert all(seq_diff(b.sequence_number, a.sequence_number) == 1 for a, b in itertools.pairwise(packets))
    assert sum(p.marker for p in packets) == 20  # one marker per access unit
    assert all(len(b) <= 300 for b in raw)


def test_round_trip_with_csrc_padding_and_one_byte_extensions() -> None:
    packet = RtpPacket(
        payload_type=96,
        sequence_number=65535,
        timestamp=0xFFFFFFFF,
        ssrc=0xDEADBEEF,
        marker=True,
        csrc=[1, 2, 3],
        extensions={1: b"\x01" * 8, 14: b"x"},
        payload=b"\x65payload",
        padding_size=3,
    )
    data = bytes(packet)
    assert data[0] == 0x80 | 0x20 | 0x10 | 3
    assert data[1] == 0x80 | 96
    ext_start = 12 + 12
    assert struct.unpack_from("!HH", data, ext_start) == (0xBEDE, 3)  # 9 + 2 bytes -> 3 words
    assert data[-3:] == b"\x00\x00\x03"
    assert RtpPacket.parse(data) == packet
    assert packet.header_size == 12 + 12 + 4 + 12


def test_two_byte_extensions_when_an_element_does_not_fit_one_byte_form() -> None:
    packet = RtpPacket(extensions={1: b"", 200: b"y" * 40}, payload=b"\x41")
    data = bytes(packet)
    assert struct.unpack_from("!H", data, 12)[0] == 0x1000
    assert RtpPacket.parse(data).extensions == {1: b"", 200: b"y" * 40}


def test_one_byte_extension_padding_and_reserved_id_15_stop_parsing() -> None:
    block = bytes([0x10, 0xAA, 0x00, 0x00, 0x21, 0xBB, 0xCC, 0xF0, 0x31, 0x01, 0x02, 0x00])
    data = struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + struct.pack("!HH", 0xBEDE, 3) + block + b"\x41"
    packet = RtpPacket.parse(data)
    assert packet.extensions == {1: b"\xaa", 2: b"\xbb\xcc"}
    assert packet.payload == b"\x41"


def test_an_extension_with_another_profile_is_skipped() -> None:
    data = struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + struct.pack("!HH", 0x1234, 1) + b"abcd" + b"\x41"
    packet = RtpPacket.parse(data)
    assert packet.extensions == {}
    assert packet.payload == b"\x41"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x60\x00", "RTP packet too short: 3 bytes, the header needs 12"),
        (struct.pack("!BBHII", 0x40, 96, 1, 2, 3), "RTP version 1, expected 2"),
        (
            struct.pack("!BBHII", 0x82, 96, 1, 2, 3) + b"\x00" * 4,
            "RTP packet too short for 2 CSRCs: 16 bytes",
        ),
        (
            struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + b"\xbe",
            "RTP packet too short for its header extension: 13 bytes",
        ),
        (
            struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + struct.pack("!HH", 0xBEDE, 2) + b"\x00" * 4,
            "RTP header extension of 8 bytes overruns the packet (4 left)",
        ),
        (
            struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + struct.pack("!HH", 0xBEDE, 1) + b"\x17\x00\x00\x00",
            "header extension element 1 of 8 bytes overruns the block (3 left)",
        ),
        (
            struct.pack("!BBHII", 0x90, 96, 1, 2, 3) + struct.pack("!HH", 0x1000, 1) + b"\x00\x00\x00\x05",
            "header extension element 5 lacks its length byte",
        ),
        (struct.pack("!BBHII", 0xA0, 96, 1, 2, 3), "RTP padding bit set but the packet has no payload bytes"),
        (struct.pack("!BBHII", 0xA0, 96, 1, 2, 3) + b"\x41\x00", "RTP padding count is zero"),
        (
            struct.pack("!BBHII", 0xA0, 96, 1, 2, 3) + b"\x41\x05",
            "RTP padding of 5 bytes exceeds the 2 payload bytes",
        ),
    ],
)
def test_malformed_packets_raise_exact_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        RtpPacket.parse(data)
    assert str(info.value) == message


def test_a_truncated_gstreamer_packet_is_rejected() -> None:
    raw = gst_packets("gst_smpte_mtu300.bin")[0]
    with pytest.raises(ProtocolError, match="^RTP packet too short: 9 bytes, the header needs 12$"):
        RtpPacket.parse(raw[:9])


def test_sequence_arithmetic_wraps() -> None:
    assert seq_add(65535, 1) == 0
    assert seq_add(10, -11) == 65535
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(100, 100) == 0
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert seq_newer(2, 65530)
    assert not seq_newer(65530, 2)


def test_capture_time_extension_round_trip_and_errors() -> None:
    t = 1_764_000_000.123456
    body = encode_capture_time(t)
    assert len(body) == 8
    assert body == struct.pack("!Q", 1_764_000_000_123_456)
    assert decode_capture_time(body) == pytest.approx(t, abs=1e-6)
    ext = capture_time_extension(t)
    packet = RtpPacket.parse(bytes(RtpPacket(extensions=ext, payload=b"\x41")))
    assert decode_capture_time(packet.extensions[CAPTURE_TIME_EXT_ID]) == pytest.approx(t, abs=1e-6)
    with pytest.raises(ProtocolError, match="^capture-time extension has 3 bytes, expected 8$"):
        decode_capture_time(b"abc")
    with pytest.raises(ValueError, match="out of range"):
        encode_capture_time(-1.0)
