"""Frames per second of the segmentation worker against a naive loop like the original FlowCloud's.

    python -m bench.worker                       # 2-core CPU: short runs
    python -m bench.worker --device cuda         # GPU: deeplabv3_resnet50 at 256x512 should pass 300/s

For each model and size, in the same run on the same frames (JPEG street scenes from
``training.synth``, as the gateway puts them on the stream):

  naive   decode, per-frame preprocessing (to_tensor, normalize), the model in fp32 at batch 1
          (NCHW, no_grad; true fp32 on a GPU: TF32 off), argmax, label PNG and class shares; no
          overlap, no Redis
  worker  the real worker pipeline (services.worker.consumer.Worker) against a real redis-server:
          frames XADDed to the stream, read in batches, decoded in threads while the model runs,
          persisted with MaskStore and acknowledged; timed from the first read to the last ack

Agreement is the share of pixels whose class equals the naive fp32 result. Without ``--weights``
the models have random weights whose BatchNorm statistics are calibrated on a few frames, so
that their masks vary per pixel like a trained model's (plain random weights predict one class
everywhere, which would make the agreement meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis
import torch
import torchvision.transforms.functional as TF
from redis.asyncio import Redis as AsyncRedis
from torch import nn

from flowcloud import keys
from flowcloud.frame_log import publish_blocking
from flowcloud.frame_queue import ensure_groups, live_queues
from flowcloud.frames import Frame, encode_image
from flowcloud.inference import IMAGENET_MEAN, IMAGENET_STD, Segmenter
from flowcloud.labels import LABEL_IDS, class_shares
from flowcloud.redis_server import EmbeddedRedis
from flowcloud.results import decode_label_map, encode_label_map
from flowcloud.settings import WorkerSettings
from flowcloud.sizes import parse_size
from flowcloud.zoo import LoadedModel, ModelInfo, build_model, calibrate_batch_norm, load_model
from services.worker.consumer import Worker, segmenter_options

MOBILE = "lraspp_mobilenet_v3_large"
MODELS = ("deeplabv3_resnet50", MOBILE)
SIZES = ("256x512", "512x1024")
# (naive frames, worker frames, worker batch): on a 2-core CPU ResNet50 at 512x1024 takes many
# seconds per frame, so few frames there; enough everywhere to see the difference.
CPU_PLAN = {
    ("deeplabv3_resnet50", "512x1024"): (2, 4, 2),
    ("deeplabv3_resnet50", "256x512"): (4, 8, 4),
}
CPU_PLAN_DEFAULT = (8, 16, 4)
GPU_PLAN = (128, 960, 32)
DISTINCT_SCENES = 8


def calibrated_random_model(name: str, images: np.ndarray, seed: int = 0) -> nn.Module:
    """A zoo model with random weights and BatchNorm statistics measured on ``images`` (NHWC uint8)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return calibrate_batch_norm(build_model(name, LABEL_IDS), TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))


def street_frames(count: int, height: int, width: int) -> list[Frame]:
    """``count`` JPEG frames of synthetic street scenes (a few distinct ones, repeated)."""
    from training.synth import SceneSequence

    scenes = SceneSequence(seed=7, width=width, height=height)
    jpegs = [encode_image(scenes.frame(i * 5)[0]) for i in range(min(count, DISTINCT_SCENES))]
    now = time.time()
    return [Frame("bench", i, now, now, width, height, "jpeg", jpegs[i % len(jpegs)]) for i in range(count)]


@dataclass
class Row:
    model: str
    size: str
    device: str
    precision: str
    batch_size: int
    naive_frames: int
    frames: int
    naive_fps: float
    worker_fps: float
    ratio: float
    agreement: float


def naive_loop(loaded: LoadedModel, frames: list[Frame], device: str) -> tuple[float, list[np.ndarray]]:
    """The original's shape: one frame at a time, fp32, preprocessing per frame, nothing overlapped."""
    model = copy.deepcopy(loaded.module).to(device).eval()
    cuda = device.startswith("cuda")
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 reference

    def one(frame: Frame) -> np.ndarray:
        x = TF.normalize(TF.to_tensor(frame.image()), IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0).to(device)
        out = model(x)["out"]
        class_map = out.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        encode_label_map(class_map, loaded.label_set)
        class_shares(class_map, loaded.label_set.num_classes)
        return class_map

    try:
        with torch.no_grad():
            for frame in frames[: 3 if cuda else 1]:  # CUDA context, kernel choice, oneDNN primitives
                one(frame)
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            maps = [one(frame) for frame in frames]
            seconds = time.perf_counter() - started
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = saved
    return seconds, maps


