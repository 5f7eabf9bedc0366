"""ops.attention / ops.window_attention: the reference against a naive per-window oracle, and
every backend against the reference, forward and backward."""
from __future__ import annotations

import importlib

import pytest
import torch

from dinocxr_fast.ops.attention import (
    attention,
    attention_probs,
    attention_reference,
    window_attention,
    window_attention_reference,
    window_padding,
)

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


def test_window_padding_is_symmetric_with_the_odd_token_last():
    assert window_padding(14, 7) == (0, 0)
    assert window_padding(16, 7) == (2, 3)
    assert window_padding(8, 7) == (3, 3)
    assert window_padding(1, 7) == (3, 3)


@pytest.mark.parametrize("hw", [(7, 14), (9, 10), (16, 16), (3, 5)])
@pytest.mark.parametrize("with_pad_value", [False, True])
def test_window_reference_matches_naive_windows(hw, with_pad_value):
    heads, hd, ws = 2, 4, 7
    qkv = _qkv(2, *hw, 3 * heads * hd)
    pad = _qkv(3 * heads * hd, seed=1) if with_pad_value else None
    got = window_attention_reference(qkv, heads, ws, pad_value=pad)
    want = _naive_window_attention(qkv, heads, ws, hd ** -0.5, pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_reference_matches_textbook_attention():
    heads, hd = 3, 5
    qkv = _qkv(2, 4, 6, 3 * heads * hd)
    x = qkv.reshape(2, 24, 3, heads, hd).permute(2, 0, 3, 1, 4)
    want = torch.softmax(x[0] @ x[1].transpose(-1, -2) / hd ** 0.5, -1) @ x[2]
    want = want.transpose(1, 2).reshape(2, 4, 6, heads * hd)
    torch.testing.assert_close(attention_reference(qkv, heads), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("hw", [(14, 14), (9, 12)])
def test_window_backend_matches_reference_forward_and_backward(backend, hw):
    heads, hd, ws = 2, 8, 7
    qkv = _qkv(2, *hw, 3 * heads * hd, dtype=torch.float32).requires_grad_()
    pad = _qkv(3 * heads * hd, seed=3, dtype=torch.float32).requires_grad_()
    grad_out = _qkv(2, *hw, heads * hd, seed=2, dtype=torch.float32)

    out = window_attention(qkv, heads, ws, pad_value=pad, backend=backend)
    g_qkv, g_pad = torch.autograd.grad(out, (qkv, pad), grad_out, materialize_grads=True)
    ref = window_attention_reference(qkv, heads, ws, pad_value=pad)
    r_qkv, r_pad = torch.autograd.grad(ref, (qkv, pad), grad_out, materialize_grads=True)

    assert out.shape == (2, *hw, heads * hd) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_qkv, r_qkv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_pad, r_pad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 10, 48), (2, 3, 4, 48)])
def test_full_backend_matches_reference_forward_and_backward(shape):
    heads = 4
    qkv = _qkv(*shape, dtype=torch.float32).requires_grad_()
    out = attention(qkv, heads, scale=0.3)
    ref = attention_reference(qkv, heads, scale=0.3)
    grad_out = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad_out)
    (r,) = torch.autograd.grad(ref, qkv, grad_out)
    assert out.shape == shape[:-1] + (16,)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_probs_are_the_maps_the_output_is_made_of():
    heads, hd = 2, 4
    qkv = _qkv(1, 3, 5, 3 * heads * hd)
    probs = attention_probs(qkv, heads)
    assert probs.shape == (1, heads, 15, 15)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, heads, 15, dtype=qkv.dtype))
    v = qkv.reshape(1, 15, 3, heads, hd)[:, :, 2].transpose(1, 2)
    out = (probs @ v).transpose(1, 2).reshape(1, 3, 5, heads * hd)
    torch.testing.assert_close(out, attention_reference(qkv, heads))

    windows = attention_probs(qkv, heads, window_size=7)  # 3 x 5 grid pads to one 7 x 7 window
    assert windows.shape == (1, heads, 49, 49)


def test_low_precision_runs_close_to_fp32():
    qkv = _qkv(2, 9, 9, 3 * 2 * 16, dtype=torch.float32)
    ref = window_attention_reference(qkv, 2, 7)
    out = window_attention(qkv.bfloat16(), 2, 7)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_dropout_only_perturbs_when_asked():
    qkv = _qkv(2, 7, 7, 3 * 8, dtype=torch.float32)
    torch.testing.assert_close(window_attention(qkv, 1, 7, dropout_p=0.0), window_attention_reference(qkv, 1, 7))
    torch.manual_seed(0)
    dropped = window_attention(qkv, 1, 7, dropout_p=0.5)
    assert not torch.allclose(dropped, window_attention_reference(qkv, 1, 7))


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
        (lambda q: attention(q[0, 0], 2), "qkv"),
        (lambda q: attention("not a tensor", 2), "qkv"),
        (lambda q: attention(q, 2, backend="fastest"), "backend"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    qkv = torch.randn(1, 4, 4, 24)
    with pytest.raises(ValueError, match=match):
        call(qkv)


def test_unimplemented_backend_falls_through_to_auto_with_a_warning():
    qkv = torch.randn(1, 7, 7, 24)
    with pytest.warns(RuntimeWarning, match="no 'cuda' backend"):
        got = window_attention(qkv, 2, 7, backend="cuda")
    torch.testing.assert_close(got, window_attention_reference(qkv, 2, 7))


def test_backends_register_by_name_only():
    # The contract later kernels rely on: IMPLEMENTED lists names, _KERNELS maps them.
    for table, kernels in ((attn_mod.IMPLEMENTED, attn_mod._KERNELS),
                           (attn_mod.WINDOW_IMPLEMENTED, attn_mod._WINDOW_KERNELS)):
        for names in table.values():
            assert set(names) <= set(kernels)


@pytest.mark.cuda
def test_cuda_matches_reference():
    qkv = torch.randn(4, 28, 28, 3 * 128, device="cuda")
    ref = window_attention_reference(qkv.double(), 2, 7, pad_value=None).float()
    torch.testing.assert_close(window_attention(qkv, 2, 7), ref, rtol=1e-3, atol=1e-3)
    out = window_attention(qkv.bfloat16(), 2, 7)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    full = qkv[:, :7, :7]
    torch.testing.assert_close(attention(full, 2), attention_reference(full.double(), 2).float(), rtol=1e-3, atol=1e-3)
