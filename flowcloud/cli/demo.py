"""`flowcloud demo`: the whole pipeline on one machine, on the synthetic street video.

It starts the local stack (`flowcloud up`), registers a demo device, streams the synthetic
street scenes from a local edge daemon, and prints the dashboard URL, an API key and a live
summary: frames sent and segmented, latency p50/p95, and mIoU against the generator's exact
ground truth (H.264 compression, JPEG on the stream and resizing included).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis as AsyncRedis

from flowcloud import keys, tokens
from flowcloud.cli.errors import CommandError
from flowcloud.cli.up import add_stack_arguments, stack_config, start_stack
from flowcloud.frames import Frame
from flowcloud.labels import get_label_set
from flowcloud.redis_server import free_port
from flowcloud.registry import DeviceRegistry
from flowcloud.results import META_FIELD, MaskResult, decode_label_map
from flowcloud.settings import ServiceSettings
from flowcloud.stack import Service, Stack
from flowcloud.streams import StreamMeta

DEMO_DEVICE = "demo-cam"
DEMO_TENANT = "demo"
RENDER_CACHE = 96  # rendered scenes kept (a scoring pass asks for about 24 frames ± the window)
ALIGN_WINDOW = 3  # frames either side of the expected index searched when matching a frame to the scene


def configure(parser: argparse.ArgumentParser) -> None:
    add_stack_arguments(parser)
    parser.add_argument("--duration", type=float, help="stop after S seconds with a final summary")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the synthetic camera")
    parser.add_argument("--width", type=int, default=640, help="synthetic camera width")
    parser.add_argument("--height", type=int, default=480, help="synthetic camera height")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between summary lines")
    parser.add_argument("--json", action="store_true", help="print the final summary as JSON")


async def register_demo_device(redis_url: str, device_id: str = DEMO_DEVICE) -> str:
    """Register the demo device (or rotate its token when it exists) and return its token."""
    client = AsyncRedis.from_url(redis_url)
    try:
        registry = DeviceRegistry(client)
        if await registry.get(device_id) is None:
            _, token = await registry.add(device_id, DEMO_TENANT)
        else:
            _, token = await registry.rotate(device_id)
        return token
    finally:
        await client.aclose()


def last_seq(client: redis.Redis, stream: str) -> int:
    meta = StreamMeta.from_fields(cast(dict[bytes, bytes], client.hgetall(keys.stream_meta(stream))))
    return meta.last_seq or 0


@dataclass
class Summary:
    sent: int
    published: int
    segmented: int
    latency_p50: float | None
    latency_p95: float | None
    miou: float | None
    pixel_accuracy: float | None
    scored_frames: int

    def line(self) -> str:
        def ms(value: float | None) -> str:
            return f"{value * 1000:.0f} ms" if value is not None else "-"

        miou = f"{self.miou:.3f}" if self.miou is not None else "-"
        return (
            f"sent {self.sent:5d}  published {self.published:5d}  segmented {self.segmented:5d}  "
            f"latency p50 {ms(self.latency_p50)}  p95 {ms(self.latency_p95)}  "
            f"mIoU {miou} ({self.scored_frames} frames)"
        )


class SceneOracle:
    """The synthetic camera's exact ground truth, matched to frames that went through the pipeline.

    Frames may be dropped on the way (by design, under overload), so a frame's scene index is not
    simply its seq: it is found by comparing the frame with the rendered scenes near the expected
    index, and the offset found is kept for the next frame.
    """

    def __init__(self, width: int, height: int) -> None:
        from edge.sources import SYNTHETIC_SEED
        from training.synth import SceneSequence

        self.scenes = SceneSequence(SYNTHETIC_SEED, width, height)
        self.offset = 0
        # Bounded: a demo may run for hours, and only scenes near the newest frames are asked for.
        self._render = functools.lru_cache(maxsize=RENDER_CACHE)(self.scenes.frame)

    def ground_truth(self, frame_rgb: np.ndarray, expected_index: int) -> np.ndarray:
        """The labelId map of the scene that ``frame_rgb`` shows, at the frame's size."""
        size = (frame_rgb.shape[1], frame_rgb.shape[0])
        small = cv2.resize(frame_rgb, (64, 48), interpolation=cv2.INTER_AREA).astype(np.float32)
        best, best_error = expected_index + self.offset, float("inf")
        low = max(0, expected_index + self.offset - ALIGN_WINDOW)
        for index in range(low, expected_index + self.offset + ALIGN_WINDOW + 1):
            rendered = cv2.resize(self._render(index)[0], (64, 48), interpolation=cv2.INTER_AREA)
            error = float(np.abs(rendered.astype(np.float32) - small).mean())
            if error < best_error:
                best, best_error = index, error
        self.offset = best - expected_index
        return cv2.resize(self._render(best)[1], size, interpolation=cv2.INTER_NEAREST)


