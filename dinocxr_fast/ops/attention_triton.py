"""The ``triton`` backend of ``ops.attention`` / ``ops.window_attention``: one torch.library custom
op per entry point, with its autograd, around the kernels in ``ops/triton``.

Dispatch stays in ``dinocxr_fast/ops/attention.py``; this module only exists so that the Triton
path is one op to ``torch.compile`` and export, and so that importing the attention op does not
import Triton. The kernels save nothing for the backward but the inputs (window attention
recomputes its 49 x 49 softmax) or the output and the log-sum-exp per query (full attention).
"""
from __future__ import annotations

import torch

from dinocxr_fast.ops import _dispatch

# ops/triton is imported on first use (Triton is optional, and it reads TRITON_INTERPRET
# when a kernel module is imported).


def _window_kernels():
    from dinocxr_fast.ops.triton import window_attention  # noqa: PLC0415

    return window_attention


def _full_kernels():
    from dinocxr_fast.ops.triton import attention  # noqa: PLC0415

    return attention


def why_unsupported(qkv: torch.Tensor, num_heads: int, window_size: int | None, dropout_p: float) -> str | None:
    """None when the Triton kernels compute this call, else the reason (the op then raises when
    ``triton`` was asked for by name and takes the next backend on ``auto``)."""
    if dropout_p > 0:
        return f"dropout_p={dropout_p}: the Triton attention kernels have no attention dropout"
    if window_size is None:
        return _full_kernels().supports(qkv, num_heads)
    return _window_kernels().supports(qkv, num_heads, window_size)


# ---- window attention ---------------------------------------------------------------------------
@torch.library.custom_op("dinocxr::window_attention_triton", mutates_args=())
def _window_op(qkv: torch.Tensor, pad_value: torch.Tensor | None, num_heads: int, window_size: int,
               scale: float) -> torch.Tensor:
    return _window_kernels().window_attention_fwd(qkv, pad_value, num_heads, window_size, scale)


@_window_op.register_fake
def _(qkv, pad_value, num_heads, window_size, scale):
    return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)


@torch.library.custom_op("dinocxr::window_attention_triton_bwd", mutates_args=())
def _window_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, pad_value: torch.Tensor | None, num_heads: int,
                   window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _window_kernels().window_attention_bwd(grad_out, qkv, pad_value, num_heads, window_size, scale)


@_window_bwd_op.register_fake
def _(grad_out, qkv, pad_value, num_heads, window_size, scale):
    dpad = torch.empty_like(pad_value) if pad_value is not None else qkv.new_empty(0)
    return torch.empty_like(qkv), dpad


def _window_setup(ctx, inputs, output):
    qkv, pad_value, num_heads, window_size, scale = inputs
    ctx.save_for_backward(qkv, pad_value)
    ctx.args = (num_heads, window_size, scale)


def _window_backward(ctx, grad_out):
    qkv, pad_value = ctx.saved_tensors
    with _dispatch.backward_of("window_attention", "triton"):
        dqkv, dpad = _window_bwd_op(grad_out, qkv, pad_value, *ctx.args)
    return dqkv, (dpad if pad_value is not None else None), None, None, None


_window_op.register_autograd(_window_backward, setup_context=_window_setup)


def window_attention(qkv, num_heads, window_size, scale, pad_value):
    """B x H x W x 3C -> B x H x W x C (see ``ops.window_attention``)."""
    return _window_op(qkv, pad_value, num_heads, window_size, float(scale))


# ---- full attention -----------------------------------------------------------------------------
@torch.library.custom_op("dinocxr::attention_triton", mutates_args=())
def _full_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B x N x 3C -> (B x N x C, fp32 log-sum-exp [B * heads, N] for the backward)."""
    return _full_kernels().attention_fwd(qkv, num_heads, scale)


@_full_op.register_fake
def _(qkv, num_heads, scale):
    b, n, c3 = qkv.shape
    return qkv.new_empty(b, n, c3 // 3), qkv.new_empty(b * num_heads, n, dtype=torch.float32)


@torch.library.custom_op("dinocxr::attention_triton_bwd", mutates_args=())
def _full_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int,
                 scale: float) -> torch.Tensor:
    return _full_kernels().attention_bwd(grad_out, qkv, out, lse, num_heads, scale)


@_full_bwd_op.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv)


def _full_setup(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, scale)


def _full_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    with _dispatch.backward_of("attention", "triton"):
        return _full_bwd_op(grad_out, qkv, out, lse, *ctx.args), None, None


_full_op.register_autograd(_full_backward, setup_context=_full_setup)


def attention(qkv, num_heads, scale):
    """B x *tokens x 3C -> B x *tokens x C (see ``ops.attention``)."""
    b, *tokens, c3 = qkv.shape
    out, _ = _full_op(qkv.reshape(b, -1, c3), num_heads, float(scale))
    return out.reshape(b, *tokens, c3 // 3)
