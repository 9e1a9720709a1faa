"""Good streams through a real gateway: libx264 (PyAV) + the protocol's Packetizer, and
GStreamer's rtph264pay ! rtpstreampay; frames, order, sizes and capture times checked on Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from support.frames import entries, frames_on_redis
from support.gateway import (
    FPS,
    GST_BFRAMES,
    MODEL_H,
    MODEL_W,
    connect,
    dropped,
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
from flowcloud.registry import DeviceRegistry
from flowcloud.streams import StreamMeta
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
    # The workers' queue holds a reference to each frame (no second copy of its bytes).
    client = redis.Redis.from_url(redis_url)
    refs = [
        fields for _, fields in entries(client, keys.frame_shard(0)) if fields[b"stream"] == stream.encode()
    ]
    logged = [entry_id for entry_id, _ in entries(client, keys.stream_frames(stream))]
    client.close()
    assert [int(ref[b"seq"]) for ref in refs] == [f.seq for f in frames]
    assert [ref[keys.F_FRAME_ID.encode()] for ref in refs] == logged
    assert all(keys.F_DATA.encode() not in ref for ref in refs)


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
        meta = StreamMeta.from_fields(redis.Redis.from_url(redis_url).hgetall(keys.stream_meta("cam-1")))
        assert (meta.device, meta.tenant, meta.width, meta.height, meta.fps) == (
            "cam-1",
            "acme",
            320,
            240,
            FPS,
        )
        assert meta.status == keys.STATUS_IDLE and meta.last_seq == FRAMES and meta.trimmed_unread is None
        tenant_index = redis.Redis.from_url(redis_url).zrange(keys.tenant_streams("acme"), 0, -1)
        assert tenant_index == [b"cam-1"]  # what a reader's /streams reads
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


def test_gstreamer_stream_with_b_frames_arrives_whole(redis_url: str, tmp_path: Path) -> None:
    """x264enc bframes=2: the decoder holds the last pictures back to reorder them; the session's end
    flushes it, so 60 frames sent are 60 frames published, in presentation (capture) order."""
    frames = 60
    capture = gst_capture(tmp_path / "gst_bframes_60.rtp", frames, encoder=GST_BFRAMES)

    async def main() -> None:
        token = await register(redis_url, "gst-b")
        t0 = 1_764_000_200.0
        closed_before = dropped("session_closed")
        async with Gateway(gateway_settings(redis_url)).listen(port=0) as gw:
            edge = await connect(gw.port, "gst-b", token)
            await edge.send(with_capture_times(capture, t0))
            await edge.close()
            assert await session_ended(gw, "gst-b")
            offset = published_offset(edge, gw)
        published = frames_on_redis(redis_url, "gst-b")
        assert [f.seq for f in published] == list(range(1, frames + 1))
        for i, f in enumerate(published):
            assert f.capture_ts == pytest.approx(t0 + i / FPS + offset, abs=2e-5)
        assert dropped("session_closed") == closed_before

    asyncio.run(main())


def test_a_revoked_session_counts_the_pictures_its_decoder_still_held(redis_url: str, tmp_path: Path) -> None:
    """A revoked device's frames are discarded, not flushed; what the decoder held back is counted."""
    frames = 60
    capture = gst_capture(tmp_path / "gst_bframes_60.rtp", frames, encoder=GST_BFRAMES)

    async def main() -> None:
        token = await register(redis_url, "gst-r")
        closed_before = dropped("session_closed")
        async with Gateway(gateway_settings(redis_url)).listen(port=0) as gw:
            edge = await connect(gw.port, "gst-r", token)
            await edge.send(with_capture_times(capture, 1_764_000_300.0))
            # Every access unit is decoded; two pictures wait in the decoder for their successors.
            assert await eventually(lambda: len(frames_on_redis(redis_url, "gst-r")) >= frames - 2, 20)
            session = gw.sessions["gst-r"]
            assert await eventually(lambda: session.decoded == frames - 2 and not session.in_flight, 10)
            await DeviceRegistry(gw.redis).revoke("gst-r")
            assert await session_ended(gw, "gst-r")
            await edge.close()
        assert len(frames_on_redis(redis_url, "gst-r")) == frames - 2
        assert dropped("session_closed") - closed_before == 2

    asyncio.run(main())
