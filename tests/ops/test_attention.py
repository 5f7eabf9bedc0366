"""ops.attention (full multi-head self-attention over every token) and ops.attention_probs: the
reference against textbook attention; every backend against the reference, forward and backward;
bad input; the dispatch; ViTAEv2 with its attention on the Triton kernels.

Backends: ``torch`` (SDPA) and ``auto`` on the CPU, ``triton`` in the interpreter (without a GPU) and
on a GPU (``pytest -m cuda``). The CPU takes N not a multiple of the blocks, tokens as a grid, a single
token, head dims 12 to 96, fp32 and fp16; the GPU ViTAEv2-S's sizes (N = 49 to 3136, head dim 64 and
128) in bf16, held to the accuracy of SDPA in the same dtype.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from dinocxr_fast.ops.attention import attention, attention_probs, attention_reference
from op_helpers import (
    assert_attention_accurate,
    assert_backend_table,
    attn_randn,
    backend_cases,
    backends,
    full_case,
    interpreted,
    reference_full,
    run_full,
)

attn_mod = importlib.import_module("dinocxr_fast.ops.attention")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
NAMES = ["out", "d qkv"]


# ---- the reference -----------------------------------------------------------------------------------
def test_reference_matches_textbook_attention():
    heads, hd = 3, 5
    qkv = attn_randn(2, 4, 6, 3 * heads * hd, seed=0)
    x = qkv.reshape(2, 24, 3, heads, hd).permute(2, 0, 3, 1, 4)
    want = torch.softmax(x[0] @ x[1].transpose(-1, -2) / hd ** 0.5, -1) @ x[2]
    want = want.transpose(1, 2).reshape(2, 4, 6, heads * hd)
    torch.testing.assert_close(attention_reference(qkv, heads), want, rtol=1e-10, atol=1e-10)


def test_probs_are_the_maps_the_output_is_made_of():
    heads, hd = 2, 4
    qkv = attn_randn(1, 3, 5, 3 * heads * hd, seed=0)
    probs = attention_probs(qkv, heads)
    assert probs.shape == (1, heads, 15, 15)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, heads, 15, dtype=qkv.dtype))
    v = qkv.reshape(1, 15, 3, heads, hd)[:, :, 2].transpose(1, 2)
    out = (probs @ v).transpose(1, 2).reshape(1, 3, 5, heads * hd)
    torch.testing.assert_close(out, attention_reference(qkv, heads))

    windows = attention_probs(qkv, heads, window_size=7)  # 3 x 5 grid pads to one 7 x 7 window
    assert windows.shape == (1, heads, 49, 49)


# ---- every backend against the reference, forward and backward -----------------------------------------
CPU_CASES = [  # (dtype, qkv shape, heads, scale or None for head_dim ** -0.5)
    *((dtype, *case) for dtype in (F32, F16) for case in [
        ((2, 49, 3 * 64), 2, None),    # stage 4 at 224 px, one block of queries and two of keys
        ((1, 67, 3 * 64), 1, None),    # N a multiple of no block
        ((1, 3, 5, 3 * 96), 3, None),  # tokens as a grid; head dim 32
        ((2, 1, 3 * 16), 1, None),     # a single token
    ]),
    (F32, (2, 10, 48), 4, 0.3),
    (F32, (2, 3, 4, 48), 4, 0.3),
]
GPU_CASES = [
    (BF16, (8, 196, 3 * 4 * 64), 4, None),   # stage 3 at 224 px
    (BF16, (8, 49, 3 * 8 * 64), 8, None),    # stage 4
    (BF16, (8, 196, 3 * 2 * 128), 2, None),  # stage-3 reduction cell
    (BF16, (2, 3136, 3 * 64), 1, None),      # 56 x 56 tokens, full attention at high resolution
    (BF16, (2, 1, 3 * 64), 1, None),
    (F16, (3, 197, 3 * 4 * 64), 4, None),
    (F32, (3, 197, 3 * 3 * 32), 3, None),
]


@pytest.mark.parametrize("backend, dtype, shape, heads, scale", backend_cases({
    ("torch", "auto", "triton-interpreter"): CPU_CASES,
    "triton-cuda": GPU_CASES,
}))
def test_matches_reference(backend, dtype, shape, heads, scale):
    qkv, grad_out = full_case(shape, dtype, device=backend.device)
    got = run_full(qkv, grad_out, heads, backend.name, scale)
    want = reference_full(qkv, grad_out, heads, scale)
    peer = run_full(qkv, grad_out, heads, "torch", scale) if backend.on_gpu else None
    assert got[0].shape == shape[:-1] + (shape[-1] // 3,)
    assert_attention_accurate(got, want, dtype, NAMES, peer)


@pytest.mark.parametrize("backend", backends("auto-cuda"))
def test_auto_on_gpu_matches_reference(backend):
    qkv = torch.randn(4, 28, 28, 3 * 128, device=backend.device)[:, :7, :7]  # a view: not contiguous
    torch.testing.assert_close(attention(qkv, 2), attention_reference(qkv.double(), 2).float(), rtol=1e-3, atol=1e-3)


@interpreted
def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the torch.library op."""
    full = attn_randn(1, 20, 3 * 32, seed=3).float().requires_grad_()
    torch.library.opcheck(torch.ops.dinocxr.attention_triton, (full, 2, 0.25))


