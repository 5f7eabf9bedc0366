"""The CUDA backend of conv_bn_act / pcm without a GPU: everything except the kernels themselves.

``KernelEmulation`` implements the interface of ``conv_bn_act._CudaKernels`` (tap convolutions
with prologue / epilogue, the weight gradient, the BatchNorm finalize and elementwise passes, the
fused grouped PCM) in plain PyTorch, following the semantics written in kernels/cuda/conv3x3.cuh.
With it swapped in, the real orchestration runs on the CPU: tap lists and parity plans of the data
gradient, weight layouts, BatchNorm statistics and backward coefficients, the chain's prologue /
epilogue fusion and recomputation, the torch.library ops and their autograd, running-stat updates.
Each is compared with the reference (``conv_bn_act_reference`` / ``pcm_reference``) in float64.
The kernels are compared with the same reference on a GPU (tests/test_cuda_conv_bn_act.py).
"""
from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")

ACTS = {None: lambda z: z, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def act_grad(z: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
    return cdf + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5


class KernelEmulation:
    """kernels/cuda/conv3x3.cuh in float64 PyTorch (values stored in the tensors' own dtype)."""

    def __init__(self, fused: bool = True):
        self.fused = fused
        self.calls: list[str] = []

    def tap_conv(self, x, w, out, plan, *, pro=None, kind=0, act=None, scale=None, shift=None, ref=None, aux=None,
                 z=None, xh=None):
        self.calls.append(f"tap_conv:{kind}:{'pro' if pro else '-'}")
        b, in_h, in_w, in_c, out_h, out_w, out_c, gh, gw, s_in, s_out, oy0, ox0, groups = plan.geom
        assert tuple(x.shape) == (b, in_h, in_w, in_c) and tuple(out.shape) == (b, out_h, out_w, out_c)
        cin_g, cout_g = in_c // groups, out_c // groups
        assert tuple(w.shape) == (out_c, len(plan.tap_dy), cin_g) and w.is_contiguous()
        assert (gh - 1) * s_out + oy0 < out_h and (gw - 1) * s_out + ox0 < out_w
        a = x.double()
        if pro is not None:  # the prologue, then the zero padding
            a = F.silu(a * pro[0].double() + pro[1].double()).to(x.dtype).double()
        pad = 2
        ap = F.pad(a, (0, 0, pad, pad, pad, pad))
        acc = torch.zeros(b, gh, gw, out_c, dtype=torch.float64, device=x.device)
        for t, (dy, dx) in enumerate(zip(plan.tap_dy, plan.tap_dx)):
            rows = torch.arange(gh, device=x.device) * s_in + dy + pad
            cols = torch.arange(gw, device=x.device) * s_in + dx + pad
            patch = ap[:, rows][:, :, cols].reshape(b, gh, gw, groups, cin_g)
            wt = w[:, t, :].double().reshape(groups, cout_g, cin_g)
            acc += torch.einsum("bhwgc,goc->bhwgo", patch, wt).reshape(b, gh, gw, out_c)
        sc = 1.0 if scale is None else scale.double()
        sh = 0.0 if shift is None else shift.double()
        target = out[:, oy0::s_out, ox0::s_out][:, :gh, :gw]
        partials = torch.empty(0, device=x.device)
        if kind == 2:  # SiLU backward through BatchNorm
            y = aux[:, oy0::s_out, ox0::s_out][:, :gh, :gw].double()
            zz = y * z[0].double() + z[1].double()
            v = acc * act_grad(zz, "silu")
            d = v.to(out.dtype).double()
            xhat = y * xh[0].double() + xh[1].double()
            partials = torch.stack([d.sum((0, 1, 2)), (d * xhat).sum((0, 1, 2))], -1)[None]
        else:
            v = acc * sc + sh
            if kind == 1:
                r = v.to(out.dtype).double() - (0.0 if ref is None else ref.double())
                partials = torch.stack([r.sum((0, 1, 2)), (r * r).sum((0, 1, 2))], -1)[None]
            else:
                v = ACTS[act](v)
        target.copy_(v.to(out.dtype))
        return partials

    def wgrad(self, x, dy, pro, groups, stride, need_bias):
        self.calls.append(f"wgrad:{'pro' if pro else '-'}")
        a = x.double()
        if pro is not None:
            a = F.silu(a * pro[0].double() + pro[1].double()).to(x.dtype).double()
        w_shape = (dy.shape[-1], x.shape[-1] // groups, 3, 3)
        dw = torch.nn.grad.conv2d_weight(a.permute(0, 3, 1, 2), w_shape, dy.double().permute(0, 3, 1, 2), stride=stride,
                                         padding=1, groups=groups)
        db = dy.double().sum((0, 1, 2)) if need_bias else torch.empty(0, device=dy.device)
        return dw.float(), db.float()  # the kernels return fp32

    def bn_forward_finalize(self, partials, count, ref, gamma, beta, eps, momentum, running_mean, running_var):
        s1, s2 = partials[..., 0].double().sum(0), partials[..., 1].double().sum(0)
        d = s1 / count
        var = (s2 / count - d * d).clamp_min(0)
        mean = ref.double() + d
        invstd = 1 / torch.sqrt(var + eps)
        scale = gamma.double() * invstd
        unbiased = var * count / (count - 1)
        return torch.stack([mean, invstd, scale, beta.double() - mean * scale,
                            (1 - momentum) * running_mean.double() + momentum * mean,
                            (1 - momentum) * running_var.double() + momentum * unbiased]).float()

    def bn_backward_finalize(self, partials, count, gamma, mean, invstd, training):
        sz, sxz = partials[..., 0].double().sum(0), partials[..., 1].double().sum(0)
        a = gamma.double() * invstd.double()
        b = -a * invstd.double() * sxz / count if training else torch.zeros_like(a)
        c = -a * sz / count - b * mean.double() if training else torch.zeros_like(a)
        return torch.stack([sxz, sz, a, b, c]).float()

    def affine_act(self, y, scale, shift, act):
        sc = 1.0 if scale is None else scale.double()
        sh = 0.0 if shift is None else shift.double()
        return ACTS[act](y.double() * sc + sh).to(y.dtype)

    def act_backward_stats(self, g, y, z, act, xh):
        yy = y.double()
        dz = (g.double() * act_grad(yy * z[0].double() + z[1].double(), act)).to(y.dtype).double()
        xhat = yy * xh[0].double() + xh[1].double()
        dims = tuple(range(y.dim() - 1))
        return torch.stack([dz.sum(dims), (dz * xhat).sum(dims)], -1)[None]

    def bn_backward_apply(self, g, y, z, act, a, b, c, inplace):
        yy = y.double()
        dz = g.double()
        if act is not None:
            zs = 1.0 if z is None else z[0].double()
            zb = 0.0 if z is None else z[1].double()
            dz = (dz * act_grad(yy * zs + zb, act)).to(y.dtype).double()
        dy = a.double() * dz + (0.0 if b is None else b.double()) * yy + (0.0 if c is None else c.double())
        if inplace:
            return g.copy_(dy.to(g.dtype))
        return dy.to(g.dtype)

    def pcm_fused_supported(self, shape, dtype, device):
        return self.fused

    def pcm_fused(self, x, w1, w2, w3, s1, t1, s2, t2, s3, t3, groups, stride1):
        self.calls.append("pcm_fused")
        a = x
        for w, s, t, stride, act in ((w1, s1, t1, stride1, "silu"), (w2, s2, t2, 1, "silu"), (w3, s3, t3, 1, None)):
            b, h, wd, c_in = a.shape
            plan = cuda_mod._forward_plan(b, h, wd, c_in, w.shape[0], groups, stride)
            nxt = a.new_empty((b, plan.geom[4], plan.geom[5], w.shape[0]))
            self.tap_conv(a, w, nxt, plan, act=act, scale=s, shift=t)
            a = nxt
        return a


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
def _modules(c_in, c_out, stride, groups, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, 1, groups).double()
    bn = nn.BatchNorm2d(c_out).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _call(fn, x, conv, bn, activation, training, use_bn=True, use_bias=True):
    kw = {}
    if use_bn:
        kw = dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                  eps=bn.eps, momentum=bn.momentum, training=training)
    return fn(x, conv.weight, conv.bias if use_bias else None, stride=conv.stride, padding=1, dilation=1,
              groups=conv.groups, activation=activation, **kw)


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
    conv, bn = _modules(c_in, c_out, stride, groups)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(batch, h, w, c_in, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = _call(cuda_mod._conv_bn_act_cuda, x1, conv, bn, act, training, use_bn, use_bias)
    want = _call(conv_mod.conv_bn_act_reference, x2, conv2, bn2, act, training, use_bn, use_bias)
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
    conv, bn = _modules(8, 16, 1, 2)
    x = torch.randn(2, 5, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = _call(cuda_mod._conv_bn_act_cuda, x, conv, bn, "silu", False)
        want = _call(conv_mod.conv_bn_act_reference, x, conv, bn, "silu", False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert emulation.calls == ["tap_conv:0:-"]


def test_conv_op_skips_the_input_gradient_nobody_needs(emulation):
    conv, bn = _modules(1, 8, 2, 1)
    x = torch.randn(2, 8, 8, 1, dtype=torch.float64)  # images: no gradient
    _call(cuda_mod._conv_bn_act_cuda, x, conv, bn, "silu", True).sum().backward()
    assert conv.weight.grad is not None
    assert not any(c.startswith("tap_conv") for c in emulation.calls[1:])  # forward only; no data gradient


# ---- the chain -----------------------------------------------------------------------------------
def _pcm_params(c0, c1, c2, c3, groups, seed=0):
    torch.manual_seed(seed)
    convs = [nn.Conv2d(a, b, 3, 1, 1, groups=groups).double() for a, b in ((c0, c1), (c1, c2), (c2, c3))]
    bns = [nn.BatchNorm2d(c).double() for c in (c1, c2)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return convs, bns


def _bn_tuple(bn):
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.momentum)


def _run_pcm(fn, x, convs, bns, strides, groups, training):
    return fn(x, [c.weight for c in convs], [c.bias for c in convs], _bn_tuple(bns[0]), _bn_tuple(bns[1]),
              strides=strides, groups=groups, training=training)


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
    convs, bns = _pcm_params(c0, c1, c2, c3, groups)
    convs2, bns2 = copy.deepcopy(convs), copy.deepcopy(bns)
    for c, s in zip(convs + convs2, strides + strides):
        c.stride = (s, s)
    x = torch.randn(batch, h, w, c0, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = _run_pcm(_cuda_pcm, x1, convs, bns, strides, groups, training)
    want = _run_pcm(pcm_mod.pcm_reference, x2, convs2, bns2, strides, groups, training)
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
    convs, bns = _pcm_params(c0, c1, c2, c3, groups)
    for c, s in zip(convs, strides):
        c.stride = (s, s)
    x = torch.randn(batch, h, w, c0, dtype=torch.float64)
    with torch.no_grad():
        got = _run_pcm(_cuda_pcm, x, convs, bns, strides, groups, (False, False))
        want = _run_pcm(pcm_mod.pcm_reference, x, convs, bns, strides, groups, (False, False))
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
    convs, bns = _pcm_params(8, 32, 8, 8, 2)
    args = [x, convs[0].weight, convs[0].bias, convs[1].weight, convs[1].bias, convs[2].weight, convs[2].bias]
    for bn in bns:
        args += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    for training, save in (([True, True], True), ([False, True], True), ([False, False], False)):
        inputs = args if save else [a.detach() for a in args]  # inference: nothing to differentiate
        torch.library.opcheck(cuda_mod._pcm_cuda_op,
                              tuple(inputs) + ([1, 1, 1], 2, [1e-5, 1e-5], [0.1, 0.1], training, save))


def test_pcm_on_cpu_is_the_reference():
    convs, bns = _pcm_params(8, 16, 8, 8, 2)
    x = torch.randn(2, 5, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = _run_pcm(pcm_mod.pcm, x, convs, bns, (1, 1, 1), 2, (False, False))
        want = _run_pcm(pcm_mod.pcm_reference, x, convs, bns, (1, 1, 1), 2, (False, False))
    torch.testing.assert_close(got, want)


# ---- argument checks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, name",
    [
        (dict(weight=torch.randn(8, 4, 5, 5)), "weight"),
        (dict(padding=2), "padding"),
        (dict(dilation=2), "dilation"),
        (dict(stride=3), "stride"),
        (dict(x=torch.randn(2, 6, 6, 4, dtype=torch.float64)), "x"),
    ],
)
def test_cuda_backend_names_what_it_does_not_cover(change, name):
    args = dict(x=torch.randn(2, 6, 6, 4), weight=torch.randn(8, 4, 3, 3), stride=1, padding=1, dilation=1)
    args.update(change)
    bn = {"bn_weight": None}
    got = cuda_mod._cuda_unsupported(args["x"], args["weight"], args["stride"], args["padding"], args["dilation"], 1,
                                     bn, False)
    assert got is not None and got[0] == name


def test_cuda_backend_on_cpu_tensors_is_refused():
    x, weight = torch.randn(2, 6, 6, 4), torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match="cuda"):
        conv_mod.conv_bn_act(x, weight, backend="cuda")


def test_pcm_bad_input_names_the_argument():
    convs, bns = _pcm_params(8, 16, 8, 8, 2)
    x = torch.randn(2, 5, 5, 8)
    weights = [c.weight.float() for c in convs]
    biases = [c.bias.float() for c in convs]
    bn = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in _bn_tuple(bns[0]))
    bn2 = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in _bn_tuple(bns[1]))
    with pytest.raises(ValueError, match="channels"):
        pcm_mod.pcm(x[..., :4], weights, biases, bn, bn2, groups=2)
    with pytest.raises(ValueError, match="strides"):
        pcm_mod.pcm(x, weights, biases, bn, bn2, strides=(1, 0, 1), groups=2)
    with pytest.raises(ValueError, match="bn2"):
        pcm_mod.pcm(x, weights, biases, bn, bn2[:4], groups=2)
    with pytest.raises(ValueError, match="weight expects"):  # conv2's input width does not chain
        pcm_mod.pcm(x, [weights[0], torch.randn(8, 3, 3, 3), weights[2]], biases, bn, bn2, groups=2)
