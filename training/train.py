"""`flowcloud train`: fine-tune (or train from scratch) a zoo model on Cityscapes-layout data.

SGD with momentum and a poly learning-rate schedule (AdamW optional), cross-entropy ignoring 255,
an auxiliary loss where the model has one, AMP on CUDA. After every epoch it writes
``checkpoint.pth`` (one dict: model, optimizer, lr_scheduler, epoch, args, plus FlowCloud ``meta``
so that `flowcloud infer --weights` and `flowcloud export` read it), ``metrics.json`` and the
charts ``loss.png``, ``accuracy.png`` and ``miou.png``. ``--resume`` continues the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from flowcloud.cli.errors import CommandError
from flowcloud.labels import IGNORE_INDEX, LABEL_IDS, LABEL_SETS, LabelSet, get_label_set
from flowcloud.sizes import size_argument
from flowcloud.zoo import MODEL_NAMES, ModelInfo, WeightsError, build_model, read_weights_file
from training.cityscapes import CityscapesError, CityscapesSegmentation, read_label_ids
from training.evaluate import DeviceUnavailable, evaluate, format_table, resolve_device
from training.metrics import ConfusionMatrix
from training.presets import SegmentationPresetEval, SegmentationPresetTrain

log = logging.getLogger(__name__)


class TrainingError(ValueError):
    """A run that cannot go on: too few images, a diverging loss, a checkpoint that does not fit."""


CHECKPOINT = "checkpoint.pth"
METRICS = "metrics.json"
POLY_POWER = 0.9
AUX_WEIGHT = 0.5


def _scale_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scale range must look like 0.5:2.0, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"scale range {text!r} must satisfy 0 < low <= high")
    return low, high


def configure(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="dataset root in the Cityscapes layout")
    data.add_argument("--val-data", type=Path, help="root of the validation data (default: --data)")
    data.add_argument("--train-split", default="train", help="training split (default train)")
    data.add_argument("--val-split", default="val", help="validation split, or 'none' (default val)")
    data.add_argument(
        "--crop-size", type=size_argument, default=(512, 1024), help="training crop HxW (512x1024)"
    )
    data.add_argument(
        "--base-size", type=size_argument, help="HxW the scale range is relative to (default: each image)"
    )
    data.add_argument("--scale-range", type=_scale_range, default=(0.5, 2.0), help="random scale (0.5:2.0)")
    data.add_argument(
        "--eval-size", type=size_argument, help="resize validation images to HxW (default: as stored)"
    )
    data.add_argument("--no-jitter", action="store_true", help="no colour jitter")
    data.add_argument("--no-degrade", action="store_true", help="no blur / JPEG degradation")
    data.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODEL_NAMES, default="deeplabv3_resnet50", help="zoo model")
    model.add_argument("--label-set", choices=sorted(LABEL_SETS), default=LABEL_IDS.name, help="classes")
    model.add_argument(
        "--weights", type=Path, help="start from these weights; a head of another shape is replaced"
    )
    model.add_argument("--freeze-backbone", action="store_true", help="train only the head(s)")
    model.add_argument("--aux-loss", action="store_true", help="auxiliary classifier and loss (DeepLabV3)")
    model.add_argument(
        "--class-weights",
        action="store_true",
        help="weight the loss by sqrt(median class frequency / class frequency) of the training labels",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--batch-size", type=int, default=8)
    optim.add_argument("--steps-per-epoch", type=int, default=0, help="cap batches per epoch (0 = all)")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    optim.add_argument("--lr", type=float, default=0.02)
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=1e-4)
    optim.add_argument(
        "--warmup-steps", type=int, default=0, help="linear warm-up steps before the poly decay"
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--output-dir", type=Path, default=Path("runs/train"), help="checkpoints and metrics"
    )
    run_group.add_argument("--resume", type=Path, help="continue from this checkpoint")
    run_group.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="end this invocation after N epochs (resume later; 0 = run all)",
    )
    run_group.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    run_group.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    run_group.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    run_group.add_argument("--seed", type=int, default=0, help="seed of augmentation and initialisation")
    run_group.add_argument(
        "--val-limit", type=int, default=0, help="validate on the first N images (0 = all)"
    )
    run_group.add_argument("--version", default="", help="model version written into the checkpoint's meta")
    run_group.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def run(args: argparse.Namespace) -> int:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        history = train(args)
    except (CityscapesError, WeightsError, TrainingError, DeviceUnavailable) as exc:
        raise CommandError(str(exc)) from None
    last = history[-1] if history else {}
    if args.json:
        print(json.dumps(last, indent=2))
    else:
        print(f"trained {len(history)} epochs; checkpoint {args.output_dir / CHECKPOINT}")
    return 0


# -- model and optimiser ----------------------------------------------------------------------


def init_from(model: nn.Module, path: Path) -> None:
    """Copy every tensor of the same name and shape from ``path``; the rest (the new head) stays new."""
    state, _ = read_weights_file(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not fitting:
        raise WeightsError(f"no tensor in {path} fits a {type(model).__name__}; check --model")
    model.load_state_dict(fitting, strict=False)
    fresh = sorted(k for k in own if k not in fitting)
    log.info("initialised %d tensors from %s; %d new (e.g. %s)", len(fitting), path, len(fresh), fresh[:2])


def poly_schedule(total_steps: int, warmup_steps: int = 0) -> Any:
    """The LR factor at a step: linear warm-up, then (1 - progress) ** 0.9."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** POLY_POWER

    return factor


