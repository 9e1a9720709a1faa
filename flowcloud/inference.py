"""Batched segmentation of RGB frames: the one inference path shared by `infer` and the workers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental import optimization as fx_optimization

from flowcloud.settings import CompileMode, Precision
from flowcloud.zoo import LoadedModel

log = logging.getLogger(__name__)

# torchvision's segmentation models are trained on ImageNet-normalised input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRECISIONS: tuple[str, ...] = get_args(Precision)


COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


@dataclass
class SegmenterOptions:
    device: str = "cpu"
    size: tuple[int, int] | None = None  # model input (H, W); None keeps each frame's own size
    precision: str = "fp32"
    channels_last: bool = True
    # Fold BatchNorm into the preceding convolutions (eval only): about 1.3x on CPU, exact to fp32 rounding.
    fuse: bool = True
    # torch.compile mode (None = eager). "reduce-overhead" uses CUDA graphs on a GPU.
    compile: str | None = None
    # Pad every batch to this many frames so shapes stay static (what compiled graphs want).
    static_batch: int | None = None
    # Pad each batch to the next power of two (at most this many frames): a few shapes, which
    # cudnn.benchmark can tune once at warm-up instead of on live frames.
    bucket_batches: int | None = None


class Segmenter:
    """Runs a zoo model on batches of same-sized uint8 RGB frames and returns class maps.

    CPU: inference_mode, channels_last, BatchNorm folded into convolutions. GPU: the same plus
    cudnn.benchmark, bf16/fp16 autocast, pinned host memory with non-blocking copies, and
    optionally torch.compile (CUDA graphs with ``compile="reduce-overhead"``) on static batches.
    """

    def __init__(self, loaded: LoadedModel, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        if self.options.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.options.precision!r}")
        if self.options.compile is not None and self.options.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.options.compile!r}")
        for name in ("static_batch", "bucket_batches"):
            value = getattr(self.options, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.device = torch.device(self.options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.loaded = loaded
        self.label_set = loaded.label_set
        self.memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        module = loaded.module.eval()
        if self.options.fuse:
            module = _fold_batch_norm(module)
        self.model: nn.Module = module.to(self.device).to(memory_format=self.memory_format)
        self._forward: Callable[[torch.Tensor], Any] = self.model
        if self.options.compile is not None:
            self._forward = torch.compile(self.model, mode=self.options.compile, dynamic=False)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    def to_tensor(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack HxWx3 uint8 frames into an NHWC uint8 tensor (pinned on the CPU when using CUDA).

        Frames are copied once, straight into the (pinned) batch; safe to call from a thread
        other than the one running ``predict_tensor``, to prepare the next batch meanwhile.
        """
        first = frames[0]
        batch = torch.empty(
            (len(frames), *first.shape), dtype=torch.uint8, pin_memory=self.device.type == "cuda"
        )
        for i, frame in enumerate(frames):
            if frame.shape != first.shape:
                raise ValueError(f"frames in a batch must share one size: {frame.shape} vs {first.shape}")
            batch[i].copy_(torch.from_numpy(np.ascontiguousarray(frame, dtype=np.uint8)))
        return batch

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def predict_tensor(
        self, batch_nhwc: torch.Tensor, out_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """NHWC uint8 frames to NxHxW uint8 class maps at ``out_size`` (default: the frames' size)."""
        if batch_nhwc.ndim != 4 or batch_nhwc.shape[-1] != 3:
            raise ValueError(f"expected an NxHxWx3 batch, got shape {tuple(batch_nhwc.shape)}")
        count, height, width = (int(d) for d in batch_nhwc.shape[:3])
        out_size = out_size or (height, width)
        static = self.options.static_batch
        if static is not None and count > static:
            return torch.cat(
                [self.predict_tensor(part, out_size) for part in batch_nhwc.split(static)], dim=0
            )
        x = batch_nhwc.to(self.device, non_blocking=True)
        padded = self.padded_count(count)
        if padded > count:
            x = torch.cat([x, x.new_zeros((padded - count, height, width, 3))], dim=0)
        # NHWC uint8 permuted to NCHW is already channels_last in memory: no copy before the model.
        x = x.permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        if self.options.size is not None and self.options.size != (height, width):
            x = F.interpolate(x, size=self.options.size, mode="bilinear", align_corners=False)
        with self._autocast():
            logits = self._forward(x)["out"]
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
        return logits[:count].argmax(dim=1).to(torch.uint8)

    def padded_count(self, count: int) -> int:
        """How many frames a batch of ``count`` is padded to before the model sees it."""
        if self.options.static_batch is not None:
            return max(count, self.options.static_batch)
        cap = self.options.bucket_batches
        if cap is None or count >= cap:
            return count
        return min(1 << (count - 1).bit_length(), cap)

    def batch_shapes(self, largest: int) -> list[int]:
        """The distinct padded batch sizes that batches of 1..``largest`` frames run as."""
        return sorted({self.padded_count(n) for n in range(1, largest + 1)})

    def predict(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class maps (HxW uint8) for same-sized HxWx3 uint8 RGB frames."""
        if not frames:
            return []
        maps = self.predict_tensor(self.to_tensor(frames)).cpu().numpy()
        return list(maps)


def _fold_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm folded into the convolution before it."""
    try:
        return fx_optimization.fuse(module, inplace=False)
    except Exception as exc:  # a model fx cannot trace still runs, just unfused
        log.warning("cannot fold BatchNorm into convolutions (%s); running the model unfused", exc)
        return module
