"""Preemption: SIGTERM mid-epoch checkpoints and exits 0, and the run started again ends with the
weights of a run never interrupted; SIGKILL while a checkpoint is being written leaves the previous
one whole, and the restarted run resumes from it by itself."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from support.cli import REPO, flowcloud
from support.training import (
    assert_same_weights,
    load_checkpoint,
    metrics,
    tiny_dataset,
    tiny_train_args,
)
from support.waiting import wait_for

from flowcloud.cli.main import main

pytestmark = pytest.mark.slow

# 3 epochs of 4 steps of 2 images, a checkpoint after every step.
STEPS = (
    "--batch-size", "2", "--epochs", "3", "--steps-per-epoch", "4", "--optimizer", "sgd", "--lr", "0.05",
    "--val-limit", "2", "--checkpoint-every", "1",
)  # fmt: skip
# One process, same data, same order of operations: resumed and straight runs agree to rounding.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("synth"), val_frames=2)


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    assert main(tiny_train_args(data, out, *STEPS)) == 0
    return out


def start(data: Path, out: Path) -> subprocess.Popen[str]:
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        flowcloud(*tiny_train_args(data, out, *STEPS)),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def checkpoint_step(out: Path) -> tuple[int, int] | None:
    """(last epoch done, step) of the checkpoint in ``out``, if one is there and readable."""
    try:
        c = load_checkpoint(out)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return int(c["epoch"]), int(c.get("step", 0))


def assert_ends_like_straight(out: Path, straight: Path) -> None:
    a, b = load_checkpoint(straight), load_checkpoint(out)
    assert b["epoch"] == a["epoch"] == 2 and b["step"] == 0
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert_same_weights(a["model"], b["model"], RTOL, ATOL)
    for key, state in a["optimizer"]["state"].items():
        assert_same_weights(state, b["optimizer"]["state"][key], RTOL, ATOL)
    ha, hb = metrics(straight), metrics(out)
    assert [h["epoch"] for h in hb] == [0, 1, 2]
    for x, y in zip(ha, hb, strict=True):
        for key in ("loss", "pixel_accuracy", "mean_iou", "val_loss", "val_mean_iou"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["epoch"], key)


def test_sigterm_mid_epoch_checkpoints_exits_0_and_the_restart_ends_like_a_straight_run(
    data: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preempted"
    proc = start(data, out)
    try:
        wait_for("a checkpoint within epoch 0", lambda: checkpoint_step(out) == (-1, 1), 120, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    epoch_done, step = checkpoint_step(out) or (None, None)
    assert epoch_done is not None and step is not None
    assert (epoch_done, step) < (2, 0), "the run stopped early"
    assert 0 < step <= 4, "stopped mid-epoch, at a step"
    log = (tmp_path / "preempted.log").read_text()
    assert f"stopped by SIGTERM in epoch {epoch_done + 1} after step {step}" in log
    assert not list(out.glob(".*.partial"))
    # The same command again: it finds its checkpoint and finishes the run.
    assert main(tiny_train_args(data, out, *STEPS)) == 0
    assert_ends_like_straight(out, straight)


def _kill_during_a_write(proc: subprocess.Popen[str], out: Path, timeout: float) -> bool:
    """SIGKILL ``proc`` the moment a checkpoint's temporary file appears beside a complete checkpoint."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "checkpoint.pth").exists() and any(out.glob(".*.partial")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    return False


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_usable(
    data: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    for _attempt in range(3):  # the poll may see a write only after it ended; then try again
        proc = start(data, out)
        try:
            killed = _kill_during_a_write(proc, out, timeout=120)
        finally:
            proc.kill()
            proc.wait()
        if killed and list(out.glob(".*.partial")):
            break
    else:
        pytest.fail("no SIGKILL landed while a checkpoint was being written")
    # The checkpoint on disk is whole: a complete training checkpoint from before the torn write.
    whole = load_checkpoint(out)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "step", "history"} <= set(whole)
    assert (whole["epoch"], whole["step"]) < (2, 0)
    # Started again without --resume: it removes the torn file and resumes from the whole one.
    assert main(tiny_train_args(data, out, *STEPS)) == 0
    assert not list(out.glob(".*.partial"))
    assert_ends_like_straight(out, straight)


def test_a_torn_checkpoint_file_is_refused_with_one_clear_line(
    data: Path, straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = (straight / "checkpoint.pth").read_bytes()
    torn = tmp_path / "torn.pth"
    torn.write_bytes(whole[: len(whole) // 2])
    assert main(tiny_train_args(data, tmp_path / "out", *STEPS, "--resume", str(torn))) == 1
    assert f"cannot resume from {torn}" in capsys.readouterr().err
    assert torch.load(straight / "checkpoint.pth", weights_only=True)["epoch"] == 2
