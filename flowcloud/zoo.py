"""The model zoo: the one place that builds segmentation networks and loads their weights.

Nothing here downloads anything: torchvision builders are called with ``weights=None`` and
``weights_backbone=None``; trained weights always come from a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import segmentation

from flowcloud.labels import LABEL_IDS, LabelSet, get_label_set
from flowcloud.sizes import parse_size

log = logging.getLogger(__name__)

DEFAULT_MODEL = "deeplabv3_resnet50"
DEMO_WEIGHTS = Path(__file__).parent / "models" / "demo.pt"


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """A 0.6 M-parameter U-Net with dilated context and a global gate, for CPUs and the demo.

    Dense 3x3 convolutions train several times faster per image on a CPU than MobileNetV3's
    depthwise blocks, and the skips at 1/2 and 1/4 keep thin things (poles, signs) sharp.
    """

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        c1, c2, c3 = width, width * 2, width * 4
        self.backbone = nn.ModuleDict(
            {
                "stage1": nn.Sequential(_conv(3, c1, 2), _conv(c1, c1)),  # 1/2
                "stage2": nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2)),  # 1/4
                "stage3": nn.Sequential(  # 1/8, receptive field widened by dilation
                    _conv(c2, c3, 2),
                    _conv(c3, c3),
                    _conv(c3, c3, dilation=2),
                    _conv(c3, c3, dilation=4),
                    _conv(c3, c3, dilation=8),
                ),
            }
        )
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c3, c3, 1), nn.Sigmoid())
        self.up2 = _conv(c3 + c2, c2)
        self.up1 = _conv(c2 + c1, c1)
        self.classifier = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        f1 = self.backbone["stage1"](x)
        f2 = self.backbone["stage2"](f1)
        f3 = self.backbone["stage3"](f2)
        f3 = f3 * self.gate(f3)
        y = nn.functional.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up2(torch.cat([y, f2], 1))
        y = nn.functional.interpolate(y, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up1(torch.cat([y, f1], 1))
        out = nn.functional.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=False)
        return {"out": out}


def small_unet(
    weights: None = None, weights_backbone: None = None, num_classes: int = 21, aux_loss: bool = False
) -> nn.Module:
    """The zoo builder of ``SmallUNet`` (no pretrained weights and no auxiliary head exist)."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("small_unet has no pretrained weights")
    if aux_loss:
        raise ValueError("small_unet has no auxiliary classifier; drop --aux-loss")
    return SmallUNet(num_classes)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "deeplabv3_mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large,
    "small_unet": small_unet,
}
MODEL_NAMES = tuple(_BUILDERS)

HOW_TO_GET_WEIGHTS = (
    "pass --weights PATH (a torchvision state_dict or a FlowCloud checkpoint); train one with "
    "'flowcloud train' and 'flowcloud export', or use --random-weights for benchmarks and tests"
)


class WeightsError(ValueError):
    """Weights are missing, unreadable, or do not fit the chosen model."""


@dataclass(frozen=True)
class ModelInfo:
    """What a weights file says about itself (the ``meta`` dict written by ``flowcloud export``)."""

    name: str = DEFAULT_MODEL
    label_set: str = LABEL_IDS.name
    version: str = "unversioned"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) the weights file records as the model's input (``meta.input_size``), if valid."""
        text = self.extra.get("input_size")
        try:
            return parse_size(text) if isinstance(text, str) else None
        except ValueError:
            return None


def choose_input_size(given: tuple[int, int] | None, info: ModelInfo) -> tuple[tuple[int, int] | None, str]:
    """The size to run a model at, and a line saying where it came from: ``--size`` when given, else
    the size the weights record, else each picture's own."""
    if given is not None:
        return given, f"{given[0]}x{given[1]} (--size)"
    recorded = info.input_size
    if recorded is not None:
        return recorded, f"{recorded[0]}x{recorded[1]} (the model's recorded input size; --size to change)"
    return None, "each picture's own size (the weights record no input size; --size to choose one)"


