"""Evaluation protocols on hand-checkable data, precision checks (bf16, int8), onnxruntime backend, bench smoke."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import zoo
from zoo.eval import evaluate_features, evaluate_model, evaluate_pixels, linear_probe_accuracy
from zoo.knn import knn_accuracy, majority_knn_accuracy, weighted_knn_accuracies, weighted_knn_predict

NAME = "wmse-resnet18_narrow.fmnist"


def test_weighted_knn_votes_with_exp_sim_over_t_where_a_majority_would_disagree():
    # Query [1, 0]: one class-1 neighbour at cosine 1.0 vs two class-0 neighbours at cosine 0.5.
    c = math.cos(math.pi / 3)
    train = torch.tensor([[1.0, 0.0], [c, math.sin(math.pi / 3)], [c, -math.sin(math.pi / 3)]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[2.0, 0.0]])  # not normalised: cosine normalises it
    # exp(1/0.07) = 1.6e6 against 2 exp(0.5/0.07) = 2.5e3: class 1.
    assert weighted_knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [1]
    # T = 1: exp(1) = 2.72 < 2 exp(0.5) = 3.30: class 0. T <= 0: plain majority, class 0.
    assert weighted_knn_predict(train, labels, query, k=3, temperature=1.0).tolist() == [0]
    assert weighted_knn_predict(train, labels, query, k=3, temperature=0).tolist() == [0]
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 100.0
    # k=200 on a 3-vector bank uses the 3; k=1 takes the single nearest.
    acc = weighted_knn_accuracies(train, labels, query, torch.tensor([1]), ks=(1, 200))
    assert acc == {1: 100.0, 200: 100.0}


def test_majority_knn_is_euclidean_on_raw_features_and_breaks_ties_to_the_smallest_label():
    # Cosine would pick [100, 0] (same direction); Euclidean picks [0.9, 0.5] (0.5 away).
    train = np.array([[100.0, 0.0], [0.9, 0.5]], np.float32)
    assert majority_knn_accuracy(train, [0, 1], np.array([[1.0, 0.0]], np.float32), [1], k=1) == 100.0
    # Five neighbours voting 2, 2, 1, 1, 0: a tie between 1 and 2 goes to 1.
    train = np.array([[0.0], [0.1], [-0.1], [0.2], [-0.2]], np.float32)
    assert majority_knn_accuracy(train, [0, 2, 2, 1, 1], np.array([[0.0]], np.float32), [1], k=5) == 100.0


def test_linear_probe_separates_separable_classes_and_ignores_constant_dimensions():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    y = torch.arange(300) % 3
    x = centres[y] + 0.3 * torch.randn(300, 2, generator=g)
    x = torch.cat([x, torch.full((300, 1), 7.0)], 1)  # constant on train: std 1, not a division by 0
    test_x = x.clone()
    test_x[:, 2] = 8.0
    assert linear_probe_accuracy(x, y, test_x, y) == 100.0


def test_evaluate_features_returns_the_four_protocol_numbers_in_percent():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    x = torch.nn.functional.one_hot(y, 4).float() * 5 + torch.randn(400, 4, generator=g)
    res = evaluate_features(x[:300], y[:300], x[300:], y[300:])
    assert set(res) == {"knn_k20", "knn_k200", "knn5_majority", "linear"}
    assert all(95.0 <= v <= 100.0 for v in res.values()), res


def test_pixel_baseline_and_model_evaluation_run_through_the_same_protocol():
    pixels = evaluate_pixels(limit_train=2000, limit_test=300, protocols=("knn", "majority"))
    assert set(pixels) == {"knn_k20", "knn_k200", "knn5_majority"}
    assert 70 < pixels["knn_k20"] < 95 and 70 < pixels["knn5_majority"] < 95
    torch.manual_seed(0)
    model = zoo.load(NAME, pretrained=False, device="cpu")
    res = evaluate_model(model, limit_train=500, limit_test=100, progress=False, protocols=("knn", "linear"))
    assert set(res) == {"knn_k20", "knn_k200", "linear"} and all(10 < v <= 100 for v in res.values())


# ------------------------------------------------------------------------------------------ precisions
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("ssl-zoo-cache")
    mp.setenv("SSL_ZOO_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.load(NAME, pretrained=False, device="cpu")


def test_onnxruntime_backend_exports_once_into_the_cache_and_matches_torch(cache, model):
    from zoo.datasets import load_fashion_mnist

    x = load_fashion_mnist("test")[0][:64]
    ref = zoo.embed(model, x, progress=False)
    ort = zoo.embed(model, x, backend="onnxruntime", progress=False)
    assert torch.allclose(ref.features, ort.features, atol=1e-4)
    files = list(cache.glob(f"{NAME}/*/model.onnx"))
    assert len(files) == 1
    info = json.loads((files[0].parent / "onnx.json").read_text())
    assert info["parity_max_abs_diff"] <= info["atol"]


def test_low_precisions_are_checked_against_fp32_stored_beside_the_onnx_file_and_refused_with_numbers(
        cache, model, monkeypatch, capsys):
    from zoo import precision as checks

    for precision in ("bf16", "int8"):
        entry = checks.check_precision(model, precision, sizes=(1000, 200))
        assert {"knn_k20", "knn_k20_fp32", "recall_at_10", "accepted"} <= set(entry)
        assert entry["n_queries"] == 200 and 0 <= entry["recall_at_10"] <= 1
    report_path = next(cache.glob(f"{NAME}/*/precision.json"))
    report = json.loads(report_path.read_text())
    assert set(report) >= {"bf16", "int8"} and (report_path.parent / "model.int8.onnx").exists()

    # A failed check refuses the precision in one line that carries its numbers.
    monkeypatch.setitem(report, "int8", {**report["int8"], "accepted": False})
    report_path.write_text(json.dumps(report))
    with pytest.raises(checks.PrecisionRejectedError) as err:
        zoo.embed(model, torch.zeros(2, 28, 28, dtype=torch.uint8), precision="int8", progress=False)
    msg = str(err.value)
    assert "int8 is refused" in msg and "recall@10" in msg and "k-NN top-1" in msg and "\n" not in msg

    # An accepted one runs (on onnxruntime, whatever backend was asked) and prints its numbers once.
    report["int8"]["accepted"] = True
    report_path.write_text(json.dumps(report))
    x = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = zoo.embed(model, x, precision="int8", progress=False)
    assert "int8 accepted" in capsys.readouterr().err
    ref = zoo.embed(model, x, progress=False)
    cos = torch.nn.functional.cosine_similarity(out.features, ref.features)
    assert out.features.shape == (8, 256) and bool((cos > 0.99).all())


def test_int8_file_and_checks_of_an_older_recipe_are_made_again(cache, model):
    from zoo import artifacts, precision

    precision.check_precision(model, "int8", sizes=(1000, 200))
    d = artifacts.model_cache_dir(model)
    info = json.loads((d / "onnx.json").read_text())
    assert info["int8"]["recipe"] == artifacts.INT8_RECIPE
    # Pretend both were made under an older recipe / rule: stale files are replaced, not reused.
    info["int8"]["recipe"] = "an older recipe"
    (d / "onnx.json").write_text(json.dumps(info))
    (d / "model.int8.onnx").write_bytes(b"stale")
    report = json.loads((d / "precision.json").read_text())
    report["int8"].pop("check_version")
    report["int8"]["knn_k20"] = -1.0
    (d / "precision.json").write_text(json.dumps(report))

    entry = precision.check_precision(model, "int8", sizes=(1000, 200))
    assert entry["check_version"] == precision.CHECK_VERSION and entry["knn_k20"] >= 0
    assert entry["int8_recipe"] == artifacts.INT8_RECIPE
    assert (d / "model.int8.onnx").read_bytes() != b"stale"
    assert json.loads((d / "onnx.json").read_text())["int8"]["recipe"] == artifacts.INT8_RECIPE


def test_bench_embed_smoke_measures_every_variant_side_by_side(cache, capsys):
    from zoo_cli.bench.embed import bench_embed

    res = bench_embed(models=[NAME], batch_size=4, batches=1, check=False, matmul_size=256, pipeline_images=16,
                      pipeline_batch=8)
    out = capsys.readouterr().out
    for fragment in ("eager fp32", "channels_last", "onnxruntime fp32", "ours: backend=torch fp32",
                     "bf16", "int8", "machine limit", "ratios vs onnxruntime fp32", "goal"):
        assert fragment in out, fragment
    assert len(res[0]["rows"]) == 7 and all(v > 0 for _, v, _ in res[0]["rows"])
    # The whole zoo.embed call beside the bare forward, for each kind of input, with its ratio and goal.
    for kind in ("uint8 tensor", "list of PIL images", "folder of JPEGs"):
        assert f"zoo.embed, {kind}" in out and res[0]["pipeline"][f"zoo.embed {kind}"] > 0
    assert "x the best bare forward (goal >= 0.8" in out and "<- best" in out
