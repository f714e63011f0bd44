"""Evaluation protocols on frozen features: the k-NN numbers (`zoo.knn`, FAISS exact search) and a linear probe.

The protocol of ssl-zoo's cards and CLI is `evaluate_features` (accuracies in percent):

- `knn_k20`, `knn_k200`: weighted k-NN (Wu et al. 2018, as in the SSL papers): cosine similarity
  (features L2-normalised), the k most similar training samples vote with weight exp(sim / T),
  T = 0.07; the class with the largest summed weight wins (ties: smallest label). `zoo.knn.WEIGHTED_KNN`.
- `knn5_majority`: plain k-NN, k = 5, Euclidean distance on the raw (unnormalised) features, one
  vote per neighbour, ties to the smallest label: W-MSE's `eval_knn` (torch.cdist + unique/argmax).
  `zoo.knn.MAJORITY_KNN`.
- `linear`: a linear probe on frozen precomputed features. Features are standardised with the
  training set's per-dimension mean/std (dimensions constant on the training set get std 1);
  `nn.Linear` from zero init, full-batch L-BFGS (strong Wolfe line search, history 20) for a fixed
  100 iterations on mean cross-entropy + 5e-4/2 * ||W||^2 (bias not decayed), fp32. Deterministic
  and hyperparameter-free per model: no validation split is used to tune anything.

`evaluate_model(model)` runs it on Fashion-MNIST (train 60k as bank/training set, test 10k as
queries/test set) with `model.preprocess`; `evaluate_pixels()` runs the raw-pixel baseline
(784-d pixels in [0, 1], standardised per pixel with training statistics) through the same code.

`zoo.knn.KNN_PROTOCOLS` holds other projects' k-NN evaluations as rows of data (dino,
dinov2, lightly, solo-learn, wmse); `knn_protocol=NAME` / `zoo eval knn --protocol NAME` reports
`knn_<name>_k<k>` under one of them instead of the default k-NN numbers.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from zoo.embed import embed
from zoo.knn import MAJORITY_KNN, WEIGHTED_KNN, get_knn_protocol, protocol_knn_accuracies
from zoo.registry import get_dataset

LINEAR_ITERATIONS = 100
LINEAR_WEIGHT_DECAY = 5e-4


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Per-dimension z-scores with the training set's statistics (constant dimensions: std 1)."""
    train = torch.as_tensor(train).float()
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(torch.as_tensor(x).float() - mean) / std for x in (train, *others)]


def linear_probe_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                          iterations: int = LINEAR_ITERATIONS, weight_decay: float = LINEAR_WEIGHT_DECAY) -> float:
    """Top-1 (percent) of a linear classifier trained on frozen features (protocol in the module docstring)."""
    x_train, x_test = standardize(torch.as_tensor(train_features), torch.as_tensor(test_features))
    y_train = torch.as_tensor(train_labels).cpu().long()
    y_test = torch.as_tensor(test_labels).cpu().long()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    layer = torch.nn.Linear(x_train.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=int(iterations), max_eval=int(iterations) * 2,
                            history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x_train), y_train) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = layer(x_test).argmax(1)
    return 100.0 * (pred == y_test).double().mean().item()


PROTOCOLS = ("knn", "majority", "linear")


def evaluate_features(train_f: Any, train_y: Any, test_f: Any, test_y: Any, progress: bool = False,
                      protocols: Sequence[str] = PROTOCOLS, knn_protocol: str | None = None) -> dict[str, float]:
    """ssl-zoo's evaluation protocol on precomputed features (see the module docstring).

    Returns `{"knn_k20", "knn_k200", "knn5_majority", "linear"}`, top-1 accuracies in percent.
    Pass the raw features (not normalised): the weighted k-NN normalises them itself, the majority
    k-NN uses raw Euclidean distances, the linear probe standardises them. `protocols` picks a
    subset (`"knn"` -> knn_k20 + knn_k200, `"majority"`, `"linear"`). `knn_protocol` (a row of
    `KNN_PROTOCOLS`) replaces the k-NN numbers ("knn" / "majority") by that protocol's `knn_<name>_k<k>`.
    """
    def note(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; pick from {PROTOCOLS}")
    train_f, test_f = torch.as_tensor(train_f).float(), torch.as_tensor(test_f).float()
    out: dict[str, float] = {}
    if knn_protocol is not None and {"knn", "majority"} & set(protocols):
        note(f"k-NN, {knn_protocol} protocol ({get_knn_protocol(knn_protocol).source})")
        out.update(protocol_knn_accuracies(train_f, train_y, test_f, test_y, knn_protocol))
        protocols = [p for p in protocols if p not in ("knn", "majority")]
    if "knn" in protocols:
        note(f"weighted k-NN (k=20, 200) on {tuple(train_f.shape)} -> {tuple(test_f.shape)}")
        out.update(protocol_knn_accuracies(train_f, train_y, test_f, test_y, WEIGHTED_KNN))
    if "majority" in protocols:
        note("majority k-NN (k=5, Euclidean)")
        out.update(protocol_knn_accuracies(train_f, train_y, test_f, test_y, MAJORITY_KNN))
    if "linear" in protocols:
        note(f"linear probe (L-BFGS, {LINEAR_ITERATIONS} iterations)")
        out["linear"] = linear_probe_accuracy(train_f, train_y, test_f, test_y)
    return out


def _fmnist(limit_train: int | None, limit_test: int | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from zoo.datasets import fashion_mnist_split

    train, test = fashion_mnist_split("train", limit_train), fashion_mnist_split("test", limit_test)
    return train.images, train.labels, test.images, test.labels


def evaluate_model(model: torch.nn.Module, dataset: str = "fmnist", backend: str = "torch", precision: str = "fp32",
                   batch_size: int | None = None, progress: bool = True, limit_train: int | None = None,
                   limit_test: int | None = None, protocols: Sequence[str] = PROTOCOLS,
                   knn_protocol: str | None = None) -> dict[str, float]:
    """`evaluate_features` on a model's Fashion-MNIST features: train 60k, test 10k, `model.preprocess`.

    `limit_train` / `limit_test` take the first N images of each split (for quick checks).
    """
    if get_dataset(dataset).tag != "fmnist":
        raise ValueError(f"dataset must be 'fmnist' (the dataset on every machine), got {dataset!r}")
    train_x, train_y, test_x, test_y = _fmnist(limit_train, limit_test)
    kw = dict(batch_size=batch_size, backend=backend, precision=precision, normalize=False, progress=progress)
    train = embed(model, train_x, **kw)
    test = embed(model, test_x, **kw)
    return evaluate_features(train.features, train_y[train.ids], test.features, test_y[test.ids], progress=progress,
                             protocols=protocols, knn_protocol=knn_protocol)


def pixel_features(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw-pixel baseline features: flattened pixels in [0, 1], standardised per pixel (train statistics)."""
    train = train_x.reshape(len(train_x), -1).float() / 255.0
    test = test_x.reshape(len(test_x), -1).float() / 255.0
    train, test = standardize(train, test)
    return train, test


def evaluate_pixels(limit_train: int | None = None, limit_test: int | None = None,
                    progress: bool = False, protocols: Sequence[str] = PROTOCOLS,
                    knn_protocol: str | None = None) -> dict[str, float]:
    """The raw-pixel baseline (standardised 784-d Fashion-MNIST pixels) through `evaluate_features`."""
    train_x, train_y, test_x, test_y = _fmnist(limit_train, limit_test)
    train, test = pixel_features(train_x, test_x)
    return evaluate_features(train, train_y, test, test_y, progress=progress, protocols=protocols,
                             knn_protocol=knn_protocol)
