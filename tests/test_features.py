"""Feature maps (`zoo.load(..., features_only=True)`), features of any stage in `zoo.embed`, their ONNX export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import zoo
from zoo.features import FeatureBackbone, features_only, gem, stage_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (see conftest.py)


def _pair(name: str, **kw):
    """The pooled model and its features_only twin, built from the same seed (so the same random weights)."""
    torch.manual_seed(0)
    pooled = zoo.load(name, pretrained=False, device="cpu")
    torch.manual_seed(0)
    maps = zoo.load(name, pretrained=False, device="cpu", features_only=True, **kw)
    return pooled, maps


@pytest.mark.parametrize("name,x_shape", [("wmse-resnet18_narrow.fmnist", (3, 1, 28, 28)),  # grayscale input
                                          ("wmse-resnet50", (2, 3, 64, 64))])
def test_last_feature_map_average_pooled_equals_the_pooled_model(name, x_shape):
    pooled, maps = _pair(name)
    x = torch.randn(x_shape)
    with torch.no_grad():
        last = maps(x)[-1]
        expected = pooled(x)
    assert len(maps(x)) == 4 and maps.feature_info.out_indices == (1, 2, 3, 4)
    assert (last.mean(dim=(2, 3)) - expected).abs().max().item() <= 1e-5
    assert maps.spec == pooled.spec and repr(maps.preprocess) == repr(pooled.preprocess)


@pytest.mark.parametrize("name", ["wmse-resnet18_narrow.fmnist", "wmse-resnet50"])
def test_shipped_weights_last_feature_map_average_pooled_equals_the_pooled_model(name):
    if not zoo.get_spec(name).has_weights:
        pytest.skip(f"{name} has no shipped weights")
    pooled = zoo.load(name, device="cpu")
    maps = zoo.load(name, device="cpu", features_only=True)
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = pooled.preprocess(images[:, None])  # real preprocessing of Fashion-MNIST-sized inputs
    with torch.no_grad():
        last, expected = maps(x)[-1], pooled(x)
    assert torch.equal(maps.conv1.weight, pooled.conv1.weight)  # the shipped weights, not a fresh init
    assert (last.mean(dim=(2, 3)) - expected).abs().max().item() <= 1e-5


def test_features_only_shares_the_pooled_models_tensors_without_copy():
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    view = features_only(model, (2, 4))
    assert isinstance(view, FeatureBackbone)
    assert view.conv1.weight.data_ptr() == model.conv1.weight.data_ptr()
    assert view.layer4[1].bn2.running_var.data_ptr() == model.layer4[1].bn2.running_var.data_ptr()
    assert set(view.state_dict()) <= set(model.state_dict())  # torchvision key names, no prefix
    with torch.no_grad():
        model.layer2[0].conv1.weight.mul_(2)  # a change to the model is seen by the view
    assert torch.equal(view.layer2[0].conv1.weight, model.layer2[0].conv1.weight)


EXPECTED_REDUCTIONS = {  # from each arch's stem: 7x7/2 + max-pool, 3x3/1 without, 3x3/1 with, 3x3/2 without
    "resnet50": [2, 4, 8, 16, 32], "resnet18": [2, 4, 8, 16, 32], "resnet18_cifar": [1, 1, 2, 4, 8],
    "resnet18_stl": [1, 2, 4, 8, 16], "resnet18_narrow": [2, 2, 4, 8, 16],
}


@pytest.mark.parametrize("arch", list(EXPECTED_REDUCTIONS))
def test_feature_map_strides_and_channels_match_feature_info(arch):
    name = next(n for n in zoo.list_models() if n.split(".")[0].split("-", 1)[1] == arch)
    model = zoo.load(name, pretrained=False, device="cpu", features_only=True, out_indices=(0, 1, 2, 3, 4))
    size = 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    info = model.feature_info
    assert info.reduction() == EXPECTED_REDUCTIONS[arch]
    assert [t.shape[1] for t in out] == info.channels()
    assert [tuple(t.shape[2:]) for t in out] == [(math.ceil(size / r),) * 2 for r in info.reduction()]
    assert info.channels()[-1] == zoo.ARCHS[arch].feature_dim


def test_feature_info_has_timms_api():
    model = zoo.load("wmse-resnet50", pretrained=False, device="cpu", features_only=True, out_indices=(1, 2, 3, 4))
    info = model.feature_info
    assert info.channels() == [256, 512, 1024, 2048] and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["layer1", "layer2", "layer3", "layer4"]
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [{"num_chs": c, "reduction": r}
                                                             for c, r in zip(info.channels(), info.reduction())]
    assert len(info) == 5 and info[0]["module"] == "relu" and info.channels(0) == 64  # every stage, as timm
    assert model.output_names == ["feature_1", "feature_2", "feature_3", "feature_4"]


def test_out_index_out_of_range_is_a_one_line_error_listing_the_valid_ones():
    with pytest.raises(IndexError) as e:
        zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, features_only=True, out_indices=(1, 5))
    assert "\n" not in str(e.value) and "0-4" in str(e.value) and "4=layer4" in str(e.value)
    with pytest.raises(ValueError, match="features_only=True"):
        zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, out_indices=(1, 2))
    negative = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, features_only=True, out_indices=(-1,))
    assert negative.feature_info.out_indices == (4,)


# ------------------------------------------------------------------------------------------ embed(layer, pool)
def _uint8_images(n=6, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)


def test_embed_default_is_the_pooled_model_itself():
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    assert stage_model(model) is model and stage_model(model, "layer4", "avg") is model
    x = _uint8_images()
    plain = zoo.embed(model, x, progress=False)
    explicit = zoo.embed(model, x, progress=False, layer="layer4", pool="avg")
    assert torch.equal(plain.features, explicit.features) and plain.map_shape is None


@pytest.mark.parametrize("pool", ["avg", "gem", "max", "none"])
def test_embed_features_of_layer3_match_the_pooled_feature_map(pool):
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    x = _uint8_images()
    emb = zoo.embed(model, x, progress=False, normalize=False, layer="layer3", pool=pool)
    with torch.no_grad():
        fmap = features_only(model, (3,))(model.preprocess(x[:, None]))[0]  # [6, 128, 4, 4]
    expected = {"avg": fmap.mean(dim=(2, 3)), "gem": gem(fmap), "max": fmap.amax(dim=(2, 3)),
                "none": fmap.flatten(1)}[pool]
    assert emb.features.shape == expected.shape
    assert (emb.features - expected).abs().max().item() <= 1e-4
    assert emb.map_shape == ((128, 4, 4) if pool == "none" else None)


def test_gem_with_p_3_lies_between_average_and_max():
    x = torch.rand(2, 5, 3, 3)
    g = gem(x)
    assert torch.allclose(g, x.pow(3).mean(dim=(2, 3)).pow(1 / 3), atol=1e-6)
    assert (g >= x.mean(dim=(2, 3)) - 1e-6).all() and (g <= x.amax(dim=(2, 3)) + 1e-6).all()


def test_embed_refuses_other_stages_on_onnxruntime_and_unknown_pools():
    from zoo.errors import EmbedError

    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    with pytest.raises(EmbedError, match="backend='torch'"):
        zoo.embed(model, _uint8_images(2), layer="layer2", backend="onnxruntime", progress=False)
    with pytest.raises(EmbedError, match="pool must be one of"):
        zoo.embed(model, _uint8_images(2), pool="median", progress=False)


def test_zoo_embed_cli_layer_and_pool_record_the_map_shape(tmp_path):
    from PIL import Image

    from zoo_cli.main import main
    from zoo.shards import read_embeddings

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "emb"
    args = ["embed", "wmse-resnet18_narrow.fmnist", str(folder), "--out", str(out), "--untrained", "--device", "cpu",
            "--no-progress", "--workers", "0"]
    assert main(args + ["--layer", "layer2", "--pool", "none"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["layer"] == "layer2" and config["pool"] == "none" and config["map_shape"] == [64, 7, 7]
    emb = read_embeddings(out)
    assert emb.features.shape == (3, 64 * 7 * 7) and emb.map_shape == (64, 7, 7)
    assert main(args + ["--layer", "layer2", "--pool", "gem"]) == 2  # the folder holds another (layer, pool)


# ------------------------------------------------------------------------------------------ ONNX
def test_onnx_features_only_export_matches_pytorch_within_1e_4_at_any_batch_and_size(tmp_path):
    pytest.importorskip("onnxruntime")
    from zoo.onnx import check_features_onnx_parity, export_features_onnx, onnx_session

    torch.manual_seed(0)
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu", features_only=True)
    path = export_features_onnx(model, tmp_path / "maps.onnx")
    session = onnx_session(path, "cpu")
    assert [o.name for o in session.get_outputs()] == ["feature_1", "feature_2", "feature_3", "feature_4"]
    assert check_features_onnx_parity(model, path, torch.randn(3, 3, 28, 28)) <= 1e-4
    assert check_features_onnx_parity(model, path, torch.randn(2, 3, 44, 36)) <= 1e-4  # dynamic H, W
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert meta["reductions"] == "2,4,8,16" and meta["channels"] == "32,64,128,256"


def test_onnx_features_parity_check_fails_on_different_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from zoo.onnx import OnnxParityError, check_features_onnx_parity, export_features_onnx

    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu", features_only=True)
    path = export_features_onnx(model, tmp_path / "maps.onnx")
    with torch.no_grad():
        model.layer3[0].conv1.weight.add_(0.05)
    with pytest.raises(OnnxParityError, match="differs from PyTorch"):
        check_features_onnx_parity(model, path, torch.randn(2, 3, 28, 28))
