"""Ingest gateway throughput: concurrent 30 fps H.264 streams through a real gateway (real
sockets, real redis-server, decoder processes), against bare PyAV decoding of the same bytes in
one process.

    python -m bench.gateway                       # the 640x480 detail, then the per-core table
    python -m bench.gateway --streams 12 --seconds 6
    python -m bench.gateway --per-core-only       # only the table at 640x480, 720p30, 1080p30
    python -m bench.gateway --per-core-only --sizes 1080p

The 640x480 detail, in one table:
  * bare decode: frames/s of one PyAV decoder (one thread) on the same access units;
  * saturation: N streams sent as fast as the gateway takes them; frames/s published, the ratio
    per core to bare decode (wall clock), and the CPU seconds per frame of the whole gateway
    (main process + decoder processes, Redis excluded) against bare decode's: the per-core
    efficiency, which does not depend on what else the machine runs;
  * real time: N streams paced at 30 fps; frames sent vs. published (held without loss?);
  * bytes per frame on Redis (JPEG at the model size, and at 640x480 for reference).

The per-core table (`per_core_table`, Markdown, the one in docs/BENCHMARKS.md): for each camera
source (`SOURCES`: size, bitrate, 2 s GOP, BT.709 for HD), ``--saturate`` streams through the whole
gateway; its CPU per frame against bare decoding's (CPU time, before and after), the ratio per core
and the cameras at 30 fps one core carries. A progress bar shows the stages.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Never, cast

import av
import numpy as np
import redis
import redis.asyncio as aioredis
from tqdm import tqdm

from flowcloud import keys
from flowcloud.frames import Frame
from flowcloud.protocol.capture_time import capture_time_extension
from flowcloud.protocol.framing import frame
from flowcloud.protocol.h264 import Packetizer, to_annexb
from flowcloud.protocol.handshake import Hello, StreamInfo, client_handshake
from flowcloud.protocol.tls import client_context
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.registry import DeviceRegistry
from flowcloud.settings import GatewaySettings
from flowcloud.x264 import encode_access_units, libx264_encoder

WIDTH, HEIGHT, FPS = 640, 480, 30


@dataclass(frozen=True)
class Source:
    """A camera's stream for the per-core runs: size, bitrate and a keyframe every ``gop`` frames;
    ``bt709`` labels the colour matrix BT.709 in the VUI, as HD cameras do (the edge's own
    640x480 stream leaves it unspecified)."""

    name: str
    width: int
    height: int
    bitrate: int
    gop: int = 2 * FPS
    bt709: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} ({self.bitrate / 1e6:g} Mbit/s, {self.gop / FPS:g} s GOP)"


# What cameras send: main/high profile at typical bitrates (2-4 Mbit/s at 720p, 4-8 at 1080p).
SOURCES = {
    "640x480": Source("640x480", 640, 480, 2_000_000),
    "720p": Source("720p30", 1280, 720, 3_000_000, bt709=True),
    "1080p": Source("1080p30", 1920, 1080, 6_000_000, bt709=True),
}


def encode(
    frames: int,
    bitrate: int = 2_000_000,
    gop: int = 30,
    width: int = WIDTH,
    height: int = HEIGHT,
    bt709: bool = False,
    progress: Callable[[], object] | None = None,
) -> list[list[bytes]]:
    """NAL units per access unit of a moving scene, libx264 veryfast (high profile, CABAC)
    zerolatency (no B-frames, like the edge and most cameras), one slice per picture. The scene is
    the same at every size (its geometry scales with the picture); ``progress`` is called per frame."""
    params = {"colorprim": "bt709", "transfer": "bt709", "colormatrix": "bt709"} if bt709 else None
    codec = libx264_encoder(
        width,
        height,
        FPS,
        preset="veryfast",
        keyframe_interval=gop,
        bitrate=bitrate,
        threads=1,
        x264_params=params,
    )
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
    half_h, half_w = height * 5 // 48, width * 7 // 64  # a 100x140 box at 640x480

    def scene(i: int) -> np.ndarray:
        img = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, ((xx // 4 + yy // 4) + 5 * i) % 256], axis=-1)
        img = img.astype(np.uint8) + noise
        cx = int(width / 2 + width * 11 / 32 * np.sin(i / 15))
        cy = int(height / 2 + height * 5 / 16 * np.cos(i / 20))
        img[max(0, cy - half_h) : cy + half_h, max(0, cx - half_w) : cx + half_w] = (230, 40, 40)
        if progress is not None:
            progress()
        return img

    return encode_access_units(codec, (scene(i) for i in range(frames)))


def bare_decode_fps(units: list[list[bytes]], repeats: int = 3) -> float:
    """Frames/s of one single-threaded PyAV decoder on these access units (best of ``repeats``)."""
    best = 0.0
    data = [to_annexb(u) for u in units]
    for _ in range(repeats):
        codec = av.CodecContext.create("h264", "r")
        codec.thread_count = 1
        started = time.perf_counter()
        count = 0
        for d in data:
            count += len(codec.decode(av.Packet(d)))
        count += len(codec.decode(None))
        best = max(best, count / (time.perf_counter() - started))
    return best


def bare_decode_cpu_ms(units: list[list[bytes]], repeats: int = 3) -> float:
    """CPU ms per frame of one single-threaded PyAV decoder on these access units (best of
    ``repeats``): the baseline the gateway's CPU per frame is compared with, in the same unit."""
    data = [to_annexb(u) for u in units]
    best = float("inf")
    for _ in range(repeats):
        codec = av.CodecContext.create("h264", "r")
        codec.thread_count = 1
        started = time.process_time()
        count = sum(len(codec.decode(av.Packet(d))) for d in data) + len(codec.decode(None))
        best = min(best, 1000 * (time.process_time() - started) / count)
    return best