# ---- the model with its attention on the Triton kernels ---------------------------------------------------
@interpreted
def test_tiny_model_with_triton_attention_matches_torch(monkeypatch):
    """vitaev2_tiny forward and backward with every attention call routed to the Triton kernels:
    windows on 16 x 16 and 8 x 8 grids (both padded, the qkv bias as pad value), full attention on
    4 x 4 and 2 x 2, head dims 16 to 48, reduction cells' value skip."""
    from dinocxr_fast.models import create_model

    torch.manual_seed(0)
    model = create_model("vitaev2_tiny")
    images = torch.randn(1, 1, 64, 64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(images)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out_torch, grads_torch = run()
    monkeypatch.setitem(attn_mod._KERNELS, "torch", attn_mod._KERNELS["triton"])
    monkeypatch.setitem(attn_mod._WINDOW_KERNELS, "torch", attn_mod._WINDOW_KERNELS["triton"])
    out_triton, grads_triton = run()
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-4, atol=1e-5)
    assert len(grads_triton) == len(grads_torch)
    for a, b in zip(grads_triton, grads_torch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_gpu_model_with_triton_attention_matches_torch_attention(monkeypatch):
    """ViTAEv2-S, bf16 autocast, forward and backward: Triton attention (forced) against the same
    model with the torch attention backend."""
    from dinocxr_fast.models import create_model

    torch.manual_seed(0)
    model = create_model("vitaev2_s").cuda()
    images = torch.randn(4, model.in_chans, 224, 224, device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
        out.float().square().mean().backward()
        grads = [p.grad.float().clone() for p in model.parameters() if p.grad is not None]
        return out.float().detach(), grads

    monkeypatch.setenv("DINOCXR_BACKEND", "triton")  # the attention ops; the others fall through to auto
    out_triton, grads_triton = run()
    monkeypatch.setenv("DINOCXR_BACKEND", "torch")
    out_torch, grads_torch = run()
    torch.testing.assert_close(out_triton, out_torch, rtol=5e-2, atol=5e-2 * out_torch.abs().max().item())
    num = sum((a - b).norm() ** 2 for a, b in zip(grads_triton, grads_torch)) ** 0.5
    den = sum(b.norm() ** 2 for b in grads_torch) ** 0.5
    assert num / den < 5e-2


# ---- bad input: a ValueError naming the argument -------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: attention(q[0, 0], 2), "qkv"),
        (lambda q: attention("not a tensor", 2), "qkv"),
        (lambda q: attention(q, 2, backend="fastest"), "backend"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    qkv = torch.randn(1, 4, 4, 24)
    with pytest.raises(ValueError, match=match):
        call(qkv)


@interpreted
def test_what_triton_does_not_cover_is_a_value_error():
    with pytest.raises(ValueError, match="qkv"):  # head dim 256: over the kernels' limit
        attention(torch.zeros(1, 4, 3 * 256), 1, backend="triton")


# ---- which backend runs ----------------------------------------------------------------------------------
def test_backends_register_by_name_only_and_auto_never_takes_the_interpreter():
    assert_backend_table("attention", attn_mod.IMPLEMENTED, attn_mod._KERNELS, cpu_candidates=[])
    assert "triton" in attn_mod.IMPLEMENTED["cuda"]
