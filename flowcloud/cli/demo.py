"""`flowcloud demo`: the whole pipeline on one machine, on the synthetic street video.

It starts the local stack (`flowcloud up`), registers a demo device, streams the synthetic
street scenes from a local edge daemon, and prints the dashboard URL, an API key and a live
summary: frames sent, segmented and dropped by the workers, latency p50/p95, and mIoU against the
generator's exact ground truth (H.264 compression, JPEG on the stream and resizing included).

Every segmented frame is scored, however late its mask arrives: the demo notes each frame (a
thumbnail) while it is in the stream's short recent window, which it reads every second, and
matches the thumbnail to the generator's scenes when the frame's mask appears.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import time
import urllib.request
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
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
from flowcloud.percentile import percentile
from flowcloud.redis_server import free_port
from flowcloud.registry import DeviceRegistry
from flowcloud.results import META_FIELD, MaskResult, decode_label_map
from flowcloud.settings import ServiceSettings
from flowcloud.stack import Service, Stack
from flowcloud.streams import StreamMeta

DEMO_DEVICE = "demo-cam"
DEMO_TENANT = "demo"
RENDER_CACHE = 96  # rendered scenes kept: masks arrive within seconds of their frame, nearly in order
ALIGN_WINDOW = 3  # frames either side of the expected index searched when matching a frame to the scene
THUMBNAIL = (64, 48)  # width, height of the picture a frame is matched to the scenes by
THUMBNAILS_KEPT = 2048  # frames noted and not yet scored (9 KB each): minutes of masks still to come
SCORING_SLICE = 0.5  # seconds of scoring a second while live (the rest catches up at the end)


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
    dropped: dict[str, int] = field(default_factory=dict)  # by the workers, by reason

    def line(self) -> str:
        def ms(value: float | None) -> str:
            return f"{value * 1000:.0f} ms" if value is not None else "-"

        miou = f"{self.miou:.3f}" if self.miou is not None else "-"
        return (
            f"sent {self.sent:5d}  published {self.published:5d}  segmented {self.segmented:5d}  "
            f"dropped {sum(self.dropped.values()):5d}  "
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

    def ground_truth(self, thumbnail: np.ndarray, size: tuple[int, int], expected_index: int) -> np.ndarray:
        """The labelId map at ``size`` (width, height) of the scene that a frame shows, by the frame's
        ``thumbnail``."""
        small = thumbnail.astype(np.float32)
        best, best_error = expected_index + self.offset, float("inf")
        low = max(0, expected_index + self.offset - ALIGN_WINDOW)
        for index in range(low, expected_index + self.offset + ALIGN_WINDOW + 1):
            rendered = cv2.resize(self._render(index)[0], THUMBNAIL, interpolation=cv2.INTER_AREA)
            error = float(np.abs(rendered.astype(np.float32) - small).mean())
            if error < best_error:
                best, best_error = index, error
        self.offset = best - expected_index
        return cv2.resize(self._render(best)[1], size, interpolation=cv2.INTER_NEAREST)


def thumbnail(frame: Frame) -> np.ndarray:
    return cv2.resize(frame.image(), THUMBNAIL, interpolation=cv2.INTER_AREA)


def recent_frames(client: redis.Redis, stream: str, after_seq: int) -> dict[int, Frame]:
    """The frames still in the stream's frame log, by seq, newer than ``after_seq``."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.stream_frames(stream)))
    frames = (Frame.from_fields(fields) for _, fields in entries)
    return {frame.seq: frame for frame in frames if frame.seq > after_seq}


def score_masks(
    frames: dict[int, Frame], masks: dict[int, MaskResult], base_seq: int, oracle: SceneOracle
) -> tuple[float | None, float | None, int]:
    """mIoU and pixel accuracy of masks against the scenes their frames show (frames matched by seq).

    Scored in the model's own label set: classes it cannot predict are ignored.
    """
    score = Score(oracle, base_seq)
    for seq in sorted(frames.keys() & masks.keys()):
        score.add(masks[seq], thumbnail(frames[seq]))
    return score.result()


class Score:
    """mIoU and pixel accuracy over every mask added, each against the scene its frame shows."""

    def __init__(self, oracle: SceneOracle, base_seq: int) -> None:
        from training.metrics import ConfusionMatrix

        self.oracle = oracle
        self.base_seq = base_seq
        self.matrix: ConfusionMatrix | None = None
        self.frames = 0
        self._matrix_type = ConfusionMatrix

    def add(self, result: MaskResult, thumb: np.ndarray) -> None:
        label_set = get_label_set(result.label_set)  # scored in the model's own label set
        predicted = decode_label_map(result.labels_png)
        size = (predicted.shape[1], predicted.shape[0])
        truth = self.oracle.ground_truth(thumb, size, result.seq - self.base_seq - 1)
        self.matrix = self.matrix or self._matrix_type(label_set.num_classes)
        self.matrix.update(label_set.from_label_ids(truth), predicted)
        self.frames += 1

    def result(self) -> tuple[float | None, float | None, int]:
        if self.matrix is None:
            return None, None, 0
        scores = self.matrix.scores()
        return scores.mean_iou, scores.pixel_accuracy, self.frames


