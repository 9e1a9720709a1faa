"""`flowcloud train`: fine-tune (or train from scratch) a zoo model on Cityscapes-layout data.

SGD with momentum and a poly learning-rate schedule (AdamW optional), cross-entropy ignoring 255,
an auxiliary loss where the model has one, AMP on CUDA. One process, or data-parallel under
``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs) with ``--batch-size`` the global batch. Rank 0 writes
``checkpoint.pth`` (see ``training.checkpoint``) after every epoch and every ``--checkpoint-every``
steps, ``metrics.json`` and the charts ``loss.png``, ``accuracy.png`` and ``miou.png``. SIGTERM
checkpoints at the next step and exits 0; a run started again in the same ``--output-dir``
resumes from its newest checkpoint, and ends with the weights of a run never interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from flowcloud.cli.errors import CommandError
from flowcloud.labels import IGNORE_INDEX, LABEL_IDS, LABEL_SETS, LabelSet, get_label_set
from flowcloud.sizes import size_argument
from flowcloud.zoo import MODEL_NAMES, ModelInfo, WeightsError, build_model, read_weights_file
from training import checkpoint as ckpt
from training import distributed
from training.backbone import load_backbone_weights
from training.batchnorm import convert_sync_batchnorm
from training.cityscapes import CityscapesError, CityscapesSegmentation, read_label_ids
from training.distributed import Ranks
from training.errors import TrainingError
from training.evaluate import evaluate, format_table
from training.metrics import ConfusionMatrix
from training.presets import SegmentationPresetEval, SegmentationPresetTrain
from training.sampling import GlobalBatchSampler, SeededSamples, derive_seed

log = logging.getLogger(__name__)

CHECKPOINT = ckpt.CHECKPOINT
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
    model.add_argument(
        "--backbone-weights",
        type=Path,
        metavar="FILE",
        help="start the backbone from an ImageNet ResNet-50 or MobileNetV3 state_dict (reports what matched)",
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
    optim.add_argument(
        "--batch-size", type=int, default=8, help="global batch: split among the processes under torchrun"
    )
    optim.add_argument(
        "--sync-bn", action="store_true", help="batch norm over the global batch under torchrun (GPU and CPU)"
    )
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
    run_group.add_argument(
        "--resume", type=Path, help="continue from this checkpoint (default: --output-dir's own, if any)"
    )
    run_group.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        metavar="N",
        help="also checkpoint every N steps, for preemption (0 = after each epoch only; default 500)",
    )
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
    try:
        outcome = train(args)
    except (TrainingError, CityscapesError, WeightsError) as exc:
        raise CommandError(str(exc)) from None
    if not outcome.main:
        return 0
    path = args.output_dir / CHECKPOINT
    if outcome.stopped_at is not None:
        epoch, step = outcome.stopped_at
        print(
            f"stopped by SIGTERM in epoch {epoch} after step {step}; checkpoint {path}; run again to resume"
        )
        return 0
    last = outcome.history[-1] if outcome.history else {}
    if args.json:
        print(json.dumps(last, indent=2))
    else:
        print(f"trained {len(outcome.history)} epochs; checkpoint {path}")
    return 0


@dataclass
class Outcome:
    history: list[dict[str, Any]]
    main: bool  # this process is rank 0, the one that reports
    stopped_at: tuple[int, int] | None = None  # (epoch, steps done) where SIGTERM stopped the run


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


def loss_sums(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weighted) cross-entropy summed over the pixels that count, and the sum of their weights.

    Their ratio is ``F.cross_entropy``'s mean (plus the auxiliary loss at AUX_WEIGHT); summing both
    across processes before dividing gives the mean over the global batch, whatever each process's
    share of ignored pixels.
    """
    valid = target != IGNORE_INDEX
    norm = weight[target[valid]].sum() if weight is not None else valid.sum()
    total = torch.zeros((), device=target.device)
    for name, logits in outputs.items():
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(
            logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total = total + (AUX_WEIGHT * ce if name == "aux" else ce)
    return total, norm.double()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Preemption:
    """SIGTERM (a pod being evicted) asks the loop to checkpoint at the next step and stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class EpochProgress:
    """The metric sums of the epoch so far: loss (the same on every rank), pixels (this rank's)."""

    matrix: ConfusionMatrix
    loss_sum: float = 0.0
    seen: int = 0

    def global_matrix(self, ranks: Ranks) -> torch.Tensor:
        return ranks.reduce_sum(self.matrix.mat.clone())

    def snapshot(self, ranks: Ranks) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps (a collective: every rank calls it)."""
        return {"loss_sum": self.loss_sum, "seen": self.seen, "matrix": self.global_matrix(ranks)}

    @classmethod
    def restore(cls, num_classes: int, partial: dict[str, Any] | None, ranks: Ranks) -> EpochProgress:
        progress = cls(ConfusionMatrix(num_classes))
        if partial:
            progress.loss_sum, progress.seen = float(partial["loss_sum"]), int(partial["seen"])
            if ranks.is_main:  # the sum across ranks counts the saved pixels once
                progress.matrix.mat += partial["matrix"]
        return progress

    def scores(self, ranks: Ranks) -> dict[str, float]:
        self.matrix.mat = self.global_matrix(ranks)
        scores = self.matrix.scores()
        return {
            "loss": self.loss_sum / max(self.seen, 1),
            "pixel_accuracy": scores.pixel_accuracy,
            "mean_iou": scores.mean_iou,
        }


@dataclass
class Training:
    """The parts of one training run the epochs share."""

    args: argparse.Namespace
    ranks: Ranks
    net: nn.Module  # the model itself
    model: nn.Module  # what the steps call: ``net``, or DDP around it
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    label_set: LabelSet
    info: ModelInfo
    train_set: Dataset[tuple[torch.Tensor, torch.Tensor]]
    steps: int
    weight: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" and not self.args.no_amp

    def loader(self, epoch: int, start_step: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        args, ranks = self.args, self.ranks
        sampler = GlobalBatchSampler(
            len(self.train_set),  # type: ignore[arg-type]
            args.batch_size,
            self.steps,
            args.seed,
            epoch,
            ranks.rank,
            ranks.world_size,
            start_step,
        )
        return DataLoader(
            SeededSamples(self.train_set),
            batch_size=args.batch_size // ranks.world_size,
            sampler=sampler,
            num_workers=args.workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_epoch(
        self, epoch: int, start_step: int, progress: EpochProgress, stop: Preemption
    ) -> int | None:
        """Steps ``start_step``..``steps`` of ``epoch``; the steps done when SIGTERM stopped it, else None."""
        args, ranks, device = self.args, self.ranks, self.device
        self.model.train()
        if args.freeze_backbone:
            self.net.backbone.eval()  # type: ignore[union-attr]
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        )
        memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        loader = self.loader(epoch, start_step)
        bar = tqdm(
            total=self.steps,
            initial=start_step,
            desc=f"epoch {epoch}",
            unit="batch",
            disable=not ranks.is_main,
        )
        with bar:
            for step, (image, target) in enumerate(loader, start=start_step):
                torch.manual_seed(derive_seed(args.seed, epoch, step, ranks.rank))  # dropout, resumed or not
                image = image.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                target = target.to(device, non_blocking=True)
                with autocast:
                    outputs = self.model(image)
                total, norm = loss_sums(outputs, target, self.weight)
                flag = torch.tensor(float(stop.requested), dtype=torch.float64, device=device)
                sums = ranks.reduce_sum(torch.stack([total.detach().double(), norm, flag]))
                global_total, global_norm, stopping = sums.tolist()
                step_loss = global_total / max(global_norm, 1e-12)
                if not math.isfinite(step_loss):
                    raise TrainingError(f"the loss became {step_loss} at epoch {epoch}; lower --lr")
                # The mean over the global batch; DDP averages the gradients over the processes.
                loss = total * (ranks.world_size / max(global_norm, 1e-12))
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
                progress.loss_sum += step_loss * args.batch_size
                progress.seen += args.batch_size
                progress.matrix.update(target, outputs["out"].detach().argmax(1))
                bar.update()
                bar.set_postfix(
                    loss=f"{progress.loss_sum / progress.seen:.4f}",
                    lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}",
                )
                done = step + 1
                if stopping:
                    self.save(epoch - 1, done, progress)
                    return done
                every = args.checkpoint_every
                if every > 0 and self.lr_scheduler.last_epoch % every == 0 and done < self.steps:
                    self.save(epoch - 1, done, progress)
        return None

    def validate(self, val_loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        ranks = self.ranks
        scores, val_loss = evaluate(
            self.net,
            val_loader,
            self.label_set.num_classes,
            self.device,
            self.amp,
            progress=ranks.is_main,
            reduce=ranks.reduce_sum if ranks.distributed else None,
        )
        if ranks.is_main:
            log.info("validation:\n%s", format_table(scores, self.label_set.class_names))
        names = self.label_set.class_names
        return {
            "val_loss": val_loss,
            "val_pixel_accuracy": scores.pixel_accuracy,
            "val_mean_iou": scores.mean_iou,
            "val_iou": {names[i]: v for i, v in enumerate(scores.iou) if v is not None},
        }

    def save(self, epoch_done: int, step: int, progress: EpochProgress | None = None) -> None:
        """Checkpoint after ``epoch_done`` and ``step`` batches of the next epoch (every rank calls it)."""
        partial = progress.snapshot(self.ranks) if progress is not None and step else None
        if not self.ranks.is_main:
            return
        args = self.args
        checkpoint: dict[str, Any] = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch_done,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
            "scaler": self.scaler.state_dict(),
            "meta": {"name": self.info.name, "label_set": self.info.label_set, "version": self.info.version},
            "history": self.history,
            "step": step,
        }
        if partial is not None:
            checkpoint["partial"] = partial
        ckpt.save(checkpoint, args.output_dir / CHECKPOINT)
        log.info("checkpoint after epoch %d, step %d: %s", epoch_done, step, args.output_dir / CHECKPOINT)


def train(args: argparse.Namespace) -> Outcome:
    """Run (or resume) training as ``args`` say, in this process's place under torchrun (if any)."""
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if args.weights is not None and args.backbone_weights is not None:
        raise TrainingError("--weights and --backbone-weights exclude each other")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ranks = distributed.start(args.device)
    if not ranks.is_main:
        for name in ("training", "flowcloud"):
            logging.getLogger(name).setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        return _train(args, ranks)
    finally:
        distributed.stop()


def _train(args: argparse.Namespace, ranks: Ranks) -> Outcome:
    device = ranks.device
    if args.batch_size % ranks.world_size:
        raise TrainingError(
            f"--batch-size {args.batch_size} is the global batch: it must divide among {ranks.world_size} "
            "processes"
        )
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
    val_loader = _val_loader(args, label_set, ranks)
    batches_per_epoch = len(train_set) // args.batch_size
    if batches_per_epoch < 1:
        raise TrainingError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    steps = min(batches_per_epoch, args.steps_per_epoch) if args.steps_per_epoch > 0 else batches_per_epoch
    seed_everything(args.seed)
    net = build_model(args.model, label_set, aux_loss=args.aux_loss)
    if args.weights is not None:
        init_from(net, args.weights)
    if args.backbone_weights is not None:
        load_backbone_weights(net, args.backbone_weights)
    if args.freeze_backbone:
        for p in net.backbone.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
    net.to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    if args.sync_bn and ranks.distributed:
        net = convert_sync_batchnorm(net, device)
    optimizer = make_optimizer(args, [p for p in net.parameters() if p.requires_grad])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_schedule(steps * args.epochs, args.warmup_steps)
    )
    out_dir: Path = args.output_dir
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    weight = None
    if args.class_weights:
        weight = ranks.broadcast(class_weights(train_set, label_set.num_classes) if ranks.is_main else None)
        log.info(
            "class weights: %s", {label_set.class_names[i]: round(float(w), 2) for i, w in enumerate(weight)}
        )
        weight = weight.to(device)
    run = Training(
        args=args,
        ranks=ranks,
        net=net,
        model=net,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not args.no_amp),
        label_set=label_set,
        info=ModelInfo(name=args.model, label_set=label_set.name, version=args.version or out_dir.name),
        train_set=train_set,
        steps=steps,
        weight=weight,
    )
    epoch_done, start_step, partial = _resume(run)
    if ranks.distributed:
        run.model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch = epoch_done + 1
    last_epoch = args.epochs if args.stop_after <= 0 else min(args.epochs, start_epoch + args.stop_after)
    with Preemption() as preemption:
        for epoch in range(start_epoch, last_epoch):
            started = time.perf_counter()
            progress = EpochProgress.restore(label_set.num_classes, partial, ranks)
            stopped = run.train_epoch(epoch, start_step, progress, preemption)
            if stopped is not None:
                if ranks.is_main:
                    log.warning("SIGTERM: checkpointed epoch %d after step %d; stopping", epoch, stopped)
                return Outcome(run.history, ranks.is_main, (epoch, stopped))
            start_step, partial = 0, None
            record: dict[str, Any] = {"epoch": epoch, "lr": lr_scheduler.get_last_lr()[0]}
            record.update(progress.scores(ranks))
            if val_loader is not None:
                record.update(run.validate(val_loader))
            record["seconds"] = round(time.perf_counter() - started, 1)
            run.history.append(record)
            run.save(epoch, 0)
            if ranks.is_main:
                (out_dir / METRICS).write_text(json.dumps(run.history, indent=2))
                plot_history(run.history, out_dir)
                log.info(
                    "epoch %d: loss %.4f, pixel accuracy %.3f%s (%.0f s)",
                    epoch,
                    record["loss"],
                    record["pixel_accuracy"],
                    f", val mIoU {record['val_mean_iou']:.3f}" if "val_mean_iou" in record else "",
                    record["seconds"],
                )
    return Outcome(run.history, ranks.is_main)