def make_optimizer(args: argparse.Namespace, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


# -- the loop ---------------------------------------------------------------------------------


def class_weights(dataset: CityscapesSegmentation, num_classes: int) -> torch.Tensor:
    """Per-class loss weights, sqrt(median frequency / frequency), clipped to [0.2, 10]; absent classes 1.

    Softened median-frequency balancing: small classes (poles, signs, people) are not drowned
    by road and sky, without the boundary noise of full inverse-frequency weighting.
    """
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for _, label_path in tqdm(dataset.pairs, desc="class frequencies", unit="image", leave=False):
        target = dataset.label_set.from_label_ids(read_label_ids(label_path))
        flat = torch.from_numpy(target).long().flatten()
        counts += torch.bincount(flat[flat < num_classes], minlength=num_classes).double()
    present = counts > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    freq = counts[present] / counts.sum()
    weights[present] = (freq.median() / freq).sqrt().clamp(0.2, 10.0)
    return weights.float()


def criterion(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    losses = {}
    for name, logits in outputs.items():
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        losses[name] = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX)
    return losses["out"] + AUX_WEIGHT * losses["aux"] if "aux" in losses else losses["out"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or resume) training as ``args`` say; returns the per-epoch metrics history."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    label_set = get_label_set(args.label_set)
    train_set = CityscapesSegmentation(
        args.data,
        args.train_split,
        label_set,
        SegmentationPresetTrain(
            args.crop_size,
            args.base_size,
            args.scale_range,
            jitter=not args.no_jitter,
            degrade=not args.no_degrade,
        ),
    )
    val_loader = None
    if args.val_split != "none":
        val_set = CityscapesSegmentation(
            args.val_data or args.data, args.val_split, label_set, SegmentationPresetEval(args.eval_size)
        )
        subset: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]] = val_set
        if args.val_limit > 0:
            subset = torch.utils.data.Subset(val_set, range(min(args.val_limit, len(val_set))))
        val_loader = DataLoader(subset, batch_size=1 if args.eval_size is None else args.batch_size)
    seed_everything(args.seed)
    model = build_model(args.model, label_set, aux_loss=args.aux_loss)
    if args.weights is not None:
        init_from(model, args.weights)
    if args.freeze_backbone:
        for p in model.backbone.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params)
    batches_per_epoch = len(train_set) // args.batch_size
    if batches_per_epoch < 1:
        raise TrainingError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    steps = min(batches_per_epoch, args.steps_per_epoch) if args.steps_per_epoch > 0 else batches_per_epoch
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_schedule(steps * args.epochs, args.warmup_steps)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    out_dir: Path = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if args.resume is not None:
        start_epoch, history = _resume(args, model, optimizer, lr_scheduler, scaler)
    info = ModelInfo(name=args.model, label_set=label_set.name, version=args.version or out_dir.name)
    weight = class_weights(train_set, label_set.num_classes).to(device) if args.class_weights else None
    if weight is not None:
        log.info(
            "class weights: %s", {label_set.class_names[i]: round(float(w), 2) for i, w in enumerate(weight)}
        )

    last_epoch = args.epochs if args.stop_after <= 0 else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, last_epoch):
        seed_everything(args.seed * 1000 + epoch)  # the same epoch sees the same data, resumed or not
        loader = DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        started = time.perf_counter()
        stats = _train_epoch(
            model, loader, steps, optimizer, lr_scheduler, scaler, device, amp, label_set, epoch, args, weight
        )
        record: dict[str, Any] = {"epoch": epoch, "lr": lr_scheduler.get_last_lr()[0], **stats}
        if val_loader is not None:
            scores, val_loss = evaluate(model, val_loader, label_set.num_classes, device, amp, progress=True)
            record.update(
                val_loss=val_loss,
                val_pixel_accuracy=scores.pixel_accuracy,
                val_mean_iou=scores.mean_iou,
                val_iou={label_set.class_names[i]: v for i, v in enumerate(scores.iou) if v is not None},
            )
            log.info("epoch %d validation:\n%s", epoch, format_table(scores, label_set.class_names))
        record["seconds"] = round(time.perf_counter() - started, 1)
        history.append(record)
        _save_checkpoint(out_dir / CHECKPOINT, model, optimizer, lr_scheduler, scaler, epoch, args, info)
        (out_dir / METRICS).write_text(json.dumps(history, indent=2))
        plot_history(history, out_dir)
        log.info(
            "epoch %d: loss %.4f, pixel accuracy %.3f%s (%.0f s)",
            epoch,
            record["loss"],
            record["pixel_accuracy"],
            f", val mIoU {record['val_mean_iou']:.3f}" if "val_mean_iou" in record else "",
            record["seconds"],
        )
    return history