class StreamScorer:
    """Scores every segmented frame of a stream, however late its mask arrives.

    ``note_frames`` keeps a thumbnail of each new frame in the stream's recent window (call it more
    often than the window turns over); ``score_masks`` scores the masks that appeared since, each
    by its frame's thumbnail, which it then forgets. A mask whose frame was never noted is counted
    in ``unmatched``.
    """

    def __init__(self, client: redis.Redis, stream: str, base_seq: int, oracle: SceneOracle) -> None:
        self.client = client
        self.stream = stream
        self.score = Score(oracle, base_seq)
        self.thumbnails: OrderedDict[int, np.ndarray] = OrderedDict()
        self.unmatched = 0
        self._last_id = "-"
        self._seen: set[int] = set()  # seqs whose mask was scored or found unmatched

    def note_frames(self) -> None:
        start = self._last_id if self._last_id == "-" else f"({self._last_id}"
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], self.client.xrange(keys.stream_frames(self.stream), start)
        )
        for entry_id, fields in entries:
            self._last_id = entry_id.decode()
            frame = Frame.from_fields(fields)
            if frame.seq > self.score.base_seq and frame.seq not in self._seen:
                self.thumbnails[frame.seq] = thumbnail(frame)
        while len(self.thumbnails) > THUMBNAILS_KEPT:
            self.thumbnails.popitem(last=False)

    def score_masks(self, budget: float | None = None) -> None:
        """Score new masks for at most ``budget`` seconds (None: all of them)."""
        started = time.monotonic()
        seqs = cast(
            list[bytes],
            self.client.zrangebyscore(keys.mask_index(self.stream), f"({self.score.base_seq}", "+inf"),
        )
        for seq in sorted({int(s) for s in seqs} - self._seen):
            if budget is not None and time.monotonic() - started > budget:
                return
            blob = cast(dict[bytes, bytes], self.client.hgetall(keys.mask(self.stream, seq)))
            if not blob:
                continue  # trimmed or expired meanwhile
            self._seen.add(seq)
            thumb = self.thumbnails.pop(seq, None)
            if thumb is None:
                self.unmatched += 1
            else:
                self.score.add(MaskResult.from_fields(blob), thumb)


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
    samples = scrape(metrics_port, "flowcloud_edge_frames_sent")
    return None if samples is None else int(sum(value for _, value in samples))


def workers_dropped(stack: Stack) -> dict[str, int]:
    """Frames the workers dropped, by reason, from their metrics (workers that do not answer: none)."""
    dropped: dict[str, int] = {}
    for i in range(stack.config.workers):
        for labels, value in (
            scrape(stack.config.worker_metrics_port + i, "flowcloud_worker_frames_dropped") or []
        ):
            reason = labels.get("reason", "")
            dropped[reason] = dropped.get(reason, 0) + int(value)
    return dropped


def scrape(metrics_port: int, family_name: str) -> list[tuple[dict[str, str], float]] | None:
    """The ``_total`` samples of a counter on a local /metrics; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3.0) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == family_name
        for sample in family.samples
        if sample.name.endswith("_total")
    ]


def segmented_count(client: redis.Redis, stream: str, base_seq: int) -> int:
    return int(cast(int, client.zcount(keys.mask_index(stream), f"({base_seq}", "+inf")))


def collect(
    client: redis.Redis, base_seq: int, scorer: StreamScorer | None, sent: int, dropped: dict[str, int]
) -> Summary:
    stream = DEMO_DEVICE
    published = last_seq(client, stream) - base_seq
    segmented = segmented_count(client, stream, base_seq)
    lat = latencies(client, stream, base_seq)
    miou, accuracy, scored = scorer.score.result() if scorer is not None else (None, None, 0)
    return Summary(
        sent=sent,
        published=published,
        segmented=segmented,
        latency_p50=percentile(lat, 50) if lat else None,
        latency_p95=percentile(lat, 95) if lat else None,
        miou=miou,
        pixel_accuracy=accuracy,
        scored_frames=scored,
        dropped=dropped,
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


def wait_for_drain(
    client: redis.Redis, base_seq: int, stack: Stack, scorer: StreamScorer, timeout: float = 30.0
) -> None:
    """After the edge stops, give the workers time to segment or drop what the gateway published
    (scoring meanwhile)."""
    deadline = time.monotonic() + timeout
    previous = -1
    while time.monotonic() < deadline:
        scorer.note_frames()
        scorer.score_masks(SCORING_SLICE)
        done = segmented_count(client, DEMO_DEVICE, base_seq) + sum(workers_dropped(stack).values())
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
        scorer = StreamScorer(client, DEMO_DEVICE, base_seq, SceneOracle(args.width, args.height))
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
            started = time.monotonic()
            scorer.note_frames()  # every second: the recent window holds a few seconds of frames
            scorer.score_masks(SCORING_SLICE)
            time.sleep(max(0.1, 1.0 - (time.monotonic() - started)))
            stack.check()
            scraped = edge_frames_sent(edge_metrics)  # scraped often: the edge may end any time
            if scraped is not None:
                sent = max(sent, scraped)
            # A line only with a fresh count: an ending edge stops answering, and a stale "sent"
            # beside live counts would look like lost frames (the final line has the exact one).
            if time.monotonic() >= next_line and scraped is not None:
                print(collect(client, base_seq, scorer, sent, workers_dropped(stack)).line(), flush=True)
                next_line += args.interval
        if edge.process is not None and edge.process.returncode not in (0, None):
            raise CommandError(
                f"the edge daemon exited with status {edge.process.returncode}; see {edge.log_path}"
            )
        final = edge_final_summary(edge)
        sent = int(final["sent"]) if final else sent
        wait_for_drain(client, base_seq, stack, scorer)
        scorer.note_frames()
        scorer.score_masks()
        summary = collect(client, base_seq, scorer, sent, workers_dropped(stack))
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
