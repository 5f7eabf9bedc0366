"""Building blocks of ViTAEv2. Every tensor between blocks is B x H x W x C (channels last)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from dinocxr_fast.ops.attention import attention, attention_probs, window_attention
from dinocxr_fast.ops.conv_bn_act import activate, conv_bn_act
from dinocxr_fast.ops.pcm import pcm


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvBNAct(nn.Module):
    """Conv2d -> optional BatchNorm2d -> optional activation, through ``ops.conv_bn_act``.

    Holds a plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` for the parameters (so state dicts, init and
    optimisers see the usual modules) and runs them as one op on channels-last tokens.
    """

    def __init__(self, in_chans, out_chans, kernel_size=3, stride=1, padding=1, dilation=1, groups=1,
                 bias=True, norm=False, activation=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chans) if norm else None
        self.activation = activation

    @property
    def fusable(self) -> bool:
        """False for a SyncBatchNorm: its forward synchronises the batch statistics across ranks,
        and a fused kernel that reads its parameters would normalise with this rank's only."""
        return not isinstance(self.bn, nn.SyncBatchNorm)

    def bn_arguments(self) -> dict:
        """The BatchNorm as the fused ops take it, for one forward pass: counts the batch in
        ``num_batches_tracked`` as ``nn.BatchNorm2d`` does (``momentum=None`` reads it). The
        BatchNorm's own mode decides, so freezing it with ``bn.eval()`` works as usual."""
        bn = self.bn
        momentum = bn.momentum
        if bn.training:
            bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                    eps=bn.eps, momentum=momentum or 0.0, training=bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if not self.fusable:  # unfused, channels last
            y = bn(conv(x.permute(0, 3, 1, 2)))
            return activate(y, self.activation).permute(0, 2, 3, 1).contiguous()
        return conv_bn_act(
            x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=conv.groups, activation=self.activation, **(self.bn_arguments() if bn is not None else {}),
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class ParallelConv(nn.Module):
    """The PCM: conv3x3-BN-SiLU-conv3x3-BN-SiLU-conv3x3, all grouped alike, strides per stage.

    Runs beside the attention on the cell's input and brings locality and scale invariance.
    ``channels`` gives the four widths along the chain: (in, embed, embed, tokens) in a reduction
    cell, (dim, 4 * dim, dim, dim) in a normal cell.
    """

    def __init__(self, channels, groups=1, strides=(1, 1, 1)):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.conv1 = ConvBNAct(c0, c1, stride=strides[0], groups=groups, norm=True, activation="silu")
        self.conv2 = ConvBNAct(c1, c2, stride=strides[1], groups=groups, norm=True, activation="silu")
        self.conv3 = ConvBNAct(c2, c3, stride=strides[2], groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = (self.conv1, self.conv2, self.conv3)
        if not all(m.fusable for m in convs):  # a SyncBatchNorm (convert_sync_batchnorm): module by module
            return self.conv3(self.conv2(self.conv1(x)))
        # One op for the chain: the CUDA backend normalises in the next conv's prologue.
        bns = [m.bn_arguments() for m in convs[:2]]
        return pcm(
            x, [m.conv.weight for m in convs], [m.conv.bias for m in convs],
            *[(b["bn_weight"], b["bn_bias"], b["running_mean"], b["running_var"], b["eps"], b["momentum"]) for b in bns],
            strides=[m.conv.stride[0] for m in convs], groups=self.conv1.conv.groups,
            training=(bns[0]["training"], bns[1]["training"]),
        )


class PyramidReduction(nn.Module):
    """The PRM: parallel dilated convs (one per dilation) + GELU, concatenated along channels.

    ``padding = ceil(((k - 1) * d + 1 - stride) / 2)`` makes every branch land on the same
    ``H / stride`` grid; the output holds ``embed_dim * len(dilations)`` channels, branch-major.
    """

    def __init__(self, in_chans, embed_dim, kernel_size, stride, dilations):
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNAct(in_chans, embed_dim, kernel_size, stride,
                      padding=math.ceil(((kernel_size - 1) * d + 1 - stride) / 2), dilation=d, activation="gelu")
            for d in dilations
        )
        self.out_chans = embed_dim * len(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention on B x H x W x C tokens, full or in unshifted windows.

    ``in_dim`` may differ from ``out_dim`` (reduction cells); ``value_skip`` adds the values to
    the output, the residual the reduction cells of stages 3-4 use because in_dim != out_dim.
    The scale is (out_dim / heads) ** -0.5 unless ``qk_scale`` is given.
    """

    def __init__(self, in_dim, out_dim, num_heads, window_size=None, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, value_skip=False):
        super().__init__()
        if out_dim % num_heads:
            raise ValueError(f"out_dim={out_dim} is not a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale or (out_dim // num_heads) ** -0.5
        self.value_skip = value_skip
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(in_dim, out_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        drop = self.attn_drop if self.training else 0.0
        if self.window_size is not None:
            # Padded tokens are zeros before this projection, so their k/v are its bias.
            out = window_attention(qkv, self.num_heads, self.window_size, scale=self.scale,
                                   pad_value=self.qkv.bias, dropout_p=drop)
        else:
            out = attention(qkv, self.num_heads, scale=self.scale, dropout_p=drop)
        out = self.proj_drop(self.proj(out))
        if self.value_skip:
            out = out + qkv[..., 2 * out.shape[-1]:]
        return out

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax maps for ``x`` (already normalised): B x heads x N x N, or per window."""
        pad = self.qkv.bias if self.window_size is not None else None
        return attention_probs(self.qkv(x), self.num_heads, scale=self.scale,
                               window_size=self.window_size, pad_value=pad)

    def extra_repr(self) -> str:
        kind = f"window_size={self.window_size}" if self.window_size else "full"
        return f"num_heads={self.num_heads}, {kind}, value_skip={self.value_skip}"


def init_weights(module: nn.Module) -> None:
    """ViTAEv2's init: truncated normal (std .02) linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = ["Attention", "ConvBNAct", "DropPath", "Mlp", "ParallelConv", "PyramidReduction", "init_weights"]
