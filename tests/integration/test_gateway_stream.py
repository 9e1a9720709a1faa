"""Good streams through a real gateway: libx264 (PyAV) + the protocol's Packetizer, and
GStreamer's rtph264pay ! rtpstreampay; frames, order, sizes and capture times checked on Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    MODEL_H,
    MODEL_W,
    connect,
    gateway_settings,
    gst_capture,
    libx264_access_units,
    published_offset,
    register,
    rtp_packets,
    session_ended,
    with_capture_times,
)
from support.waiting import eventually

from flowcloud import keys
from flowcloud.protocol.framing import Rfc4571Decoder
from services.gateway.server import Gateway

FRAMES = 45


def check_frames(
    redis_url: str, stream: str, count: int, t0: float, offset: float, first_seq: int = 1
) -> None:
    frames = frames_on_redis(redis_url, stream)
    assert len(frames) == count
    assert [f.seq for f in frames] == list(range(first_seq, first_seq + count))
    for i, f in enumerate(frames):
        assert (f.width, f.height, f.encoding) == (MODEL_W, MODEL_H, "jpeg")
        assert f.capture_ts == pytest.approx(t0 + i / FPS + offset, abs=2e-6)
        assert f.recv_ts >= f.capture_ts - offset - 1.0
    assert frames[-1].image().shape == (MODEL_H, MODEL_W, 3)
    recent = frames_on_redis(redis_url, stream, keys.recent_frames(stream))
    assert [f.seq for f in recent] == [f.seq for f in frames][-len(recent) :]


def test_libx264_stream_end_to_end(redis_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        token = await register(redis_url, "cam-1")
        t0 = 1_764_000_000.0
        packets = rtp_packets(libx264_access_units(FRAMES), t0)
        settings = gateway_settings(redis_url, record_dir=str(tmp_path / "rec"))
        async with Gateway(settings).listen(port=0) as gw:
            edge = await connect(gw.port, "cam-1", token)
            await edge.send(packets)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "cam-1")) >= FRAMES, 20)
            await edge.close()
            assert await session_ended(gw, "cam-1")
        check_frames(redis_url, "cam-1", FRAMES, t0, published_offset(edge, gw))
        meta = redis.Redis.from_url(redis_url, decode_responses=True).hgetall(keys.stream_meta("cam-1"))
        assert meta[keys.M_DEVICE] == "cam-1" and meta[keys.M_TENANT] == "acme"
        assert (meta[keys.M_WIDTH], meta[keys.M_HEIGHT], float(meta[keys.M_FPS])) == ("320", "240", FPS)
        assert meta[keys.M_STATUS] == keys.STATUS_IDLE and meta[keys.M_LAST_SEQ] == str(FRAMES)
        # The recording holds exactly the RTP packets sent after the handshake.
        (recording,) = (tmp_path / "rec").glob("cam-1-*.rfc4571")
        assert Rfc4571Decoder().feed(recording.read_bytes()) == packets
        description = json.loads(recording.with_suffix(".json").read_text())
        assert description["device"] == "cam-1" and "token" not in json.dumps(description)

    asyncio.run(main())


def test_gstreamer_stream_and_seq_continues_after_reconnect(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    capture = gst_capture(tmp_path_factory.getbasetemp() / "gst_320x240_45.rtp", FRAMES)

    async def main() -> None:
        token = await register(redis_url, "gst")
        t0 = 1_764_000_100.0
        packets = with_capture_times(capture, t0)
        async with Gateway(gateway_settings(redis_url)).listen(port=0) as gw:
            edges = []
            for round_ in range(2):
                edge = await connect(gw.port, "gst", token)
                edges.append(edge)
                await edge.send(packets)
                await edge.close()
                assert await session_ended(gw, "gst", round_ + 1)
            offsets = [published_offset(edge, gw) for edge in edges]  # once the gateway has met Redis's clock
        frames = frames_on_redis(redis_url, "gst")
        assert [f.seq for f in frames] == list(range(1, 2 * FRAMES + 1))
        first = frames[:FRAMES]
        for i, f in enumerate(frames):
            expected = t0 + (i % FRAMES) / FPS + offsets[i // FRAMES]
            assert f.capture_ts == pytest.approx(expected, abs=2e-5)  # RTP timestamps are 90 kHz
        # videotestsrc's ball moves: consecutive frames differ.
        assert not np.array_equal(first[0].image(), first[20].image())

    asyncio.run(main())
