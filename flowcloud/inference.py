"""Batched segmentation of RGB frames: the one inference path shared by `infer` and the workers."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flowcloud.zoo import LoadedModel

# torchvision's segmentation models are trained on ImageNet-normalised input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRECISIONS = ("fp32", "bf16", "fp16")


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. ``256x512``) as a (height, width) pair of positive multiples of 8."""
    try:
        h_text, w_text = text.lower().split("x")
        height, width = int(h_text), int(w_text)
    except ValueError:
        raise ValueError(f"size must look like HxW, e.g. 256x512; got {text!r}") from None
    if not (8 <= height <= 4096 and 8 <= width <= 4096) or height % 8 or width % 8:
        raise ValueError(f"size {text!r}: height and width must be multiples of 8 within 8..4096")
    return height, width


@dataclass
class SegmenterOptions:
    device: str = "cpu"
    size: tuple[int, int] | None = None  # model input (H, W); None keeps each frame's own size
    precision: str = "fp32"
    channels_last: bool = True


class Segmenter:
    """Runs a zoo model on batches of same-sized uint8 RGB frames and returns class maps."""

    def __init__(self, loaded: LoadedModel, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        if self.options.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.options.precision!r}")
        self.device = torch.device(self.options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
        self.loaded = loaded
        self.label_set = loaded.label_set
        self.model = loaded.module.to(self.device).eval()
        self.memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    def to_tensor(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack HxWx3 uint8 frames into an NHWC uint8 tensor (pinned on the CPU when using CUDA)."""
        batch = torch.from_numpy(np.stack(frames))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.options.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def predict_tensor(self, batch_nhwc: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """NHWC uint8 frames to NxHxW uint8 class maps at ``out_size`` (default: the frames' size)."""
        if batch_nhwc.ndim != 4 or batch_nhwc.shape[-1] != 3:
            raise ValueError(f"expected an NxHxWx3 batch, got shape {tuple(batch_nhwc.shape)}")
        height, width = int(batch_nhwc.shape[1]), int(batch_nhwc.shape[2])
        out_size = out_size or (height, width)
        x = batch_nhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        if self.options.size is not None and self.options.size != (height, width):
            x = F.interpolate(x, size=self.options.size, mode="bilinear", align_corners=False)
        with self._autocast():
            logits = self.model(x)["out"]
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
        return logits.argmax(dim=1).to(torch.uint8)

    def predict(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class maps (HxW uint8) for same-sized HxWx3 uint8 RGB frames."""
        if not frames:
            return []
        maps = self.predict_tensor(self.to_tensor(frames)).cpu().numpy()
        return list(maps)
