"""Model cards: what `zoo export` writes into README.md, re-carding a shipped folder, and where each listed
file lives (the folder, or built on first use)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from tests.test_export import (NAME, RESULTS, _checkpoint_backbone, _fmnist_test_images, env,  # noqa: F401
                               exported, make_checkpoint)  # env, exported: the export's fixtures, shared
from zoo import registry
from zoo.hub import sha256_file


def test_card_metadata_parses_back_with_the_model_index(exported):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported["folder"] / "README.md")
    data = card.data
    assert data.library_name == "ssl-zoo" and data.pipeline_tag == "image-feature-extraction"
    assert data.license == "mit" and "wmse" in data.tags and data.datasets == ["zalando-datasets/fashion_mnist"]
    measured = {r.metric_config: r.metric_value for r in data.eval_results}
    assert measured == {k: RESULTS[k] for k in ("knn_k20", "knn_k200", "knn5_majority")}
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    text = card.text
    assert f'zoo.load("{NAME}")' in text
    assert "| linear probe top-1 (frozen features) | not measured |" in text  # linear absent from results.json
    assert "training/recipes/wmse/fmnist.yaml" in text and "test protocol: 1000-image bank" in text
    assert "0.50 min on 2 CPU cores" in text and "20 optimiser steps, 2 epochs" in text
    assert "arXiv:2007.06346" in text and "## Limitations" in text


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_card_snippets_load_the_files_with_torchvision_and_onnxruntime_alone(exported, monkeypatch):
    from huggingface_hub import ModelCard
    from PIL import Image

    folder = exported["folder"]
    blocks = _code_blocks(ModelCard.load(folder / "README.md").text)
    tv_code = next(b for b in blocks if "load_file(" in b)
    ort_code = next(b for b in blocks if "InferenceSession" in b)
    assert "import zoo" not in tv_code and "import zoo" not in ort_code
    monkeypatch.chdir(folder)
    reference = _checkpoint_backbone(exported["ckpt"])

    ns: dict = {}
    exec(compile(tv_code, "card-torchvision", "exec"), ns)  # noqa: S102 - the card's own example
    with torch.no_grad():
        assert torch.equal(ns["features"], reference(ns["images"]))

    ns = {}
    exec(compile(ort_code, "card-onnxruntime", "exec"), ns)  # noqa: S102
    image = Image.fromarray(_fmnist_test_images()[0].numpy(), mode="L")
    got = ns["session"].run(["features"], {"images": np.stack([ns["preprocess"](image)])})[0]
    pre = zoo.load(NAME, pretrained=False, device="cpu").preprocess
    with torch.no_grad():
        assert np.abs(got - reference(pre(image)[None]).numpy()).max() <= 1e-4


# The stem variants (narrow: above); the resnet50 ones differ only in the constructor name and cost ~8 s here.
@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet18_stl"])
def test_torchvision_snippet_rebuilds_the_small_stem_archs(arch, tmp_path):
    from export.snippets import torchvision_snippet
    from zoo.safetensors_io import save_backbone

    spec = registry.make_spec("wmse", arch, "c10")  # 32 px inputs: fast on 2 cores, valid for every stem
    model = zoo.create_backbone(arch).eval()
    save_backbone(model.state_dict(), tmp_path / "w.safetensors")
    ns: dict = {}
    exec(compile(torchvision_snippet(spec, str(tmp_path / "w.safetensors")), arch, "exec"), ns)  # noqa: S102
    with torch.no_grad():
        assert torch.equal(ns["features"], model(ns["images"]))


# ---------------------------------------------------------------- variants and failures


def _shipped_copy(env: Path, name: str) -> Path:
    """A copy of the shipped folder `model_cards/<name>` under `env` (skips when the checkout lacks its weights)."""
    source = Path(__file__).resolve().parents[1] / "model_cards" / name
    if not (source / "model.safetensors").exists():
        pytest.skip(f"{name} weights are not shipped")
    folder = env / name
    shutil.copytree(source, folder)
    return folder


def test_a_shipped_folder_is_re_carded_keeping_its_bytes_numbers_and_adding_new_ones(env, tmp_path):
    """A shipped model whose run is gone: `zoo export model_cards/NAME --results new.json --force`."""
    from export.card_sections import recipe_header
    from export.checkpoint import ExportError
    from export.publish import export_model
    name = "isd-resnet18_narrow.fmnist"
    folder = _shipped_copy(env, name)
    before = json.loads((folder / "config.json").read_text())
    protocol_line = next(line for line in (folder / "README.md").read_text().splitlines()
                         if line.startswith("Protocol: "))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"knn_dinov2_k10": 83.5, "linear_1pct": 70.25,
                               "transfer_protocols": {"linear_1pct": "test: 1% of the labels"}}))
    with pytest.raises(ExportError, match="--force"):
        export_model(folder, name, results=new)
    export_model(folder, name, results=new, force=True)
    after = json.loads((folder / "config.json").read_text())
    assert after["sha256"] == before["sha256"] == sha256_file(folder / "model.safetensors")  # bytes kept
    assert after["metrics"] == before["metrics"] and after["train_minutes"] == before["train_minutes"]
    assert after["extra"]["results"]["knn_dinov2_k10"] == 83.5 and after["extra"]["monitor_knn"] is not None
    card = (folder / "README.md").read_text()
    assert "| `knn_dinov2_k10` |" in card and "| 70.25 |" in card and f"{before['metrics']['knn_k20']:.2f}" in card
    assert "| k-NN monitor at the end of training |" in card and before["recipe"] in card
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"knn_lightly_k200": 80.0}))
    export_model(folder, name, results=again, force=True)  # a second re-card keeps the first one's numbers
    card = (folder / "README.md").read_text()
    assert "| `knn_dinov2_k10` |" in card and "| `knn_lightly_k200` |" in card and "| 70.25 |" in card
    assert protocol_line in card.splitlines()  # the measured protocol, not a generic one
    # the recipe's header comment (its measured record of curves, minutes, reruns) travels into the card
    header = recipe_header(before["recipe"])
    assert "## Training history (from the recipe)" in card and header and header in card


def test_card_shows_the_recipe_header_only_for_the_recipe_the_weights_were_trained_with(exported):
    from export.card_sections import recipe_header

    header = recipe_header("training/recipes/wmse/fmnist.yaml")
    assert header.startswith("W-MSE 2 on Fashion-MNIST") and "\n#" not in header and "method:" not in header
    card = (exported["folder"] / "README.md").read_text()  # a test run's recipe, not the file's: no history
    assert "Training history (from the recipe)" not in card


def test_re_carding_refuses_a_folder_whose_recipe_file_changed(env, tmp_path):
    from export.checkpoint import ExportError
    from export.publish import export_model

    name = "isd-resnet18_narrow.fmnist"
    folder = _shipped_copy(env, name)
    config = json.loads((folder / "config.json").read_text())
    config["extra"]["recipe_hash"] = "f" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="has changed since this model was exported"):
        export_model(folder, name, force=True)


def test_card_says_plainly_that_an_imagenet_stem_net_on_small_images_is_not_an_imagenet_backbone():
    from export.card import _small_input_note, dataset_info
    from zoo.backbones import get_arch

    for name, expected in (("wmse-resnet50.fmnist", True), ("wmse-resnet18_narrow.fmnist", False),
                           ("wmse-resnet50.in1k", False), ("wmse-resnet18_cifar.c10", False)):
        spec = zoo.get_spec(name)
        note = _small_input_note(spec, get_arch(spec.arch), dataset_info(spec)[1])
        assert ("not an ImageNet backbone" in note) is expected, name
    spec = zoo.get_spec("wmse-resnet50.fmnist")
    assert "7x7 maps after its max-pool, 1x1 in the last stage" in _small_input_note(spec, get_arch(spec.arch), "x")


def test_results_of_two_sets_of_weights_name_both_on_the_card(tmp_path):
    from zoo.checkpoint import read_results, update_results

    path = tmp_path / "results.json"
    update_results(path, {"knn_k20": 80.0, "measured_on": "the fp32 weights of the training checkpoint `run`"})
    update_results(path, {"linear": 85.0, "measured_on": "model.safetensors (sha256 abc..., loaded as torch.float32)"})
    measured = read_results(path).measured_on
    assert "training checkpoint" in measured and "then model.safetensors" in measured


def _card_files(card: str) -> dict[str, str]:
    """The card's Files table: file name -> its 'where' cell."""
    section = card.split("## Files", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip("| `"): cells[1] for cells in rows}


