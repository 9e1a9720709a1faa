"""A session's packet path driven with bytes: real libx264 access units in RTP, RFC 4571 framed."""

from __future__ import annotations

from functools import cache

import pytest
from support.gateway import libx264_access_units, rtp_packets

from flowcloud.protocol.errors import ProtocolError
from flowcloud.protocol.framing import frame
from flowcloud.protocol.h264 import to_annexb
from services.gateway.limits import TokenBucket
from services.gateway.pipeline import WANTED_STREAM_START, ClearedUnit, PacketPipeline, PipelineLimits

T0 = 1_764_000_000.0
FPS = 30.0
OFFSET = 2.5  # edge clock -> gateway clock, from the handshake
LIMITS = PipelineLimits(1920, 1080, 1 << 20, 1 << 22, max_malformed=3)


@cache
def units() -> list[list[bytes]]:
    return libx264_access_units(30, width=160, height=128, gop=15)  # IDRs at 0 and 15


def stream_bytes() -> bytes:
    return b"".join(frame(p) for p in rtp_packets(units(), T0, fps=FPS))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pipeline(rate: float = 1000.0, clock: Clock | None = None, **kwargs: object) -> PacketPipeline:
    bucket = TokenBucket(rate, rate, clock=clock or Clock())
    return PacketPipeline(LIMITS, bucket, OFFSET, **kwargs)  # type: ignore[arg-type]


def test_any_chunking_gives_every_access_unit_with_its_times() -> None:
    data = stream_bytes()
    p = pipeline()
    out: list[ClearedUnit] = []
    for i in range(0, len(data), 7):
        out += p.feed(data[i : i + 7], recv_ts=T0 + 10)
    out += p.finish(T0 + 11)
    assert [u.data for u in out] == [to_annexb(nals) for nals in units()]
    assert [i for i, u in enumerate(out) if u.keyframe] == [0, 15]
    assert [u.times.capture_ts for u in out] == pytest.approx([T0 + i / FPS + OFFSET for i in range(30)])
    assert {u.times.recv_ts for u in out} == {T0 + 10}
    assert not p.dropped


def unit_chunks() -> list[bytes]:
    """The stream's bytes cut after each access unit's last packet (the marker bit)."""
    chunks, current = [], b""
    for packet in rtp_packets(units(), T0, fps=FPS):
        current += frame(packet)
        if packet[1] & 0x80:
            chunks.append(current)
            current = b""
    return chunks


def test_above_the_frame_rate_units_are_dropped_until_the_next_idr() -> None:
    clock = Clock()
    p = pipeline(rate=5.0, clock=clock)  # a burst of 5, then 5 per second
    cleared = []
    for i, chunk in enumerate(unit_chunks()):
        if i >= 10:
            clock.now += 1.0  # the stream slows down: a token for every unit from here on
        cleared += [i for _ in p.feed(chunk, recv_ts=T0)]
    # 5-9 over the rate; 10-14 within it again but not decodable before the IDR at 15.
    assert cleared == [0, 1, 2, 3, 4, *range(15, 30)]
    assert p.dropped == {"rate_limit": 5, "await_idr": 5}


def test_units_that_waited_for_a_stalled_reader_count_at_their_send_times() -> None:
    """A steady 30 fps edge under a 40 fps limit (burst 5), read by a gateway that stalled for one
    second and then read the whole second at once: no unit is over the rate, since each counts when
    the edge sent it, not when the busy gateway got round to it."""
    clock = Clock()
    bucket = TokenBucket(40.0, 5.0, clock=clock)
    p = PacketPipeline(LIMITS, bucket, OFFSET)
    data = b"".join(frame(pk) for pk in rtp_packets(units(), T0, fps=FPS, sent=lambda i: T0 + i / FPS))
    clock.now = 1.0  # one second on: the whole second is read now
    out = list(p.feed(data, recv_ts=T0 + OFFSET + 1.0))
    assert len(out) == 30 and not p.dropped
    # The same bytes without send times (an older edge) are a burst, as before.
    old = PacketPipeline(LIMITS, TokenBucket(40.0, 5.0, clock=clock), OFFSET)
    assert len(list(old.feed(stream_bytes(), recv_ts=T0 + OFFSET + 1.0))) < 30


def test_send_times_in_the_past_buy_no_more_than_the_rate() -> None:
    """A device that sends a burst claiming send times spread over the last ten seconds gets no more
    than the bucket's burst plus its rate over the time that really passed."""
    clock = Clock()
    bucket = TokenBucket(10.0, 5.0, clock=clock)
    p = PacketPipeline(LIMITS, bucket, OFFSET)
    data = b"".join(frame(pk) for pk in rtp_packets(units(), T0, fps=FPS, sent=lambda i: T0 - 10 + i / 3))
    clock.now = 1.0  # one second since the bucket was full: 5 + 10 tokens at most
    list(p.feed(data, recv_ts=T0 + OFFSET))
    assert p.dropped["rate_limit"] >= 30 - 15


def test_a_decoder_refusal_or_trouble_waits_for_the_next_idr() -> None:
    asked = iter(range(100))
    wanted: list[str] = []
    p = pipeline(
        decoder_refusal=lambda: "decoder_backlog" if next(asked) == 2 else None,
        on_keyframe_wanted=wanted.append,
    )
    cleared = []
    for unit in p.feed(stream_bytes(), recv_ts=T0):
        cleared.append(unit.times.capture_ts)
        assert not p.want_keyframe  # what goes on is decodable: nothing lost since its IDR
        if len(cleared) == 5:
            p.await_idr("decode_error")  # it applies to the very next unit
    # 0, 1 go; 2 refused; 3-14 wait for the IDR at 15; 15-17 go; 18-29 wait again (no IDR left).
    index = [round((ts - T0 - OFFSET) * FPS) for ts in cleared]
    assert index == [0, 1, 15, 16, 17]
    assert p.dropped == {"decoder_backlog": 1, "await_idr": 12 + 12}
    # Heard once each time the stream starts to need an IDR.
    assert p.want_keyframe and wanted == ["decoder_backlog", "decode_error"]


def test_malformed_packets_in_a_row_end_the_stream_after_the_good_units() -> None:
    garbage = frame(b"\x00" * 20) * 3  # RTP version 0: each one refused
    p = pipeline()
    good = list(p.feed(stream_bytes() + garbage, recv_ts=T0))
    assert len(good) == 30  # the good units first; the error comes with the next call
    with pytest.raises(ProtocolError, match="3 malformed packets in a row"):
        list(p.feed(b"", recv_ts=T0))
    with pytest.raises(ProtocolError, match="3 malformed packets in a row"):
        pipeline().feed(garbage, recv_ts=T0)


def test_a_stream_joined_mid_gop_wants_a_keyframe_once() -> None:
    wanted: list[str] = []
    p = pipeline(on_keyframe_wanted=wanted.append)
    cleared = [unit for chunk in unit_chunks()[5:] for unit in p.feed(chunk, recv_ts=T0)]
    # 5-14 cannot be decoded before the IDR at 15: the stream wants one from its first unit on.
    assert len(cleared) == 15 and cleared[0].keyframe
    assert p.dropped == {"await_idr": 10}
    assert wanted == [WANTED_STREAM_START] and not p.want_keyframe
