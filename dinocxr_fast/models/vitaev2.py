"""ViTAEv2 (Zhang et al., "ViTAEv2: Vision Transformer Advanced by Exploring Inductive Bias for
Image Recognition and Beyond", IJCV 2023), as released in ViTAE-Transformer/ViTAE-Transformer
(Image-Classification/vitaev2), written for channels-last tokens and fused kernels.

Four stages, each a reduction cell then ``depth`` normal cells; 7x7 unshifted window attention in
stages 1-2, full attention in stages 3-4; no class token, features are the mean over tokens.
Differences from the release, none of which changes the function for a given input size:

- the input size is chosen at call time (any multiple of 32), not fixed at build time, and the
  grid may be non-square;
- tokens stay B x H x W x C from the first convolution to the pooling;
- ``in_chans`` defaults to 1, and a 3-channel state dict loads into a 1-channel model by summing
  the stem kernels over their input channels (what a gray image replicated to RGB would see);
- the stochastic-depth rates rise linearly over all normal cells; the release slices its rate
  list per stage from the previous stage's depth instead of the running total
  (``drop_path_schedule="reference"`` reproduces that).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from dinocxr_fast.models.cells import NormalCell, ReductionCell
from dinocxr_fast.models.layers import init_weights


@dataclass(frozen=True)
class ViTAEv2Config:
    """Per-stage settings, one entry per stage (names follow the paper; reference names in [])."""

    embed_dims: tuple[int, ...]  # PRM width per dilation [embed_dims]
    token_dims: tuple[int, ...]  # token width after the reduction cell [token_dims]
    depths: tuple[int, ...]  # normal cells per stage [NC_depth]
    num_heads: tuple[int, ...]  # normal-cell heads [NC_heads]
    reduction_heads: tuple[int, ...]  # reduction-cell heads [RC_heads]
    groups: tuple[int, ...]  # normal-cell PCM groups [NC_group]
    reduction_groups: tuple[int, ...]  # reduction-cell PCM groups [RC_group]
    downsample_ratios: tuple[int, ...] = (4, 2, 2, 2)
    kernel_sizes: tuple[int, ...] = (7, 3, 3, 3)
    dilations: tuple[tuple[int, ...], ...] = ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2))
    window_stages: tuple[bool, ...] = (True, True, False, False)  # window (else full) attention
    window_size: int = 7
    mlp_ratio: float = 4.0
    reduction_mlp_ratio: float = 1.0
    qkv_bias: bool = True  # normal cells; window reduction cells have a bias, full ones none
    qk_scale: float | None = None  # normal cells only, as in the reference
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "linear"  # or "reference"

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def total_stride(self) -> int:
        stride = 1
        for r in self.downsample_ratios:
            stride *= r
        return stride

    def validate(self) -> None:
        n = self.num_stages
        for field in ("embed_dims", "token_dims", "num_heads", "reduction_heads", "groups", "reduction_groups",
                      "downsample_ratios", "kernel_sizes", "dilations", "window_stages"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} must have one entry per stage ({n}), got {getattr(self, field)!r}")
        if self.drop_path_schedule not in ("linear", "reference"):
            raise ValueError(f"drop_path_schedule must be 'linear' or 'reference', got {self.drop_path_schedule!r}")

    def drop_path_rates(self) -> list[list[float]]:
        """Per stage, the stochastic-depth rate of each normal cell."""
        n = sum(self.depths)
        rates = [self.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        out, start = [], 0
        for i, depth in enumerate(self.depths):
            if self.drop_path_schedule == "reference":
                start = 0 if i == 0 else self.depths[i - 1]
            out.append(rates[start:start + depth])
            start += depth
        return out


_PAPER = dict(reduction_groups=(1, 16, 32, 64), groups=(1, 32, 64, 128))
CONFIGS: dict[str, ViTAEv2Config] = {
    "vitaev2_s": ViTAEv2Config(embed_dims=(64, 64, 128, 256), token_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2),
                               num_heads=(1, 2, 4, 8), reduction_heads=(1, 1, 2, 4), **_PAPER),
    "vitaev2_48m": ViTAEv2Config(embed_dims=(64, 64, 192, 384), token_dims=(96, 192, 384, 768),
                                 depths=(2, 2, 11, 2), num_heads=(1, 2, 4, 8), reduction_heads=(1, 1, 2, 4), **_PAPER),
    "vitaev2_b": ViTAEv2Config(embed_dims=(96, 96, 256, 512), token_dims=(128, 256, 512, 1024),
                               depths=(2, 2, 12, 2), num_heads=(1, 4, 8, 16), reduction_heads=(1, 1, 4, 8), **_PAPER),
    # Same structure at a small width: CPU tests, the embedded demo, the parity fixture.
    "vitaev2_tiny": ViTAEv2Config(embed_dims=(8, 8, 16, 32), token_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1),
                                  num_heads=(1, 2, 3, 4), reduction_heads=(1, 1, 1, 2),
                                  groups=(1, 8, 12, 16), reduction_groups=(1, 4, 8, 8)),
}


# The PCM of each ViTAEv2-S cell kind at 224 px: (c0, c1, c2, c3, groups, strides, input grid). The
# kernel tests and benchmarks/bench_pcm.py run these shapes; tests/models/test_vitaev2.py checks
# them against the model.
VITAEV2_S_PCM_SHAPES = {
    "s1_reduction": (1, 64, 64, 64, 1, (2, 2, 1), 224),
    "s1_normal": (64, 256, 64, 64, 1, (1, 1, 1), 56),
    "s2_reduction": (64, 64, 64, 128, 16, (2, 1, 1), 56),
    "s2_normal": (128, 512, 128, 128, 32, (1, 1, 1), 28),
    "s3_reduction": (128, 128, 128, 256, 32, (2, 1, 1), 28),
    "s3_normal": (256, 1024, 256, 256, 64, (1, 1, 1), 14),
    "s4_reduction": (256, 256, 256, 512, 64, (2, 1, 1), 14),
    "s4_normal": (512, 2048, 512, 512, 128, (1, 1, 1), 7),
}


class Stage(nn.Module):
    def __init__(self, reduction: ReductionCell, cells: list[NormalCell]):
        super().__init__()
        self.reduction = reduction
        self.cells = nn.ModuleList(cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduction(x)
        for cell in self.cells:
            x = cell(x)
        return x


class ViTAEv2(nn.Module):
    def __init__(self, config: ViTAEv2Config, in_chans: int = 1, num_classes: int = 0):
        super().__init__()
        config.validate()
        self.config = config
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = config.token_dims[-1]
        stages, width = [], in_chans
        for i, rates in enumerate(config.drop_path_rates()):
            window = config.window_size if config.window_stages[i] else None
            reduction = ReductionCell(
                width, config.embed_dims[i], config.token_dims[i], config.downsample_ratios[i],
                config.kernel_sizes[i], config.dilations[i], config.reduction_heads[i], window_size=window,
                groups=config.reduction_groups[i], mlp_ratio=config.reduction_mlp_ratio,
            )
            cells = [
                NormalCell(config.token_dims[i], config.num_heads[i], window_size=window, groups=config.groups[i],
                           mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, qk_scale=config.qk_scale,
                           drop=config.drop_rate, attn_drop=config.attn_drop_rate, drop_path=rate)
                for rate in rates
            ]
            stages.append(Stage(reduction, cells))
            width = config.token_dims[i]
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        self.register_load_state_dict_pre_hook(_sum_stem_channels)

    def stem_weight_names(self) -> list[str]:
        """The convolution kernels that read the image (PRM branches and the first PCM conv)."""
        first = self.stages[0].reduction
        names = [f"stages.0.reduction.prm.convs.{i}.conv.weight" for i in range(len(first.prm.convs))]
        return names + ["stages.0.reduction.pcm.conv1.conv.weight"]

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a B x C x H x W image tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x has {x.shape[1]} channels but the model was built with in_chans={self.in_chans}")
        stride = self.config.total_stride
        if x.shape[2] % stride or x.shape[3] % stride or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x's height and width must be positive multiples of {stride}, got {tuple(x.shape[2:])}")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images B x C x H x W -> last-stage tokens B x H/32 x W/32 x C."""
        self._check_images(x)
        x = x.permute(0, 2, 3, 1).contiguous()  # channels last from here on
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled features B x num_features (mean over tokens; there is no class token)."""
        return self.forward_tokens(x).mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax maps of the last block: B x heads x N x N over the last grid (N = H/32 * W/32)
        when it has full attention, per window otherwise (see ``ops.attention_probs``)."""
        self._check_images(x)
        x = x.permute(0, 2, 3, 1).contiguous()
        for stage in self.stages[:-1]:
            x = stage(x)
        last = self.stages[-1]
        if len(last.cells) == 0:
            return last.reduction.attention_maps(x)
        x = last.reduction(x)
        for cell in last.cells[:-1]:
            x = cell(x)
        return last.cells[-1].attention_maps(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.head)