def test_onnx_on_first_use_is_checked_left_out_of_the_folder_and_said_on_the_card(env, tmp_path):
    from export.publish import check_folder, export_model, onnx_built_on_first_use

    ckpt = make_checkpoint(tmp_path / "run", results=RESULTS)
    result = export_model(ckpt.parent, NAME, onnx_in_folder=False)
    folder = result.folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert len(result.parity) == 2 and max(d for _, d in result.parity.values()) < 1e-4  # still checked
    config = check_folder(folder)  # complete without model.onnx: the config says it is built on first use
    assert onnx_built_on_first_use(config) and config["extra"]["onnx"]["max_abs_diff"]["random"] < 1e-4
    where = _card_files((folder / "README.md").read_text())
    assert where["model.safetensors"] == where["config.json"] == "in this folder"
    assert where["model.onnx"].startswith("built on first use") and "zoo publish" in where["model.onnx"]
    full = export_model(ckpt.parent, NAME, out_dir=tmp_path / "full").folder  # the default keeps the file
    assert (full / "model.onnx").is_file() and _card_files((full / "README.md").read_text())["model.onnx"] == \
        "in this folder"


def test_re_carding_a_folder_keeps_its_onnx_on_first_use(env):
    from export.publish import check_folder, export_model, onnx_built_on_first_use

    name = "isd-resnet18_narrow.fmnist"
    folder = _shipped_copy(env, name)
    (folder / "model.onnx").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["extra"]["onnx"]["in_folder"] = False
    (folder / "config.json").write_text(json.dumps(config))
    export_model(folder, name, force=True)  # a re-card keeps the choice, as it keeps the precision
    assert not (folder / "model.onnx").exists() and onnx_built_on_first_use(check_folder(folder))
    assert _card_files((folder / "README.md").read_text())["model.onnx"].startswith("built on first use")


@pytest.mark.parametrize("name", zoo.list_models(pretrained_only=True) or ["(none shipped)"])
def test_every_shipped_card_lists_only_files_in_its_folder_or_built_on_first_use(name):
    if name == "(none shipped)":
        pytest.skip("no weights shipped yet")
    folder = Path(__file__).resolve().parents[1] / "model_cards" / name  # the repository's, not a test's
    config = json.loads((folder / "config.json").read_text())
    tracked = set(subprocess_lines(["git", "ls-files", "--", str(folder)], cwd=folder)) or None
    for file, where in _card_files((folder / "README.md").read_text()).items():
        if where == "in this folder":
            assert (folder / file).is_file(), f"{name}'s card lists {file} in its folder, which lacks it"
            if tracked is not None:
                assert file in tracked, f"{name}'s card lists {file} in its folder, but git does not track it"
        else:
            assert where.startswith("built on first use") and file == "model.onnx", (name, file, where)
            assert config["extra"]["onnx"]["in_folder"] is False


def subprocess_lines(cmd: list[str], cwd: Path) -> list[str]:
    """Base names of the files `cmd` prints (empty when git is missing or this is not a checkout)."""
    import subprocess

    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [Path(line).name for line in out.splitlines()]
