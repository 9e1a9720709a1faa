"""Confusion-matrix metrics on hand-made cases, and `flowcloud eval` on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowcloud.cli.main import main
from flowcloud.labels import LABEL_IDS
from flowcloud.zoo import ModelInfo, build_model, save_weights
from training.evaluate import format_table
from training.metrics import ConfusionMatrix, SegmentationScores
from training.synth_cli import write_dataset


def scores_of(target: list[int], prediction: list[int], n: int = 3) -> SegmentationScores:
    matrix = ConfusionMatrix(n)
    matrix.update(torch.tensor(target), torch.tensor(prediction))
    return matrix.scores()


def test_hand_made_two_class_case() -> None:
    s = scores_of([0, 0, 1, 1], [0, 1, 1, 1])
    # class 0: TP 1, FN 1, FP 0 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent everywhere.
    assert s.iou == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert s.mean_iou == pytest.approx((0.5 + 2 / 3) / 2)
    assert s.pixel_accuracy == pytest.approx(0.75)
    assert s.pixels == 4


def test_perfect_and_all_wrong() -> None:
    assert scores_of([0, 1, 2], [0, 1, 2]).mean_iou == pytest.approx(1.0)
    wrong = scores_of([0, 0, 1, 1], [1, 1, 0, 0])
    assert wrong.mean_iou == 0.0 and wrong.pixel_accuracy == 0.0


def test_ignore_index_is_skipped_and_false_positives_of_absent_classes_count() -> None:
    s = scores_of([0, 255, 255, 0], [0, 2, 1, 2])
    # Only pixels 0 and 3 count; class 2 is predicted once but never true: IoU 0, in the mean.
    assert s.pixels == 2
    assert s.iou == [pytest.approx(0.5), None, pytest.approx(0.0)]
    assert s.mean_iou == pytest.approx(0.25)


def test_accumulates_over_batches_like_one_batch() -> None:
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
    whole = ConfusionMatrix(5)
    whole.update(t, p)
    parts = ConfusionMatrix(5)
    for i in range(0, 1000, 300):
        parts.update(t[i : i + 300], p[i : i + 300])
    assert torch.equal(whole.mat, parts.mat)
    assert int(whole.mat.sum()) == 1000


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        ConfusionMatrix(3).update(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="outside 0..2"):
        ConfusionMatrix(3).update(torch.zeros(2), torch.tensor([0, 7]))


def test_table_lists_present_classes() -> None:
    s = scores_of([0, 0, 1, 1], [0, 1, 1, 1])
    table = format_table(s, ("road", "car", "sky"))
    assert "road" in table and "car" in table and "sky" not in table and "58.3%" in table


def test_eval_command_on_a_cityscapes_layout_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(tmp_path / "data", frames=2, seed=9, size=(32, 64), split="val")
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    save_weights(
        build_model("small_unet", LABEL_IDS).eval(), weights, ModelInfo("small_unet", LABEL_IDS.name, "t")
    )
    assert main(["eval", str(tmp_path / "data"), "--weights", str(weights), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["model"] == "small_unet"
    assert 0.0 <= report["mean_iou"] <= 1.0 and 0.0 <= report["pixel_accuracy"] <= 1.0
    assert set(report["iou"]) == set(LABEL_IDS.class_names)
    assert main(["eval", str(tmp_path / "nowhere"), "--weights", str(weights)]) == 1
    assert "does not exist" in capsys.readouterr().err
