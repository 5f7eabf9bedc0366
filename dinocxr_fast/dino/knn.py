"""Weighted k-NN classification on frozen features (facebookresearch/dino's eval_knn recipe):
cosine similarity to the training features, the k nearest vote with weight exp(sim / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 256) -> torch.Tensor:
    """Class scores [n_test, num_classes] (argmax = prediction). Features are L2-normalised here."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels disagree in length")
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).float()
        scores.append((onehot * weights.unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07) -> float:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((scores.argmax(1) == test_labels).float().mean())
