"""The README's main job: load a shipped model, embed Fashion-MNIST, index, search, report."""

from __future__ import annotations

import time

import torch

from zoo.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from zoo.eval import knn_accuracy
from zoo.load import load
from zoo.registry import list_models, registry


def best_shipped_model(pattern: str = "*.fmnist") -> str | None:
    """The shipped Fashion-MNIST model with the highest measured k-NN (k=20), if any."""
    specs = [registry()[n] for n in list_models(pattern, pretrained_only=True)]
    specs = [s for s in specs if s.metrics.get("knn_k20") is not None]
    return max(specs, key=lambda s: s.metrics["knn_k20"]).name if specs else None


@torch.inference_mode()
def _embed(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    feats = [model(model.preprocess(chunk[:, None]).to(device)).float().cpu() for chunk in images.split(batch_size)]
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def run_demo(model_name: str | None = None, n_database: int = 10000, n_queries: int = 5) -> int:
    name = model_name or best_shipped_model()
    if name is None:
        name = "wmse-resnet18_narrow.fmnist"
        print(f"no Fashion-MNIST weights are shipped yet: using {name} with random weights (pretrained=False)")
        model = load(name, pretrained=False)
    else:
        model = load(name)
    print(f"model: {model.spec.name} ({model.spec.arch}, {model.spec.feature_dim}-d features)")
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    db_x, db_y = train_x[:n_database], train_y[:n_database]
    t0 = time.time()
    db = _embed(model, db_x)
    queries = _embed(model, test_x)
    dt = time.time() - t0
    print(f"embedded {db.shape[0] + queries.shape[0]} images in {dt:.1f} s: database {tuple(db.shape)}, "
          f"queries {tuple(queries.shape)}")
    try:
        import faiss

        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db.numpy())
        sims, idx = index.search(queries[:n_queries].numpy(), 5)
        sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
        backend = "faiss IndexFlatIP"
    except ImportError:
        sims, idx = (queries[:n_queries] @ db.T).topk(5, dim=1)
        backend = "torch (faiss not installed: pip install faiss-cpu)"
    print(f"nearest neighbours ({backend}, cosine):")
    for q in range(n_queries):
        neighbours = ", ".join(f"{FASHION_MNIST_CLASSES[int(db_y[i])]} {s:.2f}" for i, s in zip(idx[q], sims[q]))
        print(f"  query {q} [{FASHION_MNIST_CLASSES[int(test_y[q])]}] -> {neighbours}")
    acc = knn_accuracy(db, db_y, queries, test_y, k=20, temperature=0.07)
    print(f"weighted k-NN (k=20, T=0.07) top-1 on the Fashion-MNIST test set, {n_database}-image database: {acc:.2f}%")
    return 0
