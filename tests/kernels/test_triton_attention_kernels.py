"""The Triton attention kernels (dinocxr_fast/ops/triton/attention.py, window_attention.py) below the ops:
what they refuse to launch, the autotune candidates, and every autotune config on a GPU (the op
tests in tests/ops/ pin the first one, tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

from op_helpers import (
    assert_attention_accurate,
    full_case,
    reference_full,
    reference_window,
    run_full,
    run_window,
    window_case,
)

BF16, F32 = torch.bfloat16, torch.float32


def test_full_attention_grid_over_65535_programs_is_not_launched():
    from dinocxr_fast.ops.triton import attention as full_kernels

    qkv = torch.zeros(1, 1, 48).expand(40000, 1, 48)  # batch x heads = 80000 programs on the grid's y axis
    assert "65535" in full_kernels.supports(qkv, 2)
    assert full_kernels.supports(qkv[:30000], 2) is None


def test_config_pruning(monkeypatch):
    """Autotune candidates: tiles no longer than the sequence; DINOCXR_TRITON_CONFIG pins one."""
    import triton

    from dinocxr_fast.ops.triton import attention as full_kernels

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in ((64, 64), (128, 64), (64, 32), (128, 128))]
    monkeypatch.delenv("DINOCXR_TRITON_CONFIG", raising=False)
    short = full_kernels._prune_for_length(configs, {"N": 49})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short] == [(64, 64), (64, 32)]
    assert full_kernels._prune_for_length(configs, {"N": 196}) == configs
    monkeypatch.setenv("DINOCXR_TRITON_CONFIG", "5")  # taken modulo the candidates
    assert full_kernels._prune_for_length(configs, {"N": 196}) == [configs[1]]


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_every_autotune_config_is_correct(monkeypatch, head_dim):
    """The other GPU tests pin config 0 (conftest); here each config of each tuned kernel runs."""
    from dinocxr_fast.ops.triton import attention as full_kernels
    from dinocxr_fast.ops.triton import window_attention as window_kernels

    tuners = [window_kernels._window_fwd_kernel, window_kernels._window_bwd_kernel, full_kernels._attn_fwd_kernel,
              full_kernels._attn_bwd_dkdv_kernel, full_kernels._attn_bwd_dq_kernel]
    heads = 128 // head_dim
    window = window_case(3, (24, 24), heads, head_dim, BF16, True, device="cuda", pad_dtype=F32)
    window_want = reference_window(*window, heads, 7)
    window_peer = run_window(*window, heads, 7, "torch")
    qkv, grad_out = full_case((3, 197, 3 * 128), BF16, device="cuda")
    full_want, full_peer = reference_full(qkv, grad_out, heads), run_full(qkv, grad_out, heads, "torch")
    try:
        for i in range(max(len(t.configs) for t in tuners)):
            monkeypatch.setenv("DINOCXR_TRITON_CONFIG", str(i))
            for tuner in tuners:
                tuner.cache.clear()  # the autotuner remembers its pick per key
            assert_attention_accurate(run_window(*window, heads, 7, "triton"), window_want, BF16,
                                      [f"config {i}: out", "d qkv", "d pad_value"], window_peer)
            assert_attention_accurate(run_full(qkv, grad_out, heads, "triton"), full_want, BF16,
                                      [f"config {i}: out", "d qkv"], full_peer)
    finally:
        for tuner in tuners:
            tuner.cache.clear()