def recent_frames(client: redis.Redis, stream: str, after_seq: int) -> dict[int, Frame]:
    """The frames still in the stream's recent window, by seq, newer than ``after_seq``."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.recent_frames(stream)))
    frames = (Frame.from_fields(fields) for _, fields in entries)
    return {frame.seq: frame for frame in frames if frame.seq > after_seq}


def score_masks(
    frames: dict[int, Frame], masks: dict[int, MaskResult], base_seq: int, oracle: SceneOracle
) -> tuple[float | None, float | None, int]:
    """mIoU and pixel accuracy of masks against the scenes their frames show (frames matched by seq).

    Scored in the model's own label set: classes it cannot predict are ignored.
    """
    from training.metrics import ConfusionMatrix

    matrix: ConfusionMatrix | None = None
    scored = 0
    for seq in sorted(frames.keys() & masks.keys()):
        result = masks[seq]
        label_set = get_label_set(result.label_set)
        predicted = decode_label_map(result.labels_png)
        truth = oracle.ground_truth(frames[seq].image(), seq - base_seq - 1)
        matrix = matrix or ConfusionMatrix(label_set.num_classes)
        matrix.update(label_set.from_label_ids(truth), predicted)
        scored += 1
    if matrix is None:
        return None, None, 0
    scores = matrix.scores()
    return scores.mean_iou, scores.pixel_accuracy, scored


def score_stream(
    client: redis.Redis, stream: str, base_seq: int, oracle: SceneOracle, max_frames: int = 24
) -> tuple[float | None, float | None, int]:
    """Score the newest masks whose frames are still in the recent window."""
    frames = recent_frames(client, stream, base_seq)
    masks = {}
    for seq in sorted(frames)[-max_frames:]:
        blob = cast(dict[bytes, bytes], client.hgetall(keys.mask(stream, seq)))
        if blob:  # else not segmented (yet, or dropped as stale)
            masks[seq] = MaskResult.from_fields(blob)
    return score_masks(frames, masks, base_seq, oracle)


def latencies(client: redis.Redis, stream: str, base_seq: int, count: int = 200) -> list[float]:
    seqs = cast(
        list[bytes],
        client.zrevrangebyscore(keys.mask_index(stream), "+inf", f"({base_seq}", start=0, num=count),
    )
    pipe = client.pipeline(transaction=False)
    for seq in seqs:
        pipe.hget(keys.mask(stream, int(seq)), META_FIELD)
    return [MaskResult.from_fields({META_FIELD.encode(): meta}).latency for meta in pipe.execute() if meta]


def edge_final_summary(edge: Service) -> dict[str, Any] | None:
    """The JSON summary the edge prints when it ends (the last line of its log)."""
    assert edge.log_path is not None
    lines = edge.log_path.read_text(errors="replace").strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return summary if isinstance(summary, dict) else None


def edge_frames_sent(metrics_port: int) -> int | None:
    """Frames the edge has sent, from its metrics; None when it does not answer (ending)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3.0) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "flowcloud_edge_frames_sent":
            return int(sum(sample.value for sample in family.samples if sample.name.endswith("_total")))
    return 0


def segmented_count(client: redis.Redis, stream: str, base_seq: int) -> int:
    return int(cast(int, client.zcount(keys.mask_index(stream), f"({base_seq}", "+inf")))


def collect(client: redis.Redis, base_seq: int, oracle: SceneOracle | None, sent: int) -> Summary:
    stream = DEMO_DEVICE
    # The counts first, together: scoring below takes seconds, and a count read after it would be
    # seconds newer than ``sent`` (published ran ahead of sent in the live lines).
    published = last_seq(client, stream) - base_seq
    segmented = segmented_count(client, stream, base_seq)
    lat = latencies(client, stream, base_seq)
    miou = accuracy = None
    scored = 0
    if oracle is not None and segmented:
        miou, accuracy, scored = score_stream(client, stream, base_seq, oracle)
    return Summary(
        sent=sent,
        published=published,
        segmented=segmented,
        latency_p50=float(np.percentile(lat, 50)) if lat else None,
        latency_p95=float(np.percentile(lat, 95)) if lat else None,
        miou=miou,
        pixel_accuracy=accuracy,
        scored_frames=scored,
    )


