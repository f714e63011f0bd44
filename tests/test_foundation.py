import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import zoo
from zoo.datasets import DatasetNotFoundError, load_fashion_mnist
from zoo.errors import MissingDependencyError, require
from zoo.hub import sha256_file


def test_resnet50_imagenet_stem_maps_224_images_to_2048_features():
    model = zoo.load("wmse-resnet50", pretrained=False)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 2048)
    assert model.spec.arch == "resnet50" and not model.training


def test_cifar_stem_resnet18_maps_32px_images_to_512_features():
    model = zoo.create_backbone("resnet18_cifar").eval()
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_cpu_arch_accepts_grayscale_and_repeats_it_to_three_channels():
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False)
    gray = torch.rand(2, 1, 28, 28)
    assert model(gray).shape == (2, 256)
    assert torch.equal(model(gray), model(gray.expand(-1, 3, -1, -1)))


def test_backbone_has_no_classifier_and_torchvision_key_names():
    keys = zoo.create_backbone("resnet18").state_dict().keys()
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_list_models_names_every_method_of_the_mission():
    names = zoo.list_models()
    for method in ["wmse", "msbreg", "equimod-simclr", "equimod-byol", "isd", "groco", "simclr", "byol"]:
        assert any(n.startswith(method + "-") for n in names), method
        assert f"{method}-resnet18_narrow.fmnist" in names
    assert zoo.list_models("wmse-*") == [n for n in names if n.startswith("wmse-")]


def test_unknown_name_suggests_the_closest_model():
    with pytest.raises(zoo.UnknownNameError, match="wmse-resnet50"):
        zoo.load("wmse-resnet5")


def test_short_name_without_weights_names_the_recipe_that_makes_them():
    short = "groco-resnet50"
    if zoo.get_spec(short).has_weights:
        pytest.skip("weights shipped for this name")
    with pytest.raises(zoo.WeightsNotAvailableError, match="zoo train training/recipes/groco/in1k.yaml"):
        zoo.load(short)


def test_full_name_without_weights_fails_at_once_naming_recipe_and_tags_with_weights(monkeypatch):
    import zoo.hub

    def no_network(*args, **kwargs):
        raise AssertionError("a row without weights must not reach for the Hub")

    monkeypatch.setattr(zoo.hub, "hub_download", no_network)
    with pytest.raises(zoo.WeightsNotAvailableError) as err:
        zoo.load("wmse-resnet50.in1k")
    message = str(err.value)
    assert "\n" not in message and "zoo train training/recipes/wmse/in1k.yaml" in message
    assert all(zoo.get_spec(n).has_weights for n in message.rsplit(": ", 1)[1].split(", "))


def test_short_name_picks_the_first_tag_with_weights_and_logs_the_choice_once(monkeypatch, caplog):
    from dataclasses import replace

    from zoo import registry as reg

    rows = dict(reg.registry())
    for name in ("groco-resnet50.in1k", "groco-resnet50.fmnist"):
        row = rows.get(name) or reg.make_spec("groco", "resnet50", name.rsplit(".", 1)[1])
        rows[name] = replace(row, has_weights=name.endswith("fmnist"))
    monkeypatch.setattr(reg, "_REGISTRY", rows)
    monkeypatch.setattr(reg, "_logged_defaults", set())
    with caplog.at_level("INFO", logger="zoo"):
        assert reg.get_spec("groco-resnet50", need_weights=True).name == "groco-resnet50.fmnist"
        assert reg.get_spec("groco-resnet50", need_weights=True).name == "groco-resnet50.fmnist"
    assert [r.getMessage() for r in caplog.records] == ["groco-resnet50 -> groco-resnet50.fmnist"]
    rows["groco-resnet50.in1k"] = replace(rows["groco-resnet50.in1k"], has_weights=True)
    assert reg.get_spec("groco-resnet50").name == "groco-resnet50.in1k"  # ImageNet first when both exist


