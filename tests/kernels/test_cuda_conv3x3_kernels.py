"""GPU tests of the CUDA PCM kernels (kernels/cuda/conv3x3.cuh) and of the ops built on them.

    pytest -m cuda tests/test_cuda_conv_bn_act.py      (on a GPU machine, extension built with DINOCXR_CUDA=1)

Two levels:
- every kernel against ``KernelEmulation`` (tests/test_cuda_pcm_planning.py: the kernels'
  semantics in float64 PyTorch) on the same inputs, both implementations of each convolution
  (tensor cores and direct, forced with the extension's testing hook), odd sizes, odd channel
  counts, groups 1 and C/4, strides 1 and 2, every prologue / epilogue combination;
- ``conv_bn_act(backend="cuda")`` and ``pcm(backend="cuda")`` against their references in float64:
  forward, every gradient, BatchNorm running statistics; batch 1 and 64; bf16 / fp16 / fp32;
  autocast; determinism; bad input.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from dinocxr_fast import _ext
from test_cuda_conv3x3_planning import KernelEmulation

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")
pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Relative tolerance (of the largest magnitude) per dtype: outputs are rounded to the dtype once.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-4}


@pytest.fixture(autouse=True)
def cuda_build():
    assert torch.cuda.is_available()
    assert _ext.has_cuda(), "the extension was built without CUDA: rebuild with DINOCXR_CUDA=1"
    torch.backends.cudnn.allow_tf32 = False  # references in fp32 really in fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    _ext.require().force_direct_conv(False)
    _ext.require().conv_use_wgmma(False)


# (dtype, path): "auto" is the dispatcher's choice (tensor cores where eligible), "direct" forces the
# CUDA-core kernels; fp32 always runs direct, so it is not repeated.
# Kept small: scripts/gpu_check.sh gives every GPU test of the project 130 s together.
KERNEL_MODES = [(torch.bfloat16, "auto"), (torch.bfloat16, "direct"), (torch.float16, "auto"),
                (torch.float32, "auto")]
OP_MODES = [(torch.bfloat16, "auto"), (torch.bfloat16, "direct"), (torch.float32, "auto")]


def mode_id(mode):
    return f"{str(mode[0]).removeprefix('torch.')}-{mode[1]}"


def set_path(path: str) -> None:
    """auto: mma.sync for dense convs (the default); direct: CUDA cores only; wgmma: the sm_90a kernel."""
    ext = _ext.require()
    ext.force_direct_conv(path == "direct")
    ext.conv_use_wgmma(path == "wgmma")


def close(got, want, tol, what="", atol=0.0):
    """max |got - want| <= tol * max |want| + atol (atol for quantities that are zero in exact arithmetic)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-6) + max(atol, 1e-6), (
        f"{what}: max error {err:.3g} vs max magnitude {scale:.3g} (tol {tol})")


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


# ---- kernels ---------------------------------------------------------------------------------------
# c_in, c_out, groups, stride, batch, h, w
KERNEL_CASES = [
    (64, 64, 1, 1, 2, 9, 11),     # dense, tensor cores with 64-wide tiles
    (64, 256, 1, 1, 1, 7, 13),    # dense 4x expansion (stage-1 normal cell conv1), 128-wide tiles
    (256, 64, 1, 2, 2, 10, 7),    # dense, stride 2
    (32, 72, 1, 1, 1, 5, 5),      # Cout not a multiple of the tile
    (64, 64, 16, 1, 2, 9, 9),     # 4 -> 4 channels per group
    (128, 512, 32, 1, 1, 7, 6),   # 4 -> 16 per group
    (512, 128, 32, 1, 2, 5, 7),   # 16 -> 4 per group
    (64, 128, 16, 2, 2, 11, 9),   # 4 -> 8 per group, stride 2
    (1, 64, 1, 2, 2, 13, 15),     # the stem: one input channel
    (6, 9, 3, 1, 2, 5, 6),        # 2 -> 3 per group: masked outputs, scalar loads
    (12, 20, 1, 1, 1, 3, 4),      # dense, not a multiple of 32
]


