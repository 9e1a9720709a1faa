"""Redis stops and restarts under a live session: the gateway keeps the session, drops frames with
counted reasons in bounded memory, refuses new devices with ``busy``, and resumes publishing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support.frames import frames_on_redis
from support.gateway import (
    FPS,
    connect,
    dropped,
    gateway_settings,
    libx264_access_units,
    metric,
    published_offset,
    raw_hello,
    read_reject,
    register,
    rtp_packets,
    session_ended,
)
from support.waiting import eventually

from flowcloud.redis_server import EmbeddedRedis
from services.gateway.server import Gateway

FRAMES = 180  # 6 s at 30 fps
T0 = 1_764_100_000.0


def test_redis_outage_keeps_sessions_and_resumes(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    url = server.url
    packets = rtp_packets(libx264_access_units(FRAMES, gop=15), T0)

    async def main() -> None:
        nonlocal server
        token = await register(url, "cam")
        other = await register(url, "late")
        settings = gateway_settings(url, publish_queue=16)
        async with Gateway(settings).listen(port=0) as gw:
            edge = await connect(gw.port, "cam", token)
            sender = asyncio.create_task(edge.send(packets, fps=FPS))
            assert await eventually(lambda: len(frames_on_redis(url, "cam")) >= 20, 10)
            unavailable, backlog = dropped("redis_unavailable"), dropped("publish_backlog")
            server.stop()
            stopped_at = time.time()
            await asyncio.sleep(1.5)
            assert "cam" in gw.sessions and not sender.done()
            assert dropped("redis_unavailable") + dropped("publish_backlog") > unavailable + backlog
            assert metric("flowcloud_gateway_publish_queue") <= 16
            assert metric("flowcloud_gateway_redis_up") == 0
            # A new device cannot be verified meanwhile: refused busy, not crashed.
            reader, writer = await raw_hello(gw.port, "late", other)
            reject = await read_reject(reader)
            assert reject.code == "busy" and "unavailable" in reject.reason
            writer.close()
            server = EmbeddedRedis(tmp_path / "redis", port=server.port, appendonly=True).start()
            restarted_at = time.time()
            assert await eventually(
                lambda: any(f.recv_ts > restarted_at for f in frames_on_redis(url, "cam")), 10
            )
            assert metric("flowcloud_gateway_redis_up") == 1
            await sender
            await edge.close()
            assert await session_ended(gw, "cam")
        frames = frames_on_redis(url, "cam")
        seqs = [f.seq for f in frames]
        assert seqs == sorted(set(seqs))  # monotonic, no seq handed out twice
        # Frames from before the outage (kept by the AOF) and from after it; a gap for the outage.
        assert any(f.recv_ts < stopped_at for f in frames)
        assert any(f.recv_ts > restarted_at for f in frames)
        assert len(frames) < FRAMES
        # Frames that were published kept their true capture times, in order.
        offset = published_offset(edge, gw)
        for f in frames:
            index = round((f.capture_ts - offset - T0) * FPS)
            assert abs(f.capture_ts - (T0 + index / FPS + offset)) < 2e-6

    try:
        asyncio.run(main())
    finally:
        server.stop()
