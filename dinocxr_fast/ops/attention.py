"""Multi-head self-attention over tokens kept as a grid, full or in non-overlapping windows.

Both entry points take the packed output of the qkv projection in the layout the model keeps its
tokens, channels last, and return the per-head outputs concatenated (before the output
projection), in the same layout::

    attention(qkv, num_heads)                    qkv: B x *tokens x 3C  ->  B x *tokens x C
    window_attention(qkv, num_heads, window)     qkv: B x H x W x 3C    ->  B x H x W x C

The last dimension of ``qkv`` is ``[q | k | v]``, each ``num_heads x head_dim`` (head-major), as
``nn.Linear(dim, 3 * C)`` produces it. Windows are ``window x window`` tokens, unshifted; a grid
that is not a multiple of the window is padded as ViTAEv2 does it: symmetrically (the odd token at
the bottom / right), before the qkv projection, with tokens that are all zero. Such a token
projects to the qkv bias, so the padded keys and values equal ``pad_value`` (the bias, or zero
when the projection has none) and take part in the softmax unmasked, exactly as in the
reference; the padded queries are discarded.

Taking ``qkv`` in the grid layout lets a fused kernel do the padding, the window gather and the
scatter back by index arithmetic; the torch backend does them with one view/permute copy each
way, never with a Python loop over windows.

``attention_reference`` / ``window_attention_reference`` are the specification (plain matmul and
softmax); the ``torch`` backend runs the same partitioning around
``F.scaled_dot_product_attention``. ``attention_probs`` returns the softmax maps themselves.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dinocxr_fast.ops import _dispatch, _verify, attention_triton
from dinocxr_fast.ops._checks import check_same_device, check_tensor

# The backends per device type; ``auto`` takes a custom one only once it is verified and timed
# faster than the vendor path (SDPA) on this device (ops/_dispatch.py), never the Triton
# interpreter on the CPU (it exists for tests).
IMPLEMENTED = {"cpu": ("torch", "triton"), "cuda": ("triton", "torch")}
WINDOW_IMPLEMENTED = {"cpu": ("torch", "triton"), "cuda": ("triton", "torch")}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# The attention core on (batch, heads, tokens, head_dim): math (the spec) and SDPA
# ----------------------------------------------------------------------------------------------
def _math_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def _math_core(q, k, v, scale: float, dropout_p: float) -> torch.Tensor:
    probs = _math_probs(q, k, scale)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _sdpa_core(q, k, v, scale: float, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------
# Layout: packed channels-last qkv <-> (3, batch', heads, tokens, head_dim)
# ----------------------------------------------------------------------------------------------
def _split_heads(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B x N x 3C -> 3 x B x heads x N x head_dim (a view)."""
    b, n, c3 = qkv.shape
    return qkv.view(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)


def window_padding(size: int, window_size: int) -> tuple[int, int]:
    """(before, after) padding of one grid side to a multiple of ``window_size``, as ViTAEv2."""
    total = (window_size - size % window_size) % window_size
    return total // 2, total - total // 2


def _pad_grid(qkv: torch.Tensor, window_size: int, pad_value: torch.Tensor | None) -> torch.Tensor:
    b, h, w, c3 = qkv.shape
    top, bottom = window_padding(h, window_size)
    left, right = window_padding(w, window_size)
    if top + bottom + left + right == 0:
        return qkv
    if pad_value is None:
        return F.pad(qkv, (0, 0, left, right, top, bottom))
    padded = pad_value.to(qkv.dtype).expand(b, h + top + bottom, w + left + right, c3).clone()
    padded[:, top:top + h, left:left + w] = qkv
    return padded


