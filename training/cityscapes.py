"""A reader for the official Cityscapes layout (and synthetic data written in it).

    ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png

Targets come in the label set the model predicts: labelIds-34 as stored, or trainIds-19 via
``LabelSet.from_label_ids`` (classes outside the 19 become the ignore index 255).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from flowcloud.labels import LabelSet

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")
MAX_PIXELS = 64_000_000  # a bound on what one image may decode to

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class CityscapesError(ValueError):
    """The folder is not in the Cityscapes layout, or a file is missing or unreadable."""


def find_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """Every (image, labelIds) path pair of ``split`` under ``root``, sorted; errors say what is wrong."""
    root = Path(root)
    if split not in SPLITS:
        raise CityscapesError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise CityscapesError(f"dataset root {root} does not exist or is not a folder")
    image_root = root / "leftImg8bit" / split
    label_root = root / "gtFine" / split
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise CityscapesError(
                f"{root} is not in the Cityscapes layout: missing {folder.relative_to(root)}/ "
                f"(expected leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX} and "
                f"gtFine/{split}/<city>/*{LABEL_SUFFIX})"
            )
    images = sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise CityscapesError(f"no *{IMAGE_SUFFIX} files in {image_root}/<city>/")
    pairs = []
    missing = []
    for image in images:
        stem = image.name.removesuffix(IMAGE_SUFFIX)
        label = label_root / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if label.is_file():
            pairs.append((image, label))
        else:
            missing.append(label)
    if missing:
        raise CityscapesError(
            f"{len(missing)} of {len(images)} images in {image_root} have no ground truth "
            f"(first: {missing[0]})"
        )
    return pairs


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image (HxWx3)."""
    image = _imread(path, cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label_ids(path: Path) -> np.ndarray:
    """A labelIds map (HxW uint8)."""
    labels = _imread(path, cv2.IMREAD_UNCHANGED)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise CityscapesError(f"{path} is not a single-channel 8-bit labelIds PNG (shape {labels.shape})")
    return labels


def _imread(path: Path, flags: int) -> np.ndarray:
    try:
        header = path.read_bytes()[:24]
    except OSError as exc:
        raise CityscapesError(f"cannot read {path}: {exc}") from exc
    if header[:8] == b"\x89PNG\r\n\x1a\n" and len(header) >= 24:
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
        if width * height > MAX_PIXELS:
            raise CityscapesError(f"{path} is {width}x{height}, larger than {MAX_PIXELS} pixels")
    image = cv2.imread(str(path), flags)
    if image is None:
        raise CityscapesError(f"cannot decode {path} as an image")
    return image


class CityscapesSegmentation(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image, target) pairs of one split, targets in ``label_set``, after ``transforms``."""

    def __init__(
        self, root: str | Path, split: str, label_set: LabelSet, transforms: Transform | None = None
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.label_set = label_set
        self.transforms = transforms
        self.pairs = find_pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: RGB uint8 image and target (in the label set) as uint8 arrays."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        target = self.label_set.from_label_ids(read_label_ids(label_path))
        if image.shape[:2] != target.shape:
            raise CityscapesError(f"{image_path} is {image.shape[:2]} but its labels are {target.shape}")
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.load(index)
        if self.transforms is None:
            return torch.from_numpy(image), torch.from_numpy(target)
        return self.transforms(image, target)
