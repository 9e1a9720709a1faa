"""Training checkpoints: written atomically, found again after a restart.

A checkpoint is one dict (torchvision's reference layout): ``model``, ``optimizer``,
``lr_scheduler``, ``epoch`` (the last complete epoch, -1 before the first), ``args``, plus
``scaler``, ``meta`` (what ``flowcloud infer``/``export`` read), ``history`` (per-epoch metrics)
and, for one written mid-epoch, ``step`` (batches done of epoch ``epoch + 1``) and ``partial`` (that
epoch's metric sums so far). It is written to a temporary file in the same directory, flushed to
disk, then renamed over ``checkpoint.pth``: a process killed mid-write (even with SIGKILL) leaves the
previous checkpoint whole, and a restart removes the torn temporary file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from training.errors import TrainingError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
PARTIAL_SUFFIX = ".partial"
REQUIRED = frozenset({"model", "optimizer", "lr_scheduler", "epoch", "args"})


def save(checkpoint: dict[str, Any], path: Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically and durably (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def remove_partial(directory: Path) -> list[Path]:
    """Delete temporary files a killed writer left behind; returns them."""
    torn = sorted(directory.glob(f".*{PARTIAL_SUFFIX}"))
    for path in torn:
        path.unlink(missing_ok=True)
        log.warning("removed %s, a checkpoint whose writing was interrupted", path)
    return torn


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, if there is one."""
    path = directory / CHECKPOINT
    return path if path.is_file() else None


def load(path: Path) -> dict[str, Any]:
    """A training checkpoint, or a TrainingError that says why it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise TrainingError(f"cannot resume from {path}: {exc}") from None
    if not isinstance(checkpoint, dict):
        raise TrainingError(f"{path} is not a training checkpoint (a {type(checkpoint).__name__})")
    missing = REQUIRED - set(checkpoint)
    if missing:
        raise TrainingError(f"{path} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return checkpoint
