"""``--sync-bn``: batch normalisation over the global batch, on GPUs and on CPUs.

On CUDA this is PyTorch's ``SyncBatchNorm``. PyTorch's version refuses CPU tensors, so on CPUs
(gloo) ``GlobalBatchNorm2d`` sums the statistics across processes with a differentiable
all-reduce: the same mean and variance as one process over the whole batch, and the same
gradients, which is what lets a 2-process CPU run reproduce a 1-process run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum across processes; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    out: torch.Tensor = _AllReduceSum.apply(tensor, group)
    return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch across all processes."""

    group: Any = None  # its own process group, so its collectives never interleave with DDP's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = _all_reduce_sum(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype), self.group)
        mean = _all_reduce_sum(x.sum(dims), self.group) / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _all_reduce_sum(centred.square().sum(dims), self.group) / count
        tracked = self.num_batches_tracked
        if self.running_mean is not None and self.running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                momentum = 1.0 / float(tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` normalises over the global batch (call after joining the group)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    group = dist.new_group(backend="gloo")
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            module.group = group  # type: ignore[assignment]
    return model