def _train_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: bool,
    label_set: LabelSet,
    epoch: int,
    args: argparse.Namespace,
    weight: torch.Tensor | None = None,
) -> dict[str, float]:
    model.train()
    if args.freeze_backbone:
        model.backbone.eval()  # type: ignore[union-attr]
    matrix = ConfusionMatrix(label_set.num_classes)
    loss_sum, seen = 0.0, 0
    autocast = torch.autocast(device_type="cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = itertools.islice(iter(loader), steps)
    with tqdm(batches, total=steps, desc=f"epoch {epoch}", unit="batch") as bar:
        for image, target in bar:
            image = image.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            target = target.to(device, non_blocking=True)
            with autocast:
                outputs = model(image)
                loss = criterion(outputs, target, weight)
            if not math.isfinite(float(loss.detach())):
                raise TrainingError(f"the loss became {float(loss.detach())} at epoch {epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr_scheduler.step()
            loss_sum += float(loss.detach()) * image.shape[0]
            seen += image.shape[0]
            matrix.update(target, outputs["out"].detach().argmax(1))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
    scores = matrix.scores()
    return {
        "loss": loss_sum / max(seen, 1),
        "pixel_accuracy": scores.pixel_accuracy,
        "mean_iou": scores.mean_iou,
    }


# -- checkpoints and charts ---------------------------------------------------------------------


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    args: argparse.Namespace,
    info: ModelInfo,
) -> None:
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "scaler": scaler.state_dict(),
        "meta": {"name": info.name, "label_set": info.label_set, "version": info.version},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint


def _resume(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> tuple[int, list[dict[str, Any]]]:
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"cannot resume from {args.resume}: {exc}") from None
    missing = {"model", "optimizer", "lr_scheduler", "epoch", "args"} - set(checkpoint)
    if missing:
        raise TrainingError(
            f"{args.resume} is not a training checkpoint (missing {', '.join(sorted(missing))})"
        )
    saved = checkpoint["args"]
    for key in ("model", "label_set"):
        if saved.get(key) != getattr(args, key):
            raise TrainingError(f"{args.resume} was trained with --{key.replace('_', '-')} {saved.get(key)}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    metrics = args.output_dir / METRICS
    history = json.loads(metrics.read_text()) if metrics.is_file() else []
    history = [h for h in history if h["epoch"] <= checkpoint["epoch"]]
    log.info("resuming from %s after epoch %d", args.resume, checkpoint["epoch"])
    return int(checkpoint["epoch"]) + 1, history


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> None:
    """loss.png, accuracy.png and miou.png: training and validation curves per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    for file, key, title in (
        ("loss.png", "loss", "cross-entropy loss"),
        ("accuracy.png", "pixel_accuracy", "pixel accuracy"),
        ("miou.png", "mean_iou", "mean IoU"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[key] for h in history], marker="o", label="training")
        if any(f"val_{key}" in h for h in history):
            ax.plot(
                epochs, [h.get(f"val_{key}", float("nan")) for h in history], marker="o", label="validation"
            )
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=100)
        plt.close(fig)
