"""`zoo export`: trainer checkpoint -> model_cards/NAME/ (safetensors, ONNX, config.json, model card)."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo import registry
from zoo.hub import sha256_file

NAME = "wmse-resnet18_narrow.fmnist"
RESULTS = {"knn_k20": 71.25, "knn_k200": 69.5, "knn5_majority": 70.0,
           "protocol": "test protocol: 1000-image bank, 500 queries", "train_minutes": 0.5, "hardware": "2 CPU cores"}


def make_checkpoint(run_dir: Path, arch: str = "resnet18_narrow", method: str = "wmse",
                    dataset: str = "fashion_mnist", seed: int = 0, results: dict | None = None) -> Path:
    """A trainer-format checkpoint of a random `arch` backbone whose BN statistics are not the defaults."""
    from zoo.provenance import config_hash

    torch.manual_seed(seed)
    backbone = zoo.create_backbone(arch)
    for name, buf in backbone.named_buffers():  # non-trivial running stats, so BN is really exported
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    method_state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    method_state["projector.0.weight"] = torch.randn(8, backbone.feature_dim)  # a head: must not be exported
    recipe = {"method": {"name": method}, "model": {"arch": arch},
              "data": {"dataset": dataset, "batch_size": 16}, "augment": {"views": []},
              "optim": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 2, "seed": seed}}
    history = [{"step": 10, "epoch": 1, "knn_top1": 41.0}, {"step": 20, "epoch": 2, "knn_top1": 52.5, "final": True}]
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"method": method_state, "recipe_json": json.dumps(recipe, sort_keys=True),
                "recipe_hash": config_hash(recipe), "history": json.dumps(history), "step": 20, "epoch": 2},
               run_dir / "checkpoint.pt")
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir / "checkpoint.pt"


def isolate(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """model_cards/ and pretrained.json under `root`, so no test writes into the repository."""
    cards = root / "model_cards"
    cards.mkdir(parents=True, exist_ok=True)
    mp.setenv("SSL_ZOO_MODEL_CARDS", str(cards))
    pretrained = root / "pretrained.json"
    if registry.PRETRAINED_JSON.exists():
        shutil.copy(registry.PRETRAINED_JSON, pretrained)
    mp.setattr(registry, "PRETRAINED_JSON", pretrained)
    registry.reload()
    return cards


@pytest.fixture
def env(tmp_path, monkeypatch):
    cards = isolate(monkeypatch, tmp_path)
    yield cards
    monkeypatch.undo()
    registry.reload()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export shared by the checks below (an export takes a few seconds on two cores)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        cards = isolate(mp, root)
        ckpt = make_checkpoint(root / "run", results=RESULTS)
        from export.publish import export_model

        result = export_model(ckpt.parent, NAME)
        yield {"root": root, "cards": cards, "ckpt": ckpt, "folder": result.folder, "result": result}
    registry.reload()


def _checkpoint_backbone(ckpt: Path, arch: str = "resnet18_narrow") -> torch.nn.Module:
    state = torch.load(ckpt, weights_only=True)["method"]
    model = zoo.create_backbone(arch)
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return model.eval()


@functools.lru_cache(maxsize=1)
def _fmnist_test_images() -> torch.Tensor:
    from zoo.datasets import load_fashion_mnist

    return load_fashion_mnist("test")[0][:64]


def _fmnist_batch(n: int = 16) -> torch.Tensor:
    return zoo.load(NAME, pretrained=False, device="cpu").preprocess(_fmnist_test_images()[:n, None])


# ---------------------------------------------------------------- the folder


def test_export_writes_exactly_the_hub_repository(exported):
    folder = exported["folder"]
    assert folder == exported["cards"] / NAME
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.onnx", "model.safetensors"]
    assert not [p for p in exported["cards"].iterdir() if p.name.startswith(".")]  # no temp folders left


def test_weights_are_the_backbone_alone_with_format_metadata(exported):
    from safetensors import safe_open

    folder = exported["folder"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["ssl_zoo_format_version"] == "1" and meta["dtype"] == "float32" and meta["arch"] == "resnet18_narrow"
    assert keys == set(zoo.create_backbone("resnet18_narrow").state_dict())  # no projector, no fc.*
    reference = _checkpoint_backbone(exported["ckpt"]).state_dict()
    assert all(torch.equal(tensors[k], reference[k]) for k in keys)
    assert all(t.is_contiguous() for t in tensors.values())


def test_config_is_the_registry_row_with_sha256_metrics_and_recipe_hash(exported):
    from zoo.provenance import config_hash

    folder = exported["folder"]
    config = json.loads((folder / "config.json").read_text())
    recipe = json.loads(torch.load(exported["ckpt"], weights_only=True)["recipe_json"])
    assert config["sha256"] == sha256_file(folder / "model.safetensors")
    assert config["metrics"] == {k: RESULTS[k] for k in ("knn_k20", "knn_k200", "knn5_majority")}
    assert config["train_minutes"] == 0.5 and config["has_weights"] is True
    assert config["extra"]["recipe_hash"] == config_hash(recipe)
    expected = zoo.get_spec(NAME).to_dict()
    for key in ("arch", "feature_dim", "input_size", "mean", "std", "interpolation", "method", "tag", "recipe"):
        assert config[key] == expected[key], key
    assert zoo.ModelSpec.from_dict(config).sha256 == config["sha256"]


def test_registry_row_is_updated_and_zoo_load_gives_the_checkpoint_features(exported):
    row = json.loads(registry.PRETRAINED_JSON.read_text())[NAME]
    assert row == {"sha256": sha256_file(exported["folder"] / "model.safetensors"), "has_weights": True,
                   "train_minutes": 0.5, "metrics": {k: RESULTS[k] for k in ("knn_k20", "knn_k200", "knn5_majority")}}
    spec = zoo.get_spec(NAME)
    assert spec.has_weights and spec.sha256 == row["sha256"] and spec.metrics["knn_k20"] == 71.25
    model = zoo.load(NAME, device="cpu")  # pretrained=True: resolves model_cards/NAME
    x = _fmnist_batch(8)
    with torch.no_grad():
        assert torch.equal(model(x), _checkpoint_backbone(exported["ckpt"])(x))


def test_onnx_matches_pytorch_on_random_and_fashion_mnist_inputs(exported):
    import onnx

    from zoo.onnx import check_onnx_parity, onnx_session

    path = exported["folder"] / "model.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["features"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    model = _checkpoint_backbone(exported["ckpt"])
    session = onnx_session(path)
    for x in (_fmnist_batch(16), torch.randn(1, 3, 28, 28), torch.randn(5, 3, 28, 28)):
        got = session.run(["features"], {"images": x.numpy()})[0]
        with torch.no_grad():
            assert got.shape == (x.shape[0], 256) and np.abs(got - model(x).numpy()).max() <= 1e-4
    assert check_onnx_parity(model, path, _fmnist_batch(4)) <= 1e-4
    parity = exported["result"].parity
    assert set(parity) == {"random", "Fashion-MNIST test"} and all(d <= 1e-4 for _, d in parity.values())


def test_onnx_session_picks_cpu_without_a_cuda_provider_and_rejects_odd_devices(exported):
    import onnxruntime

    from zoo.onnx import onnx_session

    path = exported["folder"] / "model.onnx"
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert onnx_session(path).get_providers()[0] == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    assert onnx_session(path, "cpu").get_providers() == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in onnx_session(path, torch.device("cuda", 0)).get_providers()  # falls back
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        onnx_session(path, "tpu")


def test_onnx_parity_failure_is_loud(exported):
    from zoo.onnx import OnnxParityError, check_onnx_parity

    model = _checkpoint_backbone(exported["ckpt"])
    with torch.no_grad():
        model.layer4[1].bn2.bias.add_(0.5)  # no longer the exported weights
    with pytest.raises(OnnxParityError, match=r"differs from PyTorch by max \|diff\| .* > atol"):
        check_onnx_parity(model, exported["folder"] / "model.onnx", torch.randn(2, 3, 28, 28))


def _trainer_checkpoint(run_dir: Path) -> Path | None:
    """A real 2-step `zoo train` run on synthetic data, or None while the trainer cannot run yet."""
    try:
        from training.recipe import load_recipe
        from training.trainer import train
    except ImportError:
        return None
    recipe = load_recipe("training/recipes/simclr/fmnist.yaml", [
        "data.dataset=synthetic", "data.size=64", "data.test_size=32", "data.batch_size=16", "train.epochs=1",
        "train.max_steps=2", "eval.knn_bank=64", "eval.knn_queries=32", "eval.knn_every=0"])
    train(recipe, run_dir, progress=False)
    return run_dir / "checkpoint.pt"


def test_fp16_export_of_a_trainer_run_loads_back_as_fp32(env, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors import safe_open

    from export.publish import export_model

    ckpt = _trainer_checkpoint(tmp_path / "run")  # the real trainer when it runs, else its checkpoint format
    name = "simclr-resnet18_narrow.fmnist" if ckpt is not None else NAME
    if ckpt is None:
        ckpt = make_checkpoint(tmp_path / "run", seed=1)
    folder = export_model(ckpt.parent, name, fp16=True).folder
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == "float16" and f.get_tensor("conv1.weight").dtype == torch.float16
        assert f.get_tensor("bn1.num_batches_tracked").dtype == torch.int64
    model = zoo.load(name, device="cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = _checkpoint_backbone(ckpt)
    assert torch.equal(model.conv1.weight, reference.conv1.weight.half().float())
    card = (folder / "README.md").read_text()
    assert "fp16 (loads back as fp32)" in card and "not measured" in card  # no results.json for this run
    if name.startswith("simclr"):  # the trainer run used synthetic images: the card must not claim Fashion-MNIST
        assert "recipe dataset `synthetic`, not Fashion-MNIST" in card
    assert ModelCard.load(folder / "README.md").data.eval_results is None  # so no model-index


def test_interrupted_export_leaves_no_folder_and_no_registry_change(env, tmp_path, monkeypatch):
    import zoo.onnx
    from export.publish import export_model

    before = registry.PRETRAINED_JSON.read_bytes() if registry.PRETRAINED_JSON.exists() else None
    row_before = zoo.get_spec(NAME)

    def crash(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise KeyboardInterrupt  # as a Ctrl-C mid-export

    monkeypatch.setattr(zoo.onnx, "export_onnx", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(make_checkpoint(tmp_path / "run"), NAME)
    assert list(env.iterdir()) == []
    after = registry.PRETRAINED_JSON.read_bytes() if registry.PRETRAINED_JSON.exists() else None
    assert after == before and zoo.get_spec(NAME) == row_before


def test_checkpoint_of_another_arch_is_a_one_line_error(env, tmp_path):
    from export.checkpoint import ExportError
    from export.publish import export_model

    ckpt = make_checkpoint(tmp_path / "run", arch="resnet18_cifar")
    with pytest.raises(ExportError, match=r"arch 'resnet18_cifar' but wmse-resnet18_narrow.fmnist is "
                                          r"'resnet18_narrow'; export it under .*wmse-resnet18_cifar.fmnist") as e:
        export_model(ckpt, NAME)
    assert "\n" not in str(e.value) and list(env.iterdir()) == []


def test_other_bad_requests_are_one_line_errors(env, tmp_path):
    from export.checkpoint import ExportError
    from export.publish import export_model

    ckpt = make_checkpoint(tmp_path / "run", method="simclr")
    with pytest.raises(ExportError, match="method 'simclr'"):
        export_model(ckpt, NAME)
    with pytest.raises(ExportError, match="full registry name"):
        export_model(ckpt, "simclr-resnet18_narrow")
    with pytest.raises(zoo.UnknownNameError, match="did you mean"):
        export_model(ckpt, "simclr-resnet18_narow.fmnist")
    with pytest.raises(ExportError, match="no checkpoint at"):
        export_model(tmp_path / "nothing", NAME)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read"):
        export_model(tmp_path / "junk.pt", NAME)
    ckpt = make_checkpoint(tmp_path / "run2", results={"knn_k20": "high"})
    with pytest.raises(ExportError, match="knn_k20 must be a number"):
        export_model(ckpt, NAME)
    (env / NAME).mkdir()
    with pytest.raises(ExportError, match="--force"):
        export_model(make_checkpoint(tmp_path / "run3"), NAME)


def test_cli_export_and_its_errors(env, tmp_path, capsys):
    from zoo_cli.export import register

    parser = argparse.ArgumentParser(prog="zoo")
    register(parser.add_subparsers(dest="command", required=True))
    ckpt = make_checkpoint(tmp_path / "run", arch="resnet18_cifar")
    args = parser.parse_args(["export", str(ckpt.parent), "--name", NAME])
    with pytest.raises(ValueError, match="arch"):  # zoo_cli.main prints it as one `error:` line
        args.func(args)
    args = parser.parse_args(["publish", "model_cards/x", "--repo-id", "org/x", "--private", "--revision", "v1"])
    assert (args.folder, args.repo_id, args.private, args.revision) == ("model_cards/x", "org/x", True, "v1")


def test_onnxruntime_missing_names_the_pip_extra(monkeypatch, tmp_path):
    import sys

    from zoo.onnx import onnx_session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(zoo.MissingDependencyError, match=r"pip install 'ssl-zoo\[onnx\]'"):
        onnx_session(tmp_path / "model.onnx")


def test_export_onnx_rejects_an_old_opset(tmp_path):
    from zoo.onnx import export_onnx

    with pytest.raises(ValueError, match="opset >= 17"):
        export_onnx(zoo.create_backbone("resnet18_narrow"), tmp_path / "m.onnx", 28, opset=13)


def test_fp16_onnx_stores_half_precision_weights_and_matches_pytorch(tmp_path):
    import onnx

    from zoo.onnx import check_onnx_parity, export_onnx

    torch.manual_seed(0)
    model = zoo.create_backbone("resnet18_narrow").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, rounded as an fp16 safetensors file loads back
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2), module.running_var.uniform_(0.5, 2.0)
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", 28)
    fp16 = export_onnx(model, tmp_path / "fp16.onnx", 28, weights_dtype="float16")
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    stored = {i.data_type for i in onnx.load(str(fp16)).graph.initializer if i.name.endswith(".fp16")}
    assert stored == {onnx.TensorProto.FLOAT16}
    images = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert check_onnx_parity(model, fp16, images, atol=1e-4) < 1e-4
