"""Evaluation protocols on frozen features, all with FAISS exact neighbour search.

The protocol of ssl-zoo's cards and CLI is `evaluate_features` (accuracies in percent):

- `knn_k20`, `knn_k200`: weighted k-NN (Wu et al. 2018, as in the SSL papers): cosine similarity
  (features L2-normalised), the k most similar training samples vote with weight exp(sim / T),
  T = 0.07; the class with the largest summed weight wins (ties: smallest label).
- `knn5_majority`: plain k-NN, k = 5, Euclidean distance on the raw (unnormalised) features, one
  vote per neighbour, ties to the smallest label: W-MSE's `eval_knn` (torch.cdist + unique/argmax).
- `linear`: a linear probe on frozen precomputed features. Features are standardised with the
  training set's per-dimension mean/std (dimensions constant on the training set get std 1);
  `nn.Linear` from zero init, full-batch L-BFGS (strong Wolfe line search, history 20) for a fixed
  100 iterations on mean cross-entropy + 5e-4/2 * ||W||^2 (bias not decayed), fp32. Deterministic
  and hyperparameter-free per model: no validation split is used to tune anything.

`evaluate_model(model)` runs it on Fashion-MNIST (train 60k as bank/training set, test 10k as
queries/test set) with `model.preprocess`; `evaluate_pixels()` runs the raw-pixel baseline
(784-d pixels in [0, 1], standardised per pixel with training statistics) through the same code.

`KNN_PROTOCOLS` (end of this module) holds other projects' k-NN evaluations as rows of data (dino,
dinov2, lightly, solo-learn, wmse); `knn_protocol=NAME` / `zoo eval knn --protocol NAME` reports
`knn_<name>_k<k>` under one of them instead of the default k-NN numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LINEAR_ITERATIONS = 100
LINEAR_WEIGHT_DECAY = 5e-4


def _as_numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def knn_search(bank: Any, queries: Any, k: int, metric: str = "cosine", chunk: int = 4096
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours: (scores `[Q, k]`, bank row indices `[Q, k]`), best first.

    `metric="cosine"`: scores are cosine similarities (inputs L2-normalised here). `"l2"`: scores are
    squared Euclidean distances. FAISS flat index when faiss is installed, else chunked torch.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    b, q = _as_numpy(bank), _as_numpy(queries)
    if b.ndim != 2 or q.ndim != 2 or b.shape[1] != q.shape[1]:
        raise ValueError(f"bank {b.shape} and queries {q.shape} must be 2-D with the same feature dimension")
    k = int(min(k, b.shape[0]))
    if metric == "cosine":
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    try:
        import faiss
    except ImportError:
        return _torch_search(b, q, k, metric, chunk)
    index = faiss.IndexFlatIP(b.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(b.shape[1])
    index.add(b)
    scores, idx = [], []
    for s in range(0, len(q), chunk):
        d, i = index.search(q[s: s + chunk], k)
        scores.append(d)
        idx.append(i)
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(idx)


def _torch_search(b: np.ndarray, q: np.ndarray, k: int, metric: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    bank, scores, idx = torch.from_numpy(b), [], []
    sq = (bank * bank).sum(1)
    for part in torch.from_numpy(q).split(chunk):
        sims = part @ bank.T
        if metric == "cosine":
            s, i = sims.topk(k, dim=1)
        else:
            d = (part * part).sum(1, keepdim=True) - 2 * sims + sq
            s, i = d.topk(k, dim=1, largest=False)
        scores.append(s)
        idx.append(i)
    return torch.cat(scores).numpy(), torch.cat(idx).numpy()


def _votes_to_labels(neighbour_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    votes = torch.zeros(neighbour_labels.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, neighbour_labels, weights.double())
    return votes.argmax(1)  # first maximum: ties go to the smallest label


def weighted_knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                         chunk: int = 1024) -> torch.Tensor:
    """Labels predicted by cosine k-NN with votes weighted by exp(sim / T) (the SSL papers' protocol).

    T <= 0 means a plain majority vote (ties to the smallest label).
    """
    labels = torch.as_tensor(train_labels).cpu().long()
    num_classes = num_classes or int(labels.max()) + 1
    sims, idx = knn_search(train_features, test_features, k, "cosine", chunk=max(chunk, 1))
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    # exp((s - 1) / T) has the same argmax as exp(s / T) and cannot overflow in float64 or float32.
    weights = ((sims - 1.0) / temperature).exp() if temperature > 0 else torch.ones_like(sims)
    return _votes_to_labels(labels[idx], weights, num_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent of `weighted_knn_predict` (the trainer's k-NN monitor)."""
    pred = weighted_knn_predict(train_features, train_labels, test_features, k, temperature)
    return 100.0 * (pred.cpu() == torch.as_tensor(test_labels).cpu()).double().mean().item()


def weighted_knn_accuracies(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                            ks: tuple[int, ...] = (20, 200), temperature: float = 0.07) -> dict[int, float]:
    """Weighted k-NN top-1 (percent) for several k from one search (FAISS results are sorted)."""
    labels = torch.as_tensor(train_labels).cpu().long()
    test_labels = torch.as_tensor(test_labels).cpu().long()
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    sims, idx = knn_search(train_features, test_features, max(ks), "cosine")
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    weights = ((sims - 1.0) / temperature).exp()
    out = {}
    for k in ks:
        pred = _votes_to_labels(labels[idx[:, :k]], weights[:, :k], num_classes)
        out[k] = 100.0 * (pred == test_labels).double().mean().item()
    return out


def majority_knn_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                          k: int = 5) -> float:
    """Plain k-NN top-1 (percent): Euclidean on raw features, one vote each, ties to the smallest label."""
    labels = torch.as_tensor(train_labels).cpu().long()
    test_labels = torch.as_tensor(test_labels).cpu().long()
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    _, idx = knn_search(train_features, test_features, k, "l2")
    idx = torch.from_numpy(idx)
    pred = _votes_to_labels(labels[idx], torch.ones(idx.shape, dtype=torch.float64), num_classes)
    return 100.0 * (pred == test_labels).double().mean().item()


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
        weighted = weighted_knn_accuracies(train_f, train_y, test_f, test_y, ks=(20, 200))
        out.update(knn_k20=weighted[20], knn_k200=weighted[200])
    if "majority" in protocols:
        note("majority k-NN (k=5, Euclidean)")
        out["knn5_majority"] = majority_knn_accuracy(train_f, train_y, test_f, test_y, k=5)
    if "linear" in protocols:
        note(f"linear probe (L-BFGS, {LINEAR_ITERATIONS} iterations)")
        out["linear"] = linear_probe_accuracy(train_f, train_y, test_f, test_y)
    return out


