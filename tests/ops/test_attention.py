"""Triton window / full attention (backend="triton") against the reference, forward and backward.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py) on small
shapes in fp32 and fp16: window grids 7x7, 8x8 (padded to 14x14), 14x14 and 9x12, head dims
16 / 32 / 48 / 64, the padded keys holding ``pad_value`` (and its gradient) or zeros; full attention
with N not a multiple of the blocks. The ``cuda`` tests take ViTAEv2-S sizes, bf16, head dim 128
and N = 3136, and hold the kernels to the accuracy of torch's own SDPA in the same dtype.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from dinocxr_fast.ops.attention import attention, attention_reference, window_attention, window_attention_reference

attn_mod = importlib.import_module("dinocxr_fast.ops.attention")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter test (TRITON_INTERPRET=1, set without a GPU)")


def _randn(*shape, seed, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def window_case(batch, hw, heads, head_dim, dtype, pad, device="cpu", ws=7, pad_dtype=None):
    c = heads * head_dim
    qkv = _randn(batch, *hw, 3 * c, seed=0, device=device).to(dtype)
    pad_value = _randn(3 * c, seed=1, device=device).to(pad_dtype or dtype) if pad else None
    grad_out = _randn(batch, *hw, c, seed=2, device=device).to(dtype)
    return qkv, pad_value, grad_out


def run_window(qkv, pad_value, grad_out, heads, ws, backend):
    x = qkv.detach().requires_grad_()
    p = pad_value.detach().requires_grad_() if pad_value is not None else None
    out = window_attention(x, heads, ws, pad_value=p, backend=backend)
    inputs = [x] + ([p] if p is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out.detach(), *grads]


def reference_window(qkv, pad_value, grad_out, heads, ws):
    """The specification in fp64 on the same (rounded) inputs."""
    x = qkv.detach().double().requires_grad_()
    p = pad_value.detach().double().requires_grad_() if pad_value is not None else None
    out = window_attention_reference(x, heads, ws, pad_value=p)
    inputs = [x] + ([p] if p is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.double(), materialize_grads=True)
    return [out.detach(), *grads]


def run_full(qkv, grad_out, heads, backend):
    x = qkv.detach().requires_grad_()
    out = attention(x, heads, backend=backend)
    (g,) = torch.autograd.grad(out, x, grad_out)
    return [out.detach(), g]


def reference_full(qkv, grad_out, heads):
    x = qkv.detach().double().requires_grad_()
    out = attention_reference(x, heads)
    (g,) = torch.autograd.grad(out, x, grad_out.double())
    return [out.detach(), g]


def assert_close_to(got, want, dtype, names):
    for g, w, name in zip(got, want, names):
        assert g.dtype == dtype or name == "d pad_value", name
        scale = w.abs().max().item() or 1.0
        tol = 2e-5 if dtype == torch.float32 else 4e-3
        err = (g.double() - w).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} over {tol * scale:.3g} (scale {scale:.3g})"


# ---- interpreter (CI) --------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,hw,heads,head_dim,pad", [
    (1, (7, 7), 2, 32, True),    # one window, no padding: pad_value unused, its gradient zero
    (2, (8, 8), 1, 64, True),    # padded to 14 x 14: four windows per image, most tokens padding
    (1, (14, 14), 2, 32, False),  # four windows, no padding
    (1, (14, 14), 1, 64, True),
    (1, (9, 12), 2, 32, True),   # non-square, padded (3, 2) rows and (1, 1) columns
    (2, (8, 8), 1, 48, False),   # head dim not a power of two; zero padding tokens
])
def test_window_matches_reference(dtype, batch, hw, heads, head_dim, pad):
    qkv, pad_value, grad_out = window_case(batch, hw, heads, head_dim, dtype, pad)
    got = run_window(qkv, pad_value, grad_out, heads, 7, "triton")
    want = reference_window(qkv, pad_value, grad_out, heads, 7)
    assert got[0].shape == (batch, *hw, heads * head_dim) and got[0].is_contiguous()
    assert_close_to(got, want, dtype, ["out", "d qkv", "d pad_value"])


@interpreted
def test_window_fp32_pad_value_with_fp16_tokens():
    """The model's case under autocast: the qkv bias (fp32) pads fp16 tokens; its gradient is fp32."""
    qkv, pad_value, grad_out = window_case(1, (5, 9), 1, 16, torch.float16, True, pad_dtype=torch.float32)
    got = run_window(qkv, pad_value, grad_out, 1, 7, "triton")
    want = reference_window(qkv, pad_value.half(), grad_out, 1, 7)
    assert got[2].dtype == torch.float32
    assert_close_to(got, want, torch.float16, ["out", "d qkv", "d pad_value"])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,heads", [
    ((2, 49, 3 * 64), 2),     # stage 4 at 224 px, one block of queries and two of keys
    ((1, 67, 3 * 64), 1),     # N a multiple of no block
    ((1, 3, 5, 3 * 96), 3),   # tokens as a grid; head dim 32
    ((2, 1, 3 * 16), 1),      # a single token
])
def test_full_matches_reference(dtype, shape, heads):
    qkv = _randn(*shape, seed=0).to(dtype)
    grad_out = _randn(*shape[:-1], shape[-1] // 3, seed=2).to(dtype)
    got = run_full(qkv, grad_out, heads, "triton")
    want = reference_full(qkv, grad_out, heads)
    assert got[0].shape == shape[:-1] + (shape[-1] // 3,)
    assert_close_to(got, want, dtype, ["out", "d qkv"])


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


@interpreted
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the torch.library ops."""
    qkv, pad_value, _ = window_case(1, (5, 8), 1, 16, torch.float32, True)
    torch.library.opcheck(torch.ops.dinocxr.window_attention_triton,
                          (qkv.requires_grad_(), pad_value.requires_grad_(), 1, 7, 0.25))
    full = _randn(1, 20, 3 * 32, seed=3).float().requires_grad_()
    torch.library.opcheck(torch.ops.dinocxr.attention_triton, (full, 2, 0.25))


@interpreted
@pytest.mark.parametrize("call,match", [
    (lambda q: window_attention(q, 1, 7, dropout_p=0.1, backend="triton"), "dropout_p"),
    (lambda q: window_attention(q.double(), 1, 7, backend="triton"), "qkv"),
    (lambda q: window_attention(q, 1, 12, backend="triton"), "window_size"),
    (lambda q: attention(torch.zeros(1, 4, 3 * 256), 1, backend="triton"), "qkv"),
])
def test_what_the_kernels_do_not_cover_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(1, 7, 7, 3 * 16))


def test_auto_never_takes_the_interpreter_on_the_cpu():
    from dinocxr_fast.ops import _dispatch

    for table in (attn_mod.IMPLEMENTED, attn_mod.WINDOW_IMPLEMENTED):
        assert _dispatch.candidates("attention", torch.device("cpu"), table) == []
        assert "triton" in table["cuda"]


def test_full_attention_grid_over_65535_programs_is_not_launched():
    from dinocxr_fast.kernels.triton import attention as full_kernels

    qkv = torch.zeros(1, 1, 48).expand(40000, 1, 48)  # batch x heads = 80000 programs on the grid's y axis
    assert "65535" in full_kernels.supports(qkv, 2)
    assert full_kernels.supports(qkv[:30000], 2) is None


def test_config_pruning(monkeypatch):
    """Autotune candidates: tiles no longer than the sequence; DINOCXR_TRITON_CONFIG pins one."""
    import triton

    from dinocxr_fast.kernels.triton import attention as full_kernels

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in ((64, 64), (128, 64), (64, 32), (128, 128))]
    monkeypatch.delenv("DINOCXR_TRITON_CONFIG", raising=False)
    short = full_kernels._prune_for_length(configs, {"N": 49})
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short] == [(64, 64), (64, 32)]
    assert full_kernels._prune_for_length(configs, {"N": 196}) == configs
    monkeypatch.setenv("DINOCXR_TRITON_CONFIG", "5")  # taken modulo the candidates
    assert full_kernels._prune_for_length(configs, {"N": 196}) == [configs[1]]


# ---- GPU (pytest -m cuda) ------------------------------------------------------------------------------
def _gpu_errors(got, want, peer):
    return [((g.double() - w).abs().max().item(), (p.double() - w).abs().max().item(), w.abs().max().item())
            for g, w, p in zip(got, want, peer)]


def assert_as_accurate_as_sdpa(got, want, peer, names, dtype):
    """No worse than torch SDPA in the same dtype (2x its error), with a floor for exact cases."""
    floor = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for (err, peer_err, scale), name in zip(_gpu_errors(got, want, peer), names):
        assert err <= max(2 * peer_err, floor * scale), f"{name}: {err:.3g} vs SDPA {peer_err:.3g} (scale {scale:.3g})"


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# Every case compiles kernels on a fresh machine (about a second each): bf16, the training dtype,
# takes the model's shapes; fp16 and fp32 one padded / odd case each.
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,batch,hw,heads,head_dim,pad_dtype", [
    (BF16, 4, (56, 56), 1, 64, F32),   # ViTAEv2-S stage 1 at 224 px (the fp32 qkv bias pads, as under autocast)
    (BF16, 4, (28, 28), 2, 64, F32),   # stage 2
    (BF16, 4, (28, 28), 1, 128, F32),  # stage-2 reduction cell: head dim 128
    (BF16, 3, (24, 24), 2, 64, F32),   # 96-px views: 24 x 24 padded to 28 x 28
    (BF16, 1, (7, 7), 3, 48, None),
    (F16, 3, (24, 24), 2, 64, F16),
    (F32, 2, (9, 12), 2, 32, F32),
])
def test_gpu_window_matches_reference(dtype, batch, hw, heads, head_dim, pad_dtype):
    qkv, pad_value, grad_out = window_case(batch, hw, heads, head_dim, dtype, pad_dtype is not None, device="cuda",
                                           pad_dtype=pad_dtype)
    got = run_window(qkv, pad_value, grad_out, heads, 7, "triton")
    peer = run_window(qkv, pad_value, grad_out, heads, 7, "torch")
    want = reference_window(qkv, pad_value, grad_out, heads, 7)
    assert_as_accurate_as_sdpa(got, want, peer, ["out", "d qkv", "d pad_value"], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,batch,n,heads,head_dim", [
    (BF16, 8, 196, 4, 64),    # stage 3 at 224 px
    (BF16, 8, 49, 8, 64),     # stage 4
    (BF16, 8, 196, 2, 128),   # stage-3 reduction cell
    (BF16, 2, 3136, 1, 64),   # 56 x 56 tokens, full attention at high resolution
    (BF16, 2, 1, 1, 64),
    (F16, 3, 197, 4, 64),
    (F32, 3, 197, 3, 32),
])
def test_gpu_full_matches_reference(dtype, batch, n, heads, head_dim):
    qkv = _randn(batch, n, 3 * heads * head_dim, seed=0, device="cuda").to(dtype)
    grad_out = _randn(batch, n, heads * head_dim, seed=2, device="cuda").to(dtype)
    got = run_full(qkv, grad_out, heads, "triton")
    peer = run_full(qkv, grad_out, heads, "torch")
    want = reference_full(qkv, grad_out, heads)
    assert_as_accurate_as_sdpa(got, want, peer, ["out", "d qkv"], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_every_autotune_config_is_correct(monkeypatch, head_dim):
    """The other GPU tests pin config 0 (conftest); here each config of each tuned kernel runs."""
    from dinocxr_fast.kernels.triton import attention as full_kernels
    from dinocxr_fast.kernels.triton import window_attention as window_kernels

    tuners = [window_kernels._window_fwd_kernel, window_kernels._window_bwd_kernel, full_kernels._attn_fwd_kernel,
              full_kernels._attn_bwd_dkdv_kernel, full_kernels._attn_bwd_dq_kernel]
    heads = 128 // head_dim
    window = window_case(3, (24, 24), heads, head_dim, BF16, True, device="cuda", pad_dtype=F32)
    window_want = reference_window(*window, heads, 7)
    window_peer = run_window(*window, heads, 7, "torch")
    qkv = _randn(3, 197, 3 * 128, seed=0, device="cuda").to(BF16)
    grad_out = _randn(3, 197, 128, seed=2, device="cuda").to(BF16)
    full_want, full_peer = reference_full(qkv, grad_out, heads), run_full(qkv, grad_out, heads, "torch")
    try:
        for i in range(max(len(t.configs) for t in tuners)):
            monkeypatch.setenv("DINOCXR_TRITON_CONFIG", str(i))
            for tuner in tuners:
                tuner.cache.clear()  # the autotuner remembers its pick per key
            assert_as_accurate_as_sdpa(run_window(*window, heads, 7, "triton"), window_want, window_peer,
                                       [f"config {i}: out", "d qkv", "d pad_value"], BF16)
            assert_as_accurate_as_sdpa(run_full(qkv, grad_out, heads, "triton"), full_want, full_peer,
                                       [f"config {i}: out", "d qkv"], BF16)
    finally:
        for tuner in tuners:
            tuner.cache.clear()


@pytest.mark.cuda
def test_gpu_window_padding_gradient_is_deterministic():
    qkv, pad_value, grad_out = window_case(8, (24, 24), 2, 64, torch.bfloat16, True, device="cuda",
                                           pad_dtype=torch.float32)
    first = run_window(qkv, pad_value, grad_out, 2, 7, "triton")
    second = run_window(qkv, pad_value, grad_out, 2, 7, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


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
