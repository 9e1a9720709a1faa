"""Transform presets for training and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from training import transforms as T


class SegmentationPresetTrain:
    """Random scale (relative to ``base_size``), crop, flip, colour jitter and codec-like degradation."""

    def __init__(
        self,
        crop_size: tuple[int, int],
        base_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip_prob: float = 0.5,
        jitter: bool = True,
        degrade: bool = True,
    ) -> None:
        steps: list[object] = [T.RandomScale(*scale_range, base=base_size), T.RandomCrop(crop_size)]
        if hflip_prob > 0:
            steps.append(T.RandomHorizontalFlip(hflip_prob))
        if jitter:
            steps.append(T.ColorJitter())
        if degrade:
            steps += [T.RandomBlur(), T.RandomJpeg()]
        steps += [T.ToTensor(), T.Normalize()]
        self.transforms = T.Compose(steps)

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(image, target)  # type: ignore[return-value]


class SegmentationPresetEval:
    """Resize to ``size`` (HxW) if given, then normalise."""

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        steps: list[object] = [T.Resize(size)] if size else []
        self.transforms = T.Compose([*steps, T.ToTensor(), T.Normalize()])

    def __call__(self, image: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms(image, target)  # type: ignore[return-value]
