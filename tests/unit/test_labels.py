from __future__ import annotations

import numpy as np
import pytest

from flowcloud import labels
from flowcloud.labels import LABEL_IDS, TRAIN_IDS, blend_overlay, class_shares, get_label_set


def test_tables_have_official_counts() -> None:
    assert labels.NUM_LABEL_IDS == 34
    assert [lb.label_id for lb in labels.LABELS] == list(range(34))
    assert LABEL_IDS.num_classes == 34
    assert TRAIN_IDS.num_classes == 19
    assert sorted(lb.train_id for lb in labels.LABELS if lb.train_id != 255) == list(range(19))


def test_official_colours_and_names() -> None:
    by_name = labels.LABEL_BY_NAME
    assert by_name["road"].color == (128, 64, 128) and by_name["road"].label_id == 7
    assert by_name["car"].color == (0, 0, 142) and by_name["car"].train_id == 13
    assert by_name["sky"].color == (70, 130, 180) and by_name["sky"].train_id == 10
    assert TRAIN_IDS.class_names[0] == "road" and TRAIN_IDS.class_names[18] == "bicycle"
    assert TRAIN_IDS.colors[11] == (220, 20, 60)  # person


def test_label_train_round_trip() -> None:
    all_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    train = labels.label_to_train(all_ids)
    evaluated = train != 255
    assert evaluated.sum() == 19
    back = labels.train_to_label(train)
    np.testing.assert_array_equal(back[evaluated], all_ids[evaluated])
    assert (back[~evaluated] == 0).all()  # ignored classes come back as "unlabeled"
    np.testing.assert_array_equal(labels.label_to_train(labels.train_to_label(np.arange(19))), np.arange(19))


def test_unknown_ids_are_ignored() -> None:
    assert labels.label_to_train(np.array([200, 34], dtype=np.uint8)).tolist() == [255, 255]


def test_colorize_uses_palette() -> None:
    class_map = np.array([[7, 26], [23, 0]], dtype=np.uint8)
    rgb = LABEL_IDS.colorize(class_map)
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [128, 64, 128]
    assert rgb[0, 1].tolist() == [0, 0, 142]
    assert rgb[1, 0].tolist() == [70, 130, 180]
    assert TRAIN_IDS.colorize(np.array([[255]], dtype=np.uint8))[0, 0].tolist() == [0, 0, 0]


def test_label_set_conversions() -> None:
    ids = np.array([[7, 8, 4]], dtype=np.uint8)
    assert TRAIN_IDS.from_label_ids(ids).tolist() == [[0, 1, 255]]
    assert LABEL_IDS.from_label_ids(ids).tolist() == ids.tolist()
    assert TRAIN_IDS.to_label_ids(np.array([[0, 13]])).tolist() == [[7, 26]]


def test_get_label_set() -> None:
    assert get_label_set("trainIds-19") is TRAIN_IDS
    with pytest.raises(ValueError, match="unknown label set 'coco'"):
        get_label_set("coco")


def test_blend_overlay() -> None:
    frame = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.full((2, 2, 3), 200, dtype=np.uint8)
    assert blend_overlay(frame, mask, 0.5)[0, 0].tolist() == [150, 150, 150]
    assert blend_overlay(frame, mask, 0.0)[0, 0].tolist() == [100, 100, 100]
    assert blend_overlay(frame, mask, 1.0)[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match="differ in shape"):
        blend_overlay(frame, mask[:1], 0.5)


def test_class_shares() -> None:
    shares = class_shares(np.array([[7, 7], [7, 26]], dtype=np.uint8), 34)
    assert shares == {7: 0.75, 26: 0.25}