def _val_loader(
    args: argparse.Namespace, label_set: LabelSet, ranks: Ranks
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]] | None:
    """This rank's share of the validation images (every world_size-th), or None without validation."""
    if args.val_split == "none":
        return None
    val_set = CityscapesSegmentation(
        args.val_data or args.data, args.val_split, label_set, SegmentationPresetEval(args.eval_size)
    )
    count = min(args.val_limit, len(val_set)) if args.val_limit > 0 else len(val_set)
    mine = Subset(val_set, range(ranks.rank, count, ranks.world_size))
    return DataLoader(
        mine, batch_size=1 if args.eval_size is None else max(1, args.batch_size // ranks.world_size)
    )


def _resume(run: Training) -> tuple[int, int, dict[str, Any] | None]:
    """Restore --resume, or --output-dir's newest checkpoint: (last epoch done, step, partial sums)."""
    args, ranks = run.args, run.ranks
    error, checkpoint = None, None
    if ranks.is_main:  # rank 0 reads, every rank gets the same: other nodes need not see the volume
        try:
            ckpt.remove_partial(args.output_dir)
            path = args.resume or ckpt.latest(args.output_dir)
            if path is not None:
                checkpoint = ckpt.load(path)
                log.info(
                    "resuming from %s%s",
                    path,
                    "" if args.resume else " (found in --output-dir; use another to start afresh)",
                )
        except TrainingError as exc:
            error = str(exc)
    error, checkpoint = ranks.broadcast((error, checkpoint))
    if error is not None:
        raise TrainingError(error)
    if checkpoint is None:
        return -1, 0, None
    source = args.resume or args.output_dir / CHECKPOINT
    saved = checkpoint["args"]
    for key in ("model", "label_set"):
        if saved.get(key) != getattr(args, key):
            raise TrainingError(f"{source} was trained with --{key.replace('_', '-')} {saved.get(key)}")
    step = int(checkpoint.get("step", 0))
    if step and saved.get("batch_size") != args.batch_size:
        raise TrainingError(
            f"{source} stopped mid-epoch with --batch-size {saved.get('batch_size')}; keep it"
        )
    run.net.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if "scaler" in checkpoint:
        run.scaler.load_state_dict(checkpoint["scaler"])
    epoch_done = int(checkpoint["epoch"])
    history = checkpoint.get("history")
    if history is None:  # written before checkpoints carried their history
        metrics = args.output_dir / METRICS
        history = json.loads(metrics.read_text()) if metrics.is_file() else []
    run.history = [h for h in history if h["epoch"] <= epoch_done]
    log.info(
        "resuming after epoch %d%s", epoch_done, f", step {step} of epoch {epoch_done + 1}" if step else ""
    )
    return epoch_done, step, checkpoint.get("partial")


# -- charts -----------------------------------------------------------------------------------


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> None:
    """loss.png, accuracy.png and miou.png: training and validation curves per epoch."""
    try:
        import matplotlib
    except ImportError:  # the train extra is not installed (e.g. a bare GPU image): no charts
        log.warning("matplotlib is not installed (pip install 'flowcloud[train]'): no charts written")
        return
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
