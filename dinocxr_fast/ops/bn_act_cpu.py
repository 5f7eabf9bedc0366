"""BatchNorm + activation fused on the CPU: the tail of ``conv_bn_act``'s ``cpp`` backend.

    bn_act_cpu(y, bn_weight, bn_bias, running_mean, running_var, eps, momentum, training, activation)

``y`` is the convolution's output as a contiguous fp32 ``[M, C]`` matrix (M = B * H' * W', channels
last: ``conv(x).permute(0, 2, 3, 1)`` of a channels-last convolution, no copy). The result is
``act(BN(y))`` with the semantics of ``F.batch_norm`` followed by the activation; the kernels are
csrc/cpu/bn_act*.cpp (AVX2 + FMA with a portable fallback, OpenMP over rows):

- training forward: per-channel mean and biased variance in one read pass (fp32 sums of y minus a
  per-channel sample within blocks of rows, fp64 across blocks), then one pass writing
  ``act(gamma * (y - mean) * invstd + beta)``; the running statistics are updated as torch does
  (momentum, unbiased variance for ``running_var``);
- eval forward: the running statistics as a per-channel affine map, one pass;
- backward: ``z`` is recomputed from the saved ``y`` (the normalised values are never stored),
  ``dz = dout * act'(z)``; training: one pass for the per-channel sums of ``dz`` and ``dz * xhat``
  that also writes ``dz`` into the buffer of ``dy``, one pass turning it into
  ``dy = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat))`` in place (cheaper here than
  computing ``act'(z)`` a second time); eval: one pass for all of it.

Per-channel sums are reduced in thread order: results are deterministic for a given thread count.
One autograd entry (a ``torch.library`` op with ``register_autograd``); the backward is an op too.
"""
from __future__ import annotations

import torch

from dinocxr_fast import _ext
from dinocxr_fast.ops import _dispatch
from dinocxr_fast.ops._batchnorm import update_running_stats

ACT_CODE = {None: 0, "silu": 1, "gelu": 2, "relu": 3}


# The two ops are defined and given their CPU kernels in C++ (registered in csrc/bindings.cpp with
# TORCH_LIBRARY_FRAGMENT, implemented in csrc/cpu/bn_act_op.cpp), so a call reaches the kernel without
# a Python layer; their fake kernels and the autograd formula are registered here.
#   dinocxr::bn_act_cpu(y, bn_weight, bn_bias, running_mean, running_var, eps, momentum, training,
#       activation) -> (out [M, C], stats [3, C] = mean hi, mean lo, invstd,
#                       new running mean / var [2, C], or [0, C] in eval)
#   dinocxr::bn_act_cpu_backward(grad, y, bn_weight, bn_bias, stats, training, activation,
#       need_input_grad) -> (dy [M, C] or empty, dgamma [C], dbeta [C])
def _fake_forward(y, bn_weight, bn_bias, running_mean, running_var, eps, momentum, training, activation):
    c = y.shape[1]
    return torch.empty_like(y), y.new_empty((3, c)), y.new_empty((2 if training else 0, c))


def _fake_backward(grad, y, bn_weight, bn_bias, stats, training, activation, need_input_grad):
    c = y.shape[1]
    return (torch.empty_like(y) if need_input_grad else y.new_empty(0)), y.new_empty(c), y.new_empty(c)


def _setup_context(ctx, inputs, output):
    y, bn_weight, bn_bias, _, _, _, _, training, activation = inputs
    ctx.save_for_backward(y, bn_weight, bn_bias, output[1])
    ctx.config = (training, activation)


def _backward(ctx, grad, _grad_stats, _grad_running):
    y, bn_weight, bn_bias, stats = ctx.saved_tensors
    training, activation = ctx.config
    need = ctx.needs_input_grad
    with _dispatch.backward_of(("conv_bn_act", "pcm"), "cpp"):  # the cpp backend of both runs this
        dy, dgamma, dbeta = _bn_act_backward_op(grad.contiguous(), y, bn_weight, bn_bias, stats, training,
                                                activation, need[0])
    return (dy if need[0] else None, dgamma if need[1] else None, dbeta if need[2] else None) + (None,) * 6


_bn_act_op = _bn_act_backward_op = None
if _ext.has_cpp():  # loading the extension defines the ops
    _bn_act_op = torch.ops.dinocxr.bn_act_cpu.default
    _bn_act_backward_op = torch.ops.dinocxr.bn_act_cpu_backward.default
    torch.library.register_fake("dinocxr::bn_act_cpu", _fake_forward)
    torch.library.register_fake("dinocxr::bn_act_cpu_backward", _fake_backward)
    torch.library.register_autograd("dinocxr::bn_act_cpu", _backward, setup_context=_setup_context)


def bn_act_cpu(
    y: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-5,
    momentum: float = 0.1,
    training: bool = False,
    activation: str | None = None,
) -> torch.Tensor:
    """act(F.batch_norm(y)) for a contiguous fp32 CPU matrix ``y`` [M, C], channels last.

    Updates ``running_mean`` / ``running_var`` in place when ``training``. The caller checks dtypes
    and shapes (``conv_bn_act`` does); the extension rejects anything else with a ValueError.
    """
    if _bn_act_op is None:
        _ext.require()  # raises, naming why the extension is missing
    out, _, running = _bn_act_op(
        y, bn_weight.contiguous(), bn_bias.contiguous(), running_mean.detach().contiguous(),
        running_var.detach().contiguous(), float(eps), float(momentum), bool(training), ACT_CODE[activation],
    )
    if training:
        update_running_stats(running_mean, running_var, running[0], running[1])
    return out
