"""ViTAEv2's parallel convolution module (PCM) as one op, on channels-last tokens.

    pcm(x, weights, biases, bn1, bn2, strides=..., groups=..., training=...)
        conv3x3-BN-SiLU -> conv3x3-BN-SiLU -> conv3x3,   x: B x H x W x C

``pcm_reference`` (three ``conv_bn_act_reference`` calls) is the specification. Backends: ``torch``
(the reference), ``cpp`` (three ``conv_bn_act`` calls on its cpp backend: the CPU has no
whole-chain kernel) and ``cuda`` (the chain in one op, ops/conv_bn_act_cuda.py). The model's
``ParallelConv`` (models/layers.py) calls it with its modules' parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch

from dinocxr_fast.ops import _dispatch as rule
from dinocxr_fast.ops import _verify
from dinocxr_fast.ops._checks import check_tensor
from dinocxr_fast.ops.conv_bn_act import (
    DTYPES, conv_bn_act_reference, cpp_or_fallback, dtype_name, positive_pair, run_conv_bn_act, validate,
    verify_bn_inputs,
)
from dinocxr_fast.ops.conv_bn_act_cuda import _out_size, _pair, _pcm_cuda, cuda_or_fallback

IMPLEMENTED = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "torch")}


def pcm_reference(
    x, weights, biases, bn1, bn2, *, strides=(1, 1, 1), groups=1, training=(False, False),
):
    """conv3x3-BN-SiLU-conv3x3-BN-SiLU-conv3x3 through ``conv_bn_act_reference`` (the specification).

    ``bn1`` / ``bn2`` are ``(weight, bias, running_mean, running_var, eps, momentum)``;
    ``training`` is one flag per BatchNorm (or one for both).
    """
    t1, t2 = _two_flags(training)
    y = x
    for i, (bn, flag) in enumerate(((bn1, t1), (bn2, t2))):
        y = conv_bn_act_reference(
            y, weights[i], biases[i], stride=strides[i], groups=groups, bn_weight=bn[0], bn_bias=bn[1],
            running_mean=bn[2], running_var=bn[3], eps=bn[4], momentum=bn[5], training=flag, activation="silu",
        )
    return conv_bn_act_reference(y, weights[2], biases[2], stride=strides[2], groups=groups)


def pcm(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    bn1: Sequence,
    bn2: Sequence,
    *,
    strides: Sequence[int] = (1, 1, 1),
    groups: int = 1,
    training: bool | Sequence[bool] = False,
    backend: str = "auto",
) -> torch.Tensor:
    """ViTAEv2's parallel convolution module on B x H x W x C tokens, as one op (see ``pcm_reference``).

    Updates the BatchNorms' running statistics in place when training, as ``nn.BatchNorm2d`` does.
    """
    if len(weights) != 3 or len(biases) != 3 or len(strides) != 3:
        raise ValueError("weights, biases and strides must have one entry per conv (3)")
    t1, t2 = _two_flags(training)
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    for i, s in enumerate(strides):
        positive_pair(f"strides[{i}]", s, 1)
    bns = []
    for name, bn in (("bn1", bn1), ("bn2", bn2)):
        if len(bn) != 6 or bn[0] is None:
            raise ValueError(f"{name} must be (weight, bias, running_mean, running_var, eps, momentum)")
        bns.append(bn)
    # Each conv is checked as conv_bn_act checks it, on a stand-in of its input's shape (one element,
    # expanded): the widths must chain.
    specs, probes, device = [], [], None
    for i in range(3):
        bn = bns[i] if i < 2 else (None,) * 4
        specs.append({"bn_weight": bn[0], "bn_bias": bn[1], "running_mean": bn[2], "running_var": bn[3]})
        if i == 0:
            probes.append(x)
        else:
            check_tensor(f"weights[{i - 1}]", weights[i - 1], ndim=4, dtypes=DTYPES)
            probes.append(x.new_empty(1).expand(*_chain_shape(x, weights, strides, i)))
        device = validate(probes[i], weights[i], biases[i], strides[i], 1, 1, groups, specs[i],
                           "silu" if i < 2 else None)
    choice = rule.choose("pcm", backend, device, IMPLEMENTED, lambda: {
        "batch": x.shape[0], "in": list(x.shape[1:]), "widths": [w.shape[0] for w in weights],
        "bias": [b is not None for b in biases], "strides": [_pair(s)[0] for s in strides], "groups": groups,
        "training": [t1, t2], "dtype": dtype_name(x)})
    if choice.backend == "cuda":
        for i, flag in enumerate((t1, t2, False)):
            choice = cuda_or_fallback(choice, probes[i], weights[i], strides[i], 1, 1, groups, specs[i], flag)
    elif choice.backend == "cpp":
        choice = cpp_or_fallback(choice, x, weights[0], biases[0], specs[0])
    if choice.backend != "torch":
        try:
            if choice.backend == "cpp":  # the CPU has no whole-chain kernel: three conv_bn_act calls, BN+SiLU fused
                return _pcm_chain(x, weights, biases, bns, strides, groups, (t1, t2), "cpp")
            return _pcm_cuda(x, weights, biases, bns, [int(s if isinstance(s, int) else s[0]) for s in strides],
                             groups, (t1, t2))
        except Exception as exc:
            if not choice.may_demote:
                raise
            rule.demote("pcm", choice.backend, exc)
    return pcm_reference(x, weights, biases, bn1, bn2, strides=strides, groups=groups, training=(t1, t2))


def _pcm_chain(x, weights, biases, bns, strides, groups, training, backend):
    """The PCM as three conv_bn_act calls on ``backend`` ("auto" lets each conv fall back); ``pcm``
    has validated every conv already, so they go straight to the dispatch."""
    y = x
    for i in range(3):
        if i < 2:
            w, b, mean, var, eps, momentum = bns[i]
            bn = {"bn_weight": w, "bn_bias": b, "running_mean": mean, "running_var": var}
            y = run_conv_bn_act(y, weights[i], biases[i], strides[i], 1, 1, groups, bn, eps, momentum, training[i], "silu",
                          backend, y.device)
        else:
            bn = {"bn_weight": None, "bn_bias": None, "running_mean": None, "running_var": None}
            y = run_conv_bn_act(y, weights[i], biases[i], strides[i], 1, 1, groups, bn, 1e-5, 0.1, False, None, backend,
                          y.device)
    return y


def _two_flags(training) -> tuple[bool, bool]:
    if isinstance(training, bool):
        return training, training
    flags = tuple(bool(t) for t in training)
    if len(flags) != 2:
        raise ValueError(f"training must be a bool or one flag per BatchNorm (2), got {training!r}")
    return flags


def _chain_shape(x, weights, strides, i):
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    for j in range(i):
        s = strides[j] if isinstance(strides[j], int) else strides[j][0]
        h, w = _out_size(h, s), _out_size(w, s)
    return b, h, w, weights[i - 1].shape[0]


# ---- verification of the custom backends (ops/_verify.py) ----------------------------------------
def _pcm_verify_inputs(case: dict, device: torch.device) -> dict:
    gen = _verify.seeded(case)
    dtype = getattr(torch, case["dtype"])
    g = case["groups"]
    x = {"case": case, "x": _verify.randn(gen, (case["batch"], *case["in"]), device, dtype)}
    c_in = case["in"][2]
    for i, (c_out, has_bias) in enumerate(zip(case["widths"], case["bias"])):
        fan_in = c_in // g * 9
        x[f"w{i}"] = _verify.randn(gen, (c_out, c_in // g, 3, 3), device, dtype, scale=fan_in ** -0.5)
        x[f"b{i}"] = _verify.randn(gen, (c_out,), device, dtype, scale=0.1) if has_bias else None
        if i < 2:
            x.update(verify_bn_inputs(gen, c_out, device, dtype, suffix=str(i)))
        c_in = c_out
    return _verify.leaves(x)


def _pcm_verify_run(backend: str, x: dict) -> list:
    c = x["case"]
    ws, bs = [x[f"w{i}"] for i in range(3)], [x[f"b{i}"] for i in range(3)]
    bns = [(x[f"bn_weight{i}"], x[f"bn_bias{i}"], x[f"running_mean{i}"], x[f"running_var{i}"], 1e-5, 0.1)
           for i in range(2)]
    kw = dict(strides=c["strides"], groups=c["groups"], training=tuple(c["training"]))
    if backend == _verify.REFERENCE:
        return _verify.forward_backward(lambda: pcm_reference(x["x"], ws, bs, *bns, **kw), x)
    return _verify.forward_backward(lambda: pcm(x["x"], ws, bs, *bns, backend=backend, **kw), x)


def _describe_pcm(c: dict) -> str:
    return (f"{c['batch']}x{'x'.join(map(str, c['in']))} ->{'->'.join(map(str, c['widths']))} g{c['groups']} "
            f"s{''.join(map(str, c['strides']))}{' train' if any(c['training']) else ''}")


VERIFY = _verify.OpSpec("pcm", IMPLEMENTED, _pcm_verify_inputs, _pcm_verify_run, _describe_pcm)
_verify.register("pcm", f"{__name__}:VERIFY")
