"""KoLeo regulariser (DINOv2, after Sablayrolles et al. 2019): spreads the features of a batch.

``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised features, ``nn(i)`` the nearest other row.
A small model on a few hundred similar radiographs tends to map them close together; the term
pushes each feature away from its nearest neighbour, against that dimensional collapse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo of one batch ``[B, D]`` (B >= 2), as DINOv2's KoLeoLoss."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [B >= 2, D] features, got shape {tuple(features.shape)}")
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
