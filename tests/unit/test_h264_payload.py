"""RFC 6184 packetization-mode 1: bit-exact round trips of real libx264 streams, GStreamer
captures, malformed payloads with exact errors, and loss recovery at the next IDR."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from flowcloud.protocol.capture_time import (
    CAPTURE_TIME_EXT_ID,
    SEND_TIME_EXT_ID,
    capture_time_extension,
    decode_capture_time,
)
from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.h264 import (
    NAL_TYPE_AUD,
    NAL_TYPE_FU_A,
    NAL_TYPE_IDR,
    NAL_TYPE_SLICE,
    NAL_TYPE_STAP_A,
    AccessUnit,
    Depacketizer,
    Packetizer,
    nal_type,
    split_annexb,
)
from flowcloud.protocol.rtp import RtpPacket, seq_diff
from flowcloud.x264 import encode_access_units, libx264_encoder

DATA = Path(__file__).parent.parent / "data"
T0 = 1_764_000_000.0


def libx264_access_units(
    frames: int = 24, width: int = 320, height: int = 240, gop: int = 8
) -> list[list[bytes]]:
    """NAL units per access unit of a real libx264 stream (zerolatency: SPS/PPS/SEI with each IDR)."""
    codec = libx264_encoder(width, height, 30, keyframe_interval=gop, threads=1)  # one slice per picture
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)

    def picture(i: int) -> np.ndarray:
        # Static noise below, a small moving block above: large IDRs (FU-A), small P slices.
        img = noise.copy()
        img[: height // 2] = 128
        img[16:32, 4 * i : 4 * i + 16] = 250
        return img

    return encode_access_units(codec, (picture(i) for i in range(frames)))


@pytest.fixture(scope="module")
def x264_aus() -> list[list[bytes]]:
    return libx264_access_units()


def depacketize_all(packets: list[RtpPacket], depacketizer: Depacketizer | None = None) -> list[AccessUnit]:
    d = depacketizer or Depacketizer()
    aus: list[AccessUnit] = []
    for p in packets:
        aus += d.push(RtpPacket.parse(bytes(p)))
    return aus + d.flush()


def packetize_all(aus: list[list[bytes]], packetizer: Packetizer) -> list[list[RtpPacket]]:
    return [
        packetizer.packetize(nals, 3000 * i, capture_time_extension(T0 + i / 30))
        for i, nals in enumerate(aus)
    ]


def decoded_frame_count(aus: list[bytes]) -> int:
    codec = av.CodecContext.create("h264", "r")
    count = 0
    for data in aus:
        for packet in codec.parse(data):
            count += len(codec.decode(packet))
    for packet in codec.parse(b""):
        count += len(codec.decode(packet))
    return count + len(codec.decode(None))


def test_split_annexb() -> None:
    assert split_annexb(b"") == []
    assert split_annexb(b"\x67abc") == []  # no start code, no NAL units
    assert split_annexb(b"\x00\x00\x00\x01\x67ab\x00\x00\x01\x68c\x00\x00\x00\x00\x01\x65d") == [
        b"\x67ab",
        b"\x68c",
        b"\x65d",
    ]
    assert split_annexb(b"\x00\x00\x01\x09\xf0\x00\x00") == [b"\x09\xf0"]


@pytest.mark.parametrize("mtu", [200, 600, 1200])
def test_packetize_depacketize_is_bit_exact_for_libx264(x264_aus: list[list[bytes]], mtu: int) -> None:
    packetizer = Packetizer(mtu=mtu, ssrc=0x1234, first_sequence_number=65530)
    per_au = packetize_all(x264_aus, packetizer)
    packets = [p for group in per_au for p in group]
    kinds = Counter(nal_type(p.payload) for p in packets)
    assert kinds[NAL_TYPE_STAP_A] > 0 and kinds[NAL_TYPE_FU_A] > 0
    assert kinds[NAL_TYPE_SLICE] + kinds[NAL_TYPE_IDR] > 0  # single NAL unit packets
    assert all(len(bytes(p)) <= mtu for p in packets)
    assert [p.marker for p in packets] == [i == len(g) - 1 for g in per_au for i in range(len(g))]
    assert all(seq_diff(b.sequence_number, a.sequence_number) == 1 for a, b in itertools.pairwise(packets))
    assert packets[0].sequence_number == 65530 and any(p.sequence_number == 0 for p in packets)

    aus = depacketize_all(packets)
    assert [au.nals for au in aus] == x264_aus
    assert [au.timestamp for au in aus] == [3000 * i for i in range(len(x264_aus))]
    assert [au.capture_time for au in aus] == [pytest.approx(T0 + i / 30, abs=1e-6) for i in range(len(aus))]
    assert [au.keyframe for au in aus] == [
        any(nal_type(n) == NAL_TYPE_IDR for n in nals) for nals in x264_aus
    ]
    assert sum(au.keyframe for au in aus) == 3
    assert decoded_frame_count([au.to_annexb() for au in aus]) == 24


def test_extensions_ride_on_the_first_packet_only(x264_aus: list[list[bytes]]) -> None:
    packets = Packetizer(mtu=300).packetize(x264_aus[0], 0, capture_time_extension(T0))
    assert len(packets) > 3
    assert packets[0].extensions and not any(p.extensions for p in packets[1:])
    assert all(len(bytes(p)) <= 300 for p in packets)


def test_packetizer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"^MTU 40 is out of range \[64, 65535\]$"):
        Packetizer(mtu=40)
    with pytest.raises(ValueError, match=r"^payload type 200 is out of range \[0, 127\]$"):
        Packetizer(payload_type=200)
    assert Packetizer().packetize([], 0) == []


def test_rtp_timestamps_start_at_a_random_base_and_wrap() -> None:
    starts = {Packetizer().timestamp_of(0.0) for _ in range(8)}
    assert len(starts) > 1  # RFC 3550 5.1: random initial values (8 equal 32-bit draws: 2**-224)
    packetizer = Packetizer(first_timestamp=2**32 - 45_000)
    assert packetizer.timestamp_of(0.0) == 2**32 - 45_000
    assert packetizer.timestamp_of(1 / 30) == 2**32 - 42_000
    assert packetizer.timestamp_of(1.0) == 45_000  # wrapped modulo 2**32
    [packet] = packetizer.packetize([IDR], packetizer.timestamp_of(1.0))
    assert packet.timestamp == 45_000


def gst_access_units_fed() -> list[list[bytes]]:
    """The Annex B stream GStreamer's payloader was fed, cut into access units at each AUD."""
    aus: list[list[bytes]] = []
    for nal in split_annexb((DATA / "gst_160x120.h264").read_bytes()):
        if nal_type(nal) == NAL_TYPE_AUD or not aus:
            aus.append([])
        aus[-1].append(nal)
    return aus