# Frames on the stream the pipeline is also measured with: the issue author's options for the 0.7
# goal (smaller frames, or no JPEG), as (height, width, encoding).
STREAM_OPTIONS = ((256, 512, "jpeg"), (192, 384, "jpeg"), (128, 256, "jpeg"), (256, 512, "raw"))


def pipeline_efficiency(
    units: list[list[bytes]], rounds: int = 3, height: int = 256, width: int = 512, encoding: str = "jpeg"
) -> tuple[float, float, float]:
    """(bare CPU ms/frame, decoder-process pipeline CPU ms/frame, ratio), interleaved in this process
    so that both see the same machine load: decode only, against the decoder process's loop
    (decode, resize to ``height`` x ``width``, encode, messages) fed the same access units."""
    from services.gateway import decoder

    config = decoder.DecoderConfig(out_width=width, out_height=height, encoding=encoding, memory_limit_mb=0)
    messages = io.BytesIO()
    decoder._write(messages, decoder.KIND_CONFIG, 0, json.dumps(dataclasses.asdict(config)).encode())
    for tag, nals in enumerate(units):
        decoder._write(messages, decoder.KIND_ACCESS_UNIT, tag, to_annexb(nals))
    bare_ms, pipeline_ms = [], []
    for _ in range(rounds):
        bare_ms.append(bare_decode_cpu_ms(units, repeats=1))
        messages.seek(0)
        started = time.process_time()
        decoder.serve(messages, io.BytesIO())
        pipeline_ms.append(1000 * (time.process_time() - started) / len(units))
    bare, pipeline = statistics.median(bare_ms), statistics.median(pipeline_ms)
    return bare, pipeline, bare / pipeline


def step_costs(units: list[list[bytes]], rounds: int = 3) -> dict[str, float]:
    """CPU ms per frame of each step of the decoder process, alone (medians of ``rounds``): what the
    0.7 goal leaves room for. Also the RGB route the decoder took before (swscale bgr24 + OpenCV's
    libjpeg-turbo), as the baseline for the planes route it takes now."""
    import cv2

    from flowcloud.frames import encode_yuv420_jpeg
    from services.gateway.decoder import DecoderConfig, PictureEncoder, plane_view

    cv2.setNumThreads(1)
    codec = av.CodecContext.create("h264", "r")
    codec.thread_count = 1
    pictures = [p for u in units for p in codec.decode(av.Packet(to_annexb(u)))]
    config = DecoderConfig(out_width=512, out_height=256)
    resized = PictureEncoder(config).scale  # the decoder's own scaling step

    scaled = [resized(p, "yuvj420p") for p in pictures]

    def scale() -> None:
        for p in pictures:
            resized(p, "yuvj420p")

    def jpeg() -> None:
        for s in scaled:
            y, u, v = (plane_view(plane) for plane in s.planes)
            encode_yuv420_jpeg(y, u, v)

    def planes_route() -> None:
        encoder = PictureEncoder(config)
        for p in pictures:
            encoder.encode(p)

    def rgb_route() -> None:
        for p in pictures:
            bgr = resized(p, "bgr24").to_ndarray()
            cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])

    def cost(step: Callable[[], None]) -> float:
        times = []
        for _ in range(rounds):
            started = time.process_time()
            step()
            times.append(1000 * (time.process_time() - started) / len(pictures))
        return statistics.median(times)

    return {
        "decode": 1000 / bare_decode_fps(units, repeats=rounds),
        "scale to 512x256 yuvj420p": cost(scale),
        "JPEG q90 from the planes": cost(jpeg),
        "scale + JPEG, planes route (now)": cost(planes_route),
        "scale + JPEG, RGB route (before)": cost(rgb_route),
    }