async def worker_pipeline(
    segmenter: Segmenter, frames: list[Frame], settings: WorkerSettings
) -> tuple[float, list[np.ndarray]]:
    """The real worker on a real redis-server: seconds from the first read to the last acknowledgement."""
    sync = redis.Redis.from_url(settings.redis_url)
    sync.flushdb()
    client = AsyncRedis.from_url(settings.redis_url)
    await ensure_groups(client, settings.frame_shards)
    worker = Worker(settings, client, segmenter)
    await worker.start()  # warm-up (and compilation) at the frames' size, not timed
    publish_blocking(sync, frames, settings.frame_shards, maxlen=len(frames))
    started = time.perf_counter()
    serving = asyncio.create_task(worker.serve())
    while worker.processed < len(frames):  # counted after each batch's XACK; no Redis polling
        if serving.done():
            serving.result()
            raise RuntimeError("the worker stopped before finishing the frames")
        await asyncio.sleep(0.001)
    seconds = time.perf_counter() - started
    assert all(
        int(sync.xpending(q, keys.WORKER_GROUP)["pending"]) == 0 for q in live_queues(settings.frame_shards)
    )
    worker.request_stop()
    await serving
    await worker.close()
    maps = [decode_label_map(sync.hget(keys.mask(f.stream, f.seq), "labels_png")) for f in frames]  # type: ignore[arg-type]
    sync.close()
    return seconds, maps


def bench_one(
    loaded: LoadedModel, size: str, plan: tuple[int, int, int], args: argparse.Namespace, redis_url: str
) -> Row:
    naive_count, count, batch_size = plan
    height, width = parse_size(size)
    frames = street_frames(count, height, width)
    naive_s, reference = naive_loop(loaded, frames[:naive_count], args.device)
    settings = WorkerSettings(
        redis_url=redis_url,
        name="bench",
        device=args.device,
        precision=args.precision,
        batch_size=batch_size,
        batch_timeout_ms=20,
        mode="complete",
        warmup_size=size,
        decode_threads=args.decode_threads,
        results_max_per_stream=max(count, 10),
        metrics_port=0,
        compile=args.compile,
        compile_mode=args.compile_mode,
    )
    segmenter = Segmenter(loaded, segmenter_options(settings))  # exactly as `flowcloud worker` builds it
    worker_s, maps = asyncio.run(worker_pipeline(segmenter, frames, settings))
    agree = float(np.mean([np.mean(a == b) for a, b in zip(maps, reference, strict=False)]))
    naive_fps, worker_fps = naive_count / naive_s, count / worker_s
    return Row(
        loaded.info.name, size, args.device, args.precision, batch_size, naive_count, count,
        naive_fps, worker_fps, worker_fps / naive_fps, agree,
    )  # fmt: skip


def load(name: str, args: argparse.Namespace) -> LoadedModel:
    if args.weights:
        return load_model(name, args.weights)
    calib = np.stack([f.image() for f in street_frames(2, 128, 256)])
    module = calibrated_random_model(name, calib)
    info = ModelInfo(name=name, label_set=LABEL_IDS.name, version="random-calibrated")
    return LoadedModel(module, info, LABEL_IDS, "random weights, BatchNorm calibrated on street frames")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo models to run")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="frame sizes HxW")
    parser.add_argument("--frames", type=int, help="frames per model and size (default: by device)")
    parser.add_argument("--batch-size", type=int, help="worker batch size (default: by model, size, device)")
    parser.add_argument("--precision", help="worker precision (default: fp32 on CPU, fp16 on GPU)")
    parser.add_argument("--decode-threads", type=int, default=min(8, os.cpu_count() or 2))
    parser.add_argument("--compile", action="store_true", help="torch.compile the worker's model")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--weights", help="a weights file (default: calibrated random weights)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench.worker: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads"
    machine = f"{torch.cuda.get_device_name()} ({cores})" if cuda else cores
    print(f"worker vs naive loop on {machine}; torch {torch.__version__}", flush=True)
    columns = (
        ("size", 9),
        ("frames", 9),
        ("batch", 5),
        ("naive/s", 9),
        ("worker/s", 9),
        ("ratio", 6),
        ("agree", 8),
    )
    print(f"{'model':<28} " + " ".join(f"{name:>{width}}" for name, width in columns))
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-worker-")
    with tmp, EmbeddedRedis(tmp.name, appendonly=False) as server:
        for name in args.models:
            loaded = load(name, args)
            for size in args.sizes:
                naive_n, count, batch = GPU_PLAN if cuda else CPU_PLAN.get((name, size), CPU_PLAN_DEFAULT)
                if args.frames:
                    naive_n, count = min(naive_n, args.frames), args.frames
                row = bench_one(loaded, size, (naive_n, count, args.batch_size or batch), args, server.url)
                rows.append(row)
                frames = f"{row.naive_frames}/{row.frames}"
                print(
                    f"{row.model:<28} {row.size:>9} {frames:>9} {row.batch_size:>5} {row.naive_fps:>9.2f} "
                    f"{row.worker_fps:>9.2f} {row.ratio:>5.2f}x {row.agreement:>8.2%}",
                    flush=True,
                )
    print(f"(frames naive/worker; worker {args.precision}; naive batch 1 fp32; agree: pixels equal to naive)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