def test_gstreamer_rtph264pay_output_depacketizes_into_the_access_units_it_was_fed() -> None:
    frames = Rfc4571Decoder().feed((DATA / "gst_160x120_mtu600.bin").read_bytes())
    packets = [RtpPacket.parse(f) for f in frames]
    kinds = Counter(nal_type(p.payload) for p in packets)
    assert kinds == {NAL_TYPE_STAP_A: 31, NAL_TYPE_FU_A: 2, NAL_TYPE_IDR: 2}
    depacketizer = Depacketizer()
    aus = depacketize_all(packets, depacketizer)
    assert [au.nals for au in aus] == gst_access_units_fed()
    assert len(aus) == 30 and sum(au.keyframe for au in aus) == 3
    assert all(au.capture_time is None for au in aus)
    assert depacketizer.dropped == Counter() and depacketizer.lost_packets == 0
    assert decoded_frame_count([au.to_annexb() for au in aus]) == 30


def test_gstreamer_single_nal_and_fu_a_capture_decodes_frame_for_frame() -> None:
    frames = Rfc4571Decoder().feed((DATA / "gst_smpte_mtu300.bin").read_bytes())
    aus = depacketize_all([RtpPacket.parse(f) for f in frames])
    assert len(aus) == 20
    assert decoded_frame_count([au.to_annexb() for au in aus]) == 20


