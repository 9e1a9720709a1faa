"""The worker's GPU path (run by bench/gpu_check.sh on a machine with CUDA; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from support.frames import publish
from support.waiting import wait_for
from support.worker import calibrated_model, frame, pending_total, result_count, running_worker

from flowcloud import keys
from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.labels import LABEL_IDS
from flowcloud.results import decode_label_map
from flowcloud.zoo import LoadedModel, ModelInfo, load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    module = calibrated_model("deeplabv3_resnet50")
    return LoadedModel(module, ModelInfo(name="deeplabv3_resnet50"), LABEL_IDS, "calibrated random")


def scenes(count: int, height: int, width: int) -> list[np.ndarray]:
    return [frame("gpu", i, height, width).image() for i in range(count)]


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.mean(x == y) for x, y in zip(a, b, strict=True)]))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_masks_match_fp32(resnet: LoadedModel, precision: str) -> None:
    images = scenes(8, 256, 512)
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference = Segmenter(resnet, SegmenterOptions(device="cuda", fuse=False)).predict(images)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    fast = Segmenter(resnet, SegmenterOptions(device="cuda", precision=precision)).predict(images)
    assert agreement(fast, reference) >= 0.99


def test_compiled_static_batches_match_eager_and_pad_partial_batches(resnet: LoadedModel) -> None:
    images = scenes(6, 256, 512)
    eager = Segmenter(resnet, SegmenterOptions(device="cuda", precision="fp16")).predict(images)
    options = SegmenterOptions(device="cuda", precision="fp16", compile="reduce-overhead", static_batch=4)
    compiled = Segmenter(resnet, options)
    got = compiled.predict(images)  # 6 frames: one full batch of 4, then 2 padded to 4
    assert [m.shape for m in got] == [(256, 512)] * 6
    assert agreement(got, eager) >= 0.99
    assert agreement(compiled.predict(images[:1]), eager[:1]) >= 0.99


def test_pinned_batches_and_cpu_gpu_agreement() -> None:
    loaded = load_model("lraspp_mobilenet_v3_large", random_weights=True)
    segmenter = Segmenter(loaded, SegmenterOptions(device="cuda"))
    images = scenes(4, 128, 256)
    batch = segmenter.to_tensor(images)
    assert batch.is_pinned() and batch.shape == (4, 128, 256, 3)
    cpu = Segmenter(loaded, SegmenterOptions(device="cpu")).predict(images)
    assert agreement(segmenter.predict(images), cpu) >= 0.99


def test_worker_process_on_cuda(redis_url: str, weights: Path, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    frames = [frame("cam-g", i, 256, 512) for i in range(40)]
    publish(client, frames)
    args = ("--device", "cuda", "--precision", "fp16", "--batch-size", "16", "--mode", "complete")
    with running_worker(redis_url, weights, "gpu", tmp_path, *args, "--warmup-size", "256x512") as proc:
        wait_for("all results", lambda: result_count(client, "cam-g") == 40, 60, proc)
        wait_for("nothing pending", lambda: pending_total(client) == 0, 30, proc)
        assert proc.stop() == 0
    reference = Segmenter(load_model(weights=weights), SegmenterOptions(device="cpu")).predict(
        [f.image() for f in frames[:8]]
    )
    got = [decode_label_map(client.hget(keys.mask("cam-g", f.seq), "labels_png")) for f in frames[:8]]  # type: ignore[arg-type]
    assert agreement(got, reference) >= 0.99