def build_model(name: str, label_set: LabelSet, aux_loss: bool = False) -> nn.Module:
    """A randomly initialised zoo model whose classifier predicts ``label_set``'s classes."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": label_set.num_classes}
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = aux_loss
    return builder(**kwargs)


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelInfo | None]:
    """The state_dict (and FlowCloud metadata, if any) of a weights or checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; {HOW_TO_GET_WEIGHTS}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    if not isinstance(blob, dict):
        raise WeightsError(f"{path} holds a {type(blob).__name__}, not a state_dict or checkpoint dict")
    info = None
    meta = blob.get("meta")
    if isinstance(meta, dict):
        known = {k: meta[k] for k in ("name", "label_set", "version") if k in meta}
        extra = {k: v for k, v in meta.items() if k not in known}
        info = ModelInfo(**known, extra=extra)
    state = blob["model"] if isinstance(blob.get("model"), dict) else blob
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} contains no tensors")
    return tensors, info


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, with one readable error for missing, extra or misshapen tensors."""
    own = model.state_dict()
    if not any(k.startswith("aux_classifier.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (first: {wrong[0]})")
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if problems:
        raise WeightsError(
            f"weights from {source} do not fit this model: {'; '.join(problems)}. "
            "Check --model and the label set the weights were trained for."
        )
    model.load_state_dict(state, strict=True)


@dataclass
class LoadedModel:
    module: nn.Module
    info: ModelInfo
    label_set: LabelSet
    source: str


def load_model(
    name: str | None = None,
    weights: str | Path | None = None,
    label_set: str | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """Build a zoo model and fill it with weights from a file, the bundled demo model or at random.

    ``name`` and ``label_set`` default to what the weights file says about itself, then to
    DeepLabV3-ResNet50 on labelIds-34. Without ``weights`` the bundled demo model is used where
    it exists; ``random_weights`` is for benchmarks and tests only.
    """
    if random_weights:
        if weights is not None:
            raise WeightsError("--random-weights and --weights exclude each other")
        lset = get_label_set(label_set or LABEL_IDS.name)
        model_name = name or DEFAULT_MODEL
        module = build_model(model_name, lset)
        info = ModelInfo(name=model_name, label_set=lset.name, version="random")
        return LoadedModel(module.eval(), info, lset, "random initialisation")
    if weights is None:
        if not DEMO_WEIGHTS.is_file():
            raise WeightsError(f"no weights given and no bundled demo model; {HOW_TO_GET_WEIGHTS}")
        weights = DEMO_WEIGHTS
        log.info("no --weights given: using the bundled demo model %s", DEMO_WEIGHTS)
    state, file_info = read_weights_file(weights)
    if weights == DEMO_WEIGHTS and name is not None and file_info is not None and name != file_info.name:
        raise WeightsError(
            f"the bundled demo model is a {file_info.name}, not a {name}; {HOW_TO_GET_WEIGHTS}"
        )
    info = file_info or ModelInfo(name=name or DEFAULT_MODEL, label_set=label_set or LABEL_IDS.name)
    model_name = name or info.name
    lset = get_label_set(label_set or info.label_set)
    module = build_model(model_name, lset, aux_loss=any(k.startswith("aux_classifier.") for k in state))
    load_state(module, state, str(weights))
    info = ModelInfo(name=model_name, label_set=lset.name, version=info.version, extra=info.extra)
    return LoadedModel(module.eval(), info, lset, str(weights))


def save_weights(module: nn.Module, path: str | Path, info: ModelInfo) -> None:
    """Write a weights file that ``load_model`` reads: the state_dict plus FlowCloud metadata."""
    meta = {"name": info.name, "label_set": info.label_set, "version": info.version, **info.extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": module.state_dict(), "meta": meta}, path)


def calibrate_batch_norm(module: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set each BatchNorm's running statistics to those of ``batch`` (NCHW, as the model sees it).

    For random-weight models in tests and benchmarks: plain random initialisation predicts one
    class everywhere, while calibrated statistics give masks that vary per pixel like a trained
    model's, so comparing two inference paths' masks means something. Returns the model in eval mode.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average: exactly this batch's statistics
    module.train()
    with torch.no_grad():
        module(batch)
    return module.eval()
