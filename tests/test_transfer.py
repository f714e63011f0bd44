"""Label-efficient transfer: class-balanced label subsets, linear probe and fine-tuning, results and card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.transfer import (LabelledSplit, TransferError, balanced_subset, finetune_transfer, labels_key,
                          linear_transfer, merge_results, parse_labels)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (see conftest.py)


def _imbalanced_labels() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.permutation(np.repeat(np.arange(4), [500, 300, 200, 1000]))


def test_label_subset_is_class_balanced_and_deterministic_for_a_seed():
    labels = _imbalanced_labels()  # 2000 labels, classes of 500, 300, 200, 1000
    ten = balanced_subset(labels, 0.10, seed=0)
    counts = np.bincount(labels[ten.numpy()], minlength=4)
    assert counts.tolist() == [50, 50, 50, 50]  # round(0.1 x 2000 / 4) per class
    assert torch.equal(ten, balanced_subset(labels, 0.10, seed=0))
    assert torch.equal(ten, balanced_subset(torch.from_numpy(labels), 0.10))  # seed 0 is the default
    assert not torch.equal(ten, balanced_subset(labels, 0.10, seed=1))
    one = balanced_subset(labels, 0.01, seed=0)
    assert np.bincount(labels[one.numpy()], minlength=4).tolist() == [5, 5, 5, 5]
    assert set(one.tolist()) <= set(ten.tolist())  # nested: 1% inside 10% for a seed
    assert torch.equal(ten, torch.sort(ten).values) and len(set(ten.tolist())) == len(ten)


def test_full_labels_is_every_image_and_a_short_class_gives_all_it_has():
    labels = _imbalanced_labels()
    assert torch.equal(balanced_subset(labels, 1.0), torch.arange(len(labels)))
    big = balanced_subset(labels, 0.5)  # 250 per class asked, class 2 has 200
    assert np.bincount(labels[big.numpy()], minlength=4).tolist() == [250, 250, 200, 250]


def test_labels_argument_parses_percentages_to_result_keys():
    assert [labels_key(parse_labels(p)) for p in ("1%", "10%", "100%", "0.5%", "25")] == \
        ["1pct", "10pct", "100pct", "0p5pct", "25pct"]
    for bad in ("0%", "150%", "ten%"):
        with pytest.raises(TransferError, match="--labels"):
            parse_labels(bad)


def _separable_split(n_per_class: int, seed: int, name: str) -> LabelledSplit:
    """Three classes a backbone can tell apart at a glance: dark, mid-grey and bright 28 px images, with noise."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([30, 128, 225]).repeat_interleave(n_per_class)
    noise = torch.randint(-25, 26, (len(levels), 28, 28), generator=g)
    images = (levels[:, None, None] + noise).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return LabelledSplit(name, labels, images)


def test_linear_transfer_on_a_labelled_subset_separates_easy_classes():
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    train, test = _separable_split(40, 0, "train"), _separable_split(10, 1, "test")
    result = linear_transfer(model, train, test, fraction=0.25, seed=0)
    assert result["key"] == "linear_25pct" and result["n_train"] == 30 and result["n_test"] == 30
    assert result["top1"] >= 90.0