def _save_random_weights(tmp_path, arch="resnet18_narrow"):
    model = zoo.create_backbone(arch)
    for p in model.parameters():
        p.data.normal_()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_weights_round_trip_bit_exactly_through_file_and_folder(tmp_path):
    model, path = _save_random_weights(tmp_path)
    name = "wmse-resnet18_narrow.fmnist"
    spec = zoo.get_spec(name).to_dict() | {"sha256": sha256_file(path)}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    for source in (path, tmp_path):
        loaded = zoo.load(name, pretrained=source, device="cpu")
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (source, k)


def test_flipped_byte_fails_the_sha256_check(tmp_path):
    _, path = _save_random_weights(tmp_path)
    spec = zoo.get_spec("wmse-resnet18_narrow.fmnist").to_dict() | {"sha256": sha256_file(path)}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(zoo.IntegrityError, match="sha256"):
        zoo.load("wmse-resnet18_narrow.fmnist", pretrained=tmp_path)


def test_checkpoint_of_another_arch_lists_mismatched_keys(tmp_path):
    _, path = _save_random_weights(tmp_path, arch="resnet18_cifar")
    with pytest.raises(zoo.CheckpointMismatchError, match="shape mismatch .*conv1.weight"):
        zoo.load("wmse-resnet18_narrow.fmnist", pretrained=path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    _, path = _save_random_weights(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(zoo.IntegrityError, match="not a readable safetensors"):
        zoo.load("wmse-resnet18_narrow.fmnist", pretrained=path)


def test_missing_optional_dependency_names_the_pip_extra():
    with pytest.raises(MissingDependencyError, match=r"pip install 'ssl-zoo\[onnx\]'"):
        require("surely_not_installed_module", "onnx", "the onnxruntime backend")


def test_preprocess_accepts_pil_grayscale_rgb_and_uint8_tensors():
    pre = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False).preprocess
    gray = Image.fromarray(np.full((28, 28), 255, np.uint8), mode="L")
    out = pre(gray)
    assert out.shape == (3, 28, 28)
    assert torch.allclose(out, torch.full_like(out, (1 - 0.2860) / 0.3530))
    assert torch.allclose(pre(gray.convert("RGB")), out)
    assert torch.allclose(pre(torch.full((1, 28, 28), 255, dtype=torch.uint8)), out)
    assert pre(torch.zeros(4, 1, 56, 56, dtype=torch.uint8)).shape == (4, 3, 28, 28)


def test_preprocess_rejects_odd_channel_counts():
    pre = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False).preprocess
    with pytest.raises(ValueError, match="1 or 3 channels"):
        pre(torch.zeros(4, 28, 28, dtype=torch.uint8))


def test_fashion_mnist_reader_gives_uint8_images_and_labels():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))


