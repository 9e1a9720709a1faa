"""``--backbone-weights``: start a zoo model's backbone from ImageNet classification weights.

The published DeepLabV3 recipes start from an ImageNet ResNet-50; torchvision's segmentation
models keep the classifier's layer names inside ``model.backbone`` (ResNet: ``conv1``, ``layer1`` ...;
MobileNetV3: its ``features`` without the prefix). So a classification state_dict fits once a
prefix is taken off; the classifier (``fc``, ``classifier``) has no place and is reported unused.
Nothing is downloaded: the file comes from the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flowcloud.zoo import WeightsError, read_weights_file

log = logging.getLogger(__name__)

# Prefixes a classification (or whole-model) state_dict puts before the backbone's own names.
PREFIXES = ("", "features.", "backbone.", "model.", "encoder.")


@dataclass(frozen=True)
class BackboneReport:
    """What ``load_backbone_weights`` copied from the file and what it left."""

    source: str
    prefix: str
    loaded: int
    backbone_tensors: int
    missing: list[str]  # backbone tensors the file did not provide (they keep their initialisation)
    unused: list[str]  # file tensors with no place in the backbone (e.g. the ImageNet classifier)
    misshapen: list[str]

    def summary(self) -> str:
        text = (
            f"backbone: {self.loaded} of {self.backbone_tensors} tensors from {self.source}"
            + (f" (prefix {self.prefix!r} removed)" if self.prefix else "")
            + f"; {len(self.unused)} file tensors unused"
        )
        if self.unused:
            text += f" ({', '.join(self.unused[:3])}{', ...' if len(self.unused) > 3 else ''})"
        if self.missing:
            text += f"; {len(self.missing)} backbone tensors not in the file (first: {self.missing[0]})"
        if self.misshapen:
            text += f"; {len(self.misshapen)} of another shape (first: {self.misshapen[0]})"
        return text


def load_backbone_weights(model: nn.Module, path: Path) -> BackboneReport:
    """Copy every tensor of ``path`` that fits ``model.backbone`` by name and shape; report the rest."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise WeightsError(f"a {type(model).__name__} has no backbone to load {path} into")
    state, _ = read_weights_file(path)
    own = backbone.state_dict()

    def fitting(prefix: str) -> dict[str, str]:  # backbone name -> file name
        names = {k.removeprefix(prefix): k for k in state if k.startswith(prefix)}
        return {k: f for k, f in names.items() if k in own and state[f].shape == own[k].shape}

    prefix = max(PREFIXES, key=lambda p: len(fitting(p)))
    chosen = fitting(prefix)
    if not chosen:
        raise WeightsError(
            f"no tensor of {path} fits the backbone of a {type(model).__name__} "
            f"(file names such as {', '.join(list(state)[:2])}; backbone names such as "
            f"{', '.join(list(own)[:2])}); --backbone-weights takes an ImageNet classification state_dict"
        )
    backbone.load_state_dict({k: state[f] for k, f in chosen.items()}, strict=False)
    used = set(chosen.values())
    stripped = {k.removeprefix(prefix): k for k in state if k.startswith(prefix)}
    report = BackboneReport(
        source=str(path),
        prefix=prefix,
        loaded=len(chosen),
        backbone_tensors=len(own),
        missing=sorted(k for k in own if k not in chosen),
        unused=sorted(k for k in state if k not in used),
        misshapen=sorted(
            k for k, f in stripped.items() if k in own and k not in chosen and state[f].shape != own[k].shape
        ),
    )
    log.info("%s", report.summary())
    return report