def _plans(c_in, c_out, groups, stride, batch, h, w):
    """(plan, weight layout, input shape, output shape) of the forward conv and its data gradient."""
    fwd = cuda_mod._forward_plan(batch, h, w, c_in, c_out, groups, stride)
    weight = torch.randn(c_out, c_in // groups, 3, 3, device="cuda") / (9 * c_in / groups) ** 0.5
    out = [(fwd, cuda_mod._forward_weight(weight), (batch, h, w, c_in), (batch, fwd.geom[4], fwd.geom[5], c_out))]
    for plan in cuda_mod._dgrad_plans(batch, h, w, c_in, c_out, groups, stride):
        out.append((plan, cuda_mod._dgrad_weight(weight, groups, plan), (batch, fwd.geom[4], fwd.geom[5], c_out),
                    (batch, h, w, c_in)))
    return out


@pytest.mark.parametrize("mode", KERNEL_MODES, ids=mode_id)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_tap_conv_kernels_match_emulation(mode, case):
    dtype, path = mode
    set_path(path)
    torch.manual_seed(0)
    real, emu = cuda_mod._CudaKernels(), KernelEmulation()
    for plan, wt, in_shape, out_shape in _plans(*case):
        wt = wt.to(dtype)
        # The dgrad launches of a strided conv write a subset of positions each: start from one buffer.
        x = rnd(*in_shape, dtype=dtype)
        c_in, c_out = in_shape[-1], out_shape[-1]
        vec = lambda n, lo=-1.0, hi=1.0: torch.empty(n, device="cuda").uniform_(lo, hi)  # noqa: E731
        for pro in (None, (vec(c_in, 0.5, 1.5), vec(c_in))):
            for kind in (0, 1, 2):
                kw = dict(pro=pro, kind=kind)
                if kind == 0:
                    kw.update(act="silu", scale=vec(c_out, 0.5, 1.5), shift=vec(c_out))
                elif kind == 1:
                    kw.update(shift=vec(c_out), ref=vec(c_out, -0.1, 0.1))
                else:
                    kw.update(aux=rnd(*out_shape, dtype=dtype), z=(vec(c_out, 0.5, 1.5), vec(c_out)),
                              xh=(vec(c_out, 0.5, 1.5), vec(c_out)))
                got = torch.full(out_shape, float("nan"), device="cuda", dtype=dtype)
                want = got.clone()
                p_got = real.tap_conv(x, wt, got, plan, **kw)
                p_want = emu.tap_conv(x, wt, want, plan, **kw)
                what = f"{case} plan {plan.geom[9:13]} pro={pro is not None} kind={kind}"
                mask = ~torch.isnan(want)  # positions this launch writes
                assert bool((torch.isnan(got) == ~mask).all()), f"{what}: wrote outside its positions"
                close(got[mask], want[mask], TOL[dtype], what)
                if kind:
                    assert p_got.shape[1:] == (c_out, 2) and p_got.shape[0] >= 1
                    close(p_got.double().sum(0), p_want.double().sum(0), TOL[dtype] * 2, what + " partial sums")


@pytest.mark.parametrize("mode", KERNEL_MODES, ids=mode_id)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_wgrad_kernels_match_emulation(mode, case):
    dtype, path = mode
    set_path(path)
    torch.manual_seed(1)
    c_in, c_out, groups, stride, batch, h, w = case
    real, emu = cuda_mod._CudaKernels(), KernelEmulation()
    oh, ow = cuda_mod._out_size(h, stride), cuda_mod._out_size(w, stride)
    x = rnd(batch, h, w, c_in, dtype=dtype)
    dy = rnd(batch, oh, ow, c_out, dtype=dtype)
    for pro in (None, (torch.rand(c_in, device="cuda") + 0.5, torch.randn(c_in, device="cuda"))):
        for need_bias in (True, False):
            dw, db = real.wgrad(x, dy, pro, groups, stride, need_bias)
            dw_want, db_want = emu.wgrad(x, dy, pro, groups, stride, need_bias)
            what = f"{case} pro={pro is not None}"
            assert dw.dtype == torch.float32 and dw.shape == (c_out, c_in // groups, 3, 3)
            close(dw, dw_want, 1e-4 if pro is None else TOL[dtype], what + " dw")  # exact products, fp32 sums
            if need_bias:
                close(db, db_want, 1e-4, what + " db")
            else:
                assert db.numel() == 0


def test_wgrad_at_stage1_scale_uses_tensor_cores_and_matches():
    """One large dense weight gradient (split-K over many blocks) against float64."""
    info = _ext.require().wgrad_info([64, 56, 56, 64, 56, 56, 256, 1, 1], 2, torch.cuda.current_device())
    assert info[0] and info[1], info
    torch.manual_seed(2)
    x, dy = rnd(64, 56, 56, 64, dtype=torch.bfloat16), rnd(64, 56, 56, 256, dtype=torch.bfloat16)
    dw, db = cuda_mod._CudaKernels().wgrad(x, dy, None, 1, 1, True)
    # Oracle: cuDNN in fp32 (TF32 off) on the same bf16 values; both sum exact products in fp32.
    dw_want = torch.nn.grad.conv2d_weight(x.float().permute(0, 3, 1, 2), (256, 64, 3, 3),
                                          dy.float().permute(0, 3, 1, 2), padding=1)
    close(dw, dw_want, 1e-4, "dw")
    close(db, dy.float().sum((0, 1, 2)), 1e-4, "db")


@pytest.mark.parametrize("channels", [12, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_and_elementwise_kernels_match_emulation(dtype, channels):
    torch.manual_seed(3)
    real, emu = cuda_mod._CudaKernels(), KernelEmulation()
    vec = lambda lo=-1.0, hi=1.0: torch.empty(channels, device="cuda").uniform_(lo, hi)  # noqa: E731
    # Finalize passes: 37 partial rows of sums over 3700 values.
    partials = torch.randn(37, channels, 2, device="cuda").abs() * 100
    gamma, beta, ref, rm, rv, invstd = vec(0.5, 1.5), vec(), vec(), vec(), vec(0.5, 2), vec(0.5, 2)
    torch.testing.assert_close(real.bn_forward_finalize(partials, 3700, ref, gamma, beta, 1e-5, 0.1, rm, rv),
                               emu.bn_forward_finalize(partials, 3700, ref, gamma, beta, 1e-5, 0.1, rm, rv),
                               rtol=1e-5, atol=1e-5)
    for training in (True, False):
        torch.testing.assert_close(real.bn_backward_finalize(partials, 3700, gamma, ref, invstd, training),
                                   emu.bn_backward_finalize(partials, 3700, gamma, ref, invstd, training),
                                   rtol=1e-5, atol=1e-5)
    # Elementwise passes over 1000 rows.
    y, g = rnd(1000, channels, dtype=dtype), rnd(1000, channels, dtype=dtype)
    for act in (None, "silu", "gelu", "relu"):
        s, t = vec(0.5, 1.5), vec()
        close(real.affine_act(y, s, t, act), emu.affine_act(y, s, t, act), TOL[dtype], f"affine_act {act}")
        close(real.affine_act(y, None, None, act), emu.affine_act(y, None, None, act), TOL[dtype], "no affine")
        z, xh = (vec(0.5, 1.5), vec()), (vec(0.5, 1.5), vec())
        close(real.act_backward_stats(g, y, z, act, xh).double().sum(0),
              emu.act_backward_stats(g, y, z, act, xh).double().sum(0), TOL[dtype], f"act_backward_stats {act}")
        a, b, c = vec(), vec(), vec()
        want = emu.bn_backward_apply(g, y, z, act, a, b, c, False)
        close(real.bn_backward_apply(g, y, z, act, a, b, c, False), want, TOL[dtype], f"bn_backward_apply {act}")
        g2 = g.clone()
        out = real.bn_backward_apply(g2, y, z, act, a, b, c, True)
        assert out.data_ptr() == g2.data_ptr()
        close(g2, want, TOL[dtype], "bn_backward_apply in place")


# batch, h, w, c0, c1, c2, c3, groups, stride1
FUSED_CASES = [
    (3, 28, 28, 128, 512, 128, 128, 32, 1),   # stage-2 normal cell
    (2, 56, 56, 64, 64, 64, 128, 16, 2),      # stage-2 reduction cell
    (5, 7, 7, 512, 2048, 512, 512, 128, 1),   # stage-4 normal cell
    (1, 9, 13, 16, 64, 16, 16, 4, 1),         # odd sizes
    (2, 14, 14, 8, 8, 8, 8, 2, 2),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_pcm_inference_kernel_matches_emulation(dtype, case):
    torch.manual_seed(4)
    b, h, w, c0, c1, c2, c3, groups, s1 = case
    real, emu = cuda_mod._CudaKernels(), KernelEmulation()
    assert real.pcm_fused_supported(case, dtype, torch.device("cuda")), _ext.require().pcm_fused_info(
        list(case), cuda_mod._CUDA_DTYPES[dtype], torch.cuda.current_device())
    x = rnd(b, h, w, c0, dtype=dtype)
    ws = [(torch.randn(co, ci // groups, 3, 3, device="cuda") / (9 * ci / groups) ** 0.5).to(dtype)
          for ci, co in ((c0, c1), (c1, c2), (c2, c3))]
    ws = [cuda_mod._forward_weight(wt) for wt in ws]
    aff = [(torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda") * 0.1) for c in (c1, c2, c3)]
    got = real.pcm_fused(x, *ws, aff[0][0], aff[0][1], aff[1][0], aff[1][1], None, aff[2][1], groups, s1)
    want = emu.pcm_fused(x, *ws, aff[0][0], aff[0][1], aff[1][0], aff[1][1], None, aff[2][1], groups, s1)
    close(got, want, TOL[dtype] * 2, f"fused {case}")


def test_fused_pcm_reports_images_too_large():
    ok, _, _, reason = _ext.require().pcm_fused_info([1, 512, 512, 128, 512, 128, 128, 32, 1], 2,
                                                     torch.cuda.current_device())
    assert not ok and "shared memory" in reason


# ---- ops ---------------------------------------------------------------------------------------------
def _modules(c_in, c_out, stride, groups, dtype, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, 1, groups).cuda().to(dtype)
    bn = nn.BatchNorm2d(c_out).cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _call(fn, x, conv, bn, act, training, use_bn, **kw):
    bn_kw = {}
    if use_bn:
        bn_kw = dict(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                     eps=bn.eps, momentum=bn.momentum, training=training)
    return fn(x, conv.weight, conv.bias, stride=conv.stride, padding=1, dilation=1, groups=conv.groups, activation=act,
              **bn_kw, **kw)


def _double(conv, bn):
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    return conv64, bn64


# c_in, c_out, stride, groups, act, use_bn, batch, h, w
OP_CASES = [
    (64, 256, 1, 1, "silu", True, 2, 9, 7),
    (64, 64, 2, 1, "silu", True, 1, 11, 10),
    (128, 512, 1, 32, "silu", True, 2, 7, 7),
    (512, 128, 1, 32, "silu", True, 1, 5, 6),
    (64, 64, 2, 16, "silu", True, 3, 9, 9),
    (64, 64, 1, 16, None, False, 2, 6, 6),
    (1, 64, 2, 1, "silu", True, 2, 15, 13),
    (12, 8, 1, 4, "gelu", True, 2, 5, 5),
    (8, 16, 1, 1, "relu", False, 1, 4, 3),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", OP_MODES, ids=mode_id)
@pytest.mark.parametrize("case", OP_CASES)
def test_conv_bn_act_cuda_matches_reference(mode, case, training):
    dtype, path = mode
    set_path(path)
    c_in, c_out, stride, groups, act, use_bn, batch, h, w = case
    conv, bn = _modules(c_in, c_out, stride, groups, dtype)
    conv64, bn64 = _double(conv, bn)
    x = rnd(batch, h, w, c_in, dtype=dtype)
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = _call(conv_mod.conv_bn_act, x1, conv, bn, act, training, use_bn, backend="cuda")
    want = _call(conv_mod.conv_bn_act_reference, x64, conv64, bn64, act, training, use_bn)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    tol = TOL[dtype]
    close(got, want, tol, "out")
    if use_bn:
        close(bn.running_mean, bn64.running_mean, tol, "running_mean")
        close(bn.running_var, bn64.running_var, tol, "running_var")
    grad = torch.randn_like(want)
    got.backward(grad.to(dtype))
    want.backward(grad)
    close(x1.grad, x64.grad, 2 * tol, "dx")
    close(conv.weight.grad, conv64.weight.grad, 2 * tol, "dw")
    floor = 2 * tol * conv64.weight.grad.abs().max().item() if use_bn and training else 0.0  # 0 in exact arithmetic
    close(conv.bias.grad, conv64.bias.grad, 2 * tol, "db", atol=floor)
    if use_bn:
        close(bn.weight.grad, bn64.weight.grad, 2 * tol, "dgamma")
        close(bn.bias.grad, bn64.bias.grad, 2 * tol, "dbeta")


def _pcm_modules(c0, c1, c2, c3, strides, groups, dtype, seed=0):
    torch.manual_seed(seed)
    convs = [nn.Conv2d(a, b, 3, s, 1, groups=groups).cuda().to(dtype)
             for (a, b), s in zip(((c0, c1), (c1, c2), (c2, c3)), strides)]
    bns = [nn.BatchNorm2d(c).cuda() for c in (c1, c2)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.5)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return convs, bns


def _bn_tuple(bn):
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.momentum)


def _pcm(fn, x, convs, bns, strides, groups, training, **kw):
    return fn(x, [c.weight for c in convs], [c.bias for c in convs], _bn_tuple(bns[0]), _bn_tuple(bns[1]),
              strides=strides, groups=groups, training=training, **kw)


# c0, c1, c2, c3, groups, strides, batch, h, w
PCM_CASES = [
    (64, 256, 64, 64, 1, (1, 1, 1), 2, 13, 11),   # stage-1 normal cell (dense, tensor cores)
    (1, 64, 64, 64, 1, (2, 2, 1), 2, 23, 21),     # stage-1 reduction cell (stem, two stride-2 convs)
    (128, 512, 128, 128, 32, (1, 1, 1), 3, 7, 9),  # stage-2 normal cell (4 channels per group)
    (64, 64, 64, 128, 16, (2, 1, 1), 2, 11, 13),   # stage-2 reduction cell
    (16, 64, 16, 16, 4, (1, 1, 1), 1, 5, 4),       # batch 1
]


@pytest.mark.parametrize("training", [(True, True), (False, False)])
@pytest.mark.parametrize("mode", OP_MODES, ids=mode_id)
@pytest.mark.parametrize("case", PCM_CASES)
def test_pcm_cuda_matches_reference(mode, case, training):
    set_path(mode[1])
    check_pcm(mode[0], case, training)


@pytest.mark.parametrize("case", [PCM_CASES[0], PCM_CASES[2]])
def test_pcm_cuda_fp16_training_matches_reference(case):
    check_pcm(torch.float16, case, (True, True))


def check_pcm(dtype, case, training):
    c0, c1, c2, c3, groups, strides, batch, h, w = case
    convs, bns = _pcm_modules(c0, c1, c2, c3, strides, groups, dtype)
    convs64, bns64 = copy.deepcopy(convs), copy.deepcopy(bns)
    for m in convs64 + bns64:
        m.double()
    x = rnd(batch, h, w, c0, dtype=dtype)
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = _pcm(pcm_mod.pcm, x1, convs, bns, strides, groups, training, backend="cuda")
    want = _pcm(pcm_mod.pcm_reference, x64, convs64, bns64, strides, groups, training)
    tol = TOL[dtype]
    close(got, want, 2 * tol, "out")
    for bn, bn64 in zip(bns, bns64):
        close(bn.running_mean, bn64.running_mean, tol, "running_mean")
        close(bn.running_var, bn64.running_var, tol, "running_var")
    grad = torch.randn_like(want)
    got.backward(grad.to(dtype))
    want.backward(grad)
    close(x1.grad, x64.grad, 3 * tol, "dx")
    for i, (c, c64) in enumerate(zip(convs, convs64)):
        close(c.weight.grad, c64.weight.grad, 3 * tol, f"dw{i + 1}")
        # conv1 / conv2 feed a training BatchNorm: their bias gradient is 0 up to rounding
        floor = 3 * tol * c64.weight.grad.abs().max().item() if i < 2 and training[i] else 0.0
        close(c.bias.grad, c64.bias.grad, 3 * tol, f"db{i + 1}", atol=floor)
    for i, (bn, bn64) in enumerate(zip(bns, bns64)):
        close(bn.weight.grad, bn64.weight.grad, 3 * tol, f"dgamma{i + 1}")
        close(bn.bias.grad, bn64.bias.grad, 3 * tol, f"dbeta{i + 1}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PCM_CASES)
def test_pcm_cuda_inference_matches_reference(dtype, case):
    c0, c1, c2, c3, groups, strides, batch, h, w = case
    convs, bns = _pcm_modules(c0, c1, c2, c3, strides, groups, dtype)
    x = rnd(batch, h, w, c0, dtype=dtype)
    with torch.no_grad():
        got = _pcm(pcm_mod.pcm, x, convs, bns, strides, groups, False, backend="cuda")
        convs64, bns64 = copy.deepcopy(convs), copy.deepcopy(bns)
        for m in convs64 + bns64:
            m.double()
        want = _pcm(pcm_mod.pcm_reference, x.double(), convs64, bns64, strides, groups, False)
    close(got, want, 2 * TOL[dtype], "inference")


# Every PCM of ViTAEv2-S at 224 px (stage, cell): c0, c1, c2, c3, groups, strides, grid of the input.
VITAEV2_S_PCMS = {
    "s1_reduction": (1, 64, 64, 64, 1, (2, 2, 1), 224),
    "s1_normal": (64, 256, 64, 64, 1, (1, 1, 1), 56),
    "s2_reduction": (64, 64, 64, 128, 16, (2, 1, 1), 56),
    "s2_normal": (128, 512, 128, 128, 32, (1, 1, 1), 28),
    "s3_reduction": (128, 128, 128, 256, 32, (2, 1, 1), 28),
    "s3_normal": (256, 1024, 256, 256, 64, (1, 1, 1), 14),
    "s4_reduction": (256, 256, 256, 512, 64, (2, 1, 1), 14),
    "s4_normal": (512, 2048, 512, 512, 128, (1, 1, 1), 7),
}


@pytest.mark.parametrize("name", list(VITAEV2_S_PCMS))
def test_vitaev2_s_pcm_batch64_bf16_training(name):
    """The real shapes at the real batch: bf16 training step against an fp32 reference on the GPU."""
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S_PCMS[name]
    convs, bns = _pcm_modules(c0, c1, c2, c3, strides, groups, torch.bfloat16)
    convs32, bns32 = copy.deepcopy(convs), copy.deepcopy(bns)
    for m in convs32:
        m.float()
    x = rnd(64, hw, hw, c0, dtype=torch.bfloat16)
    x1, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    got = _pcm(pcm_mod.pcm, x1, convs, bns, strides, groups, True, backend="cuda")
    want = _pcm(pcm_mod.pcm_reference, x32, convs32, bns32, strides, groups, True)
    close(got, want, 4e-2, f"{name} out")
    grad = torch.randn_like(want)
    got.backward(grad.bfloat16())
    want.backward(grad)
    close(x1.grad, x32.grad, 6e-2, f"{name} dx")
    for i, (c, c32) in enumerate(zip(convs, convs32)):
        close(c.weight.grad, c32.weight.grad, 6e-2, f"{name} dw{i + 1}")
    for i, (bn, bn32) in enumerate(zip(bns, bns32)):
        close(bn.weight.grad, bn32.weight.grad, 6e-2, f"{name} dgamma{i + 1}")
        close(bn.running_var, bn32.running_var, 1e-2, f"{name} running_var{i + 1}")


def test_pcm_cuda_is_deterministic():
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S_PCMS["s2_normal"]
    results = []
    for _ in range(2):
        convs, bns = _pcm_modules(c0, c1, c2, c3, strides, groups, torch.bfloat16)
        torch.manual_seed(5)
        x = rnd(8, hw, hw, c0, dtype=torch.bfloat16).requires_grad_()
        out = _pcm(pcm_mod.pcm, x, convs, bns, strides, groups, True, backend="cuda")
        out.float().square().sum().backward()
        results.append([out, x.grad] + [c.weight.grad for c in convs] + [bn.running_var for bn in bns])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_conv_bn_act_cuda_under_autocast_matches_bf16_inputs():
    conv, bn = _modules(64, 256, 1, 1, torch.float32)
    x = rnd(2, 9, 9, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _call(conv_mod.conv_bn_act, x.requires_grad_(), conv, bn, "silu", True, True, backend="cuda")
    assert got.dtype == torch.bfloat16
    got.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    conv64, bn64 = _double(conv, bn)
    with torch.no_grad():
        conv64.weight.copy_(conv.weight.bfloat16().double())
    want = _call(conv_mod.conv_bn_act_reference, x.detach().bfloat16().double(), conv64, bn64, "silu", True, True)
    close(got, want, TOL[torch.bfloat16], "autocast")
    # Inside the model a grouped conv sees a bf16 activation and fp32 weights: still the cuda backend.
    spec = {"bn_weight": bn.weight, "bn_bias": bn.bias, "running_mean": bn.running_mean, "running_var": bn.running_var}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        choice = conv_mod.rule.Choice("cuda", "auto")
        assert cuda_mod.cuda_or_fallback(choice, got, torch.randn(256, 8, 3, 3, device="cuda"), 1, 1, 1, 32, spec,
                                          True).backend == "cuda"


def test_model_runs_the_cuda_backend_and_matches_the_reference(monkeypatch):
    from dinocxr_fast.models.vitaev2 import CONFIGS, ViTAEv2

    torch.manual_seed(0)
    model = ViTAEv2(CONFIGS["vitaev2_tiny"]).cuda().train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 1, 64, 64, device="cuda")
    monkeypatch.setenv("DINOCXR_BACKEND", "cuda")  # auto would wait for a verdict (ops/_dispatch.py)
    got = model(x)
    monkeypatch.setenv("DINOCXR_BACKEND", "torch")
    want = ref(x)
    close(got, want, 1e-3, "vitaev2_tiny features")
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p_ref.grad is not None:
            close(p.grad, p_ref.grad, 5e-3, name)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(weight_shape=(8, 4, 5, 5)), "weight"),
        (dict(padding=2), "padding"),
        (dict(dilation=2), "dilation"),
        (dict(stride=3), "stride"),
        (dict(dtype=torch.float64), "x"),
    ],
)
def test_cuda_backend_bad_input_raises_value_error_naming_the_argument(change, name):
    dtype = change.get("dtype", torch.float32)
    x = torch.randn(2, 8, 8, 4, device="cuda", dtype=dtype)
    weight = torch.randn(*change.get("weight_shape", (8, 4, 3, 3)), device="cuda", dtype=dtype)
    kw = {k: v for k, v in change.items() if k in ("padding", "dilation", "stride")}
    with pytest.raises(ValueError, match=name):
        conv_mod.conv_bn_act(x, weight, None, backend="cuda", **kw)
    # auto falls back to the reference instead
    out = conv_mod.conv_bn_act(x, weight, None, **kw)
    assert torch.isfinite(out).all()


def test_cuda_backend_training_with_one_value_per_channel_is_refused():
    conv, bn = _modules(4, 8, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="more than 1 value"):
        _call(conv_mod.conv_bn_act, rnd(1, 1, 1, 4), conv, bn, "silu", True, True, backend="cuda")


def test_extension_checks_sizes_before_launching():
    ext = _ext.require()
    x = rnd(2, 5, 5, 8)
    w = rnd(8, 9, 8)
    out = torch.empty(2, 5, 5, 8, device="cuda")
    geom = [2, 5, 5, 8, 5, 5, 8, 5, 5, 1, 1, 0, 0, 1]
    taps = [t // 3 - 1 for t in range(9)], [t % 3 - 1 for t in range(9)]
    args = (None, None, 0, 0, None, None, None, None, None, None, None, None)
    ext.tap_conv_cuda(x, w, out, geom, *taps, *args)  # fine
    with pytest.raises(ValueError, match="out must have"):
        ext.tap_conv_cuda(x, w, torch.empty(2, 5, 5, 7, device="cuda"), geom, *taps, *args)
    with pytest.raises(ValueError, match="weight must have"):
        ext.tap_conv_cuda(x, rnd(8, 9, 7), out, geom, *taps, *args)
    bad = list(geom)
    bad[7] = 6  # the grid would write past the output
    with pytest.raises(ValueError, match="outside the output"):
        ext.tap_conv_cuda(x, w, out, bad, *taps, *args)
    with pytest.raises(ValueError, match="contiguous"):
        ext.tap_conv_cuda(rnd(2, 5, 5, 16)[..., ::2], w, out, geom, *taps, *args)
    with pytest.raises(ValueError, match="dtype"):
        ext.tap_conv_cuda(x, w.half(), out, geom, *taps, *args)


# ---- the wgmma (sm_90a) path, last: it is the least proven kernel -------------------------------------
def need_wgmma():
    if not _ext.require().wgmma_available(torch.cuda.current_device()):
        pytest.skip("the wgmma kernel needs an sm_90 GPU and sm_90a code in the build (DINOCXR_CUDA_ARCHS=90a)")


def test_wgmma_path_is_taken_for_dense_convs():
    need_wgmma()
    plan = cuda_mod._forward_plan(2, 9, 9, 64, 256, 1, 1)
    info = lambda: _ext.require().tap_conv_info(list(plan.geom), list(plan.tap_dy), list(plan.tap_dx), 2,  # noqa: E731
                                                torch.cuda.current_device())
    assert info()[1] == "mma"  # the default until the wgmma kernel has been measured
    set_path("wgmma")
    assert info()[1] == "wgmma"
    grouped = cuda_mod._forward_plan(2, 9, 9, 64, 64, 16, 1)
    assert _ext.require().tap_conv_info(list(grouped.geom), list(grouped.tap_dy), list(grouped.tap_dx), 2,
                                        torch.cuda.current_device())[1] == "direct"


WGMMA_CASES = [c for c in KERNEL_CASES if c[2] == 1 and c[0] % 64 == 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", WGMMA_CASES)
def test_wgmma_tap_conv_matches_emulation(dtype, case):
    need_wgmma()
    test_tap_conv_kernels_match_emulation((dtype, "wgmma"), case)


@pytest.mark.parametrize("case", [PCM_CASES[0], PCM_CASES[1]])
def test_wgmma_pcm_matches_reference(case):
    need_wgmma()
    set_path("wgmma")
    check_pcm(torch.bfloat16, case, (True, True))


def test_wgmma_vitaev2_s_stage1_batch64():
    need_wgmma()
    set_path("wgmma")
    test_vitaev2_s_pcm_batch64_bf16_training("s1_normal")
