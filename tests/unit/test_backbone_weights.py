"""`--backbone-weights`: ImageNet classification state_dicts (ResNet-50, MobileNetV3) and the zoo's own
backbones load into the segmentation model's backbone, with a report of what matched."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support.training import tiny_dataset, tiny_train_args
from torchvision import models

from flowcloud.cli.main import main
from flowcloud.labels import TRAIN_IDS
from flowcloud.zoo import WeightsError, build_model
from training.backbone import load_backbone_weights


def _assert_backbone_is(model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = model.backbone.state_dict()  # type: ignore[union-attr]
    for key, value in own.items():
        assert torch.equal(value, state[prefix + key]), key


def test_the_zoo_s_own_backbone_round_trips_and_extra_tensors_are_reported(tmp_path: Path) -> None:
    torch.manual_seed(1)
    donor = build_model("small_unet", TRAIN_IDS)
    state = {**donor.backbone.state_dict(), "fc.weight": torch.zeros(10, 96), "fc.bias": torch.zeros(10)}  # type: ignore[union-attr]
    torch.save(state, tmp_path / "backbone.pth")
    torch.manual_seed(2)
    model = build_model("small_unet", TRAIN_IDS)
    head_before = model.state_dict()["classifier.weight"].clone()
    report = load_backbone_weights(model, tmp_path / "backbone.pth")
    _assert_backbone_is(model, state)
    assert torch.equal(model.state_dict()["classifier.weight"], head_before), "the head is left alone"
    assert report.loaded == report.backbone_tensors == len(donor.backbone.state_dict())  # type: ignore[union-attr]
    assert report.unused == ["fc.bias", "fc.weight"] and not report.missing and not report.misshapen
    assert f"backbone: {report.loaded} of {report.loaded} tensors" in report.summary()


def test_an_imagenet_resnet50_state_dict_fills_deeplabv3_s_backbone(tmp_path: Path) -> None:
    state = models.resnet50(weights=None).state_dict()  # the layout of torchvision's ImageNet file
    torch.save(state, tmp_path / "resnet50.pth")
    model = build_model("deeplabv3_resnet50", TRAIN_IDS, aux_loss=True)
    report = load_backbone_weights(model, tmp_path / "resnet50.pth")
    _assert_backbone_is(model, state)
    assert report.loaded == report.backbone_tensors and report.prefix == ""
    assert report.unused == ["fc.bias", "fc.weight"]


def test_an_imagenet_mobilenet_v3_state_dict_fills_its_features(tmp_path: Path) -> None:
    state = models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(state, tmp_path / "mnv3.pth")
    model = build_model("lraspp_mobilenet_v3_large", TRAIN_IDS)
    report = load_backbone_weights(model, tmp_path / "mnv3.pth")
    _assert_backbone_is(model, state, "features.")
    assert report.prefix == "features." and report.loaded == report.backbone_tensors
    assert all(name.startswith("classifier.") for name in report.unused)


def test_a_file_that_fits_nothing_is_an_error(tmp_path: Path) -> None:
    torch.save({"encoder.w": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no tensor of .* fits the backbone of a SmallUNet"):
        load_backbone_weights(build_model("small_unet", TRAIN_IDS), tmp_path / "other.pth")


def test_train_loads_and_reports_the_backbone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tiny_dataset(tmp_path / "data", train_frames=2, val_frames=1)
    torch.manual_seed(7)
    state = build_model("small_unet", TRAIN_IDS).backbone.state_dict()  # type: ignore[union-attr]
    torch.save(state, tmp_path / "backbone.pth")
    args = tiny_train_args(
        data, tmp_path / "run", "--batch-size", "2", "--epochs", "1", "--val-split", "none",
        "--backbone-weights", str(tmp_path / "backbone.pth"), "--freeze-backbone",
        "--label-set", "trainIds-19",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="training"):
        assert main(args) == 0
    assert f"backbone: {len(state)} of {len(state)} tensors from {tmp_path / 'backbone.pth'}" in caplog.text
    trained = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"]
    for key, value in state.items():  # frozen: the loaded weights are what the checkpoint holds
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(trained[f"backbone.{key}"], value), key


def test_weights_and_backbone_weights_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny_train_args(tmp_path, tmp_path / "run", "--weights", "a.pth", "--backbone-weights", "b.pth")
    assert main(args) == 1
    assert "--weights and --backbone-weights exclude each other" in capsys.readouterr().err