def packets_of(units: list[list[bytes]], t0: float) -> list[bytes]:
    packetizer = Packetizer(mtu=1200)
    out: list[bytes] = []
    for i, nals in enumerate(units):
        ts = packetizer.timestamp_of(i / FPS)
        out.extend(
            frame(bytes(p)) for p in packetizer.packetize(nals, ts, capture_time_extension(t0 + i / FPS))
        )
    return out


def _is_marker(framed: bytes) -> bool:
    return len(framed) > 3 and bool(framed[3] & 0x80)


async def _stream(
    port: int,
    device: str,
    token: str,
    packets: list[bytes],
    paced: bool,
    ca: str | None,
    size: tuple[int, int],
) -> float:
    """Send one stream; the seconds its sending took (at 30 fps: the video's length, if kept up).
    With ``ca`` (the gateway's self-signed certificate) the connection is TLS, verified against it."""
    tls = client_context(ca) if ca else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    await client_handshake(reader, writer, Hello(device, token, StreamInfo(*size, FPS)), timeout=10)
    started = time.monotonic()
    units = 0
    for p in packets:
        writer.write(p)
        if _is_marker(p):
            units += 1
            if paced:
                await writer.drain()
                await asyncio.sleep(max(0.0, started + units / FPS - time.monotonic()))
            elif units % 8 == 0:
                await writer.drain()
    await writer.drain()
    writer.close()
    return time.monotonic() - started


def _send_all(
    port: int,
    tokens: list[str],
    packets: list[bytes],
    paced: bool,
    ca: str | None,
    size: tuple[int, int],
    out: Queue[float],
) -> None:
    """The edges, in their own process so that the gateway is measured alone."""

    async def main() -> list[float]:
        return list(
            await asyncio.gather(
                *(_stream(port, f"bench-{i}", t, packets, paced, ca, size) for i, t in enumerate(tokens))
            )
        )

    out.put(max(asyncio.run(main())))


