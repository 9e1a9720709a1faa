"""`flowcloud synth OUT`: synthetic street scenes as a Cityscapes-layout dataset and an H.264 video.

Frames are grouped into sequences (a Cityscapes "sequence" is one street): sequence ``k`` of seed
``S`` is ``SceneSequence(S * 100000 + k)``, so two different ``--seed`` values never share a
street. ``--codec-share P`` sends that share of the sequences through a libx264 round trip (at a
CRF drawn from ``--codec-crf``) before writing them, so a model trained on them has seen the
artifacts the pipeline introduces; the ground truth stays exact.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from flowcloud.cli.errors import CommandError
from flowcloud.sizes import parse_size
from training.synth import SceneSequence

log = logging.getLogger(__name__)

SEQUENCES_PER_SEED = 100_000


def scene_seed(seed: int, sequence: int) -> int:
    """The SceneSequence seed of sequence ``sequence`` of dataset seed ``seed``."""
    return seed * SEQUENCES_PER_SEED + sequence


def city_name(seed: int) -> str:
    return f"synth{seed}"


def frame_stem(seed: int, sequence: int, index: int) -> str:
    """Cityscapes naming: ``<city>_<sequence:06d>_<frame:06d>``."""
    return f"{city_name(seed)}_{sequence:06d}_{index:06d}"


def _parse_crf(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition(":")
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"CRF range must look like 20:36, got {text!r}") from None
    if not 0 <= lo <= hi <= 51:
        raise argparse.ArgumentTypeError(f"CRF range {text!r} must lie within 0..51, low <= high")
    return lo, hi


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (Cityscapes layout)")
    parser.add_argument("--frames", type=int, default=300, help="number of frames (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", default="480x640", help="frame size HxW (default 480x640)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"), help="split folder")
    parser.add_argument(
        "--sequence-length", type=int, default=0, help="frames per street (default: all frames in one street)"
    )
    parser.add_argument("--video", action="store_true", help="also write video.mp4 (H.264) and video_gt/")
    parser.add_argument(
        "--codec-share", type=float, default=0.0, help="share of streets sent through libx264"
    )
    parser.add_argument("--codec-crf", type=_parse_crf, default=(20, 36), help="CRF range LOW:HIGH (20:36)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


@dataclass
class SynthSummary:
    out: str
    frames: int
    sequences: int
    seed: int
    size: str
    split: str
    codec_sequences: int
    video: str | None


def run(args: argparse.Namespace) -> int:
    try:
        height, width = parse_size(args.size)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.frames < 1:
        raise CommandError("--frames must be at least 1")
    if args.seed < 0:
        raise CommandError("--seed must be non-negative")
    if not 0.0 <= args.codec_share <= 1.0:
        raise CommandError("--codec-share must lie within 0..1")
    length = args.sequence_length or args.frames
    if length < 1:
        raise CommandError("--sequence-length must be positive")
    try:
        summary = write_dataset(
            args.out,
            args.frames,
            args.seed,
            (height, width),
            args.split,
            length,
            args.video,
            args.codec_share,
            args.codec_crf,
        )
    except OSError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print(
            f"wrote {summary.frames} frames in {summary.sequences} streets "
            f"({summary.codec_sequences} through libx264) to {summary.out}"
            + (f"; video {summary.video}" if summary.video else "")
        )
    return 0


def write_dataset(
    out: Path,
    frames: int,
    seed: int,
    size: tuple[int, int],
    split: str = "train",
    sequence_length: int = 0,
    video: bool = False,
    codec_share: float = 0.0,
    codec_crf: tuple[int, int] = (20, 36),
) -> SynthSummary:
    """Render ``frames`` frames into ``out`` in the Cityscapes layout (and optionally an MP4)."""
    from flowcloud.x264 import Mp4Writer  # PyAV only where a codec is used
    from training.codec import h264_roundtrip

    height, width = size
    length = sequence_length or frames
    image_dir = out / "leftImg8bit" / split / city_name(seed)
    label_dir = out / "gtFine" / split / city_name(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    if video:
        (out / "video_gt").mkdir(exist_ok=True)
        writer = Mp4Writer(out / "video.mp4", width, height)
    rng = np.random.default_rng([seed, 0xC0DEC])
    sequences = (frames + length - 1) // length
    through_codec = 0
    written = 0
    with tqdm(total=frames, desc="synth", unit="frame") as bar:
        for sequence in range(sequences):
            scene = SceneSequence(scene_seed(seed, sequence), width, height)
            count = min(length, frames - sequence * length)
            rendered = [scene.frame(i) for i in range(count)]
            images = [rgb for rgb, _ in rendered]
            use_codec = rng.random() < codec_share
            crf = int(rng.integers(codec_crf[0], codec_crf[1] + 1))
            if use_codec:
                images = list(h264_roundtrip(images, crf))
                through_codec += 1
            for i, ((clean_rgb, labels), rgb) in enumerate(zip(rendered, images, strict=True)):
                stem = frame_stem(seed, sequence, i)
                _write_png(image_dir / f"{stem}_leftImg8bit.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                _write_png(label_dir / f"{stem}_gtFine_labelIds.png", labels)
                if writer is not None:
                    writer.write(clean_rgb)
                    _write_png(out / "video_gt" / f"frame_{written:06d}.png", labels)
                written += 1
                bar.update(1)
    if writer is not None:
        writer.close()
    log.info("synthetic dataset: %d frames, %d streets, seed %d, at %s", written, sequences, seed, out)
    return SynthSummary(
        out=str(out),
        frames=written,
        sequences=sequences,
        seed=seed,
        size=f"{height}x{width}",
        split=split,
        codec_sequences=through_codec,
        video=str(out / "video.mp4") if video else None,
    )


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")
