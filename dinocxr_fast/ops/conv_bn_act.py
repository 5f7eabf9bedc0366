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

The ``cuda`` backend (ops/conv_bn_act_cuda.py) covers the PCM's convolutions (3x3, padding 1,
dilation 1, stride 1 or 2); the whole PCM chain as one op is ``ops.pcm`` (ops/pcm.py). Anything
the kernels do not cover falls back to the reference under ``backend="auto"`` and is a
``ValueError`` naming the argument under ``backend="cuda"``.

The ``cpp`` backend (CPU) runs the convolution through aten exactly as the reference does
(``F.conv2d`` on the channels-last NCHW view: oneDNN, ordinary autograd) and BatchNorm + activation
as one fused op (``ops.bn_act_cpu``, csrc/cpu/bn_act*.cpp): in training one read pass for the batch
statistics and one pass writing the activations (eager: statistics, normalisation, activation, each
its own pass and its own output tensor), in eval one pass; backward two passes (eager: the
activation's backward, then BatchNorm's reduction and its elementwise pass). It computes in
float32 only: under ``backend="auto"`` float16 / bfloat16 / float64 inputs, or CPU autocast, run the reference instead; under
``backend="cpp"`` they are a ``ValueError`` naming the argument. Without BatchNorm it is the
reference. ``backend="torch"`` (or ``DINOCXR_BACKEND=torch``) is always the pure reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinocxr_fast.ops import _dispatch as rule
from dinocxr_fast.ops import _verify
from dinocxr_fast.ops._checks import check_same_device, check_tensor
from dinocxr_fast.ops.bn_act_cpu import bn_act_cpu
from dinocxr_fast.ops.conv_bn_act_cuda import _conv_bn_act_cuda, _pair, compute_dtype, cuda_or_fallback

# The backends per device type; kernels add their names here and a function to _KERNELS.
# ``auto`` takes a custom one only once it is verified and timed faster than the vendor path
# (cuDNN / oneDNN) on this device at the call's shape (ops/_dispatch.py).
IMPLEMENTED = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "torch")}
ACTIVATIONS = (None, "silu", "gelu", "relu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
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
    return activate(y, activation).permute(0, 2, 3, 1).contiguous()




# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def positive_pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def validate(x, weight, bias, stride, padding, dilation, groups, bn, activation) -> torch.device:
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=4, dtypes=DTYPES)
    tensors = {"x": x, "weight": weight}
    c_out = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=DTYPES)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias must have shape [{c_out}], got {tuple(bias.shape)}")
        tensors["bias"] = bias
    positive_pair("stride", stride, 1)
    positive_pair("padding", padding, 0)
    positive_pair("dilation", dilation, 1)
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
            check_tensor(name, t, ndim=1, dtypes=DTYPES)
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
    device = validate(x, weight, bias, stride, padding, dilation, groups, bn, activation)
    return run_conv_bn_act(x, weight, bias, stride, padding, dilation, groups, bn, eps, momentum, training, activation,
                     backend, device)


def dtype_name(x: torch.Tensor) -> str:
    return str(compute_dtype(x)).removeprefix("torch.")


def _conv_case(x, weight, bias, stride, padding, dilation, groups, bn, training, activation) -> dict:
    return {"batch": x.shape[0], "in": list(x.shape[1:]), "weight": list(weight.shape), "bias": bias is not None,
            "stride": list(_pair(stride)), "padding": list(_pair(padding)), "dilation": list(_pair(dilation)),
            "groups": groups, "bn": bn["bn_weight"] is not None, "training": bool(training),
            "activation": activation, "dtype": dtype_name(x)}


def run_conv_bn_act(x, weight, bias, stride, padding, dilation, groups, bn, eps, momentum, training, activation, backend,
              device):
    """conv_bn_act after validation: pick the backend (with its fallbacks) and run it."""
    choice = rule.choose("conv_bn_act", backend, device, IMPLEMENTED, lambda: _conv_case(
        x, weight, bias, stride, padding, dilation, groups, bn, training, activation))
    if choice.backend == "cuda":
        choice = cuda_or_fallback(choice, x, weight, stride, padding, dilation, groups, bn, training)
    elif choice.backend == "cpp":
        choice = cpp_or_fallback(choice, x, weight, bias, bn)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, **bn, eps=eps, momentum=momentum,
                  training=training, activation=activation)
    if choice.backend != "torch":
        try:
            return _KERNELS[choice.backend](x, weight, bias, **kwargs)
        except Exception as exc:
            if not choice.may_demote:
                raise
            rule.demote("conv_bn_act", choice.backend, exc)
    return conv_bn_act_reference(x, weight, bias, **kwargs)