def _fmnist(limit_train: int | None, limit_test: int | None):
    from zoo.datasets import load_fashion_mnist

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    return train_x[:limit_train], train_y[:limit_train], test_x[:limit_test], test_y[:limit_test]


def evaluate_model(model: torch.nn.Module, dataset: str = "fmnist", backend: str = "torch", precision: str = "fp32",
                   batch_size: int | None = None, progress: bool = True, limit_train: int | None = None,
                   limit_test: int | None = None, protocols: Sequence[str] = PROTOCOLS,
                   knn_protocol: str | None = None) -> dict[str, float]:
    """`evaluate_features` on a model's Fashion-MNIST features: train 60k, test 10k, `model.preprocess`.

    `limit_train` / `limit_test` take the first N images of each split (for quick checks).
    """
    from zoo.embed import embed

    if dataset not in ("fmnist", "fashion_mnist", "fashion-mnist"):
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


# ------------------------------------------------------------------------------------------ k-NN protocols
# `zoo eval knn MODEL --protocol NAME`: the k-NN of another project's evaluation code, one row each.
# Neighbours come from `knn_search` (FAISS); a row says how they are found and how they vote.
# Results are keyed `knn_<name>_k<k>` (`-` in a name becomes `_`), so every number names its protocol;
# the default keys above (knn_k20, knn_k200, knn5_majority) are untouched. Ties: the smallest label.
@dataclass(frozen=True)
class KnnProtocol:
    name: str
    ks: tuple[int, ...]
    metric: str  # "cosine": L2-normalised features, inner product; "euclidean": raw features, L2 distance
    weighting: str  # a key of KNN_WEIGHTS
    temperature: float | None
    source: str  # the evaluation code it reproduces (repository, file, commit read)

    def key(self, k: int) -> str:
        return f"knn_{self.name.replace('-', '_')}_k{k}"

    def describe(self, k: int | None = None) -> str:
        """One line naming the protocol; `k` None lists all of its ks."""
        ks = "/".join(map(str, self.ks)) if k is None else k
        t = f", T={self.temperature:g}" if self.temperature is not None else ""
        return f"{self.name} protocol: k-NN, {self.metric}, {KNN_WEIGHTS[self.weighting][0]}, k={ks}{t}"


