"""`zoo eval knn --protocol NAME`: other projects' k-NN evaluations, as rows of `zoo.knn.KNN_PROTOCOLS`."""

from __future__ import annotations

import json

import numpy as np
import torch

from zoo.eval import evaluate_features
from zoo.knn import KNN_PROTOCOLS, protocol_knn_accuracies, weighted_knn_accuracies


def test_protocol_rows_hold_each_projects_k_temperature_metric_and_weighting():
    rows = {name: (p.ks, p.metric, p.weighting, p.temperature) for name, p in KNN_PROTOCOLS.items()}
    assert rows == {"dino": ((20,), "cosine", "exp", 0.07),
                    "dinov2": ((10, 20, 100, 200), "cosine", "softmax", 0.07),
                    "lightly": ((200,), "cosine", "exp", 0.1),
                    "solo-learn": ((20,), "euclidean", "inverse_distance", None),
                    "wmse": ((5,), "euclidean", "majority", None)}


def test_solo_learn_inverse_distance_votes_outweigh_the_wmse_majority_of_farther_neighbours():
    # Query at 0: one class-1 point 0.1 away, four class-0 points about 1 away (k covers all five).
    bank = np.array([[0.1], [1.0], [1.1], [-1.2], [1.3]], np.float32)
    labels = [1, 0, 0, 0, 0]
    query, truth = np.zeros((1, 1), np.float32), [1]
    # 1/0.1 = 10 against 1/1 + 1/1.1 + 1/1.2 + 1/1.3 = 3.6: class 1; one vote each: class 0.
    assert protocol_knn_accuracies(bank, labels, query, truth, "solo-learn") == {"knn_solo_learn_k20": 100.0}
    assert protocol_knn_accuracies(bank, labels, query, truth, "wmse") == {"knn_wmse_k5": 0.0}
    # Distances, not squared ones (FAISS returns squares): 1/1 + 1/1 = 2 beats 1/0.6 = 1.67, but not 1/0.36 = 2.78.
    bank = np.array([[0.6], [1.0], [-1.0]], np.float32)
    assert protocol_knn_accuracies(bank, [0, 1, 1], query, truth, "solo-learn") == {"knn_solo_learn_k20": 100.0}


def test_lightly_k200_t01_lets_many_similar_neighbours_outvote_the_nearest_where_dino_k20_t007_does_not():
    # Query [1, 0]: one class-1 point at cosine 1, forty class-0 points at cosine 0.7.
    bank = np.array([[1.0, 0.0]] + [[0.7, float(np.sqrt(1 - 0.49))]] * 40, np.float32)
    labels = [1] + [0] * 40
    query, truth = np.array([[3.0, 0.0]], np.float32), [1]
    # dino: 1 against 19 exp(-0.3/0.07) = 0.26 -> class 1. lightly: 1 against 40 exp(-0.3/0.1) = 1.99 -> class 0.
    assert protocol_knn_accuracies(bank, labels, query, truth, "dino") == {"knn_dino_k20": 100.0}
    assert protocol_knn_accuracies(bank, labels, query, truth, "lightly") == {"knn_lightly_k200": 0.0}


def _reference(train, train_y, test, test_y, ks, temperature, weighting):
    """Brute force in torch, as the projects write it: full similarity matrix, top-k, weights, one-hot sums."""
    train = torch.nn.functional.normalize(torch.as_tensor(train), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(test), dim=1)
    sims, idx = (test @ train.T).topk(max(ks), dim=1)
    weights = torch.softmax(sims / temperature, 1) if weighting == "softmax" else (sims / temperature).exp()
    onehot = torch.nn.functional.one_hot(torch.as_tensor(train_y)[idx], 5).double() * weights.double()[..., None]
    return {k: 100.0 * (onehot[:, :k].sum(1).argmax(1) == torch.as_tensor(test_y)).double().mean().item()
            for k in ks}


