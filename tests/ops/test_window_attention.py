"""ops.window_attention: the reference against a naive per-window oracle; every backend against the
reference, forward and backward; bad input; the dispatch.

Backends: ``torch`` (SDPA) and ``auto`` on the CPU, ``triton`` in the interpreter (without a GPU) and
on a GPU (``pytest -m cuda``). The CPU takes small grids in fp32 and fp16: 7x7 (one window, pad_value
unused), 8x8 (padded to 14x14, most tokens padding), 14x14, 9x12 (padded (3, 2) rows and (1, 1)
columns), head dims 8 to 64, the padded keys holding ``pad_value`` (and its gradient) or zeros. The
GPU takes ViTAEv2-S's grids and head dims in bf16, and holds the kernels to the accuracy of SDPA in
the same dtype.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from dinocxr_fast.ops.attention import window_attention, window_attention_reference, window_padding
from op_helpers import (
    assert_attention_accurate,
    assert_backend_table,
    backend_cases,
    backends,
    interpreted,
    reference_window,
    run_window,
    window_case,
)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
NAMES = ["out", "d qkv", "d pad_value"]
# The package exports the function under the module's name; fetch the module itself.
attn_mod = importlib.import_module("dinocxr_fast.ops.attention")


def _naive_window_attention(qkv, num_heads, ws, scale, pad_value):
    """Independent oracle: build the padded grid explicitly and loop over the windows."""
    b, h, w, c3 = qkv.shape
    c, hd = c3 // 3, c3 // 3 // num_heads
    top, bottom = window_padding(h, ws)
    left, right = window_padding(w, ws)
    hp, wp = h + top + bottom, w + left + right
    grid = torch.zeros(b, hp, wp, c3, dtype=qkv.dtype)
    if pad_value is not None:
        grid[:] = pad_value
    grid[:, top:top + h, left:left + w] = qkv
    out = torch.zeros(b, hp, wp, c, dtype=qkv.dtype)
    for i in range(0, hp, ws):
        for j in range(0, wp, ws):
            win = grid[:, i:i + ws, j:j + ws].reshape(b, ws * ws, 3, num_heads, hd)
            q, k, v = (win[:, :, n].transpose(1, 2) for n in range(3))  # b, heads, N, hd
            probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
            out[:, i:i + ws, j:j + ws] = (probs @ v).transpose(1, 2).reshape(b, ws, ws, c)
    return out[:, top:top + h, left:left + w]


def _qkv(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- the reference -----------------------------------------------------------------------------------
def test_window_padding_is_symmetric_with_the_odd_token_last():
    assert window_padding(14, 7) == (0, 0)
    assert window_padding(16, 7) == (2, 3)
    assert window_padding(8, 7) == (3, 3)
    assert window_padding(1, 7) == (3, 3)


@pytest.mark.parametrize("hw", [(7, 14), (9, 10), (16, 16), (3, 5)])
@pytest.mark.parametrize("with_pad_value", [False, True])
def test_reference_matches_naive_windows(hw, with_pad_value):
    heads, hd, ws = 2, 4, 7
    qkv = _qkv(2, *hw, 3 * heads * hd)
    pad = _qkv(3 * heads * hd, seed=1) if with_pad_value else None
    got = window_attention_reference(qkv, heads, ws, pad_value=pad)
    want = _naive_window_attention(qkv, heads, ws, hd ** -0.5, pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- every backend against the reference, forward and backward -----------------------------------------
CPU_CASES = [  # (dtype, batch, grid, heads, head_dim, pad_value's dtype or None for zero padding)
    *((dtype, *case, dtype if pad else None) for dtype in (F32, F16) for *case, pad in [
        (1, (7, 7), 2, 32, True),    # one window, no padding: pad_value unused, its gradient zero
        (2, (8, 8), 1, 64, True),    # padded to 14 x 14: four windows per image, most tokens padding
        (1, (14, 14), 2, 32, False),  # four windows, no padding
        (1, (14, 14), 1, 64, True),
        (1, (9, 12), 2, 32, True),   # non-square, padded (3, 2) rows and (1, 1) columns
        (2, (8, 8), 1, 48, False),   # head dim not a power of two; zero padding tokens
    ]),
    (F32, 2, (14, 14), 2, 8, F32),
    (F32, 2, (9, 12), 2, 8, F32),
]
# Every case compiles kernels on a fresh machine (about a second each): bf16, the training dtype,
# takes the model's shapes; fp16 and fp32 one padded / odd case each.
GPU_CASES = [
    (BF16, 4, (56, 56), 1, 64, F32),   # ViTAEv2-S stage 1 at 224 px (the fp32 qkv bias pads, as under autocast)
    (BF16, 4, (28, 28), 2, 64, F32),   # stage 2
    (BF16, 4, (28, 28), 1, 128, F32),  # stage-2 reduction cell: head dim 128
    (BF16, 3, (24, 24), 2, 64, F32),   # 96-px views: 24 x 24 padded to 28 x 28
    (BF16, 1, (7, 7), 3, 48, None),
    (F16, 3, (24, 24), 2, 64, F16),
    (F32, 2, (9, 12), 2, 32, F32),
]


@pytest.mark.parametrize("backend, dtype, batch, hw, heads, head_dim, pad_dtype", backend_cases({
    ("torch", "auto", "triton-interpreter"): CPU_CASES,
    "triton-cuda": GPU_CASES,
}))
def test_matches_reference(backend, dtype, batch, hw, heads, head_dim, pad_dtype):
    case = window_case(batch, hw, heads, head_dim, dtype, pad_dtype is not None, device=backend.device,
                       pad_dtype=pad_dtype)
    got = run_window(*case, heads, 7, backend.name)
    want = reference_window(*case, heads, 7)
    peer = run_window(*case, heads, 7, "torch") if backend.on_gpu else None
    assert got[0].shape == (batch, *hw, heads * head_dim) and got[0].is_contiguous()
    assert_attention_accurate(got, want, dtype, NAMES, peer)


@pytest.mark.parametrize("backend", backends("torch", "triton-interpreter"))
def test_fp32_pad_value_with_fp16_tokens(backend):
    """The model's case under autocast: the qkv bias (fp32) pads fp16 tokens; its gradient is fp32."""
    qkv, pad_value, grad_out = window_case(1, (5, 9), 1, 16, F16, True, pad_dtype=F32)
    got = run_window(qkv, pad_value, grad_out, 1, 7, backend.name)
    want = reference_window(qkv, pad_value.half(), grad_out, 1, 7)
    assert got[2].dtype == F32
    assert_attention_accurate(got, want, F16, NAMES)


