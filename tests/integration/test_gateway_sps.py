"""The gateway checks each SPS before decoding, against a real gateway and a real redis-server: a
stream whose SPS announces a size above the cap never reaches the decoder and is counted as
``dimensions``; a malformed SPS is a counted ``malformed`` drop; the session goes on at the next
IDR with an acceptable SPS, and a good stream beside it loses no frame."""

from __future__ import annotations

import logging

import pytest
from support.frames import frames_on_redis
from support.gateway import (
    all_drops,
    connect,
    dropped,
    libx264_access_units,
    register,
    rtp_packets,
    run_beside_good_stream,
    session_ended,
)

from flowcloud.protocol.h264 import NAL_TYPE_SPS, nal_type
from services.gateway.pipeline import MAX_SPS_PER_ACCESS_UNIT
from services.gateway.server import Gateway

T0 = 1_765_000_000.0


def with_truncated_sps(access_unit: list[bytes]) -> list[bytes]:
    return [nal[:4] if nal_type(nal) == NAL_TYPE_SPS else nal for nal in access_unit]


def test_oversized_sps_is_dropped_before_decoding(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    small = libx264_access_units(5, width=320, height=240)
    broken = rtp_packets([with_truncated_sps(small[0]), *small[1:]], T0)
    oversized = rtp_packets(libx264_access_units(5, width=1280, height=720), T0 + 100)
    good_again = rtp_packets(libx264_access_units(10, width=320, height=240), T0 + 200)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "big")
        # Declares a size within the cap, then sends an SPS for more.
        edge = await connect(gw.port, "big", token, width=640, height=480)
        await edge.send(broken)  # SPS cut short: malformed, then await_idr until the next IDR
        await edge.send(oversized)  # 1280x720: every access unit dropped as dimensions
        await edge.send(good_again)  # a new IDR with a 320x240 SPS: decoding resumes
        await edge.close()
        assert await session_ended(gw, "big")

    before = {reason: dropped(reason) for reason in ("malformed", "await_idr", "dimensions")}
    drops = all_drops()
    with caplog.at_level(logging.INFO, logger="services.gateway"):
        run_beside_good_stream(redis_url, bad, max_width=640, max_height=480)
    after = {reason: dropped(reason) - before[reason] for reason in before}
    assert after == {"malformed": 1, "await_idr": 4, "dimensions": 5}
    assert all_drops() - drops == 10  # nothing else dropped, on either stream
    frames = frames_on_redis(redis_url, "big")
    assert [f.seq for f in frames] == list(range(1, 11))
    assert {(f.width, f.height) for f in frames} == {(96, 64)}  # the model size: decoded and resized
    messages = [r.getMessage() for r in caplog.records]
    refusals = [m for m in messages if "SPS 0 announces 1280x720, above the cap 640x480" in m]
    assert len(refusals) == 1
    # The decoder's own size check (its second line of defence) never saw the 1280x720 stream.
    assert not [m for m in messages if "frame is 1280x720" in m]


def test_access_unit_flooded_with_sps_is_dropped_unparsed(redis_url: str) -> None:
    """Five SPSs in one access unit (one is the norm) is an attack on the parser: dropped as
    ``malformed`` without parsing any of them, and decoding resumes at the next IDR."""
    small = libx264_access_units(5, width=320, height=240)
    sps = next(nal for nal in small[0] if nal_type(nal) == NAL_TYPE_SPS)
    flooded = rtp_packets([[sps] * (MAX_SPS_PER_ACCESS_UNIT + 1) + small[0], *small[1:]], T0 + 300)
    good_again = rtp_packets(libx264_access_units(10, width=320, height=240), T0 + 400)

    async def bad(gw: Gateway) -> None:
        token = await register(redis_url, "flood")
        edge = await connect(gw.port, "flood", token)
        await edge.send(flooded)
        await edge.send(good_again)
        await edge.close()
        assert await session_ended(gw, "flood")

    before = {reason: dropped(reason) for reason in ("malformed", "await_idr")}
    run_beside_good_stream(redis_url, bad)
    assert {reason: dropped(reason) - before[reason] for reason in before} == {"malformed": 1, "await_idr": 4}
    assert [f.seq for f in frames_on_redis(redis_url, "flood")] == list(range(1, 11))
