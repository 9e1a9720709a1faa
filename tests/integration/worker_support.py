"""Helpers for the worker tests: weights files, real worker subprocesses, frames on the real stream."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
from flowcloud.zoo import ModelInfo, build_model, calibrate_batch_norm, save_weights

ROOT = Path(__file__).resolve().parents[2]
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


def publish(client: redis.Redis, frames: list[Frame]) -> list[str]:
    """XADD frames atomically (one MULTI), so that one XREADGROUP sees all of them."""
    pipe = client.pipeline(transaction=True)
    for f in frames:
        pipe.xadd(keys.FRAMES_STREAM, f.to_fields())  # type: ignore[arg-type]
    return [i.decode() for i in pipe.execute()]


def worker_command(redis_url: str, weights: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flowcloud.cli.main", "worker",
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
    ]  # fmt: skip


@contextmanager
def running_worker(
    redis_url: str, weights: Path, name: str, log_dir: Path, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `flowcloud worker` process; killed at exit if the test left it running."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            worker_command(redis_url, weights, name, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def worker_log(log_dir: Path, name: str) -> str:
    return (log_dir / f"{name}.log").read_text(errors="replace")


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``check`` until true; fail with the worker's log tail on a timeout or an early exit."""
    deadline = time.monotonic() + timeout
    while not check():
        problem = None
        if proc is not None and proc.poll() is not None:
            problem = f"worker exited with {proc.returncode} while waiting for {what}"
        elif time.monotonic() > deadline:
            problem = f"timed out after {timeout:.0f}s waiting for {what}"
        if problem:
            log = getattr(proc, "log_path", None)
            tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-40:]) if log else ""
            raise AssertionError(f"{problem}\n--- worker log ---\n{tail}")
        time.sleep(0.02)


def wait_ready(client: redis.Redis, name: str, proc: subprocess.Popen[bytes]) -> None:
    wait_for(
        f"worker {name} to be ready",
        lambda: client.hget(keys.worker(name), "state") == b"ready",
        STARTUP_TIMEOUT,
        proc,
    )


def pending_of(client: redis.Redis, consumer: str) -> list[str]:
    rows = client.xpending_range(keys.FRAMES_STREAM, keys.WORKER_GROUP, "-", "+", 1000, consumername=consumer)
    return [r["message_id"].decode() for r in rows]


def pending_total(client: redis.Redis) -> int:
    return int(client.xpending(keys.FRAMES_STREAM, keys.WORKER_GROUP)["pending"])


def result_count(client: redis.Redis, stream: str) -> int:
    return int(client.zcard(keys.mask_index(stream)))
