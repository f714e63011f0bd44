"""k-NN classification on frozen features: neighbour search, and one voting path for every k-NN number.

`knn_search` finds exact neighbours (FAISS flat index, else chunked torch). A `KnnProtocol` row says
how they are found (cosine on L2-normalised features, or Euclidean on raw ones), how they vote
(`KNN_WEIGHTS`) and under which key each k is reported; `knn_accuracies` runs any row. Every k-NN
number of ssl-zoo goes through it:

- the default keys of `zoo.eval.evaluate_features` (the cards' numbers): `WEIGHTED_KNN`
  (`knn_k20`, `knn_k200`: weighted k-NN of Wu et al. 2018, as in the SSL papers: cosine, the k most
  similar training samples vote with weight exp(sim / T), T = 0.07) and `MAJORITY_KNN` (`knn5_majority`:
  k = 5, Euclidean on raw features, one vote each: W-MSE's `eval_knn`);
- `weighted_knn_predict` / `knn_accuracy`: `WEIGHTED_KNN` at one k and T (the trainer's k-NN monitor,
  the low-precision checks of `zoo.precision`, the demo);
- `KNN_PROTOCOLS`: other projects' k-NN evaluations as rows of data (dino, dinov2, lightly,
  solo-learn, wmse), reported as `knn_<name>_k<k>` (`zoo eval knn --protocol NAME`).

Ties go to the smallest label everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


# ------------------------------------------------------------------------------------------ search
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


# ------------------------------------------------------------------------------------------ protocol rows
# A row says how neighbours are found and how they vote; results are keyed `knn_<name>_k<k>` unless the
# row names its keys (the defaults keep knn_k20, knn_k200, knn5_majority).
@dataclass(frozen=True)
class KnnProtocol:
    name: str
    ks: tuple[int, ...]
    metric: str  # "cosine": L2-normalised features, inner product; "euclidean": raw features, L2 distance
    weighting: str  # a key of KNN_WEIGHTS
    temperature: float | None
    source: str  # the evaluation code it reproduces (repository, file, commit read)
    key_format: str = "knn_{name}_k{k}"  # result key; `-` in the name becomes `_`
    # dtype the scores and votes' weights are computed in (votes are summed in float64 either way). The
    # rows of other projects use float64; ssl-zoo's own rows float32, as their published numbers were
    # computed (float64 weights could tip a near-tie and change a card's number in its last digit).
    score_dtype: torch.dtype = torch.float64

    def key(self, k: int) -> str:
        return self.key_format.format(name=self.name.replace("-", "_"), k=k)

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

# ssl-zoo's own protocol (`zoo.eval.evaluate_features`, the cards): the same votes as the dino and wmse rows.
WEIGHTED_KNN = KnnProtocol("weighted", (20, 200), "cosine", "exp", 0.07,
                           "ssl-zoo: weighted k-NN (Wu et al. 2018), as the dino row", key_format="knn_k{k}",
                           score_dtype=torch.float32)
MAJORITY_KNN = KnnProtocol("majority", (5,), "euclidean", "majority", None,
                           "ssl-zoo: majority k-NN on raw features, as the wmse row", key_format="knn{k}_majority",
                           score_dtype=torch.float32)

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
    """The row of `KNN_PROTOCOLS` called `name` (a ValueError lists the names otherwise)."""
    if name not in KNN_PROTOCOLS:
        raise ValueError(f"unknown k-NN protocol {name!r}; pick from {', '.join(KNN_PROTOCOLS)}")
    return KNN_PROTOCOLS[name]


def knn_protocol_labels() -> dict[str, str]:
    """Result key -> printed description, for every protocol row and k."""
    return {p.key(k): p.describe(k) for p in KNN_PROTOCOLS.values() for k in p.ks}


# ------------------------------------------------------------------------------------------ voting
def _votes_to_labels(neighbour_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    votes = torch.zeros(neighbour_labels.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, neighbour_labels, weights.double())
    return votes.argmax(1)  # first maximum: ties go to the smallest label


def knn_predictions(train_features: Any, train_labels: Any, test_features: Any, protocol: str | KnnProtocol,
                    num_classes: int | None = None, chunk: int = 4096) -> dict[int, torch.Tensor]:
    """Predicted labels of the test features for each k of a protocol row, from one search.

    The search takes max(ks) neighbours (best first), so a smaller k votes with the nearest of them.
    """
    p = get_knn_protocol(protocol) if isinstance(protocol, str) else protocol
    labels = torch.as_tensor(train_labels).cpu().long()
    num_classes = num_classes or int(labels.max()) + 1
    search_metric, to_scores = _KNN_METRICS[p.metric]
    scores, idx = knn_search(train_features, test_features, max(p.ks), search_metric, chunk=chunk)
    scores, idx = to_scores(torch.from_numpy(scores).to(p.score_dtype)), torch.from_numpy(idx)
    weights = KNN_WEIGHTS[p.weighting][1](scores, p)
    return {k: _votes_to_labels(labels[idx[:, :k]], weights[:, :k], num_classes) for k in p.ks}


def knn_accuracies(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                   protocol: str | KnnProtocol) -> dict[int, float]:
    """Top-1 (percent) for each k of a protocol row."""
    train_labels = torch.as_tensor(train_labels).cpu().long()
    test_labels = torch.as_tensor(test_labels).cpu().long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predictions(train_features, train_labels, test_features, protocol, num_classes)
    return {k: _accuracy(pred, test_labels) for k, pred in preds.items()}


def protocol_knn_accuracies(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                            protocol: str | KnnProtocol) -> dict[str, float]:
    """Top-1 (percent) under a protocol row, for each of its k, by key: `{"knn_<name>_k<k>": acc}`."""
    p = get_knn_protocol(protocol) if isinstance(protocol, str) else protocol
    return {p.key(k): acc for k, acc in knn_accuracies(train_features, train_labels, test_features, test_labels,
                                                        p).items()}


def _accuracy(pred: torch.Tensor, test_labels: Any) -> float:
    return 100.0 * (pred.cpu() == torch.as_tensor(test_labels).cpu()).double().mean().item()


def _weighted(ks: tuple[int, ...], temperature: float) -> KnnProtocol:
    """`WEIGHTED_KNN` at other ks and T; T <= 0 means a plain majority vote (on cosine neighbours)."""
    if temperature > 0:
        return dataclasses.replace(WEIGHTED_KNN, ks=tuple(ks), temperature=temperature)
    return dataclasses.replace(WEIGHTED_KNN, ks=tuple(ks), weighting="majority", temperature=None)


def weighted_knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                         chunk: int = 1024) -> torch.Tensor:
    """Labels predicted by cosine k-NN with votes weighted by exp(sim / T) (the SSL papers' protocol).

    T <= 0 means a plain majority vote (ties to the smallest label).
    """
    return knn_predictions(train_features, train_labels, test_features, _weighted((k,), temperature),
                           num_classes, chunk=max(chunk, 1))[k]


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent of `weighted_knn_predict` (the trainer's k-NN monitor)."""
    return _accuracy(weighted_knn_predict(train_features, train_labels, test_features, k, temperature), test_labels)


def weighted_knn_accuracies(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                            ks: tuple[int, ...] = (20, 200), temperature: float = 0.07) -> dict[int, float]:
    """Weighted k-NN top-1 (percent) for several k from one search (FAISS results are sorted)."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, _weighted(ks, temperature))


def majority_knn_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                          k: int = 5) -> float:
    """Plain k-NN top-1 (percent): Euclidean on raw features, one vote each, ties to the smallest label."""
    row = dataclasses.replace(MAJORITY_KNN, ks=(k,))
    return knn_accuracies(train_features, train_labels, test_features, test_labels, row)[k]