def test_low_precision_runs_close_to_fp32():
    qkv = _qkv(2, 9, 9, 3 * 2 * 16, dtype=F32)
    ref = window_attention_reference(qkv, 2, 7)
    out = window_attention(qkv.bfloat16(), 2, 7)
    assert out.dtype == BF16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_dropout_only_perturbs_when_asked():
    qkv = _qkv(2, 7, 7, 3 * 8, dtype=F32)
    torch.testing.assert_close(window_attention(qkv, 1, 7, dropout_p=0.0), window_attention_reference(qkv, 1, 7))
    torch.manual_seed(0)
    dropped = window_attention(qkv, 1, 7, dropout_p=0.5)
    assert not torch.allclose(dropped, window_attention_reference(qkv, 1, 7))


@pytest.mark.parametrize("backend", backends("triton-cuda"))
def test_padding_gradient_is_deterministic(backend):
    case = window_case(8, (24, 24), 2, 64, BF16, True, device=backend.device, pad_dtype=F32)
    first = run_window(*case, 2, 7, backend.name)
    second = run_window(*case, 2, 7, backend.name)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends("auto-cuda"))
def test_auto_on_gpu_matches_reference(backend):
    qkv = torch.randn(4, 28, 28, 3 * 128, device=backend.device)
    ref = window_attention_reference(qkv.double(), 2, 7, pad_value=None).float()
    torch.testing.assert_close(window_attention(qkv, 2, 7), ref, rtol=1e-3, atol=1e-3)
    out = window_attention(qkv.bfloat16(), 2, 7)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@interpreted
def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the torch.library op."""
    qkv, pad_value, _ = window_case(1, (5, 8), 1, 16, F32, True)
    torch.library.opcheck(torch.ops.dinocxr.window_attention_triton,
                          (qkv.requires_grad_(), pad_value.requires_grad_(), 1, 7, 0.25))


# ---- bad input: a ValueError naming the argument -------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: window_attention(q[0], 2, 7), "qkv"),  # 3-D, the grid op wants 4-D
        (lambda q: window_attention(q, 0, 7), "num_heads"),
        (lambda q: window_attention(q, 5, 7), "qkv's last dimension"),
        (lambda q: window_attention(q, 2, 0), "window_size"),
        (lambda q: window_attention(q, 2, 7, pad_value=torch.zeros(5)), "pad_value"),
        (lambda q: window_attention(q, 2, 7, scale=-1.0), "scale"),
        (lambda q: window_attention(q, 2, 7, dropout_p=1.0), "dropout_p"),
        (lambda q: window_attention(q.long(), 2, 7), "qkv"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    qkv = torch.randn(1, 4, 4, 24)
    with pytest.raises(ValueError, match=match):
        call(qkv)


@interpreted
@pytest.mark.parametrize("call,match", [
    (lambda q: window_attention(q, 1, 7, dropout_p=0.1, backend="triton"), "dropout_p"),
    (lambda q: window_attention(q.double(), 1, 7, backend="triton"), "qkv"),
    (lambda q: window_attention(q, 1, 12, backend="triton"), "window_size"),
])
def test_what_triton_does_not_cover_is_a_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(1, 7, 7, 3 * 16))


# ---- which backend runs ----------------------------------------------------------------------------------
def test_unimplemented_backend_falls_through_to_auto_with_a_warning():
    qkv = torch.randn(1, 7, 7, 24)
    with pytest.warns(RuntimeWarning, match="no 'cuda' backend"):
        got = window_attention(qkv, 2, 7, backend="cuda")
    torch.testing.assert_close(got, window_attention_reference(qkv, 2, 7))


def test_backends_register_by_name_only_and_auto_never_takes_the_interpreter():
    assert_backend_table("window_attention", attn_mod.WINDOW_IMPLEMENTED, attn_mod._WINDOW_KERNELS, cpu_candidates=[])
    assert "triton" in attn_mod.WINDOW_IMPLEMENTED["cuda"]
