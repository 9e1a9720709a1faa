"""`flowcloud infer INPUT`: segment an image or a video on this machine, no cluster needed.

For an image: ``<stem>_color.png`` (the mask in Cityscapes colours), ``<stem>_overlay.png``
(the mask blended onto the image) and ``<stem>_labelIds.png`` (Cityscapes labelIds, one byte per
pixel), all at the input's size. For a video: ``<stem>_overlay.mp4`` (H.264), with a progress
bar and the measured frames per second at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from flowcloud.cli.errors import CommandError
from flowcloud.inference import PRECISIONS, Segmenter, SegmenterOptions
from flowcloud.labels import LABEL_SETS, blend_overlay
from flowcloud.sizes import size_argument
from flowcloud.x264 import Mp4Writer
from flowcloud.zoo import MODEL_NAMES, WeightsError, choose_input_size, load_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that choose and place a model (shared by the commands that run one)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=MODEL_NAMES, help="zoo model (default: what the weights say)")
    group.add_argument("--weights", type=Path, help="weights file (default: the bundled demo model)")
    group.add_argument(
        "--random-weights", action="store_true", help="random weights: for benchmarks and tests only"
    )
    group.add_argument("--label-set", choices=sorted(LABEL_SETS), help="classes (default: the weights')")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision on GPU")
    group.add_argument(
        "--size", type=size_argument, metavar="HxW", help="model input size (default: the weights' own)"
    )
    group.add_argument("--batch-size", type=int, default=4, help="frames per forward pass (video)")


def build_segmenter(args: argparse.Namespace) -> tuple[Segmenter, str]:
    """The segmenter the options ask for, and a line saying the input size it runs at and why."""
    try:
        loaded = load_model(args.model, args.weights, args.label_set, args.random_weights)
        size, size_text = choose_input_size(args.size, loaded.info)
        options = SegmenterOptions(device=args.device, size=size, precision=args.precision)
        segmenter = Segmenter(loaded, options)
    except (WeightsError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    log.info(
        "model %s (%s, %d classes) from %s on %s",
        loaded.info.name,
        loaded.label_set.name,
        loaded.label_set.num_classes,
        loaded.source,
        args.device,
    )
    return segmenter, size_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="an image (png, jpg, ...) or a video file")
    parser.add_argument("-o", "--output", type=Path, default=Path("out"), help="output folder (default: out)")
    parser.add_argument("--alpha", type=float, default=0.5, help="mask weight in the overlay (0..1)")
    parser.add_argument("--display", action="store_true", help="show the overlay in a window if possible")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    add_model_arguments(parser)


@dataclass
class Rendered:
    color: np.ndarray
    overlay: np.ndarray
    label_ids: np.ndarray


class Display:
    """An OpenCV window when a display and a GUI-enabled OpenCV exist; otherwise it says why once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def show(self, rgb: np.ndarray) -> None:
        if not self.enabled:
            return
        import cv2

        try:
            cv2.imshow("flowcloud", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            cv2.waitKey(1)
        except cv2.error as exc:
            log.warning(
                "--display unavailable here (%s); continuing without a window", str(exc).strip()[:120]
            )
            self.enabled = False


def render(segmenter: Segmenter, frames: list[np.ndarray], alpha: float) -> list[Rendered]:
    label_set = segmenter.label_set
    out = []
    for frame, class_map in zip(frames, segmenter.predict(frames), strict=True):
        color = label_set.colorize(class_map)
        out.append(Rendered(color, blend_overlay(frame, color, alpha), label_set.to_label_ids(class_map)))
    return out


def infer_image(path: Path, segmenter: Segmenter, out_dir: Path, alpha: float, display: Display) -> dict:
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise CommandError(f"cannot read image {path}: {exc}") from None
    start = time.perf_counter()
    result = render(segmenter, [rgb], alpha)[0]
    seconds = time.perf_counter() - start
    outputs = {
        "color": out_dir / f"{path.stem}_color.png",
        "overlay": out_dir / f"{path.stem}_overlay.png",
        "labels": out_dir / f"{path.stem}_labelIds.png",
    }
    Image.fromarray(result.color).save(outputs["color"])
    Image.fromarray(result.overlay).save(outputs["overlay"])
    Image.fromarray(result.label_ids, mode="L").save(outputs["labels"])
    display.show(result.overlay)
    return {
        "input": str(path),
        "kind": "image",
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "seconds": seconds,
        "outputs": {k: str(v) for k, v in outputs.items()},
    }


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def infer_video(
    path: Path, segmenter: Segmenter, out_dir: Path, alpha: float, display: Display, batch_size: int
) -> dict:
    try:
        source = av.open(str(path))
    except av.FFmpegError as exc:
        raise CommandError(f"cannot read video {path}: {exc}") from None
    with source:
        if not source.streams.video:
            raise CommandError(f"{path} has no video stream")
        in_stream = source.streams.video[0]
        in_stream.thread_type = "AUTO"
        rate = in_stream.average_rate or in_stream.guessed_rate or 30
        width, height = in_stream.codec_context.width, in_stream.codec_context.height
        out_path = out_dir / f"{path.stem}_overlay.mp4"
        frames = (f.to_ndarray(format="rgb24") for f in source.decode(in_stream))
        count = 0
        start = time.perf_counter()
        # yuv420p needs even dimensions; an odd edge is padded by one pixel.
        with Mp4Writer(out_path, width + width % 2, height + height % 2, rate, crf=20) as sink:
            total = in_stream.frames or None
            try:
                with tqdm(total=total, unit="frame", desc=path.name) as bar:
                    for batch in _batches(frames, batch_size):
                        for result in render(segmenter, batch, alpha):
                            overlay = np.pad(
                                result.overlay, ((0, height % 2), (0, width % 2), (0, 0)), "edge"
                            )
                            sink.write(overlay)
                            display.show(result.overlay)
                            count += 1
                        bar.update(len(batch))
            except av.FFmpegError as exc:
                raise CommandError(f"cannot decode video {path} after {count} frames: {exc}") from None
        seconds = time.perf_counter() - start
    if count == 0:
        raise CommandError(f"{path} contains no decodable video frames")
    return {
        "input": str(path),
        "kind": "video",
        "width": width,
        "height": height,
        "frames": count,
        "seconds": seconds,
        "fps": count / seconds,
        "outputs": {"overlay": str(out_path)},
    }


def run(args: argparse.Namespace) -> int:
    path: Path = args.input
    if not path.is_file():
        raise CommandError(f"input {path} does not exist or is not a file")
    if not 0.0 <= args.alpha <= 1.0:
        raise CommandError("--alpha must be within 0..1")
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    segmenter, size_text = build_segmenter(args)
    args.output.mkdir(parents=True, exist_ok=True)
    display = Display(args.display)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        summary = infer_image(path, segmenter, args.output, args.alpha, display)
    else:
        summary = infer_video(path, segmenter, args.output, args.alpha, display, args.batch_size)
    summary["model"] = segmenter.loaded.info.name
    summary["weights"] = segmenter.loaded.source
    summary["input_size"] = size_text
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model input size: {size_text}")
        for name, out in summary["outputs"].items():
            print(f"{name:>8}: {out}")
        if summary["kind"] == "video":
            rate = f"{summary['fps']:.2f} fps"
            print(f"segmented {summary['frames']} frames in {summary['seconds']:.1f} s ({rate})")
        else:
            print(f"segmented {summary['width']}x{summary['height']} in {summary['seconds']:.2f} s")
    return 0