def test_truncated_capture_delivers_the_complete_access_units_only() -> None:
    decoder = Rfc4571Decoder()
    frames = decoder.feed((DATA / "gst_160x120_mtu600_truncated.bin").read_bytes())
    depacketizer = Depacketizer()
    aus = depacketize_all([RtpPacket.parse(f) for f in frames], depacketizer)
    fed = gst_access_units_fed()
    assert 0 < len(aus) < 30
    assert [au.nals for au in aus] == fed[: len(aus)]


# --- malformed payloads and loss ---------------------------------------------------------------


class Stream:
    """Hand-built packets with consecutive sequence numbers.

    Every push also checks that ``on_drop`` reported each drop as it happened."""

    def __init__(self) -> None:
        self.seq = 100
        self.reported: Counter[str] = Counter()
        self.depacketizer = Depacketizer(
            max_nal_size=5000,
            max_access_unit_size=8000,
            on_drop=lambda reason: self.reported.update([reason]),
        )

    def push(self, payload: bytes, ts: int, marker: bool = True, skip: int = 0) -> list[AccessUnit]:
        self.seq += 1 + skip
        packet = RtpPacket(
            sequence_number=self.seq % 65536, timestamp=ts, ssrc=7, marker=marker, payload=payload
        )
        units = self.depacketizer.push(packet)
        assert self.reported == self.depacketizer.dropped
        return units

    def error(self, payload: bytes, ts: int, marker: bool = True) -> str:
        with pytest.raises(ProtocolError) as info:
            self.push(payload, ts, marker)
        assert self.reported == self.depacketizer.dropped
        return str(info.value)


IDR = b"\x65" + b"\x88" * 40
P_SLICE = b"\x41" + b"\x9a" * 20
SPS = b"\x67\x42\x00\x1e"
PPS = b"\x68\xce\x38\x80"


def stap_a(*nals: bytes) -> bytes:
    return b"\x78" + b"".join(len(n).to_bytes(2, "big") + n for n in nals)


def test_access_units_before_the_first_idr_are_dropped_and_counted() -> None:
    s = Stream()
    assert s.push(P_SLICE, 0) == []
    [au] = s.push(stap_a(SPS, PPS), 3000, marker=False) + s.push(IDR, 3000)
    assert au.nals == [SPS, PPS, IDR] and au.keyframe
    assert s.depacketizer.dropped == {"await_idr": 1}
    [au] = s.push(P_SLICE, 6000)
    assert not au.keyframe


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty RTP payload"),
        (b"\x7c\x05" + IDR[1:], "FU-A packet of 2 bytes is too short" if False else None),
        (b"\x7c\x05\x88", "FU-A fragment without a start fragment"),
        (stap_a(SPS) + b"\x01\x00\x67", "STAP-A NAL unit length 256 exceeds the 1 bytes left in the packet"),
        (b"\x78\x00\x00", "STAP-A contains a zero-length NAL unit"),
        (b"\x78\x00\x04" + SPS + b"\x00", "STAP-A has 1 trailing byte(s), too few for a NAL unit size"),
        (b"\x78", "STAP-A contains no NAL units"),
        (stap_a(b"\x7c\x85"), "STAP-A contains NAL unit type 28, which cannot be aggregated"),
        (b"\x79\x00\x01", "NAL unit type 25 (STAP-B) is not allowed in packetization-mode 1"),
        (b"\x7d\x85\x00", "NAL unit type 29 (FU-B) is not allowed in packetization-mode 1"),
        (b"\x1f\x00", "unsupported NAL unit type 31"),
        (b"\xe5\x00", "NAL unit header has the forbidden_zero_bit set"),
        (b"\x7c\xc5\x00", "FU-A fragment has both the start and the end bit set"),
        (b"\x7c\x98\x00", "FU-A carries NAL unit type 24, which cannot be fragmented"),
        (b"\x7c\x85", "FU-A packet of 2 bytes is too short"),
    ],
)
def test_malformed_payloads_raise_exact_errors_and_count_a_drop(payload: bytes, message: str | None) -> None:
    s = Stream()
    s.push(IDR, 0)
    if message is None:  # a FU-A middle fragment without a start
        message = "FU-A fragment without a start fragment"
    assert s.error(payload, 3000) == message
    assert s.depacketizer.dropped == {"malformed": 1}
    assert s.depacketizer.awaiting_idr
    assert s.push(P_SLICE, 6000) == []  # undecodable until the next IDR
    assert s.depacketizer.dropped == {"malformed": 1, "await_idr": 1}
    [au] = s.push(IDR, 9000)
    assert au.keyframe and au.nals == [IDR]


