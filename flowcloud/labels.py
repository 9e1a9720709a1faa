"""The Cityscapes label set: the one owner of class ids, names and colours.

Two label sets are used: ``labelIds-34`` (all 34 official label ids, as the original FlowCloud
trained) and ``trainIds-19`` (the 19 evaluated classes of the Cityscapes benchmark, 255 = ignore).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class CityscapesLabel:
    name: str
    label_id: int
    train_id: int
    color: tuple[int, int, int]


# The official table (cityscapesScripts, helpers/labels.py), without the -1 license plate.
LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, (119, 11, 32)),
)

NUM_LABEL_IDS = len(LABELS)
LABEL_BY_NAME = {label.name: label for label in LABELS}

# Lookup tables indexed by the 8-bit value of a map (unknown values map to ignore / black).
_LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TRAIN_TO_LABEL = np.zeros(256, dtype=np.uint8)
for _label in LABELS:
    _LABEL_TO_TRAIN[_label.label_id] = _label.train_id
    if _label.train_id != IGNORE_INDEX:
        _TRAIN_TO_LABEL[_label.train_id] = _label.label_id


def label_to_train(label_map: np.ndarray) -> np.ndarray:
    """Map a labelId map (uint8) to trainIds; labels outside the 19 classes become 255."""
    return _LABEL_TO_TRAIN[np.asarray(label_map, dtype=np.uint8)]


def train_to_label(train_map: np.ndarray) -> np.ndarray:
    """Map a trainId map to labelIds; 255 (ignore) becomes 0 (unlabeled)."""
    return _TRAIN_TO_LABEL[np.asarray(train_map, dtype=np.uint8)]


@dataclass(frozen=True)
class LabelSet:
    """The classes a model predicts: index ``i`` of the model output is class ``i`` here."""

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def palette(self) -> np.ndarray:
        """A 256x3 uint8 colour table; ids outside the set (and 255) are black."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return table

    def to_label_ids(self, class_map: np.ndarray) -> np.ndarray:
        """Class indices of this set as Cityscapes labelIds."""
        return class_map.astype(np.uint8) if self.name == LABEL_IDS.name else train_to_label(class_map)

    def from_label_ids(self, label_map: np.ndarray) -> np.ndarray:
        """Cityscapes labelIds as targets for this set (255 where the set ignores the label)."""
        return label_map.astype(np.uint8) if self.name == LABEL_IDS.name else label_to_train(label_map)

    def colorize(self, class_map: np.ndarray) -> np.ndarray:
        """An HxW class map as an HxWx3 RGB image in the official colours."""
        return self.palette[np.asarray(class_map, dtype=np.uint8)]


LABEL_IDS = LabelSet(
    "labelIds-34",
    tuple(label.name for label in LABELS),
    tuple(label.color for label in LABELS),
)
_TRAIN_LABELS = sorted((lb for lb in LABELS if lb.train_id != IGNORE_INDEX), key=lambda lb: lb.train_id)
TRAIN_IDS = LabelSet(
    "trainIds-19",
    tuple(label.name for label in _TRAIN_LABELS),
    tuple(label.color for label in _TRAIN_LABELS),
)
LABEL_SETS = {LABEL_IDS.name: LABEL_IDS, TRAIN_IDS.name: TRAIN_IDS}


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; choose one of {', '.join(LABEL_SETS)}") from None


def blend_overlay(frame_rgb: np.ndarray, color_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB colour mask onto an RGB frame of the same size (alpha = mask weight)."""
    if frame_rgb.shape != color_mask.shape:
        raise ValueError(f"frame {frame_rgb.shape} and mask {color_mask.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    mixed = frame_rgb.astype(np.float32) * (1.0 - alpha) + color_mask.astype(np.float32) * alpha
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def class_shares(class_map: np.ndarray, num_classes: int) -> dict[int, float]:
    """The fraction of pixels of each class present in the map (absent classes are omitted)."""
    counts = np.bincount(np.asarray(class_map, dtype=np.int64).ravel(), minlength=num_classes)
    total = float(class_map.size) or 1.0
    return {int(i): float(c) / total for i, c in enumerate(counts) if c}
