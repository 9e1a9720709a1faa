"""`flowcloud eval`: pixel accuracy, mean IoU and per-class IoU of a model on Cityscapes-layout data."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from flowcloud.cli.errors import CommandError
from flowcloud.labels import IGNORE_INDEX, LABEL_SETS
from flowcloud.sizes import size_argument
from flowcloud.zoo import MODEL_NAMES, WeightsError, choose_input_size, load_model
from training.cityscapes import SPLITS, CityscapesError, CityscapesSegmentation
from training.metrics import ConfusionMatrix, SegmentationScores
from training.presets import SegmentationPresetEval

log = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device,
    amp: bool = False,
    progress: bool = False,
    total: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[SegmentationScores, float]:
    """Scores and mean cross-entropy (ignoring 255) of ``model`` over (image, target) batches.

    With ``reduce`` (an in-place sum across processes), each process passes its share of the
    batches and all get the scores of the whole set, the same as one process over all of it.
    """
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    loss_sum, pixels = 0.0, 0
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode():
        for image, target in tqdm(
            batches, desc="eval", unit="batch", disable=not progress, total=total, leave=False
        ):
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast:
                logits = model(image)["out"]
            logits = logits.float()
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            valid = int((target != IGNORE_INDEX).sum())
            if valid:
                loss_sum += float(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"))
                pixels += valid
            matrix.update(target, logits.argmax(1))
    if reduce is not None:
        reduce(matrix.mat)
        sums = reduce(torch.tensor([loss_sum, float(pixels)], dtype=torch.float64))
        loss_sum, pixels = float(sums[0]), int(sums[1])
    return matrix.scores(), loss_sum / max(pixels, 1)


def format_table(scores: SegmentationScores, class_names: tuple[str, ...]) -> str:
    """A readable table: one row per class that has an IoU, then the totals."""
    rows = [f"{'class':<22}{'IoU':>8}"]
    rows += [f"{class_names[i]:<22}{v * 100:>7.1f}%" for i, v in enumerate(scores.iou) if v is not None]
    rows.append("-" * 30)
    rows.append(f"{'mean IoU':<22}{scores.mean_iou * 100:>7.1f}%")
    rows.append(f"{'pixel accuracy':<22}{scores.pixel_accuracy * 100:>7.1f}%")
    return "\n".join(rows)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="dataset root in the Cityscapes layout")
    parser.add_argument("--split", default="val", choices=SPLITS, help="split to evaluate (default val)")
    parser.add_argument(
        "--weights", type=Path, help="weights or checkpoint (default: the bundled demo model)"
    )
    parser.add_argument("--model", choices=MODEL_NAMES, help="zoo model (default: what the weights say)")
    parser.add_argument("--label-set", choices=sorted(LABEL_SETS), help="classes (default: the weights')")
    parser.add_argument(
        "--size", type=size_argument, metavar="HxW", help="resize to HxW (default: the weights' input size)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0 = all)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")


class DeviceUnavailable(ValueError):
    """The device asked for is not on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a device; DeviceUnavailable for one that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda was asked for, but no CUDA device is available")
    return device


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    try:
        device = resolve_device(args.device)
        loaded = load_model(args.model, args.weights, args.label_set)
        size, size_text = choose_input_size(args.size, loaded.info)
        preset = SegmentationPresetEval(size)
        dataset = CityscapesSegmentation(args.data, args.split, loaded.label_set, preset)
    except (WeightsError, CityscapesError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if args.weights is None:
        log.info("evaluating the bundled demo model (%s)", loaded.source)
    subset: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]] = dataset
    if args.limit > 0:
        subset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers)
    started = time.perf_counter()
    try:
        scores, loss = evaluate(
            loaded.module.to(device),
            loader,
            loaded.label_set.num_classes,
            device,
            progress=True,
            total=len(loader),
        )
    except CityscapesError as exc:
        raise CommandError(str(exc)) from None
    report = {
        "data": str(args.data),
        "split": args.split,
        "images": len(subset),  # type: ignore[arg-type]
        "size": f"{size[0]}x{size[1]}" if size else "as stored",
        "size_from": size_text,
        "model": loaded.info.name,
        "label_set": loaded.label_set.name,
        "weights": loaded.source,
        "loss": loss,
        "seconds": round(time.perf_counter() - started, 2),
        **scores.as_dict(loaded.label_set.class_names),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['images']} images of {args.data} ({args.split}), "
            f"model {loaded.info.name} from {loaded.source}"
        )
        print(f"input size: {size_text}")
        print(format_table(scores, loaded.label_set.class_names))
    return 0