def test_fashion_mnist_reader_says_how_to_install_when_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_package_imports_and_builds_a_backbone_without_optional_dependencies():
    import subprocess
    import sys

    code = (
        "import sys, importlib.machinery\n"
        "class Block:\n"  # modules that 'exist' to probes (torch checks some) but fail to import
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('faiss', 'onnxruntime', 'onnx', 'huggingface_hub', 'training'):\n"
        "            return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('blocked ' + spec.name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, zoo\n"
        "m = zoo.load('wmse-resnet18_narrow.fmnist', pretrained=False)\n"
        "print(tuple(m(torch.zeros(1, 1, 28, 28)).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 256)"


def test_cli_reports_an_unknown_model_in_one_line():
    from zoo_cli.main import main

    assert main(["info", "wmse-resnet5"]) == 2


def test_registry_rows_without_weights_say_so_and_name_their_recipe():
    spec = zoo.get_spec("isd-resnet50.in1k")
    assert spec.method == "isd" and spec.feature_dim == 2048 and spec.input_size == 224
    assert spec.recipe == "training/recipes/isd/in1k.yaml"
    assert zoo.get_spec("isd-resnet18.in1k").recipe == "training/recipes/isd/in1k-resnet18.yaml"
    assert spec.hub_repo == "ssl-zoo/isd-resnet50.in1k"
    assert "reconstruction" in zoo.get_spec("msbreg-resnet18_narrow.fmnist").paper


@pytest.mark.parametrize("name", zoo.list_models(pretrained_only=True) or ["(none shipped)"])
def test_every_shipped_model_loads_offline_from_model_cards_with_its_checked_sha256(name, monkeypatch):
    if name == "(none shipped)":
        pytest.skip("no weights shipped yet")
    from zoo.hub import model_cards_dir, sha256_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = zoo.get_spec(name)
    weights = model_cards_dir() / name / spec.weights_file
    assert weights.exists(), f"{name} is marked as shipped but {weights} is missing"
    assert sha256_file(weights) == spec.sha256
    model = zoo.load(name, device="cpu")
    x = model.preprocess(torch.zeros(2, 1, spec.input_size, spec.input_size, dtype=torch.uint8))
    assert model(x).shape == (2, spec.feature_dim)


@pytest.mark.parametrize("name", zoo.list_models(pretrained_only=True) or ["(none shipped)"])
def test_every_shipped_model_was_trained_by_its_recipe_file_as_committed(name):
    # The card's recipe_hash is the sha256 of the resolved recipe the weights were trained with: editing a
    # recipe without retraining (or shipping a run made with --set overrides) breaks `zoo train RECIPE`
    # reproducing the shipped row.
    if name == "(none shipped)":
        pytest.skip("no weights shipped yet")
    from training.recipe import load_recipe
    from zoo.provenance import config_hash
    from zoo.hub import model_cards_dir

    spec = zoo.get_spec(name)
    config = json.loads((model_cards_dir() / name / "config.json").read_text())
    assert config["recipe"] == spec.recipe
    assert config_hash(load_recipe(spec.recipe)) == config["extra"]["recipe_hash"], (
        f"{spec.recipe} differs from the recipe {name} was trained with")


def test_one_dataset_row_answers_every_name_and_unknown_names_list_the_known_ones():
    from zoo.registry import DATASET_ROWS, UnknownDatasetError, get_dataset

    fmnist = get_dataset("fmnist")
    assert all(get_dataset(n) is fmnist for n in ("fashion_mnist", "fashion-mnist", "synthetic"))
    assert (fmnist.num_classes, fmnist.display, fmnist.trainer) == (10, "Fashion-MNIST", "fashion_mnist")
    assert get_dataset("imagenet").tag == get_dataset("imagenet-1k").tag == "in1k"
    names = [n for row in DATASET_ROWS for n in row.names]
    assert len(names) == len(set(names))  # no name in two rows
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'mnist'; known: .*Fashion-MNIST") as e:
        get_dataset("mnist")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_fashion_mnist_split_takes_the_first_or_last_n_and_refuses_a_negative_limit():
    from zoo.datasets import fashion_mnist_split, load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    first, last = fashion_mnist_split("train", 7), fashion_mnist_split("train", 7, from_end=True)
    assert torch.equal(first.images, images[:7]) and torch.equal(first.labels, labels[:7])
    assert torch.equal(last.images, images[-7:]) and last.ids[0] == f"fmnist:train:{len(images) - 7}"
    assert len(fashion_mnist_split("test")) == 10000 and len(fashion_mnist_split("test", 0)) == 0
    with pytest.raises(ValueError, match="limit"):
        fashion_mnist_split("test", -5)


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_registry_row_preprocesses_at_the_size_its_recipe_trains(name):
    # The row's input size is what zoo.load's preprocess feeds the network; the recipe's first (global) view is
    # what it learned on, and its k-NN monitor's eval.input_size what it was watched at: one size for all three.
    from training.recipe import load_recipe

    spec = zoo.get_spec(name)
    recipe = load_recipe(spec.recipe)
    assert recipe["augment"]["views"][0]["crop_size"] == spec.input_size, (spec.recipe, spec.input_size)
    assert recipe.get("eval", {}).get("input_size", spec.input_size) == spec.input_size
