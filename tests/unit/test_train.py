"""`flowcloud train` on tiny synthetic data: the loss falls, checkpoints resume the very same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowcloud.cli.main import main
from flowcloud.zoo import load_model
from training.synth_cli import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, frames=8, seed=5, size=(48, 96), sequence_length=4)
    write_dataset(root, frames=2, seed=6, size=(48, 96), split="val")
    return root


def train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--model", "small_unet", "--crop-size", "32x64",
        "--scale-range", "0.7:1.0", "--batch-size", "4", "--epochs", str(epochs), "--steps-per-epoch", "2",
        "--workers", "0", "--optimizer", "adamw", "--lr", "0.01", "--threads", "1",
        "--output-dir", str(out), "--no-degrade", *extra,
    ]  # fmt: skip


def test_a_few_steps_lower_the_loss_and_write_metrics_and_charts(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(data, out, 4, "--class-weights")) == 0
    history = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"] * 0.8
    assert {"val_loss", "val_pixel_accuracy", "val_mean_iou", "val_iou", "pixel_accuracy"} <= set(history[-1])
    for chart in ("loss.png", "accuracy.png", "miou.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(checkpoint)
    assert checkpoint["epoch"] == 3 and checkpoint["args"]["model"] == "small_unet"
    # The checkpoint is also a weights file for inference.
    loaded = load_model(weights=out / "checkpoint.pth")
    assert loaded.info.name == "small_unet" and loaded.label_set.name == "labelIds-34"


def test_resume_continues_the_same_run(data: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(train_args(data, straight, 2, "--val-split", "none")) == 0
    assert main(train_args(data, split, 2, "--val-split", "none", "--stop-after", "1")) == 0
    first = torch.load(split / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 0 and first["lr_scheduler"]["last_epoch"] == 2
    resumed = train_args(data, split, 2, "--val-split", "none", "--resume", str(split / "checkpoint.pth"))
    assert main(resumed) == 0
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert state["step"] == b["optimizer"]["state"][key]["step"]
        torch.testing.assert_close(
            state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"], rtol=1e-4, atol=1e-6
        )
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    history = json.loads((split / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]


def test_resume_refuses_another_model(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(train_args(data, out, 1, "--val-split", "none")) == 0
    args = train_args(data, out, 2, "--val-split", "none", "--resume", str(out / "checkpoint.pth"))
    args[args.index("small_unet")] = "lraspp_mobilenet_v3_large"
    assert main(args) == 1
    assert "was trained with --model small_unet" in capsys.readouterr().err


def test_bad_data_root_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tmp_path / "missing", tmp_path / "out", 1)) == 1
    assert "does not exist" in capsys.readouterr().err


def test_the_deeplabv3_resnet50_recipe_runs_end_to_end_on_cityscapes_layout_data(
    data: Path, tmp_path: Path
) -> None:
    """training/README.md's GPU recipe, shrunk to one tiny step on the CPU."""
    out = tmp_path / "deeplab"
    args = [
        "train", "--data", str(data), "--model", "deeplabv3_resnet50", "--label-set", "trainIds-19",
        "--aux-loss",
        "--crop-size", "32x64", "--scale-range", "0.5:2.0", "--batch-size", "2", "--epochs", "1",
        "--steps-per-epoch", "1", "--optimizer", "sgd", "--lr", "0.02", "--momentum", "0.9",
        "--weight-decay", "1e-4", "--workers", "0", "--threads", "1", "--val-limit", "1",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    loaded = load_model(weights=out / "checkpoint.pth")
    assert loaded.info.name == "deeplabv3_resnet50" and loaded.label_set.name == "trainIds-19"
