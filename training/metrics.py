"""Segmentation metrics from a confusion matrix accumulated with ``bincount``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowcloud.labels import IGNORE_INDEX


@dataclass(frozen=True)
class SegmentationScores:
    pixel_accuracy: float
    mean_iou: float
    iou: list[float | None]  # per class; None where the class is in neither target nor prediction
    pixels: int

    def as_dict(self, class_names: tuple[str, ...] | None = None) -> dict[str, object]:
        per_class: dict[str, float | None] = {
            (class_names[i] if class_names else str(i)): v for i, v in enumerate(self.iou)
        }
        return {
            "pixel_accuracy": self.pixel_accuracy,
            "mean_iou": self.mean_iou,
            "pixels": self.pixels,
            "iou": per_class,
        }


class ConfusionMatrix:
    """``mat[t, p]`` counts pixels of true class ``t`` predicted as ``p``; ignored pixels are skipped.

    IoU of a class is TP / (TP + FP + FN); a class absent from both target and prediction has no
    IoU and is left out of the mean (a class predicted but absent counts, with IoU 0).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, target: torch.Tensor | np.ndarray, prediction: torch.Tensor | np.ndarray) -> None:
        """Add a batch: ``target`` and ``prediction`` are integer class maps of the same shape."""
        t = torch.as_tensor(target).flatten().to("cpu", torch.int64)
        p = torch.as_tensor(prediction).flatten().to("cpu", torch.int64)
        if t.shape != p.shape:
            raise ValueError(f"target {tuple(t.shape)} and prediction {tuple(p.shape)} differ in size")
        n = self.num_classes
        keep = (t >= 0) & (t < n) & (t != self.ignore_index)
        t, p = t[keep], p[keep]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"prediction holds class ids outside 0..{n - 1}")
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def reset(self) -> None:
        self.mat.zero_()

    def scores(self) -> SegmentationScores:
        mat = self.mat.double()
        tp = mat.diag()
        total = float(mat.sum())
        union = mat.sum(0) + mat.sum(1) - tp
        iou = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(self.num_classes)]
        valid = [v for v in iou if v is not None]
        return SegmentationScores(
            pixel_accuracy=float(tp.sum()) / total if total else 0.0,
            mean_iou=float(np.mean(valid)) if valid else 0.0,
            iou=iou,
            pixels=int(total),
        )
