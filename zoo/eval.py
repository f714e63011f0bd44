"""Evaluation protocols on frozen features: weighted k-NN (Wu et al. 2018), majority k-NN, linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                         k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                         chunk: int = 1024) -> torch.Tensor:
    """Labels predicted by cosine k-NN with votes weighted by exp(sim / T) (the SSL papers' protocol).

    T <= 0 means a plain majority vote (ties to the smallest label).
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(test_features.float(), dim=1).split(chunk):
        sims, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp() if temperature > 0 else torch.ones_like(sims)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels.to(q.device)[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent of `weighted_knn_predict`."""
    pred = weighted_knn_predict(train_features, train_labels, test_features, k, temperature)
    return 100.0 * (pred.cpu() == test_labels.cpu()).float().mean().item()