def test_dinov2_and_dino_weights_match_a_brute_force_reference_and_dinov2_k20_equals_dino_k20():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(700) % 5
    x = torch.nn.functional.one_hot(y, 5).float() @ torch.randn(5, 16, generator=g) + 1.5 * torch.randn(
        700, 16, generator=g)
    train, train_y, test, test_y = x[:600], y[:600], x[600:], y[600:]
    dinov2 = protocol_knn_accuracies(train, train_y, test, test_y, "dinov2")
    ref = _reference(train, train_y, test, test_y, (10, 20, 100, 200), 0.07, "softmax")
    assert dinov2 == {f"knn_dinov2_k{k}": v for k, v in ref.items()}
    assert len(set(dinov2.values())) > 1  # the ks really differ on this data
    dino = protocol_knn_accuracies(train, train_y, test, test_y, "dino")
    assert dino == {"knn_dino_k20": _reference(train, train_y, test, test_y, (20,), 0.07, "exp")[20]}
    # softmax normalises each query's votes by one factor: the same prediction as exp(sim/T) at the same k, T;
    # and the dino row is what the default knn_k20 measures.
    assert dinov2["knn_dinov2_k20"] == dino["knn_dino_k20"] == weighted_knn_accuracies(train, train_y, test, test_y,
                                                                                        ks=(20,))[20]


def test_a_protocol_replaces_the_default_knn_keys_and_leaves_the_others():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(300) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + torch.randn(300, 3, generator=g)
    args = (x[:200], y[:200], x[200:], y[200:])
    assert set(evaluate_features(*args, protocols=("knn", "majority"))) == {"knn_k20", "knn_k200", "knn5_majority"}
    assert set(evaluate_features(*args, protocols=("knn", "majority"), knn_protocol="solo-learn")) == {
        "knn_solo_learn_k20"}
    assert set(evaluate_features(*args, protocols=("knn", "linear"), knn_protocol="wmse")) == {"knn_wmse_k5", "linear"}


def test_cli_eval_knn_protocol_prints_the_protocol_with_every_number_and_writes_keyed_results(tmp_path, capsys):
    from zoo_cli.main import main

    results = tmp_path / "results.json"
    argv = ["eval", "knn", "pixels", "--limit-train", "1000", "--limit-test", "200", "--no-progress",
            "--results", str(results)]
    assert main(argv) == 0
    assert main(argv + ["--protocol", "dinov2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  knn")]
    assert len(lines) == 2 + 1 + 4  # default knn_k20, knn_k200, knn5_majority; dinov2 k=10/20/100/200
    assert all(" protocol: " in line for line in lines)
    assert any(line.split()[0] == "knn5_majority" and "wmse protocol" in line for line in lines)
    assert any(line.split()[0] == "knn_dinov2_k200" and "dinov2 protocol" in line and "k=200" in line
               for line in lines)
    data = json.loads(results.read_text())
    assert {"knn_k20", "knn_k200", "knn5_majority", "knn_dinov2_k10", "knn_dinov2_k200"} <= set(data)
    assert data["knn_dinov2_k20"] == data["knn_k20"]  # same neighbours, same votes up to one factor per query


def test_protocol_knn_numbers_reach_the_model_card_each_naming_its_protocol(tmp_path, caplog):
    from export.card_sections import protocol_knn_section
    from zoo.checkpoint import read_results

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"knn_k20": 80.0, "knn_dinov2_k10": 81.234, "knn_lightly_k200": 79.5,
                                "knn_wmse_k5": 78.0, "knn_nonsense_k3": 1.0}))
    with caplog.at_level("WARNING", logger="export"):
        results = read_results(path)
    assert results.protocol_knn == {"knn_dinov2_k10": 81.234, "knn_lightly_k200": 79.5, "knn_wmse_k5": 78.0}
    assert "knn_nonsense_k3" in caplog.text and "knn_dinov2_k10" not in caplog.text
    rows = [r for r in protocol_knn_section(results).splitlines() if r.startswith("| `knn")]
    assert [r.split("`")[1] for r in rows] == ["knn_dinov2_k10", "knn_lightly_k200", "knn_wmse_k5"]  # table order
    assert "dinov2 protocol" in rows[0] and "k=10" in rows[0] and "| 81.23 |" in rows[0]
    assert "facebookresearch/dinov2" in rows[0] and "htdt/self-supervised" in rows[2]
    assert protocol_knn_section(read_results(None)) == ""
