"""The cuda backend of conv_bn_act / pcm without a GPU: everything except the kernels themselves.

``KernelEmulation`` (cuda_emulation.py: the kernels' semantics in float64 PyTorch) is swapped in
for the extension, so the real orchestration of ops/conv_bn_act_cuda.py runs on the CPU: tap lists
and parity plans of the data gradient, weight layouts, BatchNorm statistics and backward
coefficients, the chain's prologue / epilogue fusion and recomputation, the torch.library ops and
their autograd, running-stat updates. Each is compared with the reference (``conv_bn_act_reference``
/ ``pcm_reference``) in float64. The kernels themselves are compared with the emulation on a GPU
(test_cuda_conv3x3_kernels.py) and emulated on the CPU (test_cuda_emulated_kernels.py); the ops'
contracts, the cuda backend's included, are in tests/ops/.
"""
from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from cuda_emulation import KernelEmulation
from op_helpers import conv_bn_modules, conv_call, pcm_call, pcm_modules

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")


@pytest.fixture
def emulation(monkeypatch):
    emu = KernelEmulation()
    monkeypatch.setattr(cuda_mod, "_PROVIDER", emu)
    return emu


# ---- planning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, stride", [(7, 7, 1), (5, 8, 2), (1, 3, 2), (2, 2, 2), (9, 4, 2)])
def test_dgrad_plans_write_every_input_position_exactly_once(h, w, stride):
    seen = torch.zeros(h, w, dtype=torch.int64)
    for plan in cuda_mod._dgrad_plans(1, h, w, 4, 4, 1, stride):
        _, oh, ow, _, out_h, out_w, _, gh, gw, s_in, s_out, oy0, ox0, _ = plan.geom
        assert (out_h, out_w) == (h, w) and (oh, ow) == (cuda_mod._out_size(h, stride), cuda_mod._out_size(w, stride))
        assert s_in == 1 and s_out == stride
        seen[oy0::s_out, ox0::s_out][:gh, :gw] += 1
        assert len(plan.tap_dy) == len(range(plan.kh0, 3, plan.step)) * len(range(plan.kw0, 3, plan.step))
    assert bool((seen == 1).all())


@pytest.mark.parametrize("groups, stride", [(1, 1), (1, 2), (4, 1), (4, 2)])
def test_tap_convolutions_reproduce_conv2d_and_its_input_gradient(emulation, groups, stride):
    torch.manual_seed(0)
    b, h, w, c_in, c_out = 2, 7, 6, 8, 12
    x = torch.randn(b, h, w, c_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, 3, 3, dtype=torch.float64)
    want = F.conv2d(x.permute(0, 3, 1, 2), weight, None, stride, 1, 1, groups).permute(0, 2, 3, 1)
    plan = cuda_mod._forward_plan(b, h, w, c_in, c_out, groups, stride)
    got = x.new_empty(want.shape)
    emulation.tap_conv(x.detach(), cuda_mod._forward_weight(weight), got, plan)
    torch.testing.assert_close(got, want.detach())

    dy = torch.randn_like(want)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    dx, _ = cuda_mod._dgrad(emulation, dy, weight, tuple(x.shape), groups, stride)
    torch.testing.assert_close(dx, want_dx)


