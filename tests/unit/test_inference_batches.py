"""The Segmenter's performance paths on CPU: BatchNorm folding, static (padded) batches, one-copy stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from flowcloud.inference import IMAGENET_MEAN, IMAGENET_STD, Segmenter, SegmenterOptions
from flowcloud.labels import LABEL_IDS
from flowcloud.zoo import LoadedModel, ModelInfo, build_model, calibrate_batch_norm


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (count, 8, 16, 3), dtype=np.uint8)
    return [np.kron(img, np.ones((8, 8, 1), dtype=np.uint8)) for img in small]  # 64x128 blocks


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    batch = torch.from_numpy(np.stack(_images(4, seed=1))).permute(0, 3, 1, 2).float() / 255.0
    module = calibrate_batch_norm(
        build_model("lraspp_mobilenet_v3_large", LABEL_IDS), TF.normalize(batch, IMAGENET_MEAN, IMAGENET_STD)
    )
    return LoadedModel(module, ModelInfo(name="lraspp_mobilenet_v3_large"), LABEL_IDS, "calibrated random")


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.mean(x == y) for x, y in zip(a, b, strict=True)]))


def test_folded_batch_norm_matches_the_plain_model(loaded: LoadedModel) -> None:
    images = _images(3)
    fused = Segmenter(loaded, SegmenterOptions())
    plain = Segmenter(loaded, SegmenterOptions(fuse=False, channels_last=False))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())
    got, want = fused.predict(images), plain.predict(images)
    assert len({m.tobytes() for m in want}) == 3 and len(np.unique(want[0])) > 1  # masks worth comparing
    assert _agreement(got, want) >= 0.999


def test_static_batches_pad_and_split_without_changing_results(loaded: LoadedModel) -> None:
    images = _images(5)
    eager = Segmenter(loaded, SegmenterOptions()).predict(images)
    static = Segmenter(loaded, SegmenterOptions(static_batch=2))
    got = static.predict(images)  # 2 + 2 + 1 padded to 2
    assert [m.shape for m in got] == [(64, 128)] * 5
    assert _agreement(got, eager) >= 0.999


def test_to_tensor_stacks_once_and_rejects_mixed_sizes(loaded: LoadedModel) -> None:
    segmenter = Segmenter(loaded, SegmenterOptions())
    images = _images(2)
    batch = segmenter.to_tensor(images)
    assert batch.shape == (2, 64, 128, 3) and batch.dtype == torch.uint8
    assert np.array_equal(batch[1].numpy(), images[1])
    with pytest.raises(ValueError, match="share one size"):
        segmenter.to_tensor([images[0], np.zeros((32, 64, 3), np.uint8)])


def test_bad_options_are_refused(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="compile must be one of"):
        Segmenter(loaded, SegmenterOptions(compile="fastest"))
    with pytest.raises(ValueError, match="static_batch must be positive"):
        Segmenter(loaded, SegmenterOptions(static_batch=0))


def test_bucketed_batches_pad_to_powers_of_two_up_to_the_cap(loaded: LoadedModel) -> None:
    bucketed = Segmenter(loaded, SegmenterOptions(bucket_batches=6))
    assert [bucketed.padded_count(n) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, 7]
    assert bucketed.batch_shapes(6) == [1, 2, 4, 6]
    images = _images(3)
    assert (
        _agreement(bucketed.predict(images), Segmenter(loaded, SegmenterOptions()).predict(images)) >= 0.999
    )
    assert Segmenter(loaded, SegmenterOptions(static_batch=4)).batch_shapes(4) == [4]
