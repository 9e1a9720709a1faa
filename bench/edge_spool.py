"""Edge store and forward: spool bytes per minute, and the backfill rate while live holds latency.

1. **Spool size.** libx264 at the edge's defaults (640x480, 30 fps, 2 Mbit/s, a keyframe every
   30 frames) encodes a minute of the street generator; the spool stores it. Baseline: the bytes
   of H.264 itself. The ratio is the spool's overhead (RTP and RFC 4571 headers, checksums).
2. **Backfill beside live.** A real gateway and redis-server, the real edge daemon (synthetic
   source at ``--size``) with a spool: live for a while, the gateway stopped for ``--outage``
   seconds, then started again. Measured: how fast the spool drains (backfill frames published per
   second, as a multiple of the frame rate) and live latency (gateway receipt minus capture, p95)
   while it drains. Baseline: live latency before the outage, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from redis.asyncio import Redis

from edge import metrics
from edge.daemon import DaemonConfig, EdgeDaemon
from edge.encoder import Libx264Encoder
from edge.frames import Picture, StreamShape
from edge.sender import Backoff
from edge.sources import Pacer, SyntheticSource, _Stoppable
from edge.spool import Spool
from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.percentile import percentile
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.registry import DeviceRegistry
from flowcloud.settings import EdgeSettings, GatewaySettings
from services.gateway.server import Gateway


def spool_size(seconds: float) -> tuple[int, int, float]:
    """(H.264 bytes, spool bytes, seconds of video) for ``seconds`` of default-bitrate video."""
    defaults = EdgeSettings()
    shape = StreamShape(defaults.width, defaults.height, defaults.fps)
    source = SyntheticSource(shape)
    encoder = Libx264Encoder(shape, defaults.bitrate, defaults.keyframe_interval)
    count = int(seconds * shape.fps)
    start = time.time() - seconds
    h264 = 0
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(tmp, shape, segment_seconds=defaults.spool_segment_seconds)
        pictures = source.pictures()
        for i in range(count):
            picture = next(pictures)
            for item in encoder.encode(Picture(picture.image, start + i / shape.fps)):
                h264 += item.size
                spool.append(item)
        source.stop()
        spool.close()
        return h264, spool.bytes, count / shape.fps


class LoopedStreet(_Stoppable):
    """A second of the street generator rendered once, then looped at ``fps``: the generator itself
    is too slow on a shared 2-core machine to feed a real-time stream beside the gateway."""

    def __init__(self, shape: StreamShape) -> None:
        super().__init__()
        self.shape = shape
        source = SyntheticSource(shape)
        generated = source.pictures()
        self.images = [next(generated).image for _ in range(int(shape.fps))]
        source.stop()

    def pictures(self) -> Iterator[Picture]:
        pacer = Pacer(self.shape.fps)
        i = 0
        while not self.stopped:
            pacer.wait()
            yield Picture(self.images[i % len(self.images)], time.time())
            i += 1


async def backfill(url: str, shape: StreamShape, live_seconds: float, outage: float) -> dict[str, float]:
    client = Redis.from_url(url)
    _, token = await DeviceRegistry(client).add("bench-cam")
    settings = GatewaySettings(
        redis_url=url,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        model_size="256x512",
        stream_frames_maxlen=100_000,
    )
    with tempfile.TemporaryDirectory() as spool_dir:
        async with Gateway(settings).listen(port=0) as gw:
            port = gw.port
            config = DaemonConfig(
                "127.0.0.1", port, "bench-cam", token, bitrate=EdgeSettings().bitrate, encoder="libx264",
                backoff=Backoff(0.05, 0.2), spool_dir=spool_dir, duration=600,
            )  # fmt: skip
            daemon = EdgeDaemon(config, LoopedStreet(shape))
            edge = asyncio.create_task(daemon.run())
            await asyncio.sleep(live_seconds)
        stopped = time.time()
        await asyncio.sleep(outage)
        spool = daemon.spool
        assert spool is not None
        spooled = spool.frames
        async with Gateway(settings).listen(port=port):
            restarted = time.time()
            while spool.frames > 0 and time.time() - restarted < 10 * outage + 30:
                await asyncio.sleep(0.2)
            drained = time.time()
            await asyncio.sleep(1.0)
            daemon.source.stop()
            await asyncio.wait_for(edge, 30)
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.stream_frames("bench-cam")))
    raw_backfill = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.backfill_frames("bench-cam"))
    )
    await client.aclose()
    live = [Frame.from_fields(f) for _, f in raw]
    spooled_frames = [Frame.from_fields(f) for _, f in raw_backfill]
    received = [f.recv_ts for f in spooled_frames if f.recv_ts > restarted]
    first, last = min(received), max(received)
    captures = [f.capture_ts for f in live + spooled_frames]
    before = [f.recv_ts - f.capture_ts for f in live if f.recv_ts < stopped - 0.5]
    during = [f.recv_ts - f.capture_ts for f in live if first <= f.capture_ts <= last]
    return {
        "spooled": spooled,
        "backfilled": len(received),
        "drain_seconds": drained - restarted,
        "backfill_fps": len(received) / max(last - first, 1e-3),
        "live_p95_before": percentile(before, 95),
        "live_p95_during": percentile(during, 95),
        "live_frames_during": len(during),
        "congestion_spooled": metrics.SPOOL_CONGESTION_FRAMES._value.get(),
        "duplicates": len(captures) - len(set(captures)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=1.0, help="video encoded for the spool size")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the gateway is stopped")
    parser.add_argument("--size", default="320x240", help="WxH of the backfill run's synthetic video")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    h264, spooled, seconds = spool_size(args.minutes * 60)
    per_minute = spooled / seconds * 60
    print(f"spool: {per_minute / 1e6:.2f} MB per minute of video at the default 2 Mbit/s "
          f"(H.264 alone {h264 / seconds * 60 / 1e6:.2f} MB: overhead ratio {spooled / h264:.3f}); "
          f"1 GiB default cap = {(1 << 30) / per_minute:.0f} minutes", flush=True)  # fmt: skip
    width, height = (int(v) for v in args.size.split("x"))
    shape = StreamShape(width, height, 30.0)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        result = asyncio.run(backfill(server.url, shape, 5.0, args.outage))
    print(
        f"backfill ({args.size}, {args.outage:g} s outage): {result['spooled']} frames spooled, "
        f"{result['backfilled']} backfilled in {result['drain_seconds']:.1f} s = "
        f"{result['backfill_fps']:.1f} frames/s ({result['backfill_fps'] / shape.fps:.2f}x real time); "
        f"live p95 latency {result['live_p95_during'] * 1000:.0f} ms during the drain "
        f"({result['live_frames_during']} frames) vs {result['live_p95_before'] * 1000:.0f} ms before the "
        f"outage: ratio {result['live_p95_during'] / result['live_p95_before']:.2f}; "
        f"{result['congestion_spooled']:.0f} frames spooled while connected (the link or the machine "
        f"fell behind), {result['duplicates']} duplicated; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