# ---- the per-conv op ---------------------------------------------------------------------------
CONV_CASES = [
    # c_in, c_out, stride, groups, act, use_bn, use_bias, batch, h, w
    (8, 16, 1, 1, "silu", True, True, 2, 7, 5),
    (16, 64, 1, 4, "silu", True, False, 1, 5, 9),
    (8, 8, 2, 2, "gelu", True, True, 3, 7, 6),
    (4, 12, 2, 1, "relu", True, True, 2, 5, 5),
    (12, 8, 1, 4, None, True, True, 2, 4, 3),
    (8, 8, 1, 2, "silu", False, True, 2, 5, 5),
    (8, 16, 2, 1, None, False, True, 2, 6, 7),
    (1, 8, 2, 1, "silu", True, True, 2, 9, 9),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("c_in, c_out, stride, groups, act, use_bn, use_bias, batch, h, w", CONV_CASES)
def test_conv_op_forward_backward_and_running_stats(emulation, training, c_in, c_out, stride, groups, act, use_bn,
                                                    use_bias, batch, h, w):
    conv, bn = conv_bn_modules(c_in, c_out, stride, groups, dtype=torch.float64, bn_dtype=torch.float64)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(batch, h, w, c_in, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = conv_call(cuda_mod._conv_bn_act_cuda, x1, conv, bn, act, training, use_bn, use_bias)
    want = conv_call(conv_mod.conv_bn_act_reference, x2, conv2, bn2, act, training, use_bn, use_bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn2.running_var, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad, rtol=1e-5, atol=1e-5)
    if use_bias:
        torch.testing.assert_close(conv.bias.grad, conv2.bias.grad, rtol=1e-5, atol=1e-5)
    if use_bn:
        torch.testing.assert_close(bn.weight.grad, bn2.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.bias.grad, bn2.bias.grad, rtol=1e-5, atol=1e-5)


def test_conv_op_inference_is_one_folded_kernel(emulation):
    conv, bn = conv_bn_modules(8, 16, 1, 2, dtype=torch.float64, bn_dtype=torch.float64)
    x = torch.randn(2, 5, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = conv_call(cuda_mod._conv_bn_act_cuda, x, conv, bn, "silu", False)
        want = conv_call(conv_mod.conv_bn_act_reference, x, conv, bn, "silu", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert emulation.calls == ["tap_conv:0:-"]


def test_conv_op_skips_the_input_gradient_nobody_needs(emulation):
    conv, bn = conv_bn_modules(1, 8, 2, 1, dtype=torch.float64, bn_dtype=torch.float64)
    x = torch.randn(2, 8, 8, 1, dtype=torch.float64)  # images: no gradient
    conv_call(cuda_mod._conv_bn_act_cuda, x, conv, bn, "silu", True).sum().backward()
    assert conv.weight.grad is not None
    assert not any(c.startswith("tap_conv") for c in emulation.calls[1:])  # forward only; no data gradient


# ---- the chain -----------------------------------------------------------------------------------
def _cuda_pcm(x, weights, biases, bn1, bn2, *, strides, groups, training):
    return cuda_mod._pcm_cuda(x, weights, biases, [bn1, bn2], list(strides), groups, tuple(training))


PCM_CASES = [
    # c0, c1, c2, c3, groups, strides, batch, h, w
    (8, 32, 8, 8, 2, (1, 1, 1), 2, 6, 5),      # normal cell, grouped (4 channels per group)
    (8, 8, 8, 16, 2, (2, 1, 1), 2, 9, 7),      # reduction cell: stride 2 first
    (4, 8, 8, 8, 1, (2, 2, 1), 1, 11, 10),     # stage-1 reduction cell: two stride-2 convs
    (16, 64, 16, 16, 1, (1, 1, 1), 3, 4, 4),   # dense normal cell
]


@pytest.mark.parametrize("training", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("c0, c1, c2, c3, groups, strides, batch, h, w", PCM_CASES)
def test_pcm_op_matches_reference_forward_backward_and_running_stats(emulation, training, c0, c1, c2, c3, groups,
                                                                     strides, batch, h, w):
    convs, bns = pcm_modules(c0, c1, c2, c3, groups, strides)
    convs2, bns2 = copy.deepcopy(convs), copy.deepcopy(bns)
    x = torch.randn(batch, h, w, c0, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = pcm_call(_cuda_pcm, x1, convs, bns, strides, groups, training)
    want = pcm_call(pcm_mod.pcm_reference, x2, convs2, bns2, strides, groups, training)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bn, bn2 in zip(bns, bns2):
        torch.testing.assert_close(bn.running_mean, bn2.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var, bn2.running_var, rtol=1e-6, atol=1e-6)
    # The normalised activations never went through memory: the 2nd and 3rd convs load y through the prologue.
    assert emulation.calls[:3] == [f"tap_conv:{1 if training[0] else 0}:-",
                                   f"tap_conv:{1 if training[1] else 0}:pro", "tap_conv:0:pro"]
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for c, c2 in zip(convs, convs2):
        torch.testing.assert_close(c.weight.grad, c2.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.bias.grad, c2.bias.grad, rtol=1e-5, atol=1e-5)
    for bn, bn2 in zip(bns, bns2):
        torch.testing.assert_close(bn.weight.grad, bn2.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.bias.grad, bn2.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("c0, c1, c2, c3, groups, strides, batch, h, w", PCM_CASES)
def test_pcm_inference(monkeypatch, fused, c0, c1, c2, c3, groups, strides, batch, h, w):
    emu = KernelEmulation(fused=fused)
    monkeypatch.setattr(cuda_mod, "_PROVIDER", emu)
    convs, bns = pcm_modules(c0, c1, c2, c3, groups, strides)
    x = torch.randn(batch, h, w, c0, dtype=torch.float64)
    with torch.no_grad():
        got = pcm_call(_cuda_pcm, x, convs, bns, strides, groups, (False, False))
        want = pcm_call(pcm_mod.pcm_reference, x, convs, bns, strides, groups, (False, False))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one_kernel = fused and groups > 1 and strides[1:] == (1, 1)
    assert ("pcm_fused" in emu.calls) == one_kernel
    if not one_kernel:
        assert emu.calls == ["tap_conv:0:-"] * 3  # BatchNorm folded into each conv's epilogue


def test_parallel_conv_through_the_fused_op_matches_its_modules(emulation, monkeypatch):
    """ParallelConv hands its parameters and BatchNorm bookkeeping to ops.pcm: the same output,
    running statistics and num_batches_tracked as calling its three modules one by one."""
    from dinocxr_fast.models import layers
    from dinocxr_fast.models.layers import ParallelConv

    torch.manual_seed(0)
    pcm = ParallelConv((8, 32, 8, 8), groups=2).double().train()
    pcm2 = copy.deepcopy(pcm)
    x = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    # Route the op's cuda path through the emulation on the CPU: pcm() resolves the backend from the
    # device, so the model's pcm is the cuda path forced.
    monkeypatch.setattr(layers, "pcm", lambda *a, **k: _cuda_pcm(*a, **{n: v for n, v in k.items() if n != "backend"}))
    got = pcm(x)
    want = pcm2.conv3(pcm2.conv2(pcm2.conv1(x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in itertools.product(("conv1", "conv2"), ("running_mean", "running_var", "num_batches_tracked")):
        torch.testing.assert_close(getattr(getattr(pcm, a).bn, b), getattr(getattr(pcm2, a).bn, b))


def test_custom_ops_pass_opcheck(emulation):
    """Schema, fake (meta) implementations and autograd registration, as torch.compile needs them."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    g = torch.rand(16, dtype=torch.float64, requires_grad=True)
    be = torch.randn(16, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(16, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
    for training, act in ((True, 1), (False, 2)):
        torch.library.opcheck(cuda_mod._conv_cuda_op, (x, w, b, g, be, rm, rv, 2, 2, 1e-5, 0.1, training, act, True))
    torch.library.opcheck(cuda_mod._conv_cuda_op, (x, w, None, None, None, None, None, 1, 2, 1e-5, 0.1, False, 0, True))
    convs, bns = pcm_modules(8, 32, 8, 8, 2)
    args = [x, convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias, convs[2].weight, convs[2].bias]
    for bn in bns:
        args += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    for training, save in (([True, True], True), ([False, True], True), ([False, False], False)):
        inputs = args if save else [a.detach() for a in args]  # inference: nothing to differentiate
        torch.library.opcheck(cuda_mod._pcm_cuda_op,
                              tuple(inputs) + ([1, 1, 1], 2, [1e-5, 1e-5], [0.1, 0.1], training, save))
