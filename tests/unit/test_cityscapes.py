"""The Cityscapes-layout reader on a tiny tree in the official layout, and the joint transforms."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from flowcloud.labels import IGNORE_INDEX, LABEL_IDS, TRAIN_IDS
from training import transforms as T
from training.cityscapes import CityscapesError, CityscapesSegmentation, find_pairs
from training.presets import SegmentationPresetEval, SegmentationPresetTrain


def make_tree(root: Path, split: str = "train", cities: tuple[str, ...] = ("aachen", "bochum")) -> None:
    """Two cities, two frames each, 16x32; labels are stripes of road (7), car (26) and unlabeled (0)."""
    for c, city in enumerate(cities):
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for f in range(2):
            stem = f"{city}_{c:06d}_{f:06d}"
            image = np.full((16, 32, 3), 40 * (c + f), np.uint8)
            image[..., 0] = 200  # red channel marks RGB order
            labels = np.zeros((16, 32), np.uint8)
            labels[8:] = 7
            labels[8:, 10:20] = 26
            cv2.imwrite(
                str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), image[..., ::-1]
            )
            cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), labels)
            # Files the reader must ignore.
            cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}_gtFine_color.png"), image)


def test_reads_pairs_in_label_ids_mode(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dataset = CityscapesSegmentation(tmp_path, "train", LABEL_IDS)
    assert len(dataset) == 4
    assert [p[0].parent.name for p in dataset.pairs] == ["aachen", "aachen", "bochum", "bochum"]
    image, target = dataset.load(0)
    assert image.shape == (16, 32, 3) and image[0, 0, 0] == 200  # RGB, not BGR
    assert set(np.unique(target)) == {0, 7, 26}


def test_train_ids_mode_maps_and_ignores(tmp_path: Path) -> None:
    make_tree(tmp_path)
    _, target = CityscapesSegmentation(tmp_path, "train", TRAIN_IDS).load(1)
    assert target[0, 0] == IGNORE_INDEX  # unlabeled is not one of the 19 classes
    assert target[15, 0] == 0  # road
    assert target[15, 15] == 13  # car


def test_transforms_produce_normalised_tensors(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dataset = CityscapesSegmentation(
        tmp_path, "train", LABEL_IDS, SegmentationPresetTrain((8, 16), None, (0.5, 1.0))
    )
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 8, 16) and tuple(target.shape) == (8, 16)
    assert set(target.unique().tolist()) <= {0, 7, 26, IGNORE_INDEX}
    image, target = CityscapesSegmentation(tmp_path, "train", LABEL_IDS, SegmentationPresetEval((8, 16)))[0]
    assert tuple(image.shape) == (3, 8, 16)


def test_wrong_root_and_missing_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CityscapesError, match="does not exist"):
        find_pairs(tmp_path / "nowhere", "train")
    with pytest.raises(CityscapesError, match="not in the Cityscapes layout: missing leftImg8bit/train"):
        find_pairs(tmp_path, "train")
    with pytest.raises(CityscapesError, match="unknown split"):
        find_pairs(tmp_path, "training")
    make_tree(tmp_path)
    with pytest.raises(CityscapesError, match="missing leftImg8bit/val"):
        find_pairs(tmp_path, "val")
    (tmp_path / "gtFine" / "train" / "bochum" / "bochum_000001_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(CityscapesError, match="1 of 4 images .* have no ground truth"):
        find_pairs(tmp_path, "train")
    make_tree(tmp_path / "empty", cities=())
    (tmp_path / "empty" / "leftImg8bit" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(CityscapesError, match="no \\*_leftImg8bit.png files"):
        find_pairs(tmp_path / "empty", "train")


def test_corrupt_image_is_reported(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dataset = CityscapesSegmentation(tmp_path, "train", LABEL_IDS)
    dataset.pairs[0][0].write_bytes(b"not a png at all")
    with pytest.raises(CityscapesError, match="cannot decode"):
        dataset.load(0)


def test_joint_transforms_keep_labels_exact() -> None:
    random.seed(0)
    image = np.zeros((20, 40, 3), np.uint8)
    target = np.zeros((20, 40), np.uint8)
    target[:, 20:] = 26
    _, tgt = T.RandomScale(1.7, 1.7)(image, target)
    assert tgt.shape == (34, 68) and set(np.unique(tgt)) == {0, 26}  # nearest: no blended ids
    _, tgt = T.RandomCrop((30, 50))(image, target)
    assert tgt.shape == (30, 50) and (tgt == IGNORE_INDEX).sum() == 30 * 50 - 20 * 40  # padding: ignored
    _, flipped = T.RandomHorizontalFlip(1.0)(image, target)
    assert flipped[0, 0] == 26 and flipped[0, -1] == 0
    jittered, same = T.ColorJitter()(np.full((4, 4, 3), 128, np.uint8), target[:4, :4])
    assert jittered.dtype == np.uint8 and same is not None
    assert np.array_equal(same, target[:4, :4])  # colours change, labels never
    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    jpeg, kept = T.RandomJpeg(p=1.0)(noise, target)
    assert jpeg.shape == (16, 16, 3)
    assert not np.array_equal(jpeg, noise) and np.array_equal(kept, target)  # lossy pixels, exact labels