# weighting -> (what it is, votes of the neighbours [Q, K] from their scores (similarity or distance)).
KNN_WEIGHTS: dict[str, tuple[str, Callable[[torch.Tensor, KnnProtocol], torch.Tensor]]] = {
    # exp(sim / T); shifted by -1/T, which scales every vote of a query alike (same argmax, no overflow).
    "exp": ("votes exp(sim/T)", lambda s, p: ((s - 1.0) / p.temperature).exp()),
    # softmax(sim / T) over all max(ks) neighbours, then the first k summed (DINOv2's KnnModule).
    "softmax": ("votes softmax(sim/T) over the neighbours", lambda s, p: torch.softmax(s / p.temperature, dim=1)),
    # 1 / (distance + 1e-5), distance Euclidean (solo-learn's WeightedKNNClassifier, distance_fx="euclidean").
    "inverse_distance": ("votes 1/(distance+1e-5)", lambda d, p: 1.0 / (d + 1e-5)),
    "majority": ("one vote each (majority)", lambda s, p: torch.ones_like(s)),
}
# metric -> (knn_search metric, its scores -> the protocol's scores): FAISS L2 gives squared distances.
_KNN_METRICS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "cosine": ("cosine", lambda s: s),
    "euclidean": ("l2", lambda d2: d2.clamp_min(0).sqrt()),
}

KNN_PROTOCOLS: dict[str, KnnProtocol] = {p.name: p for p in [
    KnnProtocol("dino", (20,), "cosine", "exp", 0.07,
                "facebookresearch/dino@7c446df eval_knn.py knn_classifier: L2-normalised, exp(sim/T), "
                "T=0.07, k=20 (the k its paper reports; nb_knn also runs 10/100/200): what knn_k20 measures"),
    KnnProtocol("dinov2", (10, 20, 100, 200), "cosine", "softmax", 0.07,
                "facebookresearch/dinov2@b8931f7 dinov2/eval/knn.py KnnModule: nb_knn 10/20/100/200, "
                "temperature 0.07, softmax over the max-k neighbours"),
    KnnProtocol("lightly", (200,), "cosine", "exp", 0.1,
                "lightly-ai/lightly@e8d317f lightly/utils/benchmarking/knn.py knn_predict defaults "
                "(knn_k=200, knn_t=0.1)"),
    KnnProtocol("solo-learn", (20,), "euclidean", "inverse_distance", None,
                "vturrisi/solo-learn@9187ea3 solo/utils/knn.py WeightedKNNClassifier(k=20, "
                "distance_fx='euclidean'): raw features, weights 1/(d + 1e-5); its T=0.07 applies to cosine only"),
    KnnProtocol("wmse", (5,), "euclidean", "majority", None,
                "htdt/self-supervised@d9662c8 eval/knn.py eval_knn: torch.cdist, 5 nearest, majority "
                "(unique + argmax: ties to the smallest label); what knn5_majority above measures"),
]}


def get_knn_protocol(name: str) -> KnnProtocol:
    if name not in KNN_PROTOCOLS:
        raise ValueError(f"unknown k-NN protocol {name!r}; pick from {', '.join(KNN_PROTOCOLS)}")
    return KNN_PROTOCOLS[name]


def protocol_knn_accuracies(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                            protocol: str | KnnProtocol) -> dict[str, float]:
    """Top-1 (percent) under a row of `KNN_PROTOCOLS`, for each of its k: `{"knn_<name>_k<k>": acc}`."""
    p = get_knn_protocol(protocol) if isinstance(protocol, str) else protocol
    labels = torch.as_tensor(train_labels).cpu().long()
    test_labels = torch.as_tensor(test_labels).cpu().long()
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    search_metric, to_scores = _KNN_METRICS[p.metric]
    scores, idx = knn_search(train_features, test_features, max(p.ks), search_metric)
    scores, idx = to_scores(torch.from_numpy(scores).double()), torch.from_numpy(idx)
    weights = KNN_WEIGHTS[p.weighting][1](scores, p)
    out = {}
    for k in p.ks:
        pred = _votes_to_labels(labels[idx[:, :k]], weights[:, :k], num_classes)
        out[p.key(k)] = 100.0 * (pred == test_labels).double().mean().item()
    return out


def knn_protocol_labels() -> dict[str, str]:
    """Result key -> printed description, for every protocol row and k."""
    return {p.key(k): p.describe(k) for p in KNN_PROTOCOLS.values() for k in p.ks}
