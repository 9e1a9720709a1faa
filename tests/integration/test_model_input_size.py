"""`flowcloud eval` and `flowcloud infer` run the model at the input size its weights file records
(the size the worker's frames arrive at), say so, and keep ``--size`` to choose another."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowcloud.cli.main import main
from flowcloud.zoo import DEMO_WEIGHTS, read_weights_file


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_synth_then_eval_scores_at_the_models_input_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, info = read_weights_file(DEMO_WEIGHTS)
    assert info is not None and info.input_size == (256, 512)
    data = str(tmp_path / "synth")
    _run_json(capsys, "synth", data, "--frames", "2", "--split", "val", "--json")  # stored at 480x640

    default = _run_json(capsys, "eval", data, "--json")
    at_input_size = _run_json(capsys, "eval", data, "--json", "--size", "256x512")
    stored = _run_json(capsys, "eval", data, "--json", "--size", "480x640")

    assert default["size"] == "256x512" and "recorded input size" in default["size_from"]
    assert default["mean_iou"] == pytest.approx(at_input_size["mean_iou"], abs=1e-9)
    assert stored["size_from"] == "480x640 (--size)"
    assert abs(stored["mean_iou"] - default["mean_iou"]) > 0.01  # the size matters on this data

    assert main(["eval", data]) == 0
    printed = capsys.readouterr().out
    assert "input size: 256x512 (the model's recorded input size; --size to change)" in printed


def test_infer_says_which_input_size_it_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(image)
    recorded = _run_json(capsys, "infer", str(image), "-o", str(tmp_path / "a"), "--json")
    assert recorded["input_size"] == "256x512 (the model's recorded input size; --size to change)"
    assert (recorded["width"], recorded["height"]) == (160, 120)  # the outputs keep the picture's size
    chosen = _run_json(capsys, "infer", str(image), "-o", str(tmp_path / "b"), "--json", "--size", "64x96")
    assert chosen["input_size"] == "64x96 (--size)"
    assert main(["infer", str(image), "-o", str(tmp_path / "c")]) == 0
    assert "model input size: 256x512 (the model's recorded input size" in capsys.readouterr().out
