"""A session the gateway recorded (``--record``) replayed by the edge daemon into a real gateway:
the same pictures come out, at the recorded pace; a damaged recording gets a clear error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    connect,
    gateway_settings,
    libx264_access_units,
    register,
    rtp_packets,
    session_ended,
)
from support.waiting import eventually

from edge.daemon import DaemonConfig, EdgeDaemon
from edge.frames import StreamShape
from edge.sources import RecordingSource, SourceError, open_source
from flowcloud.protocol.framing import frame
from services.gateway.server import Gateway

FRAMES = 30
T0 = 1_764_300_000.0


def test_recorded_session_replays_to_the_same_frames(redis_url: str, tmp_path: Path) -> None:
    packets = rtp_packets(libx264_access_units(FRAMES, gop=10), T0)

    async def main() -> float:
        token = await register(redis_url, "original")
        replayer_token = await register(redis_url, "replayer")
        settings = gateway_settings(redis_url, record_dir=str(tmp_path / "rec"))
        async with Gateway(settings).listen(port=0) as gw:
            edge = await connect(gw.port, "original", token)
            await edge.send(packets, fps=FPS)
            assert await eventually(lambda: len(frames_on_redis(redis_url, "original")) >= FRAMES, 20)
            await edge.close()
            assert await session_ended(gw, "original")

            (recording,) = (tmp_path / "rec").glob("original-*.rfc4571")
            source = open_source(str(recording), StreamShape(1, 1, 5.0), loop=False)
            assert isinstance(source, RecordingSource) and source.fps == FPS  # from the .json beside it
            config = DaemonConfig("127.0.0.1", gw.port, "replayer", replayer_token, mtu=500)
            started = time.monotonic()
            result = await EdgeDaemon(config, source).run()
            took = time.monotonic() - started
            assert result.sent == FRAMES
            assert await eventually(lambda: len(frames_on_redis(redis_url, "replayer")) >= FRAMES, 20)
        return took

    took = asyncio.run(main())
    original, replayed = frames_on_redis(redis_url, "original"), frames_on_redis(redis_url, "replayer")
    assert [f.seq for f in replayed] == list(range(1, FRAMES + 1))
    # The same H.264 (repacketized at another MTU) decodes, scales and encodes to the same bytes.
    assert [f.data for f in replayed] == [f.data for f in original]
    assert took >= 0.9 * (FRAMES - 1) / FPS  # paced by the recorded RTP timestamps, not a burst


def test_damaged_recording_is_a_clear_error(tmp_path: Path) -> None:
    damaged = tmp_path / "cam-1-20261127T000000-abc.rfc4571"
    damaged.write_bytes(frame(b"\x80\x60not an rtp packet") + b"\xff\xff" + bytes(100))
    source = open_source(str(damaged), StreamShape(1, 1, 30.0), loop=False)
    assert isinstance(source, RecordingSource)
    with pytest.raises(SourceError, match="ended before a keyframe with a parsable SPS"):
        source.open()
    # Looping a file with nothing to replay ends too, instead of reopening it forever.
    looped = RecordingSource(damaged, loop=True, fps=30.0)
    with pytest.raises(SourceError, match="ended before a keyframe with a parsable SPS"):
        looped.open()


def test_looped_replay_restarts_the_recording(tmp_path: Path) -> None:
    recording = tmp_path / "cam-1-20261127T000000-abc.rfc4571"
    recording.write_bytes(b"".join(frame(p) for p in rtp_packets(libx264_access_units(6, gop=6), T0)))
    source = RecordingSource(recording, loop=True, fps=FPS)
    assert (source.open().width, source.fps) == (320, FPS)  # no .json: the fps given, the size from the SPS
    units = []
    for unit in source.access_units():
        units.append(unit)
        if len(units) == 13:
            source.stop()
    assert [u.keyframe for u in units[:13]] == [True, *[False] * 5] * 2 + [True]
