"""Helpers for the gateway tests: real H.264 (libx264 through PyAV, and GStreamer's
``rtph264pay ! rtpstreampay``), a test edge client that performs the real handshake with the
protocol module, registered devices, the gateway's metrics, and a good stream beside a bad one."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from edge.daemon import DaemonResult
from flowcloud.protocol.capture_time import capture_time_extension
from flowcloud.protocol.framing import Rfc4571Decoder, frame, read_frame
from flowcloud.protocol.h264 import Packetizer
from flowcloud.protocol.handshake import Accept, ClockSync, Hello, Reject, StreamInfo, client_handshake
from flowcloud.protocol.rtp import RtpPacket
from flowcloud.registry import DeviceRegistry
from flowcloud.settings import GatewaySettings
from flowcloud.x264 import encode_access_units, libx264_encoder
from services.gateway.server import Gateway
from support.frames import frames_on_redis
from support.waiting import eventually

MODEL_H, MODEL_W = 64, 96
FPS = 30.0


def gateway_settings(redis_url: str, **overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "model_size": f"{MODEL_H}x{MODEL_W}",
        "handshake_timeout": 2.0,
        "decoder_spares": 1,
        "drain_timeout": 5.0,
        "decoder_backlog": 600,  # the shared 2-core test machine can be far behind; no real-time drops here
    }
    base.update(overrides)
    return GatewaySettings(**base)


def libx264_access_units(
    frames: int, width: int = 320, height: int = 240, gop: int = 15
) -> list[list[bytes]]:
    """NAL units of each access unit of a real libx264 zerolatency stream with moving content."""
    codec = libx264_encoder(width, height, 30, keyframe_interval=gop, threads=1)
    yy, xx = np.mgrid[0:height, 0:width]
    pictures = (
        np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + 8 * i) % 256], axis=-1).astype(
            np.uint8
        )
        for i in range(frames)
    )
    return encode_access_units(codec, pictures)


def rtp_packets(
    access_units: list[list[bytes]],
    t0: float,
    fps: float = FPS,
    mtu: int = 1200,
    sent: Callable[[int], float] | None = None,
) -> list[bytes]:
    """RTP packets of the access units, each with its capture time t0 + i / fps (and, given ``sent``,
    the send time ``sent(i)``: the edge's, as `edge.sender` stamps it)."""
    packetizer = Packetizer(mtu=mtu)
    out: list[bytes] = []
    for i, nals in enumerate(access_units):
        capture = t0 + i / fps
        ts = packetizer.timestamp_of(i / fps)
        extensions = capture_time_extension(capture, sent=None if sent is None else sent(i))
        out.extend(bytes(p) for p in packetizer.packetize(nals, ts, extensions))
    return out


GST_ZEROLATENCY = "x264enc tune=zerolatency key-int-max=15 speed-preset=ultrafast"
# Two B-frames between references: the decoder holds pictures back to reorder them. x264enc makes
# none at 10-bit 4:4:4 (what it would pick), with ultrafast, or in the baseline profile (what
# rtph264pay would ask for).
GST_BFRAMES = (
    "videoconvert ! video/x-raw,format=I420 ! "
    "x264enc bframes=2 b-adapt=false key-int-max=15 speed-preset=superfast ! video/x-h264,profile=main"
)


def gst_capture(
    path: Path, frames: int, width: int = 320, height: int = 240, encoder: str = GST_ZEROLATENCY
) -> bytes:
    """RFC 4571 bytes written by GStreamer (x264enc ! rtph264pay ! rtpstreampay), made once per path."""
    if not path.exists():
        pipeline = (
            f"videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width={width},height={height},"
            f"framerate=30/1 ! {encoder} ! "
            f"rtph264pay config-interval=1 mtu=1000 ! rtpstreampay ! filesink location={path}"
        )
        subprocess.run(
            ["gst-launch-1.0", "-q", *pipeline.split()], check=True, timeout=60, capture_output=True
        )
    return path.read_bytes()


def with_capture_times(rfc4571: bytes, t0: float, fps: float = FPS) -> list[bytes]:
    """GStreamer's packets, each access unit's first packet given the capture-time extension."""
    packets = [RtpPacket.parse(p) for p in Rfc4571Decoder().feed(rfc4571)]
    out: list[bytes] = []
    first_ts = packets[0].timestamp
    previous_ts: int | None = None
    for p in packets:
        if p.timestamp != previous_ts:
            seconds = ((p.timestamp - first_ts) % (1 << 32)) / 90_000
            p.extensions = {**p.extensions, **capture_time_extension(t0 + seconds)}
            previous_ts = p.timestamp
        out.append(bytes(p))
    return out


async def register(redis_url: str, device_id: str, tenant: str = "acme") -> str:
    client = aioredis.Redis.from_url(redis_url)
    try:
        _, token = await DeviceRegistry(client).add(device_id, tenant)
    finally:
        await client.aclose()
    return token


@dataclass
class Edge:
    """A test edge: a real TCP connection that did the real handshake."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    accept: Accept
    clock: ClockSync

    async def send(self, packets: Iterable[bytes], fps: float = 2 * FPS) -> None:
        """Send packets, pacing access units (marker bit) at ``fps`` (0: as fast as possible)."""
        start = time.monotonic()
        units = 0
        for packet in packets:
            self.writer.write(frame(packet))
            if fps and len(packet) >= 2 and packet[1] & 0x80:
                units += 1
                await self.writer.drain()
                await asyncio.sleep(max(0.0, start + units / fps - time.monotonic()))
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def closed_by_gateway(self, timeout: float) -> bool:
        """True when the gateway closes the connection within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(4096):
                    pass
            return True
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True


def published_offset(edge: Edge, gateway: Gateway) -> float:
    """Edge clock -> the clock frames are published on: the handshake's offset (edge to gateway),
    then the gateway's offset to Redis's clock (`flowcloud.clock`)."""
    return edge.clock.offset + gateway.publisher.clock.offset


async def connect(
    port: int, device_id: str, token: str, width: int = 320, height: int = 240, fps: float = FPS
) -> Edge:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = Hello(device_id, token, StreamInfo(width, height, fps))
    accept, clock = await client_handshake(reader, writer, hello, timeout=5.0)
    return Edge(reader, writer, accept, clock)


async def raw_hello(
    port: int, device_id: str, token: str, **stream: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    info = StreamInfo(stream.get("width", 320), stream.get("height", 240), stream.get("fps", FPS))
    writer.write(frame(Hello(device_id, token, info, edge_time=time.time()).to_bytes()))
    await writer.drain()
    return reader, writer


async def read_reject(reader: asyncio.StreamReader, timeout: float = 5.0) -> Reject:
    async with asyncio.timeout(timeout):
        return Reject.parse(await read_frame(reader, 4096))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dropped(reason: str) -> float:
    return metric("flowcloud_gateway_frames_dropped_total", reason=reason)


def all_drops() -> float:
    """Frames dropped so far, every reason together."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "flowcloud_gateway_frames_dropped"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def session_ended(gateway: Any, device_id: str, count: int = 1, timeout: float = 10.0) -> bool:
    """Wait until ``count`` sessions of the device have ended on the gateway."""
    return await eventually(lambda: gateway.services.ended[device_id] >= count, timeout)


GOOD_FRAMES = 45
GOOD_T0 = 1_764_000_000.0


@cache
def good_units() -> list[list[bytes]]:
    return libx264_access_units(GOOD_FRAMES)


def run_beside_good_stream(
    redis_url: str, bad: Callable[[Gateway], Awaitable[None]], **settings: Any
) -> None:
    """Run ``bad`` while a good device streams 45 frames on the same gateway; check it lost none."""

    async def main() -> None:
        token = await register(redis_url, "good")
        packets = rtp_packets(good_units(), GOOD_T0)
        async with Gateway(gateway_settings(redis_url, **settings)).listen(port=0) as gw:
            edge = await connect(gw.port, "good", token)

            async def good() -> None:
                await edge.send(packets, fps=FPS)
                assert await eventually(lambda: len(frames_on_redis(redis_url, "good")) >= GOOD_FRAMES, 20)
                await edge.close()

            await asyncio.gather(good(), bad(gw))
            offset = published_offset(edge, gw)
        frames = frames_on_redis(redis_url, "good")
        assert [f.seq for f in frames] == list(range(1, GOOD_FRAMES + 1))
        for i, f in enumerate(frames):
            assert f.capture_ts == pytest.approx(GOOD_T0 + i / FPS + offset, abs=2e-6)

    asyncio.run(main())


async def check_stream(
    redis_url: str, gateway: Gateway, device_id: str, result: DaemonResult, frames: int
) -> None:
    """The edge's whole run arrived: every frame it sent
    published in order at the model size, capture times rising, in one session that has ended."""
    assert (result.captured, result.sent, result.sessions) == (frames, frames, 1)
    assert await eventually(lambda: len(frames_on_redis(redis_url, device_id)) >= frames, 20)
    assert await session_ended(gateway, device_id)
    published = frames_on_redis(redis_url, device_id)
    assert [f.seq for f in published] == list(range(1, frames + 1))
    captured = [f.capture_ts for f in published]
    assert captured == sorted(captured) and len(set(captured)) == frames
    assert {(f.width, f.height) for f in published} == {(MODEL_W, MODEL_H)}
    for f in published:  # every hand-over stamped, in order (one machine: the offset error is small)
        assert f.sent_ts is not None and f.decoded_ts is not None and f.published_ts is not None
        assert f.capture_ts <= f.sent_ts <= f.recv_ts + 0.01 <= f.decoded_ts + 0.01 <= f.published_ts + 0.01
    assert gateway.services.ended[device_id] == 1
