"""The README's main job: load a shipped model, embed Fashion-MNIST, index, search, report, draw."""

from __future__ import annotations

import time
from pathlib import Path

from zoo.datasets import FASHION_MNIST_CLASSES, fashion_mnist_split
from zoo.load import load
from zoo.registry import list_models, registry


def best_shipped_model(pattern: str = "*.fmnist") -> str | None:
    """The shipped Fashion-MNIST model with the highest measured k-NN (k=20), if any."""
    specs = [registry()[n] for n in list_models(pattern, pretrained_only=True)]
    specs = [s for s in specs if s.metrics.get("knn_k20") is not None]
    return max(specs, key=lambda s: s.metrics["knn_k20"]).name if specs else None


def run_demo(model_name: str | None = None, n_database: int = 10000, n_queries: int = 5, k: int = 8,
             grid_path: str | Path = "zoo-demo-retrieval.png", progress: bool = True) -> int:
    """Embed `n_database` training images and the 10k test images, index them, print neighbours and
    the weighted k-NN accuracy (cosine, k=20, T=0.07), and write a retrieval grid PNG."""
    import torch

    from zoo.embed import embed
    from zoo.knn import knn_accuracy
    from zoo.grid import GridRow, retrieval_grid
    from zoo.index import Index

    name = model_name or best_shipped_model()
    if name is None:
        name = "wmse-resnet18_narrow.fmnist"
        print(f"no Fashion-MNIST weights are shipped yet: using {name} with random weights (pretrained=False); "
              f"its numbers say what an untrained network gives")
        torch.manual_seed(0)
        model = load(name, pretrained=False)
    else:
        model = load(name)
    print(f"model: {model.spec.name} ({model.spec.arch}, {model.spec.feature_dim}-d features)")
    database, test = fashion_mnist_split("train", n_database), fashion_mnist_split("test")
    db_x, db_y, test_x, test_y = database.images, database.labels, test.images, test.labels
    t0 = time.time()
    db = embed(model, db_x, progress=progress)
    queries = embed(model, test_x, progress=progress)
    dt = time.time() - t0
    n = len(db) + len(queries)
    print(f"embedded {n} images in {dt:.1f} s ({n / dt:.0f} img/s): database {tuple(db.features.shape)}, "
          f"queries {tuple(queries.features.shape)}")
    index = Index(db.features.shape[1], metric="cosine", kind="flat", model=model.spec.name)
    index.add(db.features, db.ids, labels=[FASHION_MNIST_CLASSES[int(y)] for y in db_y])
    sims, ids = index.search(queries.features[:n_queries], k)
    print(f"nearest neighbours (FAISS {index.factory}, cosine):")
    rows = []
    for q in range(n_queries):
        labels = index.labels_of(ids[q])
        neighbours = ", ".join(f"{lab} {s:.2f}" for lab, s in zip(labels[:5], sims[q][:5]))
        qlabel = FASHION_MNIST_CLASSES[int(test_y[q])]
        print(f"  query {q} [{qlabel}] -> {neighbours}")
        rows.append(GridRow(test_x[q], [db_x[int(i)] for i in ids[q]], sims[q].tolist(), qlabel, labels))
    acc = knn_accuracy(db.features, db_y, queries.features, test_y, k=20, temperature=0.07)
    print(f"weighted k-NN (cosine, k=20, T=0.07) top-1 on the Fashion-MNIST test set, {n_database}-image "
          f"database: {acc:.2f}%")
    path = retrieval_grid(rows, grid_path)
    print(f"retrieval grid: {path.resolve()}")
    return 0