@dataclass
class RunResult:
    streams: int
    frames_sent: int
    frames_published: int
    wall_s: float
    window_s: float  # the steady-state window CPU was measured over
    window_frames: int
    cpu_s: float
    main_cpu_s: float  # of cpu_s, the gateway's own process (sessions, publisher)
    redis_cpu_s: float  # redis-server over the same window (not part of cpu_s)
    dropped: dict[str, float]
    bytes_per_frame: float
    per_stream_min: int
    sending_s: float  # how long the slowest edge took to send its stream
    publishes: int  # pipelined publishes (batches) the run took

    @property
    def frames_per_publish(self) -> float:
        return self.frames_published / max(1, self.publishes)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_signed(directory: Path) -> tuple[str, str]:
    """(certificate, key) PEM files for 127.0.0.1, made with the openssl command (EC P-256)."""
    cert, key = directory / "gateway.pem", directory / "gateway.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def run_gateway(
    redis_url: str,
    n: int,
    units: list[list[bytes]],
    paced: bool,
    model_size: str = "256x512",
    tls: tuple[str, str] | None = None,
    size: tuple[int, int] = (WIDTH, HEIGHT),
    redis_pid: int | None = None,
) -> RunResult:
    from prometheus_client import REGISTRY

    from services.gateway.server import Gateway

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    aclient = aioredis.Redis.from_url(redis_url)
    registry = DeviceRegistry(aclient)
    tokens = [(await registry.add(f"bench-{i}"))[1] for i in range(n)]
    await aclient.aclose()
    settings = GatewaySettings(
        redis_url=redis_url,
        port=0,
        metrics_port=0,
        model_size=model_size,
        frames_maxlen=100_000,
        stream_frames_maxlen=100_000,  # every frame stays in its log, to be counted
        decoder_backlog=100_000 if not paced else 60,
        max_frames_per_second=1000,
        max_bytes_per_second=10**9,
        publish_queue=100_000,
        decoder_spares=min(n, 8),
        tls_cert_file=tls[0] if tls else None,
        tls_key_file=tls[1] if tls else None,
    )
    t0 = time.time()
    all_packets = packets_of(units, t0)

    def drops() -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in REGISTRY.collect():
            if metric.name == "flowcloud_gateway_frames_dropped":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        out[sample.labels["reason"]] = sample.value
        return out

    def publishes() -> float:
        return REGISTRY.get_sample_value("flowcloud_gateway_publish_seconds_count") or 0.0  # no labels

    before = drops()
    publishes_before = publishes()
    expected = n * len(units)
    async with Gateway(settings).listen(port=0) as gw:
        await asyncio.sleep(1.0)  # spare decoders started
        started = time.monotonic()
        context = multiprocessing.get_context("spawn")
        send_time: Queue[float] = context.Queue()
        ca = tls[0] if tls else None  # self-signed: the certificate is its own CA
        edges = context.Process(
            target=_send_all, args=(gw.port, tokens, all_packets, paced, ca, size, send_time)
        )
        edges.start()
        # Measure the steady state: from every stream publishing to 90% of the frames published
        # (decoder start-up, an interpreter per session, is not decoding work).
        # In-memory progress only: polling Redis here would load the process being measured.
        while any(gw.publisher.last_seq(f"bench-{i}") == 0 for i in range(n)):
            await asyncio.sleep(0.01)
        pids = [os.getpid()] + [s.decoder_pid for s in gw.sessions.values() if s.decoder_pid]
        window_start, cpu_start = time.monotonic(), sum(_proc_cpu(p) for p in pids)
        main_start = _proc_cpu(os.getpid())
        redis_start = _proc_cpu(redis_pid) if redis_pid else 0.0
        published_start = gw.publisher.published
        while gw.publisher.published < 0.9 * expected and time.monotonic() - started < 120:
            if not paced and gw.services.ended.total() >= n:
                break
            await asyncio.sleep(0.01)
        window = time.monotonic() - window_start
        cpu = sum(_proc_cpu(p) for p in pids) - cpu_start
        main_cpu = _proc_cpu(os.getpid()) - main_start
        redis_cpu = _proc_cpu(redis_pid) - redis_start if redis_pid else 0.0
        window_frames = gw.publisher.published - published_start
        while time.monotonic() - started < 120 and gw.services.ended.total() < n:
            await asyncio.sleep(0.02)
        wall = time.monotonic() - started
        sending = await asyncio.to_thread(send_time.get, True, 60)
        edges.join(10)
    entries = [
        entry
        for i in range(n)
        for entry in cast(
            list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.stream_frames(f"bench-{i}"))
        )
    ]
    frames = [Frame.from_fields(f) for _, f in entries]
    sizes = [sum(len(k) + len(v) for k, v in fields.items()) for _, fields in entries]
    per_stream = [sum(1 for f in frames if f.stream == f"bench-{i}") for i in range(n)]
    after = drops()
    client.close()
    return RunResult(
        streams=n,
        frames_sent=expected,
        frames_published=len(frames),
        wall_s=wall,
        window_s=window,
        window_frames=window_frames,
        cpu_s=cpu,
        main_cpu_s=main_cpu,
        redis_cpu_s=redis_cpu,
        dropped={k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0},
        bytes_per_frame=statistics.fmean(sizes) if sizes else 0.0,
        per_stream_min=min(per_stream),
        sending_s=sending,
        publishes=int(publishes() - publishes_before),
    )