def test_finetune_trains_a_copy_and_leaves_the_model_untouched():
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = _separable_split(20, 0, "train"), _separable_split(4, 1, "test")
    result = finetune_transfer(model, train, test, fraction=0.5, seed=0, epochs=2, batch_size=8)
    assert result["key"] == "finetune_50pct" and result["n_train"] == 30 and result["steps"] == 8  # 2 x ceil(30/8)
    assert 0.0 <= result["top1"] <= 100.0 and np.isfinite(result["final_loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _image_folders(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    for split, n in (("train", 6), ("val", 3)):
        for c, level in (("bright", 220), ("dark", 30)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((28, 28), level + i, dtype=np.uint8)).save(d / f"{i}.png")
    (root / "train" / "dark" / "broken.png").write_bytes(b"not a png")  # skipped, not fatal
    return root / "train", root / "val"


def test_cli_transfer_on_an_image_folder_merges_keys_and_protocols_into_results(tmp_path, capsys):
    from zoo_cli.main import main

    train, val = _image_folders(tmp_path / "data")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"knn_k20": 70.0, "protocol": "k-NN protocol text"}))
    common = ["wmse-resnet18_narrow.fmnist", "--untrained", "--device", "cpu", "--train", str(train), "--val", str(val),
              "--results", str(results), "--no-progress"]
    assert main(["eval", "linear", *common, "--labels", "50%", "100%", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"model", "linear_50pct", "linear_100pct"}
    assert main(["eval", "finetune", *common, "--labels", "50%", "--batch-size", "4", "--max-steps", "1"]) == 0
    data = json.loads(results.read_text())
    assert data["knn_k20"] == 70.0 and data["protocol"] == "k-NN protocol text"  # the rest is kept
    assert {"linear_50pct", "linear_100pct", "finetune_50pct"} <= set(data)
    assert "class-balanced" in data["transfer_protocols"]["linear_50pct"]
    assert "seed 0" in data["transfer_protocols"]["finetune_50pct"]
    assert "1 steps" in data["transfer_protocols"]["finetune_50pct"]


def test_eval_linear_without_labels_runs_the_full_label_protocol_as_before(monkeypatch):
    import zoo_cli.evaluate as evaluate
    from zoo_cli.main import build_parser

    calls = []
    monkeypatch.setattr(evaluate, "_cmd_eval", lambda args, protocols: calls.append(protocols) or 0)
    args = build_parser().parse_args(["eval", "linear", "wmse-resnet18_narrow.fmnist"])
    assert args.labels is None and args.func(args) == 0 and calls == [("linear",)]


def test_results_with_transfer_numbers_show_in_the_model_card_with_their_protocols(tmp_path):
    from export.card import ExportFacts, build_card
    from export.card_sections import transfer_section
    from zoo.checkpoint import TrainedCheckpoint, read_results

    path = merge_results(tmp_path / "results.json", [
        {"key": "linear_10pct", "top1": 71.234, "n_train": 6000, "n_test": 10000, "fraction": 0.1, "seed": 0},
        {"key": "finetune_1pct", "top1": 55.0, "n_train": 600, "n_test": 10000, "fraction": 0.01, "seed": 0,
         "epochs": 1, "steps": 3, "batch_size": 256, "lr": 0.05}], "Fashion-MNIST (train 60000, test 10000)")
    data = json.loads(path.read_text())
    data["knn_k20"] = 80.5
    path.write_text(json.dumps(data))
    results = read_results(path)
    assert results.transfer == {"linear_10pct": 71.23, "finetune_1pct": 55.0} and results.metrics == {"knn_k20": 80.5}
    section = transfer_section(results)
    assert "| linear probe, 10% of the labels (class-balanced) | 71.23 |" in section
    assert "fine-tuning of the whole network" in section
    spec = zoo.get_spec("wmse-resnet18_narrow.fmnist")
    ckpt = TrainedCheckpoint(path=tmp_path / "checkpoint.pt", backbone={}, recipe={"data": {"dataset": "fashion_mnist"}},
                             recipe_hash="0" * 64)
    facts = ExportFacts(sha256="0" * 64, weights_dtype="float32", onnx_opset=17, parity={"random": (4, 1e-6)},
                        weights_bytes=1, onnx_bytes=1)
    card = str(build_card(spec, ckpt, results, facts))
    assert "Label-efficient transfer" in card and "| 71.23 |" in card and "80.50" in card
    assert "Label-efficient transfer" not in str(build_card(spec, ckpt, read_results(None), facts))


def test_pixel_baseline_runs_the_same_label_subsets_and_refuses_image_folders():
    from zoo.transfer import TransferError, pixel_linear_transfer

    train, test = _separable_split(40, 0, "train"), _separable_split(10, 1, "test")
    result = pixel_linear_transfer(train, test, fraction=0.25, seed=0)
    model = zoo.load("wmse-resnet18_narrow.fmnist", pretrained=False, device="cpu")
    assert {k: result[k] for k in ("key", "n_train", "n_test")} == \
        {k: linear_transfer(model, train, test, 0.25, seed=0)[k] for k in ("key", "n_train", "n_test")}
    assert result["top1"] >= 90.0  # grey levels are linearly separable from pixels
    folder = LabelledSplit("train", train.labels, None, paths=["a.png"] * len(train.labels))
    with pytest.raises(TransferError, match="--dataset fmnist"):
        pixel_linear_transfer(folder, test, 0.25)


def test_card_transfer_table_puts_the_baselines_beside_the_model():
    from export.card_sections import transfer_section
    from zoo.checkpoint import Results

    results = Results(transfer={"linear_1pct": 70.0, "linear_10pct": 80.0},
                      transfer_protocols={"linear_1pct": "p1", "linear_10pct": "p10"})
    section = transfer_section(results, [("raw pixels", {"linear_1pct": 65.5, "knn_k20": 86.0}),
                                         ("random init", {"knn_k20": 79.0})])  # no transfer keys: no column
    lines = section.splitlines()
    assert "| protocol | top-1 (%) | raw pixels | how it was measured |" in lines
    assert "| linear probe, 1% of the labels (class-balanced) | 70.00 | 65.50 | p1 |" in lines
    assert any(line.startswith("| linear probe, 10%") and "| not measured |" in line for line in lines)
