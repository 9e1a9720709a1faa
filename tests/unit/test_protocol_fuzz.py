"""Hypothesis: the RTP parser, the depacketizer, the RFC 4571 decoder and the handshake parsers
raise nothing but ProtocolError on any input."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import Rfc4571Decoder
from flowcloud.protocol.h264 import AccessUnit, Depacketizer
from flowcloud.protocol.handshake import Hello, parse_control
from flowcloud.protocol.rtp import RtpPacket

DATA = Path(__file__).parent.parent / "data"
REAL = Rfc4571Decoder().feed((DATA / "gst_160x120_mtu600.bin").read_bytes())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def push_all(frames: list[bytes], max_nal: int, max_au: int) -> list[AccessUnit]:
    """Every packet through one depacketizer; what it gives out must stay within its caps."""
    depacketizer = Depacketizer(max_nal_size=max_nal, max_access_unit_size=max_au)
    units: list[AccessUnit] = []
    for body in frames:
        with contextlib.suppress(ProtocolError):
            units += depacketizer.push(RtpPacket.parse(body))
    units += depacketizer.flush()
    assert depacketizer.packets <= len(frames)
    assert all(0 < len(nal) <= max_nal for unit in units for nal in unit.nals)
    assert all(0 < unit.size <= max_au for unit in units)
    return units


CLEAN = push_all(REAL, max_nal=3000, max_au=6000)


def test_the_undamaged_recording_gives_whole_access_units() -> None:
    """The baseline the mutation test compares against is a real stream, starting at an IDR."""
    assert len(CLEAN) > 10 and CLEAN[0].keyframe


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=30))
def test_depacketizer_survives_random_packets(frames: list[bytes]) -> None:
    push_all(frames, max_nal=2000, max_au=4000)


def _mutate(frames: list[bytes], edits: list[tuple[int, int, int]], drops: set[int]) -> list[bytes]:
    out = []
    for i, body in enumerate(frames):
        if i in drops:
            continue
        data = bytearray(body)
        for index, pos, value in edits:
            if index == i and data:
                data[pos % len(data)] = value
        out.append(bytes(data))
    return out


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 2000), st.integers(0, 255)), max_size=20
    ),
    st.sets(st.integers(0, len(REAL) - 1), max_size=5),
    st.integers(0, len(REAL) - 1),
    st.integers(0, 700),
)
def test_depacketizer_survives_mutated_real_packets(
    edits: list[tuple[int, int, int]], drops: set[int], cut_index: int, cut: int
) -> None:
    frames = _mutate(REAL, edits, drops)
    truncated = cut_index < len(frames) and cut < len(frames[cut_index])
    if truncated:
        frames[cut_index] = frames[cut_index][:cut]
    units = push_all(frames, max_nal=3000, max_au=6000)
    if not edits and not truncated:
        # Only whole packets were lost: the units given out are whole units of the clean stream (a
        # loss drops units, never delivers part of one). Not checked: the first and the last, since
        # a loss before the first packet received or after the last one cannot be seen (flush()
        # ends the last unit as it is).
        whole = [u.nals for u in CLEAN]
        assert all(u.nals in whole for u in units[1:-1])
        if not drops:
            assert [u.nals for u in units] == whole


@FUZZ
@given(
    st.binary(max_size=2000), st.lists(st.integers(1, 300), min_size=1, max_size=20), st.integers(1, 65535)
)
def test_framing_survives_any_bytes_in_any_chunks(data: bytes, steps: list[int], limit: int) -> None:
    decoder = Rfc4571Decoder(max_frame_size=limit)
    pos = 0
    i = 0
    try:
        while pos < len(data):
            step = steps[i % len(steps)]
            for body in decoder.feed(data[pos : pos + step]):
                assert len(body) <= limit
            pos += step
            i += 1
    except ProtocolError:
        return
    assert decoder.buffered <= limit + 2


@FUZZ
@given(
    st.one_of(st.binary(max_size=600), st.from_regex(rb'\A\{"type":"(hello|accept|reject|clock)".{0,200}\Z'))
)
def test_control_parsers_raise_only_protocol_errors(body: bytes) -> None:
    for parse in (parse_control, Hello.parse):
        with contextlib.suppress(ProtocolError):
            parse(body)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
        max_leaves=20,
    ),
    st.sampled_from(["hello", "accept", "reject", "clock"]),
)
def test_control_parsers_on_json_shaped_input(value: object, kind: str) -> None:
    obj = {"type": kind, "version": 1, "stream": value, "device_id": value, "edge_time": value, "code": value}
    try:
        body = json.dumps(obj).encode()
    except ValueError:
        return
    with contextlib.suppress(ProtocolError):
        parse_control(body)