def start_edge(stack: Stack, token: str, args: argparse.Namespace, metrics_port: int) -> Service:
    command = [
        "edge",
        "--gateway", stack.gateway_address,
        "--device-id", DEMO_DEVICE,
        "--source", "synthetic",
        "--width", str(args.width),
        "--height", str(args.height),
        "--fps", str(args.fps),
        "--metrics-port", str(metrics_port),
        "--json",
    ]  # fmt: skip
    if args.duration:
        command += ["--duration", str(args.duration)]
    edge = Service(
        "edge", command, {"FLOWCLOUD_EDGE_TOKEN": token}, log_path=stack.config.data_dir / "edge.log"
    )
    edge.start()
    return edge


def wait_for_drain(client: redis.Redis, base_seq: int, timeout: float = 30.0) -> None:
    """After the edge stops, give the workers time to finish what the gateway published."""
    deadline = time.monotonic() + timeout
    previous = -1
    while time.monotonic() < deadline:
        done = segmented_count(client, DEMO_DEVICE, base_seq)
        if done >= last_seq(client, DEMO_DEVICE) - base_seq or done == previous:
            return
        previous = done
        time.sleep(2.0)


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration <= 0:
        raise CommandError("--duration must be positive")
    admin_key = os.environ.get("FLOWCLOUD_API_ADMIN_KEY") or tokens.new_token()
    stack = start_stack(stack_config(args, admin_key=admin_key))
    edge: Service | None = None
    summary: Summary | None = None
    client = redis.Redis.from_url(stack.redis_url)
    try:
        # Where the stack's gateway looks for devices: FLOWCLOUD_CONTROL_REDIS_URL, else the stack's Redis.
        control_url = ServiceSettings(redis_url=stack.redis_url).control_url
        token = asyncio.run(register_demo_device(control_url))
        base_seq = last_seq(client, DEMO_DEVICE)
        edge_metrics = free_port()
        edge = start_edge(stack, token, args, edge_metrics)
        oracle = SceneOracle(args.width, args.height)
        print(f"dashboard  {stack.api_url}/dashboard#key={admin_key}")
        print(f"API key    {admin_key}   (admin; send as 'Authorization: Bearer <key>')")
        print(f"masks      {stack.api_url}/streams/{DEMO_DEVICE}/masks/latest?format=overlay")
        print(f"logs       {Path(stack.config.data_dir).resolve()}")
        print(
            "streaming the synthetic street video" + (f" for {args.duration:.0f} s" if args.duration else "")
        )
        sent = 0
        next_line = time.monotonic() + args.interval
        while edge.alive():
            time.sleep(1.0)
            stack.check()
            scraped = edge_frames_sent(edge_metrics)  # scraped often: the edge may end any time
            if scraped is not None:
                sent = max(sent, scraped)
            # A line only with a fresh count: an ending edge stops answering, and a stale "sent"
            # beside live counts would look like lost frames (the final line has the exact one).
            if time.monotonic() >= next_line and scraped is not None:
                print(collect(client, base_seq, oracle, sent).line(), flush=True)
                next_line += args.interval
        if edge.process is not None and edge.process.returncode not in (0, None):
            raise CommandError(
                f"the edge daemon exited with status {edge.process.returncode}; see {edge.log_path}"
            )
        final = edge_final_summary(edge)
        sent = int(final["sent"]) if final else sent
        wait_for_drain(client, base_seq)
        summary = collect(client, base_seq, oracle, sent)
    except KeyboardInterrupt:
        print("stopping ...")
    finally:
        if edge is not None:
            edge.stop(10.0)
        client.close()
        stack.stop()
    if summary is None:
        return 130
    report: dict[str, Any] = asdict(summary)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("final: " + summary.line())
    if summary.segmented == 0:
        raise CommandError("no frame was segmented; see the logs in " + str(stack.config.data_dir))
    return 0
