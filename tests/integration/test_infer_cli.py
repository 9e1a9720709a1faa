"""`flowcloud infer` end to end, as a user runs it: a real process, real files, real H.264. The
refusals run the same entry point in this process (`flowcloud.cli.main.main`): a process start
costs seconds of torch import each, and what is checked (the exit status, one line on stderr, no
traceback) is the entry point's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from flowcloud.cli.main import main
from flowcloud.x264 import Mp4Writer

FLOWCLOUD = [sys.executable, "-m", "flowcloud"]
MODEL = ["--random-weights", "--model", "lraspp_mobilenet_v3_large"]


def flowcloud(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOWCLOUD, *map(str, args)], capture_output=True, text=True, timeout=300)


def make_video(path: Path, frames: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    with Mp4Writer(path, width, height, 10) as sink:
        for i in range(frames):
            rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            rgb[:, : (i * 7) % width] = (40, 200, 90)
            sink.write(rgb)


def test_help_lists_commands() -> None:
    result = flowcloud("--help")
    assert result.returncode == 0
    for command in ("infer", "train", "gateway", "worker", "api", "edge", "demo"):
        assert f"  {command} " in result.stdout


def test_image_writes_three_pngs_at_input_size(tmp_path: Path) -> None:
    image = tmp_path / "street.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (75, 130, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = flowcloud("infer", image, "-o", out, "--size", "64x128", "--json", *MODEL)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "image" and summary["width"] == 130
    color = np.asarray(Image.open(out / "street_color.png"))
    overlay = np.asarray(Image.open(out / "street_overlay.png"))
    label_img = Image.open(out / "street_labelIds.png")
    assert label_img.mode == "L"
    labels = np.asarray(label_img)
    assert color.shape == overlay.shape == (75, 130, 3)
    assert labels.shape == (75, 130)
    assert labels.max() < 34
    # The colour image is exactly the label map drawn in the official palette.
    from flowcloud.labels import LABEL_IDS

    np.testing.assert_array_equal(LABEL_IDS.colorize(labels), color)


def test_video_writes_mp4_with_same_frame_count(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    make_video(video, frames=9, width=96, height=64)
    out = tmp_path / "out"
    result = flowcloud("infer", video, "-o", out, "--batch-size", "4", "--json", *MODEL)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames"] == 9 and summary["fps"] > 0
    with av.open(str(out / "clip_overlay.mp4")) as written:
        stream = written.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = [f.to_ndarray(format="rgb24") for f in written.decode(stream)]
    assert len(decoded) == 9
    assert decoded[0].shape == (64, 96, 3)
    assert "fps" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.png", "does not exist"),
        (b"this is not an image", "bad.png", "cannot read image"),
        (b"\x00\x01 not a video at all", "bad.mp4", "cannot read video"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, name: str, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    status = main(["infer", str(path), "-o", str(tmp_path / "out"), *MODEL])  # (raising: a traceback)
    err = capsys.readouterr().err
    assert status != 0
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_weights_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    assert main(["infer", str(image), "--weights", str(tmp_path / "none.pt")]) == 1
    err = capsys.readouterr().err
    assert "does not exist; pass --weights PATH" in err and len(err.strip().splitlines()) == 1
