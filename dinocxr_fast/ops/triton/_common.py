"""Helpers shared by the Triton launch helpers (host side only)."""
from __future__ import annotations

import os

import torch
import triton

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test mode); read when a kernel module is imported,
    as @triton.jit itself does."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: TF32 where torch allows it for matmuls, else
    3xTF32 (about fp32 accuracy, still on tensor cores; "ieee" compiles to FMA loops that spill
    on sm_90). 16-bit operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def head_dim_block(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (tl.dot's minimum K on tensor cores)."""
    return max(16, triton.next_power_of_2(head_dim))


CONFIG_ENV = "DINOCXR_TRITON_CONFIG"


def prune_configs(configs, named_args, **kwargs):
    """early_config_prune for every triton.autotune here. ``DINOCXR_TRITON_CONFIG=<i>`` pins the
    i-th config (mod the list's length): GPU tests use it to skip tuning and to check each config
    in turn. Otherwise the autotuner times them all on the first call of each tuning key."""
    pinned = os.environ.get(CONFIG_ENV)
    if pinned not in (None, ""):
        return [configs[int(pinned) % len(configs)]]
    return configs
