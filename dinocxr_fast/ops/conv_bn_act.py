"""Convolution, then optional BatchNorm, then optional activation, on channels-last tokens.

    conv_bn_act(x, weight, bias, ...)    x: B x H x W x Cin  ->  B x H' x W' x Cout

ViTAEv2's parallel convolution module (PCM) is conv3x3 -> BN -> SiLU -> conv3x3 -> BN -> SiLU ->
conv3x3 and its pyramid reduction module is dilated conv -> GELU; the model runs every one of
those stages through this op. Tokens stay B x H x W x C between cells, so the convolution sees an
NCHW view with channels-last strides and returns channels-last: no permute copies.

BatchNorm is applied when ``bn_weight`` is given (then ``bn_bias``, ``running_mean`` and
``running_var`` are required). With ``training=True`` it normalises with the batch statistics and
updates the running ones in place (momentum as ``nn.BatchNorm2d``), as ``F.batch_norm`` does; in
eval it uses the running statistics, which a fused kernel can fold into the convolution.

``conv_bn_act_reference`` is the specification; the ``torch`` backend is that reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinocxr_fast.ops import _backend
from dinocxr_fast.ops._checks import check_same_device, check_tensor

# Fastest first, per device type; kernels add their names here and a function to _KERNELS.
IMPLEMENTED = {"cpu": ("torch",), "cuda": ("torch",)}
ACTIVATIONS = (None, "silu", "gelu", "relu")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "relu":
        return F.relu(x)
    return x


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------
def conv_bn_act_reference(
    x, weight, bias=None, *, stride=1, padding=1, dilation=1, groups=1,
    bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
    eps=1e-5, momentum=0.1, training=False, activation=None,
):
    """F.conv2d -> F.batch_norm -> activation on the NCHW view of a B x H x W x C tensor."""
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride, padding, dilation, groups)
    if bn_weight is not None:
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    # Back to B x H' x W' x C: free when the convolution kept channels-last (it does for C > 1).
    return _activate(y, activation).permute(0, 2, 3, 1).contiguous()


_KERNELS = {"torch": conv_bn_act_reference}


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _positive_pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _validate(x, weight, bias, stride, padding, dilation, groups, bn, activation) -> torch.device:
    check_tensor("x", x, ndim=4, dtypes=_DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=_DTYPES)
    tensors = {"x": x, "weight": weight}
    c_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=_DTYPES)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias must have shape [{c_out}], got {tuple(bias.shape)}")
        tensors["bias"] = bias
    _positive_pair("stride", stride, 1)
    _positive_pair("padding", padding, 0)
    _positive_pair("dilation", dilation, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if c_out % groups:
        raise ValueError(f"weight has {c_out} output channels, not a multiple of groups={groups}")
    if x.shape[-1] != weight.shape[1] * groups:
        raise ValueError(
            f"x has {x.shape[-1]} channels (last dimension, B x H x W x C) but weight expects "
            f"{weight.shape[1]} per group x groups={groups}"
        )
    if bn["bn_weight"] is not None:
        for name, t in bn.items():
            if t is None:
                raise ValueError(f"{name} is required when bn_weight is given")
            check_tensor(name, t, ndim=1, dtypes=_DTYPES)
            if t.shape[0] != c_out:
                raise ValueError(f"{name} must have shape [{c_out}], got {tuple(t.shape)}")
            tensors[name] = t
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return check_same_device(**tensors)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
    momentum: float = 0.1,
    training: bool = False,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """act(BN(conv(x))) with ``x`` and the result B x H x W x C (channels last)."""
    bn = {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean, "running_var": running_var}
    device = _validate(x, weight, bias, stride, padding, dilation, groups, bn, activation)
    chosen = _backend.resolve("conv_bn_act", backend, device, IMPLEMENTED)
    return _KERNELS[chosen](
        x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups, **bn,
        eps=eps, momentum=momentum, training=training, activation=activation,
    )
