"""The bundled demo model: used when no weights are given, and good on streets it never saw."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from flowcloud.inference import Segmenter, SegmenterOptions
from flowcloud.sizes import parse_size
from flowcloud.zoo import DEMO_WEIGHTS, load_model
from training.metrics import ConfusionMatrix
from training.synth import SceneSequence
from training.synth_cli import scene_seed

HELD_OUT_SEED = 3  # the demo model trained on seed 1 and was validated on seed 2
MAX_BYTES = 15 * 1024 * 1024


def test_demo_model_is_small_and_used_when_no_weights_are_given(caplog: pytest.LogCaptureFixture) -> None:
    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size <= MAX_BYTES
    with caplog.at_level(logging.INFO, logger="flowcloud.zoo"):
        loaded = load_model()
    assert loaded.source == str(DEMO_WEIGHTS)
    assert "bundled demo model" in caplog.text
    assert loaded.info.version != "unversioned" and "input_size" in loaded.info.extra


def held_out_scores(jpeg_quality: int | None = None) -> tuple[float, list[float | None]]:
    loaded = load_model()
    height, width = parse_size(str(loaded.info.extra["input_size"]))
    segmenter = Segmenter(loaded, SegmenterOptions(size=(height, width)))
    matrix = ConfusionMatrix(loaded.label_set.num_classes)
    frames, targets = [], []
    for street in range(3):
        scene = SceneSequence(scene_seed(HELD_OUT_SEED, street), width, height)
        for index in (0, 45):
            rgb, labels = scene.frame(index)
            if jpeg_quality is not None:
                _ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
                assert decoded is not None
                rgb = decoded[..., ::-1]
            frames.append(np.ascontiguousarray(rgb))
            targets.append(loaded.label_set.from_label_ids(labels))
    for prediction, target in zip(segmenter.predict(frames), targets, strict=True):
        matrix.update(target, prediction)
    scores = matrix.scores()
    return scores.mean_iou, scores.iou


def test_demo_model_reaches_070_miou_on_held_out_synthetic_frames() -> None:
    miou, per_class = held_out_scores()
    assert miou >= 0.70, per_class


def test_demo_model_survives_jpeg_compression() -> None:
    miou, per_class = held_out_scores(jpeg_quality=60)
    assert miou >= 0.60, per_class