# ==============================================================================================
# cpp backend (CPU): the aten convolution, then BatchNorm + activation fused (ops/bn_act_cpu.py)
# ==============================================================================================
def _cpp_unsupported(x, weight, bias, bn) -> tuple[str, str] | None:
    """(argument, why) when the cpp backend does not cover this call, else None."""
    if torch.is_autocast_enabled("cpu"):
        return "x", (f"the cpp backend computes in float32, but CPU autocast runs the convolution in "
                     f"{torch.get_autocast_dtype('cpu')}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), *bn.items()):
        if t is not None and t.dtype != torch.float32:
            return name, f"the cpp backend computes in float32, {name} is {t.dtype}"
    return None


def cpp_or_fallback(choice, x, weight, bias, bn) -> rule.Choice:
    return rule.unless_uncovered("conv_bn_act", choice, _cpp_unsupported(x, weight, bias, bn))


def _conv_bn_act_cpp(
    x, weight, bias=None, *, stride=1, padding=1, dilation=1, groups=1,
    bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
    eps=1e-5, momentum=0.1, training=False, activation=None,
):
    """The cpp backend of ``conv_bn_act`` (float32, checked by the caller)."""
    if bn_weight is None:  # nothing to fuse: the convolution and the activation, as the reference
        return conv_bn_act_reference(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, activation=activation)
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride, padding, dilation, groups)
    b, c, h, w = y.shape
    if y.numel() == 0 or (training and b * h * w <= 1):
        # Empty, or one value per channel in training: F.batch_norm's behaviour (and error) as it is.
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        return activate(y, activation).permute(0, 2, 3, 1).contiguous()
    # B x H' x W' x C: a view when the convolution kept channels-last (it does for C > 1).
    y2d = y.permute(0, 2, 3, 1).contiguous().view(b * h * w, c)
    out = bn_act_cpu(y2d, bn_weight, bn_bias, running_mean, running_var, eps, momentum, training, activation)
    return out.view(b, h, w, c)


_KERNELS = {"torch": conv_bn_act_reference, "cuda": _conv_bn_act_cuda, "cpp": _conv_bn_act_cpp}


# ==============================================================================================
# Verification of the custom backends (ops/_verify.py)
# ==============================================================================================
def verify_bn_inputs(gen, c, device, dtype, suffix=""):
    return {f"bn_weight{suffix}": _verify.randn(gen, (c,), device, dtype, scale=0.1) + 1.0,
            f"bn_bias{suffix}": _verify.randn(gen, (c,), device, dtype, scale=0.1),
            f"running_mean{suffix}": _verify.randn(gen, (c,), device, dtype, scale=0.1, grad=False),
            f"running_var{suffix}": _verify.randn(gen, (c,), device, dtype, scale=0.1, grad=False).abs() + 1.0}


def _conv_verify_inputs(case: dict, device: torch.device) -> dict:
    gen = _verify.seeded(case)
    dtype = getattr(torch, case["dtype"])
    w = case["weight"]
    fan_in = w[1] * w[2] * w[3]
    x = {"case": case, "x": _verify.randn(gen, (case["batch"], *case["in"]), device, dtype),
         "weight": _verify.randn(gen, w, device, dtype, scale=fan_in ** -0.5),
         "bias": _verify.randn(gen, (w[0],), device, dtype, scale=0.1) if case["bias"] else None}
    if case["bn"]:
        x.update(verify_bn_inputs(gen, w[0], device, dtype))
    return _verify.leaves(x)


def _conv_verify_run(backend: str, x: dict) -> list:
    c = x["case"]
    kw = dict(stride=tuple(c["stride"]), padding=tuple(c["padding"]), dilation=tuple(c["dilation"]),
              groups=c["groups"], training=c["training"], activation=c["activation"],
              **{k: x.get(k) for k in ("bn_weight", "bn_bias", "running_mean", "running_var")})
    if backend == _verify.REFERENCE:
        return _verify.forward_backward(lambda: conv_bn_act_reference(x["x"], x["weight"], x["bias"], **kw), x)
    return _verify.forward_backward(lambda: conv_bn_act(x["x"], x["weight"], x["bias"], backend=backend, **kw), x)


def _describe_conv(c: dict) -> str:
    w = c["weight"]
    what = "+bn" if c["bn"] else ""
    what += f"+{c['activation']}" if c["activation"] else ""
    return (f"{c['batch']}x{'x'.join(map(str, c['in']))} {w[2]}x{w[3]}->{w[0]} g{c['groups']} s{c['stride'][0]}"
            f"{' d' + str(c['dilation'][0]) if c['dilation'][0] > 1 else ''}{what}{' train' if c['training'] else ''}")


VERIFY = _verify.OpSpec("conv_bn_act", IMPLEMENTED, _conv_verify_inputs, _conv_verify_run, _describe_conv,
                        is_vendor=lambda backend, case: backend == "cpp" and not case["bn"])  # cpp: BN is all it fuses
_verify.register("conv_bn_act", f"{__name__}:VERIFY")
