"""The synthetic street generator: deterministic, exact labels, all the promised classes; its CLI."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from flowcloud.cli.main import main
from flowcloud.labels import LABEL_IDS
from training.codec import h264_roundtrip
from training.synth import ROAD, SKY, SYNTH_LABEL_IDS, SceneSequence
from training.synth_cli import frame_stem, scene_seed


def test_frames_are_a_pure_function_of_seed_size_and_index() -> None:
    a = SceneSequence(7, 128, 96)
    b = SceneSequence(7, 128, 96)
    late = b.frame(40)
    rgb_a, lab_a = a.frame(3)
    rgb_b, lab_b = b.frame(3)  # rendered after a later frame: no hidden state
    assert np.array_equal(rgb_a, rgb_b) and np.array_equal(lab_a, lab_b)
    assert np.array_equal(late[0], a.frame(40)[0])
    assert rgb_a.shape == (96, 128, 3) and rgb_a.dtype == np.uint8
    assert lab_a.shape == (96, 128) and lab_a.dtype == np.uint8
    other, _ = SceneSequence(8, 128, 96).frame(3)
    assert not np.array_equal(rgb_a, other)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_every_labelled_pixel_agrees_with_what_was_drawn(seed: int) -> None:
    """In clean mode each class is painted in its official colour by the same drawing calls."""
    clean = SceneSequence(seed, 160, 120, clean=True)
    textured = SceneSequence(seed, 160, 120)
    for index in (0, 17, 45):
        rgb, labels = clean.frame(index)
        assert np.array_equal(rgb, LABEL_IDS.colorize(labels)), f"seed {seed} frame {index}"
        assert np.array_equal(textured.frame(index)[1], labels)  # texture never moves an edge
        assert set(np.unique(labels)) <= set(SYNTH_LABEL_IDS)


def test_scene_geometry_is_plausible() -> None:
    scene = SceneSequence(5, 200, 150)
    for index in range(0, 60, 20):
        _, labels = scene.frame(index)
        _, _, _, horizon = scene.camera(index)
        rows = np.arange(labels.shape[0])[:, None]
        assert not ((labels == ROAD) & (rows < horizon - 1)).any(), "road above the horizon"
        assert not ((labels == SKY) & (rows > horizon + 1)).any(), "sky below the horizon"
        assert (labels[-1] == ROAD).any(), "no road at the bottom of the frame"


def test_all_promised_classes_appear_and_colour_alone_does_not_tell_them_apart() -> None:
    seen: set[int] = set()
    means: dict[int, list[np.ndarray]] = {}
    for seed in range(6):
        scene = SceneSequence(seed, 320, 240)
        for index in (0, 30):
            rgb, labels = scene.frame(index)
            seen |= set(np.unique(labels).tolist())
            for label in (ROAD, SKY):
                if (labels == label).any():
                    means.setdefault(label, []).append(rgb[labels == label].mean(axis=0))
    assert seen == set(SYNTH_LABEL_IDS)
    # The same class looks different from scene to scene (light, tint, material).
    for label, values in means.items():
        assert np.ptp(np.stack(values), axis=0).max() > 25, LABEL_IDS.class_names[label]


def test_frames_move_over_time() -> None:
    scene = SceneSequence(2, 128, 96)
    assert not np.array_equal(scene.frame(0)[1], scene.frame(30)[1])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        SceneSequence(0, 4, 4)
    with pytest.raises(ValueError, match="non-negative"):
        SceneSequence(0, 64, 64).frame(-1)


def test_h264_roundtrip_keeps_count_order_and_content() -> None:
    scene = SceneSequence(1, 128, 64)
    frames = [scene.frame(i)[0] for i in range(6)]
    decoded = list(h264_roundtrip(frames, crf=23))
    assert len(decoded) == 6
    for original, back in zip(frames, decoded, strict=True):
        assert back.shape == original.shape
        mse = np.mean((original.astype(np.float64) - back) ** 2)
        assert 10 * np.log10(255**2 / mse) > 25  # decodes to the same picture, with codec loss


def test_synth_cli_writes_cityscapes_layout_and_video(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synth"
    args = ["synth", str(out), "--frames", "5", "--seed", "4", "--size", "64x128", "--sequence-length", "3"]
    assert main([*args, "--video", "--codec-share", "1", "--json"]) == 0
    assert '"frames": 5' in capsys.readouterr().out
    images = sorted((out / "leftImg8bit" / "train" / "synth4").glob("*_leftImg8bit.png"))
    labels = sorted((out / "gtFine" / "train" / "synth4").glob("*_gtFine_labelIds.png"))
    assert [p.name.removesuffix("_leftImg8bit.png") for p in images] == [
        frame_stem(4, 0, 0),
        frame_stem(4, 0, 1),
        frame_stem(4, 0, 2),
        frame_stem(4, 1, 0),
        frame_stem(4, 1, 1),
    ]
    assert len(labels) == 5
    # Ground truth is exact: the label PNG of sequence 1, frame 1 is that scene's frame 1.
    expected = SceneSequence(scene_seed(4, 1), 128, 64).frame(1)[1]
    written = cv2.imread(str(labels[4]), cv2.IMREAD_UNCHANGED)
    assert written is not None and np.array_equal(written, expected)
    with av.open(str(out / "video.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(stream)) == 5
    assert len(list((out / "video_gt").glob("frame_*.png"))) == 5


def test_synth_cli_rejects_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path), "--size", "65x100"]) == 1
    assert "multiples of 8" in capsys.readouterr().err
