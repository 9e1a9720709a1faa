"""`flowcloud train` under `torchrun --nproc-per-node 2` (gloo, CPU) trains what one process trains:
the same global batch, seed and data give the same weights, metrics and files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import REPO
from support.training import (
    RUN_FILES,
    assert_same_weights,
    free_port,
    load_checkpoint,
    metrics,
    tiny_dataset,
    tiny_train_args,
)

from flowcloud.cli.main import main

pytestmark = pytest.mark.slow

# SGD is linear in the gradients, so summation order moves weights by float rounding only (we see
# ~2e-6 relative after 4 steps). Adam divides by the gradients' size: where a gradient is ~0, rounding
# flips its sign and the step (lr) with it, so Adam runs agree on metrics but not to this tolerance.
WEIGHTS_RTOL, WEIGHTS_ATOL = 1e-4, 1e-6
METRIC_ATOL = 1e-4

STEPS = ("--batch-size", "4", "--epochs", "2", "--steps-per-epoch", "2", "--optimizer", "sgd", "--lr", "0.05")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node N -m flowcloud.cli.main ARGS` on loopback."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "flowcloud.cli.main", *args,
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_gloo_processes_train_the_weights_of_one(data: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(tiny_train_args(data, one, *STEPS, "--class-weights", "--sync-bn")) == 0
    result = torchrun(2, *tiny_train_args(data, two, *STEPS, "--class-weights", "--sync-bn"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2 (gloo, cpu)" in result.stderr
    assert result.stderr.count("epoch 1: loss") == 1 and result.stdout.count("trained 2 epochs") == 1, (
        "rank 0 alone reports"
    )
    # One set of files, written by rank 0.
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} == RUN_FILES
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["args"]["batch_size"] == b["args"]["batch_size"] == 4
    assert_same_weights(a["model"], b["model"], WEIGHTS_RTOL, WEIGHTS_ATOL)
    assert a["lr_scheduler"] == b["lr_scheduler"]
    for key, state in a["optimizer"]["state"].items():
        assert_same_weights(state, b["optimizer"]["state"][key], WEIGHTS_RTOL, WEIGHTS_ATOL)
    # Training and validation metrics: validation is each rank's share of the images, summed.
    ha, hb = metrics(one), metrics(two)
    assert len(ha) == len(hb) == 2
    for x, y in zip(ha, hb, strict=True):
        assert x.keys() == y.keys()
        for key in ("loss", "pixel_accuracy", "mean_iou", "val_loss", "val_pixel_accuracy", "val_mean_iou"):
            assert x[key] == pytest.approx(y[key], abs=METRIC_ATOL), key
        assert x["val_iou"].keys() == y["val_iou"].keys()
