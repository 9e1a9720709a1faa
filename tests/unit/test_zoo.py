from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowcloud.labels import LABEL_IDS, TRAIN_IDS, LabelSet
from flowcloud.zoo import MODEL_NAMES, ModelInfo, WeightsError, build_model, load_model, save_weights


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("label_set", [LABEL_IDS, TRAIN_IDS])
def test_output_shape_and_classes(name: str, label_set: LabelSet) -> None:
    torch.manual_seed(0)
    model = build_model(name, label_set).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 64, 96))["out"]
    assert tuple(out.shape) == (1, label_set.num_classes, 64, 96)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", LABEL_IDS)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.inference_mode():
        return model.eval()(torch.rand(1, 3, 32, 32))["out"]


def test_save_load_round_trip_with_meta(tmp_path: Path) -> None:
    model = build_model("lraspp_mobilenet_v3_large", TRAIN_IDS)
    path = tmp_path / "w.pt"
    save_weights(
        model, path, ModelInfo(name="lraspp_mobilenet_v3_large", label_set=TRAIN_IDS.name, version="t1")
    )
    loaded = load_model(weights=path)  # name and label set come from the file's metadata
    assert loaded.info.name == "lraspp_mobilenet_v3_large"
    assert loaded.label_set is TRAIN_IDS
    assert loaded.info.version == "t1"
    torch.testing.assert_close(_outputs(loaded.module), _outputs(model))


def test_plain_state_dict_and_checkpoint_dict(tmp_path: Path) -> None:
    model = build_model("lraspp_mobilenet_v3_large", LABEL_IDS)
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), plain)
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)
    for path in (plain, ckpt):
        loaded = load_model("lraspp_mobilenet_v3_large", path)
        torch.testing.assert_close(_outputs(loaded.module), _outputs(model))


def test_wrong_shape_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "w19.pt"
    torch.save(build_model("lraspp_mobilenet_v3_large", TRAIN_IDS).state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit this model: \d+ tensors of the wrong shape"):
        load_model("lraspp_mobilenet_v3_large", path, label_set=LABEL_IDS.name)


def test_wrong_architecture_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(build_model("lraspp_mobilenet_v3_large", LABEL_IDS).state_dict(), path)
    with pytest.raises(WeightsError, match="missing"):
        load_model("deeplabv3_mobilenet_v3_large", path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist; pass --weights PATH"):
        load_model("lraspp_mobilenet_v3_large", tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model("lraspp_mobilenet_v3_large", bad)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Path("/")}, path)  # a non-tensor object
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model("lraspp_mobilenet_v3_large", path)


def test_random_weights_excludes_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="exclude each other"):
        load_model(weights=tmp_path / "w.pt", random_weights=True)
    loaded = load_model("lraspp_mobilenet_v3_large", random_weights=True)
    assert loaded.info.version == "random" and loaded.label_set is LABEL_IDS