@dataclass
class PerCore:
    """One source through the whole gateway, saturated, against bare decoding of the same bytes."""

    source: Source
    kb_per_frame: float
    bare_ms: tuple[float, float]  # bare decode CPU ms per frame, before and after the gateway run
    run: RunResult
    pipeline: tuple[float, float]  # (bare, decoder child loop) CPU ms per frame, interleaved
    encode_ms: float  # the child's scale + JPEG alone, on the route this source's pictures take

    @property
    def bare(self) -> float:
        return statistics.fmean(self.bare_ms)

    @property
    def whole_ms(self) -> float:
        """CPU ms per frame of the gateway process and its decoders (redis-server not included)."""
        return 1000 * self.run.cpu_s / max(1, self.run.window_frames)

    @property
    def main_ms(self) -> float:
        return 1000 * self.run.main_cpu_s / max(1, self.run.window_frames)

    @property
    def redis_ms(self) -> float:
        return 1000 * self.run.redis_cpu_s / max(1, self.run.window_frames)

    @property
    def ratio(self) -> float:
        return self.bare / self.whole_ms


PER_CORE_STAGES = 4  # bare decode, the gateway run, bare decode again, the decoder's steps


def picture_encode_ms(units: list[list[bytes]], pictures: int = 60) -> float:
    """CPU ms per picture of the decoder child's scale + JPEG (`PictureEncoder`) at the default
    model size, on the first ``pictures`` decoded pictures: the route (planes or RGB) is the one the
    gateway takes for them."""
    from services.gateway.decoder import DecoderConfig, PictureEncoder

    codec = av.CodecContext.create("h264", "r")
    codec.thread_count = 1
    decoded: list[av.VideoFrame] = []
    for u in units:
        decoded += codec.decode(av.Packet(to_annexb(u)))
        if len(decoded) >= pictures:
            break
    encoder = PictureEncoder(DecoderConfig(out_width=512, out_height=256))
    times = []
    for _ in range(3):
        started = time.process_time()
        for picture in decoded:
            encoder.encode(picture)
        times.append(1000 * (time.process_time() - started) / len(decoded))
    return min(times)


def per_core(
    source: Source, frames: int, streams: int, redis_url: str, redis_pid: int, bar: tqdm[Never]
) -> PerCore:
    """Encode ``frames`` of ``source``, then: bare decode, ``streams`` copies through the whole
    gateway as fast as it takes them, bare decode again (the machine may be shared), the decoder
    child's loop interleaved with bare decoding, and its scale + JPEG alone."""
    bar.set_description(f"{source.name}: encoding")
    units = encode(
        frames,
        source.bitrate,
        source.gop,
        source.width,
        source.height,
        source.bt709,
        progress=lambda: bar.update(),
    )
    kb = sum(len(n) for u in units for n in u) / len(units) / 1024
    bar.set_description(f"{source.name}: bare decode")
    before = bare_decode_cpu_ms(units)
    bar.update()
    bar.set_description(f"{source.name}: {streams} streams through the gateway")
    size = (source.width, source.height)
    run = asyncio.run(run_gateway(redis_url, streams, units, paced=False, size=size, redis_pid=redis_pid))
    bar.update()
    bar.set_description(f"{source.name}: bare decode again")
    after = bare_decode_cpu_ms(units)
    bar.update()
    bar.set_description(f"{source.name}: decoder steps")
    head = units[: 2 * source.gop]  # two GOPs keep the interleaved rounds short at 1080p
    pipeline_bare, pipeline_ms, _ = pipeline_efficiency(head)
    encode_ms = picture_encode_ms(head)
    bar.update()
    return PerCore(source, kb, (before, after), run, (pipeline_bare, pipeline_ms), encode_ms)


