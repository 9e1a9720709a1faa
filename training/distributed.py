"""Data-parallel training under ``torchrun``: which process this is, and the sums across processes.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them training runs as one
process with no process group. NCCL carries the collectives between GPUs, gloo between CPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from training.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and the device its collectives use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and charts."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place; returns it (on its own device)."""
        if not self.distributed:
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        if on_device is not tensor:
            tensor.copy_(on_device)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (pickled; for checkpoints and small values)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start(device_name: str) -> Ranks:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for, but no CUDA device is available")
        if world_size > 1 or device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        log.info("rank %d of %d (%s, %s)", rank, world_size, backend, device)
    return Ranks(rank, world_size, local_rank, device)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