def _sum_stem_channels(module, state_dict, prefix, *_):
    """Load a 3-channel (RGB) checkpoint into a 1-channel model: sum the stem kernels over inputs."""
    own = module.state_dict(keep_vars=True)
    for name in module.stem_weight_names():
        key = prefix + name
        if key in state_dict and own[name].shape[1] == 1 and state_dict[key].shape[1] != 1:
            state_dict[key] = state_dict[key].sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Released checkpoints use the reference's module names: map them to ours
# ----------------------------------------------------------------------------------------------
_PCM_INDEX = {"0": "conv1.conv", "1": "conv1.bn", "3": "conv2.conv", "4": "conv2.bn", "6": "conv3.conv"}
_RENAMES = [
    (r"^layers\.(\d+)\.RC\.PRM\.convs\.(\d+)\.0\.", r"stages.\1.reduction.prm.convs.\2.conv."),
    (r"^layers\.(\d+)\.RC\.PCM\.(\d)\.", lambda m: f"stages.{m[1]}.reduction.pcm.{_PCM_INDEX[m[2]]}."),
    (r"^layers\.(\d+)\.RC\.attn\.attn\.", r"stages.\1.reduction.attn."),
    (r"^layers\.(\d+)\.RC\.attn\.(norm1|norm2|mlp)\.", r"stages.\1.reduction.\2."),
    (r"^layers\.(\d+)\.NC\.(\d+)\.PCM\.(\d)\.", lambda m: f"stages.{m[1]}.cells.{m[2]}.pcm.{_PCM_INDEX[m[3]]}."),
    (r"^layers\.(\d+)\.NC\.(\d+)\.", r"stages.\1.cells.\2."),
]


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of the released ViTAEv2 to this module's names.

    Drops the relative-position index buffers (the release builds them but never uses them).
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            continue
        new = key
        for pattern, repl in _RENAMES:
            new, hits = re.subn(pattern, repl, new)
            if hits:
                break
        out[new] = value
    return out


def create_model(name: str, num_classes: int = 0, in_chans: int = 1, **overrides) -> ViTAEv2:
    """Build a ViTAEv2 by name (``vitaev2_s``, ``vitaev2_48m``, ``vitaev2_b``, ``vitaev2_tiny``);
    keyword overrides replace fields of its ``ViTAEv2Config`` (e.g. ``drop_path_rate=0.1``)."""
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {sorted(CONFIGS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(ViTAEv2Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown config overrides {unknown}; ViTAEv2Config has {sorted(fields)}")
    return ViTAEv2(dataclasses.replace(CONFIGS[name], **overrides), in_chans=in_chans, num_classes=num_classes)


def list_models() -> list[str]:
    return sorted(CONFIGS)