def per_core_table(sources: list[Source], seconds: float, streams: int) -> list[PerCore]:
    """The whole gateway's CPU per frame at each source size against bare PyAV decoding, printed as
    a Markdown table (the one in docs/BENCHMARKS.md)."""
    frames = int(seconds * FPS)
    results = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server,
        tqdm(total=len(sources) * (frames + PER_CORE_STAGES), unit="step") as bar,
    ):
        assert server.process is not None
        for source in sources:
            results.append(per_core(source, frames, streams, server.url, server.process.pid, bar))
    load = os.getloadavg()
    print(f"\nper core, {streams} streams of {seconds:g} s each as fast as the gateway takes them; ", end="")
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end")
    print(
        "| source | KB/frame | bare decode ms/frame (fps per core) | decoder child ms/frame (ratio) "
        "| gateway process ms/frame | whole gateway ms/frame (fps per core) | **ratio per core** "
        "| cameras at 30 fps per core | published (frames per publish) | KB per frame on Redis "
        "| redis-server ms/frame |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        pipeline_bare, pipeline_ms = r.pipeline
        print(
            f"| {r.source.label} | {r.kb_per_frame:.1f} "
            f"| {r.bare:.2f} ({1000 / r.bare:.0f}; before {r.bare_ms[0]:.2f}, after {r.bare_ms[1]:.2f}) "
            f"| {pipeline_ms:.2f} ({pipeline_bare / pipeline_ms:.2f}; scale + JPEG {r.encode_ms:.2f}) "
            f"| {r.main_ms:.2f} | {r.whole_ms:.2f} ({1000 / r.whole_ms:.0f}) | **{r.ratio:.2f}** "
            f"| {1000 / r.whole_ms / FPS:.1f} | {r.run.frames_published}/{r.run.frames_sent} "
            f"({r.run.frames_per_publish:.1f}) | {r.run.bytes_per_frame / 1024:.1f} "
            f"| {r.redis_ms:.2f} |"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=8, help="real-time streams (default 8)")
    parser.add_argument("--saturate", type=int, default=4, help="streams in the saturation run (default 4)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each stream (default 8 s)")
    parser.add_argument(
        "--tls", action="store_true", help="also run the saturation and real-time runs over TLS, and compare"
    )
    parser.add_argument(
        "--sizes",
        default=",".join(SOURCES),
        help=f"sources of the per-core table, of {', '.join(SOURCES)} (default all; 'none' skips the table)",
    )
    parser.add_argument(
        "--per-core-only", action="store_true", help="only the per-core table (skip the 640x480 detail)"
    )
    args = parser.parse_args()
    sources = [] if args.sizes == "none" else [SOURCES[name] for name in args.sizes.split(",")]
    if not args.per_core_only:
        detail(args)
    if sources:
        per_core_table(sources, args.seconds, args.saturate)


def detail(args: argparse.Namespace) -> None:
    """The 640x480 tables: saturation, real time, TLS, the decoder's steps and the frame options."""
    cores = len(os.sched_getaffinity(0))
    frames = int(args.seconds * FPS)
    print(f"encoding {frames} frames of 640x480 H.264 (libx264 veryfast zerolatency, 2 Mb/s) ...", flush=True)
    units = encode(frames)
    kb_per_frame = sum(len(n) for u in units for n in u) / len(units) / 1024
    bare = bare_decode_fps(units)
    bare_cpu_per_frame = 1.0 / bare
    print(
        f"bare PyAV decode: {bare:.0f} frames/s on one core ({kb_per_frame:.1f} KB of H.264 per frame)",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        sat = asyncio.run(run_gateway(server.url, args.saturate, units, paced=False))
        rt = asyncio.run(run_gateway(server.url, args.streams, units, paced=True))
        full = asyncio.run(run_gateway(server.url, 1, units[: 2 * FPS], paced=True, model_size="480x640"))
        if args.tls:
            pem = self_signed(Path(tmp))
            sat_tls = asyncio.run(run_gateway(server.url, args.saturate, units, paced=False, tls=pem))
            rt_tls = asyncio.run(run_gateway(server.url, args.streams, units, paced=True, tls=pem))
    eff_bare, eff_pipeline, eff = pipeline_efficiency(units)
    options = {STREAM_OPTIONS[0]: (eff_bare, eff_pipeline, eff)}  # the frames of the runs above
    options.update((option, pipeline_efficiency(units, 1, *option)) for option in STREAM_OPTIONS[1:])
    steps = step_costs(units)
    # The machine may be shared: decode again and compare against the mean of before and after.
    bare_after = bare_decode_fps(units)
    print(f"bare PyAV decode after the runs: {bare_after:.0f} frames/s", flush=True)
    bare = (bare + bare_after) / 2
    bare_cpu_per_frame = 1.0 / bare

    sat_fps = sat.window_frames / sat.window_s
    sat_cpu = sat.cpu_s / max(1, sat.window_frames)
    rt_cpu = rt.cpu_s / max(1, rt.window_frames)
    sat_main = sat.main_cpu_s / max(1, sat.window_frames)
    kept_pace = rt.sending_s < args.seconds + 0.5
    held = "yes" if rt.frames_published == rt.frames_sent and kept_pace else f"no: dropped {rt.dropped}"
    rows = [
        ("machine", f"{cores} cores, {os.uname().machine}, no GPU, load average {os.getloadavg()[0]:.1f}"),
        (
            "bare PyAV decode, 1 process, 1 thread (mean)",
            f"{bare:.0f} frames/s ({1000 / bare:.2f} ms CPU/frame)",
        ),
        (f"gateway saturated, {sat.streams} streams", f"{sat_fps:.0f} frames/s published"),
        ("  frames published", f"{sat.frames_published}/{sat.frames_sent}"),
        ("  ratio per core (wall clock)", f"{sat_fps / cores / bare:.2f}"),
        ("  CPU per frame: gateway + decoders", f"{1000 * sat_cpu:.2f} ms"),
        ("    of which the gateway process", f"{1000 * sat_main:.2f} ms"),
        ("    of which the decoder processes", f"{1000 * (sat_cpu - sat_main):.2f} ms"),
        ("  efficiency per core (bare CPU / gateway CPU)", f"{bare_cpu_per_frame / sat_cpu:.2f}"),
        (
            "decoder pipeline vs bare decode, interleaved",
            f"{eff_pipeline:.2f} vs {eff_bare:.2f} ms CPU/frame",
        ),
        ("  efficiency per core (load-independent)", f"{eff:.2f}"),
        (
            f"real time, {rt.streams} x 30 fps for {args.seconds:g} s",
            f"{rt.frames_published}/{rt.frames_sent}",
        ),
        ("  fewest frames of one stream", f"{rt.per_stream_min}"),
        ("  slowest edge's sending time", f"{rt.sending_s:.2f} s for {args.seconds:g} s of video"),
        ("  held without loss", held),
        ("  CPU load (steady state)", f"{rt.cpu_s / rt.window_s:.2f} cores, {1000 * rt_cpu:.2f} ms/frame"),
        ("bytes per frame on Redis (JPEG q90 256x512)", f"{sat.bytes_per_frame / 1024:.1f} KB"),
        ("bytes per frame on Redis (JPEG q90 480x640)", f"{full.bytes_per_frame / 1024:.1f} KB"),
    ]
    if args.tls:
        tls_main = sat_tls.main_cpu_s / max(1, sat_tls.window_frames)
        tls_cpu = sat_tls.cpu_s / max(1, sat_tls.window_frames)
        rows += [
            (f"TLS: {sat_tls.streams} streams as fast as they go", f"{sat_tls.frames_published} published"),
            ("  gateway process CPU/frame, TLS vs plain", f"{1e3 * tls_main:.2f} vs {1e3 * sat_main:.2f} ms"),
            ("  with decoders CPU/frame, TLS vs plain", f"{1e3 * tls_cpu:.2f} vs {1e3 * sat_cpu:.2f} ms"),
            (f"TLS: real time, {rt_tls.streams} x 30 fps", f"{rt_tls.frames_published}/{rt_tls.frames_sent}"),
            ("  slowest edge's sending time", f"{rt_tls.sending_s:.2f} s for {args.seconds:g} s of video"),
        ]
    rows.append(("decoder steps alone, CPU ms per frame", ""))
    rows.extend((f"  {name}", f"{ms:.2f} ms") for name, ms in steps.items())
    speedup = steps["scale + JPEG, RGB route (before)"] / steps["scale + JPEG, planes route (now)"]
    rows.append(("  planes route vs RGB route", f"{speedup:.2f}x faster"))
    budget = steps["decode"] / 0.7 - steps["decode"]
    rows.append(("  room the 0.7 goal leaves beside decoding", f"{budget:.2f} ms"))
    rows.append(("frames on the stream: pipeline / whole gateway (estimated) per core", ""))
    for (height, width, encoding), (option_bare, option_ms, option_eff) in options.items():
        # The whole gateway adds the gateway process's CPU per frame (measured above, saturated).
        whole = option_bare / (option_ms + 1000 * sat_main)
        rows.append((f"  {height}x{width} {encoding}", f"{option_eff:.2f} / {whole:.2f}"))
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if sat.dropped:
        print(f"saturation drops: {sat.dropped}")


if __name__ == "__main__":
    main()