def test_fu_a_reassembles_and_errors_in_sequence() -> None:
    s = Stream()
    body = IDR[1:]
    assert s.push(b"\x7c\x85" + body[:10], 0, marker=False) == []
    assert s.push(b"\x7c\x05" + body[10:20], 0, marker=False) == []
    [au] = s.push(b"\x7c\x45" + body[20:], 0)
    assert au.nals == [b"\x65" + body]
    # A new start before the previous FU-A ended.
    s.push(b"\x7c\x85" + body[:10], 3000, marker=False)
    assert (
        s.error(b"\x7c\x85" + body[:10], 3000, marker=False)
        == "FU-A start fragment before the previous FU-A ended"
    )
    # A fragment of another NAL type continuing an open FU-A.
    s.push(IDR, 6000)
    s.push(b"\x7c\x85" + body[:10], 9000, marker=False)
    assert (
        s.error(b"\x7c\x01" + body[:10], 9000) == "FU-A fragment of NAL type 1 continues a NAL unit of type 5"
    )
    # A whole NAL unit inside an open FU-A.
    s.push(IDR, 12000)
    s.push(b"\x7c\x85" + body[:10], 15000, marker=False)
    assert s.error(P_SLICE, 15000) == "NAL unit of type 1 arrived inside an unfinished FU-A"
    # The marker arrives while a FU-A is still open: incomplete.
    s.push(IDR, 18000)
    assert s.push(b"\x7c\x85" + body[:10], 21000) == []
    assert s.depacketizer.dropped == {"malformed": 3, "incomplete": 1}


def test_a_huge_nal_unit_is_refused_while_it_is_reassembled() -> None:
    s = Stream()
    s.push(IDR, 0)
    s.push(b"\x7c\x85" + b"\x00" * 3000, 3000, marker=False)
    message = s.error(b"\x7c\x05" + b"\x00" * 3000, 3000, marker=False)
    assert message == "NAL unit of at least 6001 bytes exceeds the limit of 5000"
    assert s.push(b"\x7c\x45" + b"\x00" * 10, 3000) == []  # the rest of the broken unit is skipped
    assert s.error(b"\x65" + b"\x00" * 5000, 6000) == "NAL unit of 5001 bytes exceeds the limit of 5000"
    assert s.error(stap_a(b"\x65" + b"\x00" * 4000, b"\x65" + b"\x00" * 4000), 9000) == (
        "access unit of at least 8002 bytes exceeds the limit of 8000"
    )
    assert s.depacketizer.dropped == {"nal_too_large": 2, "access_unit_too_large": 1}
    [au] = s.push(IDR, 12000)
    assert au.keyframe


def test_packet_loss_drops_until_the_next_idr() -> None:
    s = Stream()
    s.push(IDR, 0)
    [au] = s.push(P_SLICE, 3000)
    # The second packet of a two-packet P frame is lost: that frame and the next P are dropped.
    assert s.push(b"\x41\x00", 6000, marker=False) == []
    assert s.push(P_SLICE, 9000, skip=1) == []
    assert s.depacketizer.lost_packets == 1
    assert s.push(P_SLICE, 12000) == []
    [au] = s.push(stap_a(SPS, PPS), 15000, marker=False) + s.push(IDR, 15000)
    assert au.keyframe
    assert s.depacketizer.dropped == {"loss": 2, "await_idr": 1}
    [au] = s.push(P_SLICE, 18000)
    assert s.depacketizer.access_units == 4


