"""Helpers for the worker tests: weights files, test frames, real worker processes and what they
leave on Redis (pending entries, results)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import redis
import torch
import torchvision.transforms.functional as TF
from torch import nn

from flowcloud import keys
from flowcloud.frames import Frame, encode_image
from flowcloud.inference import IMAGENET_MEAN, IMAGENET_STD
from flowcloud.labels import LABEL_IDS
from flowcloud.results import META_FIELD, MaskResult
from flowcloud.zoo import ModelInfo, build_model, calibrate_batch_norm, save_weights
from support.cli import REPO, flowcloud
from support.waiting import wait_for

MODEL = "lraspp_mobilenet_v3_large"
STARTUP_TIMEOUT = 150.0  # importing torch on a busy 2-core machine is slow


def calibrated_model(model: str = MODEL, seed: int = 0) -> nn.Module:
    """A zoo model with random weights and BatchNorm statistics calibrated on a few images.

    (Plain random initialisation predicts one class everywhere, which would make comparing
    masks meaningless.)
    """
    torch.manual_seed(seed)
    images = torch.from_numpy(np.stack([scene(64, 128, seed + i) for i in range(4)]))
    batch = TF.normalize(images.permute(0, 3, 1, 2).float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    return calibrate_batch_norm(build_model(model, LABEL_IDS), batch)


def make_weights(path: Path, model: str = MODEL, seed: int = 0) -> Path:
    """A weights file of ``calibrated_model`` for ``flowcloud worker --weights``."""
    save_weights(calibrated_model(model, seed), path, ModelInfo(name=model, version=f"test-{seed}"))
    return path


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, so decoding is not the interesting part)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def frame(stream: str, seq: int, height: int, width: int, capture_ts: float | None = None) -> Frame:
    now = time.time()
    image = scene(height, width, zlib.crc32(f"{stream}:{seq}".encode()))
    capture = now if capture_ts is None else capture_ts
    return Frame(stream, seq, capture, max(capture, now - 0.001), width, height, "jpeg", encode_image(image))


def worker_command(redis_url: str, weights: Path, name: str, *extra: str) -> list[str]:
    return flowcloud(
        "worker",
        "--redis-url", redis_url,
        "--name", name,
        "--weights", str(weights),
        "--warmup-size", "64x128",
        "--heartbeat-interval", "0.5",
        "--poll-ms", "200",
        "--threads", "1",
        "--decode-threads", "2",
        "--metrics-port", "0",  # off unless a test names a (free) port: later options win
        *extra,
    )  # fmt: skip


class WorkerProcess(subprocess.Popen[bytes]):
    """A real `flowcloud worker` process and its log (``support.waiting.wait_for`` shows the log's
    tail when the wait fails)."""

    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM; its exit status once it has drained (allowed as long as a start)."""
        self.send_signal(signal.SIGTERM)
        return self.wait(STARTUP_TIMEOUT)


@contextmanager
def running_worker(
    redis_url: str, weights: Path, name: str, log_dir: Path, *extra: str
) -> Iterator[WorkerProcess]:
    """A real `flowcloud worker` process, ready (its heartbeat says so) when the block starts; killed
    at exit if the test left it running."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = WorkerProcess(
            worker_command(redis_url, weights, name, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        proc.log_path = log_path
        try:
            client = redis.Redis.from_url(redis_url)
            try:
                wait_for(
                    f"worker {name} to be ready",
                    lambda: client.hget(keys.worker(name), "state") == b"ready",
                    STARTUP_TIMEOUT,
                    proc,
                )
            finally:
                client.close()
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def pending_of(client: redis.Redis, consumer: str, shard: int = 0) -> list[str]:
    """The ids of the references ``consumer`` holds pending on the queue of ``shard``."""
    queue = keys.frame_shard(shard)
    rows = client.xpending_range(queue, keys.WORKER_GROUP, "-", "+", 1000, consumername=consumer)
    return [cast(bytes, r["message_id"]).decode() for r in rows]


def pending_total(client: redis.Redis, shards: int = 1) -> int:
    """References read and not acknowledged, over the live queues of ``shards`` shards."""
    queues = [keys.frame_shard(shard) for shard in range(shards)]
    return sum(int(client.xpending(q, keys.WORKER_GROUP)["pending"]) for q in queues if client.exists(q))


def result_count(client: redis.Redis, stream: str) -> int:
    return int(client.zcard(keys.mask_index(stream)))


def result_seqs(client: redis.Redis, stream: str) -> list[int]:
    """The seqs of the stream's results in its mask index, oldest first."""
    return [int(s) for s in cast(list[bytes], client.zrange(keys.mask_index(stream), 0, -1))]


def metric(port: int, line_prefix: str) -> float:
    """The sum of the samples on the worker's /metrics whose line starts with ``line_prefix``."""
    return sum(metric_samples(port, line_prefix).values())


def metric_samples(port: int, line_prefix: str) -> dict[str, float]:
    """The samples on the worker's /metrics whose line starts with ``line_prefix``, by name and labels."""
    for attempt in range(3):  # a scrape cut by a reset is scraped again, as Prometheus would
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except ConnectionResetError:
            if attempt == 2:
                raise
            time.sleep(0.2)
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(line_prefix)
    }


def all_judged(client: redis.Redis, shards: int = 1) -> bool:
    """Every frame queued was read by the group and acknowledged (with a result or dropped); False
    while no queue exists (nothing published yet, or published to other shards)."""
    queued = False
    for shard in range(shards):
        queue = keys.frame_shard(shard)
        if not client.exists(queue):
            continue
        queued = True
        groups = cast(list[dict[str, object]], client.xinfo_groups(queue))
        ours = [g for g in groups if g["name"] in (keys.WORKER_GROUP, keys.WORKER_GROUP.encode())]
        if not ours or ours[0]["lag"] != 0:
            return False
    return queued and pending_total(client, shards) == 0


def results_of(client: redis.Redis, stream: str) -> list[MaskResult]:
    """The stream's results (metadata only), oldest seq first."""
    pipe = client.pipeline(transaction=False)
    for seq in result_seqs(client, stream):
        pipe.hget(keys.mask(stream, seq), META_FIELD)
    return [MaskResult.from_fields({META_FIELD.encode(): meta}) for meta in pipe.execute() if meta]
