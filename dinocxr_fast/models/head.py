"""The DINO projection head and the multi-crop wrapper (Caron et al. 2021, facebookresearch/dino)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, w = g * v / ||v|| per output row.

    Keeps DINO's parameter names (``weight_g`` [out, 1], ``weight_v`` [out, in]) so its
    checkpoints load as they are; plain tensors, so torch.compile and export see ordinary ops.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)  # nn.Linear's default init

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (``nlayers`` linears, GELU between, hidden ``hidden_dim``) to a ``bottleneck_dim``
    embedding, L2-normalised, then a weight-normalised linear layer to ``out_dim`` logits.

    ``norm_last_layer=True`` freezes the norm g of the last layer at 1 (DINO's default for ViTs;
    it stabilises training), so only the directions v learn.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, *, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs a list of crops through backbone and head; all crops of one resolution go through
    the backbone in one call, the head runs once on everything. Output rows are crop-major in the
    order of the input list (crop 0's batch, then crop 1's, ...), as DINO's loss expects."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        if hasattr(backbone, "head"):
            backbone.head = nn.Identity()  # the backbone yields features only
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs; with ``return_features`` also the backbone features (same row order)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("crops must hold at least one tensor")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            by_shape.setdefault(tuple(crop.shape[1:]), []).append(i)
        features: list[torch.Tensor | None] = [None] * len(crops)
        for indices in by_shape.values():
            out = self.backbone(torch.cat([crops[i] for i in indices]))
            for i, chunk in zip(indices, out.split([crops[i].shape[0] for i in indices])):
                features[i] = chunk
        features = torch.cat(features)
        out = self.head(features)
        return (out, features) if return_features else out