def test_a_lost_marker_packet_is_noticed_at_the_timestamp_change() -> None:
    s = Stream()
    s.push(IDR, 0)
    assert s.push(b"\x7c\x85" + IDR[1:20], 3000, marker=False) == []
    # The end fragment (marker) is lost. The lost packets could as well have begun the next access
    # unit, so that one is dropped too; the IDR after it is delivered.
    assert s.push(IDR, 6000, skip=1) == []
    assert s.depacketizer.dropped == {"loss": 2}
    [au] = s.push(IDR, 9000)
    assert au.timestamp == 9000


def test_late_and_duplicate_packets_are_discarded() -> None:
    s = Stream()
    s.push(IDR, 0)
    s.seq -= 1
    assert s.push(IDR, 0) == []  # the same sequence number again
    assert s.depacketizer.discarded == {"late_or_duplicate": 1}
    assert len(s.push(P_SLICE, 3000)) == 1


def test_a_timestamp_change_ends_an_access_unit_without_a_marker() -> None:
    s = Stream()
    assert s.push(IDR, 0, marker=False) == []
    [au] = s.push(P_SLICE, 3000, marker=False)
    assert au.nals == [IDR]
    [au] = s.depacketizer.flush()
    assert au.nals == [P_SLICE]


def test_an_ssrc_change_restarts_sequence_tracking() -> None:
    d = Depacketizer()
    d.push(RtpPacket(sequence_number=10, timestamp=0, ssrc=1, marker=True, payload=IDR))
    assert d.push(RtpPacket(sequence_number=9000, timestamp=5, ssrc=2, marker=True, payload=P_SLICE)) == []
    [au] = d.push(RtpPacket(sequence_number=9001, timestamp=6, ssrc=2, marker=True, payload=IDR))
    assert d.lost_packets == 0 and d.dropped == {"await_idr": 1}
    assert au.keyframe


def test_access_units_completed_before_an_error_come_out_next() -> None:
    s = Stream()
    s.push(IDR, 0, marker=False)
    assert s.error(b"", 3000) == "empty RTP payload"  # the timestamp change completed the IDR first
    [au] = s.depacketizer.flush()
    assert au.nals == [IDR]


def test_a_malformed_capture_time_extension_is_a_protocol_error() -> None:
    d = Depacketizer()
    packet = RtpPacket(sequence_number=1, timestamp=0, marker=True, extensions={1: b"abc"}, payload=IDR)
    with pytest.raises(ProtocolError, match="^capture-time extension has 3 bytes, expected 8$"):
        d.push(packet)
    assert d.dropped == {"malformed": 1}


def test_the_send_time_rides_beside_the_capture_time_and_is_optional(x264_aus: list[list[bytes]]) -> None:
    """The edge's send time (id 2) reaches the access unit; a stream without it (an older edge)
    still gives capture times, and a receiver that knows only id 1 reads the same capture time."""
    with_send = Packetizer(mtu=300).packetize(x264_aus[0], 0, capture_time_extension(T0, sent=T0 + 0.025))
    assert len(bytes(with_send[0])) <= 300
    [au] = depacketize_all(with_send)
    assert (au.capture_time, au.send_time) == (pytest.approx(T0), pytest.approx(T0 + 0.025))
    first = RtpPacket.parse(bytes(with_send[0]))
    assert decode_capture_time(first.extensions[CAPTURE_TIME_EXT_ID]) == pytest.approx(T0)
    [old] = depacketize_all(Packetizer(mtu=300).packetize(x264_aus[0], 0, capture_time_extension(T0)))
    assert (old.capture_time, old.send_time) == (pytest.approx(T0), None)


def test_a_malformed_send_time_extension_is_a_protocol_error() -> None:
    d = Depacketizer()
    ext = {**capture_time_extension(T0), SEND_TIME_EXT_ID: b"abcd"}
    packet = RtpPacket(sequence_number=1, timestamp=0, marker=True, extensions=ext, payload=IDR)
    with pytest.raises(ProtocolError, match="^send-time extension has 4 bytes, expected 8$"):
        d.push(packet)
