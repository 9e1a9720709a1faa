"""`flowcloud export`: weights, TorchScript and ONNX files reproduce the eager model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flowcloud.cli.main import main
from flowcloud.inference import Segmenter
from flowcloud.labels import TRAIN_IDS
from flowcloud.zoo import ModelInfo, build_model, load_model, save_weights
from training.export import ONNX_TOLERANCE, TORCHSCRIPT_TOLERANCE


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("small_unet", TRAIN_IDS)
    # Non-trivial batch-norm statistics, so eval-mode export is really exercised.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 32, 64) * 2 + 0.5)
    path = tmp_path / "ckpt.pth"
    save_weights(model.eval(), path, ModelInfo("small_unet", TRAIN_IDS.name, "t1"))
    return path


def test_export_round_trips(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, ts, onnx = tmp_path / "w.pt", tmp_path / "m.ts", tmp_path / "m.onnx"
    args = ["export", str(checkpoint), "-o", str(out), "--torchscript", str(ts), "--onnx", str(onnx)]
    assert main([*args, "--size", "32x64", "--version", "v2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checks"][str(out)] == 0.0
    assert report["checks"][str(ts)] <= TORCHSCRIPT_TOLERANCE
    assert report["checks"][str(onnx)] <= ONNX_TOLERANCE
    loaded = load_model(weights=out)
    assert (loaded.info.name, loaded.label_set.name, loaded.info.version) == (
        "small_unet",
        "trainIds-19",
        "v2",
    )

    # Independently of the exporter's own check: all three give the same class maps.
    frames = [np.random.default_rng(i).integers(0, 256, (32, 64, 3), dtype=np.uint8) for i in range(2)]
    eager = np.stack(Segmenter(load_model(weights=checkpoint)).predict(frames))
    assert np.array_equal(np.stack(Segmenter(loaded).predict(frames)), eager)
    segmenter = Segmenter(loaded)
    x = segmenter.to_tensor(frames).permute(0, 3, 1, 2).float()
    x = (x - segmenter.mean) / segmenter.std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still deployed
        scripted = torch.jit.load(str(ts))
    with torch.inference_mode():
        ts_maps = scripted(x).argmax(1).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    onnx_maps = session.run(None, {"image": x.numpy()})[0].argmax(1)
    assert (ts_maps == eager).mean() > 0.999
    assert (onnx_maps == eager).mean() > 0.999


def test_export_refuses_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "none.pth"), "-o", str(tmp_path / "w.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "w.pt").exists()


def test_export_refuses_weights_of_another_model(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", str(checkpoint), "-o", str(tmp_path / "w.pt"), "--model", "lraspp_mobilenet_v3_large"]
    assert main(args) == 1
    assert "do not fit this model" in capsys.readouterr().err
