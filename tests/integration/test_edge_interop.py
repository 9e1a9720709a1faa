"""Interop with independent peers: the edge's RFC 4571 output decodes in GStreamer frame for
frame; a GStreamer ``rtph264pay ! rtpstreampay`` stream passes the edge's rfc4571:// relay; the
RTSP/demux relay, file, and gst: picture sources."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from support.edge import TestGateway, daemon_config, decode_access_units

from edge.daemon import DaemonResult, EdgeDaemon
from edge.frames import StreamShape
from edge.sources import (
    DemuxRelaySource,
    FileSource,
    GstPictureSource,
    PictureSource,
    RelaySource,
    Rfc4571RelaySource,
)
from flowcloud.protocol.h264 import NAL_TYPE_PPS, NAL_TYPE_SPS, nal_type
from flowcloud.x264 import Mp4Writer

# GStreamer is a required test peer (make sysdeps installs it): without it these tests fail.
pytestmark = [pytest.mark.timeout(90)]


async def stream(source: PictureSource | RelaySource, **changes: object) -> tuple[DaemonResult, TestGateway]:
    async with TestGateway() as gw:
        config = daemon_config(gw.port, **{"device_id": "cam-interop", "mtu": 500, **changes})
        result = await EdgeDaemon(config, source).run()
        await gw.wait_for(lambda: bool(gw.sessions) and gw.sessions[-1].closed.is_set())
    return result, gw


def gst_decoded_frames(rfc4571: Path, width: int, height: int, out: Path) -> int:
    """Decode an RFC 4571 capture with GStreamer alone; the number of I420 frames it wrote."""
    caps = "application/x-rtp-stream,media=video,clock-rate=90000,encoding-name=H264,payload=96"
    pipeline = (
        f"filesrc location={rfc4571} ! {caps} ! rtpstreamdepay ! rtph264depay ! h264parse ! avdec_h264 ! "
        f"videoconvert ! video/x-raw,format=I420,width={width},height={height} ! filesink location={out}"
    )
    subprocess.run(["gst-launch-1.0", "-q", *pipeline.split()], check=True, timeout=60, capture_output=True)
    size = out.stat().st_size
    assert size % (width * height * 3 // 2) == 0
    return size // (width * height * 3 // 2)


def test_edge_output_decodes_in_gstreamer_frame_for_frame(tmp_path: Path) -> None:
    from edge.sources import SyntheticSource

    result, gw = asyncio.run(stream(SyntheticSource(StreamShape(176, 144, 30.0)), frames=25))
    assert result.sent == 25
    capture = tmp_path / "edge.rfc4571"
    capture.write_bytes(bytes(gw.sessions[0].raw))
    assert gst_decoded_frames(capture, 176, 144, tmp_path / "out.yuv") == 25


def test_gstreamer_stream_passes_the_rfc4571_relay(tmp_path: Path) -> None:
    relay = Rfc4571RelaySource("127.0.0.1", 0, fps=30.0)
    host, port = relay.address
    pipeline = (
        "videotestsrc num-buffers=30 pattern=ball ! video/x-raw,width=192,height=128,framerate=30/1 ! "
        "x264enc tune=zerolatency key-int-max=10 bitrate=300 ! "
        f"rtph264pay config-interval=-1 mtu=700 ! rtpstreampay ! tcpclientsink host={host} port={port}"
    )
    gst = subprocess.Popen(["gst-launch-1.0", "-q", *pipeline.split()], stderr=subprocess.PIPE)
    try:
        result, gw = asyncio.run(stream(relay, frames=30, mtu=400))
    finally:
        gst.wait(timeout=30)
    assert gst.returncode == 0, gst.stderr.read() if gst.stderr else ""
    assert result.sent == 30 and relay.dropped == {}
    [session] = gw.sessions
    assert (session.hello.stream.width, session.hello.stream.height) == (192, 128)
    aus = session.access_units
    assert len(aus) == 30 and aus[0].keyframe and all(au.capture_time for au in aus)
    frames = decode_access_units(aus)
    assert len(frames) == 30 and {(f.width, f.height) for f in frames} == {(192, 128)}
    capture = tmp_path / "relayed.rfc4571"
    capture.write_bytes(bytes(session.raw))
    assert gst_decoded_frames(capture, 192, 128, tmp_path / "out.yuv") == 30


def write_mp4(path: Path, frames: int, width: int = 128, height: int = 96) -> None:
    with Mp4Writer(
        path, width, height, 30, preset="ultrafast", keyframe_interval=10, options={"bf": "0"}
    ) as mp4:
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[:, (i * 5) % width :] = (40 * i) % 256
            mp4.write(img)


def test_demux_relay_passes_h264_through_with_parameter_sets_at_each_idr(tmp_path: Path) -> None:
    # The rtsp:// source's code path, on an MP4 (length-prefixed NAL units, avcC extradata).
    path = tmp_path / "clip.mp4"
    write_mp4(path, 24)
    result, gw = asyncio.run(stream(DemuxRelaySource(str(path), pace=True)))
    assert result.sent == 24
    aus = gw.access_units
    assert len(aus) == 24 and sum(au.keyframe for au in aus) == 3
    for au in aus:
        kinds = [nal_type(n) for n in au.nals]
        assert (NAL_TYPE_SPS in kinds and NAL_TYPE_PPS in kinds) == au.keyframe
    with av.open(str(path)) as container:
        original = [bytes(p) for p in container.demux(video=0) if p.size]
    assert len(original) == 24
    assert len(decode_access_units(aus)) == 24


def test_file_source_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_mp4(path, 5)
    source = FileSource(path, None, loop=True)
    assert source.shape == StreamShape(128, 96, 30.0)
    result, gw = asyncio.run(stream(source, frames=12))
    assert result.sent == 12
    assert len(decode_access_units(gw.access_units)) == 12


def test_gst_picture_source() -> None:
    source = GstPictureSource("videotestsrc pattern=ball is-live=true", StreamShape(96, 64, 30.0))
    result, gw = asyncio.run(stream(source, frames=8))
    assert result.sent == 8
    frames = decode_access_units(gw.access_units)
    assert len(frames) == 8 and (frames[0].width, frames[0].height) == (96, 64)


def test_an_unreachable_rtsp_camera_is_a_source_error() -> None:
    from edge.sources import SourceError
    from flowcloud.redis_server import free_port

    url = f"rtsp://127.0.0.1:{free_port()}/cam"
    with pytest.raises(SourceError, match=f"^cannot open {url}: "):
        DemuxRelaySource(url).open()