def _to_windows(qkv: torch.Tensor, num_heads: int, window_size: int) -> torch.Tensor:
    """Padded B x Hp x Wp x 3C -> 3 x (B * nH * nW) x heads x window^2 x head_dim (one copy)."""
    b, hp, wp, c3 = qkv.shape
    nh, nw, ws = hp // window_size, wp // window_size, window_size
    x = qkv.view(b, nh, ws, nw, ws, 3, num_heads, c3 // (3 * num_heads))
    x = x.permute(5, 0, 1, 3, 6, 2, 4, 7)  # 3, B, nH, nW, heads, ws, ws, hd
    return x.reshape(3, b * nh * nw, num_heads, ws * ws, -1)


def _from_windows(out: torch.Tensor, batch: int, hp: int, wp: int, window_size: int) -> torch.Tensor:
    """(B * nH * nW) x heads x window^2 x head_dim -> B x Hp x Wp x C (one copy)."""
    _, heads, _, hd = out.shape
    nh, nw, ws = hp // window_size, wp // window_size, window_size
    x = out.view(batch, nh, nw, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)  # B, nH, ws, nW, ws, heads, hd
    return x.reshape(batch, hp, wp, heads * hd)


def _window_attention_with(core: Core, qkv, num_heads, window_size, scale, pad_value, dropout_p):
    b, h, w, _ = qkv.shape
    padded = _pad_grid(qkv, window_size, pad_value)
    q, k, v = _to_windows(padded, num_heads, window_size).unbind(0)
    out = _from_windows(core(q, k, v, scale, dropout_p), b, padded.shape[1], padded.shape[2], window_size)
    top, left = window_padding(h, window_size)[0], window_padding(w, window_size)[0]
    if out.shape[1] != h or out.shape[2] != w:
        out = out[:, top:top + h, left:left + w].contiguous()
    return out


def _attention_with(core: Core, qkv, num_heads, scale, dropout_p):
    b, *tokens, c3 = qkv.shape
    q, k, v = _split_heads(qkv.reshape(b, -1, c3), num_heads).unbind(0)
    out = core(q, k, v, scale, dropout_p)  # B x heads x N x hd
    return out.transpose(1, 2).reshape(b, *tokens, c3 // 3)


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------
def attention_reference(qkv, num_heads, scale=None, dropout_p=0.0):
    """softmax(q k^T * scale) v per head over all tokens; qkv B x *tokens x 3C -> B x *tokens x C."""
    scale = _default_scale(qkv, num_heads, scale)
    return _attention_with(_math_core, qkv, num_heads, scale, dropout_p)


def window_attention_reference(qkv, num_heads, window_size, scale=None, pad_value=None, dropout_p=0.0):
    """The same inside each ``window_size``^2 window of the (padded) grid; B x H x W x 3C -> B x H x W x C."""
    scale = _default_scale(qkv, num_heads, scale)
    return _window_attention_with(_math_core, qkv, num_heads, window_size, scale, pad_value, dropout_p)


def attention_probs(qkv, num_heads, *, scale=None, window_size=None, pad_value=None):
    """The softmax maps, for pictures: B x heads x N x N (full), or for windows
    (B * nH * nW) x heads x window^2 x window^2 over the padded grid, windows in row-major order."""
    _validate(qkv, num_heads, scale, 0.0, grid=window_size is not None)
    scale = _default_scale(qkv, num_heads, scale)
    if window_size is None:
        b, c3 = qkv.shape[0], qkv.shape[-1]
        q, k, _ = _split_heads(qkv.reshape(b, -1, c3), num_heads).unbind(0)
    else:
        q, k, _ = _to_windows(_pad_grid(qkv, window_size, pad_value), num_heads, window_size).unbind(0)
    return _math_probs(q, k, scale)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def _torch_attention(qkv, num_heads, scale, dropout_p):
    return _attention_with(_sdpa_core, qkv, num_heads, scale, dropout_p)


def _torch_window_attention(qkv, num_heads, window_size, scale, pad_value, dropout_p):
    return _window_attention_with(_sdpa_core, qkv, num_heads, window_size, scale, pad_value, dropout_p)


def _triton_attention(qkv, num_heads, scale, dropout_p):
    return attention_triton.attention(qkv, num_heads, scale)


def _triton_window_attention(qkv, num_heads, window_size, scale, pad_value, dropout_p):
    return attention_triton.window_attention(qkv, num_heads, window_size, scale, pad_value)


_KERNELS = {"torch": _torch_attention, "triton": _triton_attention}
_WINDOW_KERNELS = {"torch": _torch_window_attention, "triton": _triton_window_attention}


def _unless_triton_cannot(op, choice, qkv, num_heads, window_size, dropout_p) -> _dispatch.Choice:
    """The Triton kernels cover fp16/bf16/fp32, head_dim <= 128, windows up to 11 x 11, no
    dropout and at most 65535 (batch x heads) programs per launch: outside that the vendor path
    runs, or, for ``backend="triton"`` on the call, a ValueError says why."""
    if choice.backend != "triton":
        return choice
    reason = attention_triton.why_unsupported(qkv, num_heads, window_size, dropout_p)
    return _dispatch.unless_uncovered(op, choice, reason and ("backend 'triton' cannot run this call", reason))


def _run(op, kernels, choice, args):
    """``kernels[choice]`` on ``args``; a custom backend that raises is demoted, the vendor path reruns."""
    if choice.backend != "torch":
        try:
            return kernels[choice.backend](*args)
        except Exception as exc:
            if not choice.may_demote:
                raise
            _dispatch.demote(op, choice.backend, exc)
    return kernels["torch"](*args)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _default_scale(qkv: torch.Tensor, num_heads: int, scale: float | None) -> float:
    return float(scale) if scale is not None else (qkv.shape[-1] // (3 * num_heads)) ** -0.5


def _validate(qkv, num_heads, scale, dropout_p, *, grid: bool) -> torch.device:
    check_tensor("qkv", qkv, ndim=4 if grid else None, dtypes=_DTYPES)
    if not grid and qkv.dim() < 3:
        raise ValueError(f"qkv must be B x tokens... x 3C (at least 3 dimensions), got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv's last dimension ({qkv.shape[-1]}) must be 3 * num_heads * head_dim with num_heads={num_heads}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return qkv.device


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Full multi-head self-attention; ``qkv`` B x *tokens x 3C (e.g. B x H x W x 3C) -> B x *tokens x C.

    ``scale`` defaults to head_dim ** -0.5. ``dropout_p`` drops attention weights (training only).
    """
    device = _validate(qkv, num_heads, scale, dropout_p, grid=False)
    choice = _dispatch.choose("attention", backend, device, IMPLEMENTED, lambda: {
        "batch": qkv.shape[0], "tokens": list(qkv.shape[1:-1]), "channels": qkv.shape[-1], "heads": num_heads,
        "dropout": dropout_p > 0, "dtype": _dtype_name(qkv)})
    choice = _unless_triton_cannot("attention", choice, qkv, num_heads, None, dropout_p)
    return _run("attention", _KERNELS, choice,
                (qkv, num_heads, _default_scale(qkv, num_heads, scale), float(dropout_p)))


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    *,
    scale: float | None = None,
    pad_value: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head self-attention inside non-overlapping windows; B x H x W x 3C -> B x H x W x C.

    Any H, W: the grid is padded to a multiple of ``window_size`` as the module docstring says,
    the padded keys/values holding ``pad_value`` (shape [3C]; None means zeros).
    """
    device = _validate(qkv, num_heads, scale, dropout_p, grid=True)
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    if pad_value is not None:
        check_tensor("pad_value", pad_value, ndim=1, dtypes=_DTYPES)
        check_same_device(qkv=qkv, pad_value=pad_value)
        if pad_value.shape[0] != qkv.shape[-1]:
            raise ValueError(f"pad_value must have shape [{qkv.shape[-1]}] (3C), got {tuple(pad_value.shape)}")
    choice = _dispatch.choose("window_attention", backend, device, WINDOW_IMPLEMENTED, lambda: {
        "batch": qkv.shape[0], "grid": list(qkv.shape[1:3]), "channels": qkv.shape[-1], "heads": num_heads,
        "window": window_size, "pad": pad_value is not None, "dropout": dropout_p > 0, "dtype": _dtype_name(qkv)})
    choice = _unless_triton_cannot("window_attention", choice, qkv, num_heads, window_size, dropout_p)
    return _run("window_attention", _WINDOW_KERNELS, choice,
                (qkv, num_heads, window_size, _default_scale(qkv, num_heads, scale), pad_value, float(dropout_p)))


# ----------------------------------------------------------------------------------------------
# Verification of the custom backends (ops/_verify.py)
# ----------------------------------------------------------------------------------------------
def _verify_inputs(case: dict, device: torch.device) -> dict:
    gen = _verify.seeded(case)
    dtype = getattr(torch, case["dtype"])
    shape = (case["batch"], *case.get("grid", case.get("tokens", ())), case["channels"])
    x = {"qkv": _verify.randn(gen, shape, device, dtype), "heads": case["heads"], "window": case.get("window")}
    if case.get("pad"):
        x["pad_value"] = _verify.randn(gen, (case["channels"],), device, dtype, scale=0.5, grad=False)
    return x


def _verify_run(backend: str, x: dict) -> list:
    qkv, heads, window, pad = x["qkv"], x["heads"], x["window"], x.get("pad_value")
    reference = backend == _verify.REFERENCE

    def fn():
        if window is None:
            return attention_reference(qkv, heads) if reference else attention(qkv, heads, backend=backend)
        if reference:
            return window_attention_reference(qkv, heads, window, pad_value=pad)
        return window_attention(qkv, heads, window, pad_value=pad, backend=backend)
    return _verify.forward_backward(fn, x)


VERIFY = _verify.OpSpec(
    "attention", IMPLEMENTED, _verify_inputs, _verify_run,
    lambda c: f"{c['batch']}x{'x'.join(map(str, c['tokens']))}x{c['channels']} h{c['heads']}")
WINDOW_VERIFY = _verify.OpSpec(
    "window_attention", WINDOW_IMPLEMENTED, _verify_inputs, _verify_run,
    lambda c: f"{c['batch']}x{c['grid'][0]}x{c['grid'][1]}x{c['channels']} h{c['heads']} w{c['window']}")
_verify.register("attention", f"{__name__}:VERIFY")
_verify.register("window_attention", f"{__name__}:WINDOW_VERIFY")
