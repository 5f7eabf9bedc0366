"""ViTAEv2's two cells. Input and output are B x H x W x C tokens (channels last).

Reduction cell (first block of a stage; downsamples by ``downsample``)::

    t   = PRM(x)                               dilated convs, concatenated: the new tokens
    y   = Attn(LN(t)) + PCM(x)                 window or full attention; full adds its values
    out = y + MLP(LN(y))

Normal cell::

    y   = x + DropPath(Attn(LN(x))) + DropPath(PCM(x))
    out = y + DropPath(MLP(LN(y)))
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from dinocxr_fast.models.layers import Attention, DropPath, Mlp, ParallelConv, PyramidReduction


def pcm_strides(downsample: int) -> tuple[int, int, int]:
    """Spread a 2^k downsampling (k <= 3) over the PCM's three convs, stride-2 ones first."""
    halvings = int(math.log2(downsample)) if downsample > 0 else -1
    if downsample < 1 or 2 ** halvings != downsample or halvings > 3:
        raise ValueError(f"downsample must be 1, 2, 4 or 8, got {downsample}")
    return tuple(2 if i < halvings else 1 for i in range(3))


class ReductionCell(nn.Module):
    """Reduces the grid by ``downsample`` and changes the width from ``in_chans`` to ``token_dim``.

    As in the reference: LayerNorms with eps 1e-5, MLP ratio 1, no dropout or stochastic depth,
    the default attention scale; a qkv bias for window attention, none for full attention, which
    instead adds its values to the output (``window_size=None`` selects it).
    """

    def __init__(self, in_chans, embed_dim, token_dim, downsample, kernel_size, dilations, num_heads,
                 window_size=None, groups=1, mlp_ratio=1.0):
        super().__init__()
        self.prm = PyramidReduction(in_chans, embed_dim, kernel_size, downsample, dilations)
        full = window_size is None
        self.norm1 = nn.LayerNorm(self.prm.out_chans)
        self.attn = Attention(self.prm.out_chans, token_dim, num_heads, window_size=window_size,
                              qkv_bias=not full, value_skip=full)
        self.pcm = ParallelConv((in_chans, embed_dim, embed_dim, token_dim), groups, pcm_strides(downsample))
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, int(token_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(self.prm(x))) + self.pcm(x)
        return y + self.mlp(self.norm2(y))

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.attention_maps(self.norm1(self.prm(x)))


class NormalCell(nn.Module):
    """Keeps grid and width; attention and PCM both read the cell's input."""

    def __init__(self, dim, num_heads, window_size=None, groups=1, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-6):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, dim, num_heads, window_size=window_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.pcm = ParallelConv((dim, hidden, dim, dim), groups)
        # One module, two calls: the attention and PCM branches draw independent masks.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) + self.drop_path(self.pcm(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.attention_maps(self.norm1(x))
