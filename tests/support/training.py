"""Tiny training runs for the training tests: synthetic data, the demo model's architecture, seconds."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import torch

from training.synth_cli import write_dataset

RUN_FILES = {"checkpoint.pth", "metrics.json", "loss.png", "accuracy.png", "miou.png"}


def tiny_dataset(root: Path, train_frames: int = 8, val_frames: int = 3) -> Path:
    """A Cityscapes-layout synthetic dataset at 48x96 (train and val splits)."""
    write_dataset(root, frames=train_frames, seed=5, size=(48, 96), sequence_length=4)
    write_dataset(root, frames=val_frames, seed=6, size=(48, 96), split="val")
    return root


def tiny_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`flowcloud train` arguments of a small_unet run on ``data`` that takes seconds."""
    return [
        "train", "--data", str(data), "--model", "small_unet", "--crop-size", "32x64",
        "--scale-range", "0.7:1.0", "--workers", "0", "--threads", "1", "--no-degrade",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_checkpoint(out: Path) -> dict[str, Any]:
    checkpoint: dict[str, Any] = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    return checkpoint


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float
) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=rtol, atol=atol, msg=f"{key} differs")


def metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.json without the wall-clock seconds."""
    history: list[dict[str, Any]] = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]
