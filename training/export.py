"""`flowcloud export CKPT -o weights.pt [--torchscript F] [--onnx F]`: ship a trained model.

The weights file is what `flowcloud infer`, `flowcloud eval` and the workers load (state_dict
plus ``meta``: name, label set, version). TorchScript and ONNX files take one NCHW float input
(ImageNet-normalised, at ``--size``) and return the logits. Every file written is read back
and its output compared with the eager model's on the same random input:

* weights file: identical (max |difference| 0),
* TorchScript: max |difference| <= 1e-4,
* ONNX (onnxruntime, CPU): max |difference| <= 1e-3 (kernels fuse and reorder float sums).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flowcloud.cli.errors import CommandError
from flowcloud.inference import IMAGENET_MEAN, IMAGENET_STD
from flowcloud.labels import LABEL_SETS
from flowcloud.sizes import parse_size
from flowcloud.zoo import MODEL_NAMES, LoadedModel, ModelInfo, WeightsError, load_model, save_weights

log = logging.getLogger(__name__)

TORCHSCRIPT_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-3
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """An exported file does not reproduce the eager model within its tolerance."""


class LogitsOnly(nn.Module):
    """The model with a plain tensor output (``["out"]``), as TorchScript and ONNX consumers expect."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@dataclass
class ExportReport:
    weights: str
    model: str
    label_set: str
    version: str
    size: str
    checks: dict[str, float] = field(default_factory=dict)  # file -> max |difference| to eager


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="training checkpoint (or weights file)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="weights file to write")
    parser.add_argument("--torchscript", type=Path, help="also write a TorchScript file")
    parser.add_argument("--onnx", type=Path, help="also write an ONNX file (checked with onnxruntime)")
    parser.add_argument("--model", choices=MODEL_NAMES, help="zoo model (default: what the checkpoint says)")
    parser.add_argument("--label-set", choices=sorted(LABEL_SETS), help="classes (default: the checkpoint's)")
    parser.add_argument("--version", help="version written into meta (default: the checkpoint's)")
    parser.add_argument("--size", default="256x512", help="HxW of the TorchScript/ONNX input (256x512)")
    parser.add_argument("--json", action="store_true", help="print a JSON report")


def run(args: argparse.Namespace) -> int:
    try:
        size = parse_size(args.size)
        loaded = load_model(args.model, args.checkpoint, args.label_set)
        report = export(loaded, args.output, size, args.torchscript, args.onnx, args.version)
    except (WeightsError, ValueError, ExportError) as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"wrote {report.weights} ({report.model}, {report.label_set}, version {report.version})")
        for path, diff in report.checks.items():
            print(f"  {path}: max |difference| to eager {diff:.2e}")
    return 0


def export(
    loaded: LoadedModel,
    output: Path,
    size: tuple[int, int],
    torchscript: Path | None = None,
    onnx: Path | None = None,
    version: str | None = None,
) -> ExportReport:
    """Write the weights file (and TorchScript / ONNX), verifying each against the eager model."""
    model = loaded.module.eval()
    info = ModelInfo(
        name=loaded.info.name,
        label_set=loaded.label_set.name,
        version=version or loaded.info.version,
        extra={
            **{k: v for k, v in loaded.info.extra.items() if isinstance(v, str | int | float | bool)},
            "input_size": f"{size[0]}x{size[1]}",  # the size it was checked (and is meant to run) at
        },
    )
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, *size, generator=generator)
    with torch.inference_mode():
        reference = model(sample)["out"]
    report = ExportReport(str(output), info.name, info.label_set, info.version, f"{size[0]}x{size[1]}")

    save_weights(model, output, info)
    reloaded = load_model(weights=output).module
    report.checks[str(output)] = _check(reloaded(sample)["out"], reference, 0.0, str(output))

    if torchscript is not None:
        wrapper = LogitsOnly(copy.deepcopy(model)).eval()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still widely deployed
            traced = torch.jit.trace(wrapper, sample[:1], strict=False)
        torchscript.parent.mkdir(parents=True, exist_ok=True)
        traced.save(str(torchscript))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(torchscript), map_location="cpu")
        diff = _check(scripted(sample), reference, TORCHSCRIPT_TOLERANCE, str(torchscript))
        report.checks[str(torchscript)] = diff

    if onnx is not None:
        report.checks[str(onnx)] = _export_onnx(model, sample, reference, onnx, info)
    log.info("exported %s: %s", output, report.checks)
    return report


def _export_onnx(
    model: nn.Module, sample: torch.Tensor, reference: torch.Tensor, path: Path, info: ModelInfo
) -> float:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError(
            "ONNX export needs onnxruntime to check the file: pip install onnxruntime"
        ) from None
    # The exporter restores the wrapper's train/eval mode afterwards: keep it eval.
    wrapper = LogitsOnly(copy.deepcopy(model)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (sample[:1],),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    # What a consumer without torch needs (the edge's fallback): the model's identity and input.
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, onnx_metadata(info))
    onnx.save(exported, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = session.run(None, {"image": sample.numpy()})[0]
    return _check(torch.from_numpy(output), reference, ONNX_TOLERANCE, str(path))


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    """The ONNX file's metadata_props: name, label set, version, input size, normalisation."""
    return {
        "flowcloud.model": info.name,
        "flowcloud.label_set": info.label_set,
        "flowcloud.version": info.version,
        "flowcloud.input_size": str(info.extra.get("input_size", "")),
        "flowcloud.mean": ",".join(str(v) for v in IMAGENET_MEAN),
        "flowcloud.std": ",".join(str(v) for v in IMAGENET_STD),
    }


def _check(got: torch.Tensor, reference: torch.Tensor, tolerance: float, what: str) -> float:
    if got.shape != reference.shape:
        raise ExportError(f"{what} outputs shape {tuple(got.shape)}, eager {tuple(reference.shape)}")
    diff = float((got.detach().float() - reference.float()).abs().max())
    if diff > tolerance:
        raise ExportError(f"{what} differs from the eager model by {diff:.3e} (tolerance {tolerance:.0e})")
    return diff
