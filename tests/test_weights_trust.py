"""`zoo.load(name, pretrained=PATH)`: identity only for measured bytes, preprocessing edits only off-registry."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo.errors import CheckpointMismatchError, IntegrityError
from zoo.hub import model_cards_dir, sha256_file

NAME = "simclr-resnet18_narrow.fmnist"


@pytest.fixture
def shipped(tmp_path) -> Path:
    folder = tmp_path / NAME
    shutil.copytree(model_cards_dir() / NAME, folder, ignore=shutil.ignore_patterns("*.onnx"))
    return folder


def _edit(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _other_weights(folder: Path) -> Path:
    model = zoo.create_backbone("resnet18_narrow")
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("field,value", [("mean", [0.5, 0.5, 0.5]), ("std", [1.0, 1.0, 1.0]), ("input_size", 64),
                                         ("arch", "resnet18_cifar")])
def test_an_edited_config_of_registry_weights_is_refused_naming_the_field(shipped, field, value):
    _edit(shipped, **{field: value})
    with pytest.raises(IntegrityError, match=rf"changes {field} of {NAME}"):
        zoo.load(NAME, pretrained=shipped, device="cpu")


def test_registry_weights_in_a_folder_carry_the_registry_row(shipped):
    loaded = zoo.load(NAME, pretrained=shipped, device="cpu")
    assert loaded.spec == zoo.get_spec(NAME) and loaded.spec.metrics["knn_k20"] > 0


def test_a_weights_file_outside_the_folder_is_refused(shipped, tmp_path):
    shutil.copy(shipped / "model.safetensors", tmp_path / "other.safetensors")
    _edit(shipped, weights_file="../other.safetensors")
    with pytest.raises(IntegrityError, match="must name a file inside the folder"):
        zoo.load(NAME, pretrained=shipped, device="cpu")


def test_config_without_sha256_is_said_and_claims_no_metrics(shipped, caplog):
    _other_weights(shipped)
    _edit(shipped, sha256=None)
    with caplog.at_level(logging.INFO, logger="zoo"):
        loaded = zoo.load(NAME, pretrained=shipped, device="cpu")
    assert "records no sha256" in caplog.text
    assert loaded.spec.metrics == {} and loaded.spec.train_minutes is None and loaded.spec.recipe == ""


def test_other_bytes_claiming_a_registry_name_lose_its_metrics_but_keep_their_preprocessing(shipped):
    weights = _other_weights(shipped)
    _edit(shipped, sha256=sha256_file(weights), mean=[0.5, 0.5, 0.5])
    loaded = zoo.load(NAME, pretrained=shipped, device="cpu")
    assert loaded.spec.metrics == {} and loaded.spec.name == "simclr-resnet18_narrow"
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.sha256 == sha256_file(weights)


def test_a_bare_safetensors_file_is_checked_against_the_registry_sha256(shipped, tmp_path, caplog):
    same = zoo.load(NAME, pretrained=shipped / "model.safetensors", device="cpu")
    assert same.spec.metrics == zoo.get_spec(NAME).metrics
    other = _other_weights(tmp_path)
    with caplog.at_level(logging.INFO, logger="zoo"):
        loaded = zoo.load(NAME, pretrained=other, device="cpu")
    assert loaded.spec.metrics == {} and loaded.spec.name == "simclr-resnet18_narrow"
    assert "not the registry's weights" in caplog.text and "28 px" in caplog.text


def test_a_folder_of_another_arch_is_refused_before_loading(shipped):
    weights = _other_weights(shipped)
    _edit(shipped, sha256=sha256_file(weights), arch="resnet18_cifar")
    with pytest.raises(CheckpointMismatchError, match="load it with a model name of arch 'resnet18_cifar'"):
        zoo.load(NAME, pretrained=shipped, device="cpu")


def test_malformed_config_json_is_a_one_line_error_naming_the_file(shipped):
    (shipped / "config.json").write_text("{not json")
    with pytest.raises(IntegrityError, match=r"config.json is not valid JSON") as info:
        zoo.load(NAME, pretrained=shipped, device="cpu")
    assert "\n" not in str(info.value)
