"""The CUDA kernels of kernels/cuda executed on the CPU (kernels/cuda/emulation): no GPU needed.

The kernel sources are compiled with a host compiler against simt.h, which runs every CUDA thread
as a std::thread with real barriers and emulates the warp-level matrix instructions (ldmatrix,
mma.m16n8k16, wgmma with its descriptors and 128-byte swizzle, cp.async) from the PTX ISA, so the
tensor-core kernels' addressing is checked against the instructions' documented layouts. The
results are compared with ``KernelEmulation`` (the kernels' semantics in float64 PyTorch) and, end
to end through the torch.library ops, with ``conv_bn_act_reference`` / ``pcm_reference``.

What this cannot show: timing, real memory-model races (threads here are sequentially consistent
at every barrier), hardware limits (registers, occupancy), and anything in the instructions' real
behaviour that the PTX ISA text does not say. tests/kernels/test_cuda_conv3x3_kernels.py checks those on a GPU.
A second build with AddressSanitizer + UBSan runs a subset in a subprocess (out-of-bounds and
misaligned accesses).
"""
from __future__ import annotations

import copy
import ctypes
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cuda_emulation import KernelEmulation
from dinocxr_fast.models.vitaev2 import VITAEV2_S_PCM_SHAPES
from op_helpers import CUDA_TOL as TOL
from op_helpers import bn_tuple, close, pcm_modules

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")
ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "kernels" / "cuda" / "emulation" / "build.py"
OUT = Path(tempfile.gettempdir()) / "dinocxr_emu"
pytestmark = pytest.mark.slow

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT = {None: 0, "silu": 1, "gelu": 2, "relu": 3}
IMPL = {0: "direct", 1: "mma", 2: "wgmma"}


def build_library(sanitize: bool = False) -> Path:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the emulation harness")
    OUT.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(BUILD), "--out", str(OUT)] + (["--sanitize"] if sanitize else [])
    return Path(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class SimtKernels:
    """The interface of conv_bn_act._CudaKernels on the emulated kernels (CPU tensors)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.impls: list[str] = []
        for name, restype in (("emu_tap_conv", ctypes.c_int), ("emu_wgrad", ctypes.c_int),
                              ("emu_act_backward_stats_rows", ctypes.c_int64)):
            getattr(lib, name).restype = restype

    def config(self, sm_count=4, path="auto", smem_optin=227 * 1024):
        self.lib.emu_config(sm_count, smem_optin, int(path == "direct"), int(path == "wgmma"))

    def tap_conv(self, x, w, out, plan, *, pro=None, kind=0, act=None, scale=None, shift=None, ref=None, aux=None,
                 z=None, xh=None):
        for t in (x, w, out, aux):
            assert t is None or (t.is_contiguous() and t.dtype == x.dtype)
        arr = lambda v: (ctypes.c_int * len(v))(*v)  # noqa: E731
        cap = 4096
        partials = torch.zeros(cap, out.shape[-1], 2)
        rows, impl = ctypes.c_int64(), ctypes.c_int()
        ps, pb = pro if pro is not None else (None, None)
        zs, zb = z if z is not None else (None, None)
        xs, xb = xh if xh is not None else (None, None)
        # fp32 contiguous copies of the per-channel vectors, kept alive through the call
        v = [None if t is None else t.float().contiguous() for t in (ps, pb, scale, shift, ref, zs, zb, xs, xb)]
        err = self.lib.emu_tap_conv(arr(plan.geom), len(plan.tap_dy), arr(plan.tap_dy), arr(plan.tap_dx),
                                    DTYPE_CODE[x.dtype], ptr(x), ptr(w), ptr(out), ptr(v[0]), ptr(v[1]), kind, ACT[act],
                                    ptr(v[2]), ptr(v[3]), ptr(v[4]), ptr(aux), ptr(v[5]), ptr(v[6]), ptr(v[7]),
                                    ptr(v[8]), ptr(partials), ctypes.c_int64(cap), ctypes.byref(rows),
                                    ctypes.byref(impl))
        assert err == 0, f"emu_tap_conv returned {err}"
        self.impls.append(IMPL[impl.value])
        return partials[: rows.value].clone()

    def wgrad(self, x, dy, pro, groups, stride, need_bias):
        b, h, w, c_in = x.shape
        _, oh, ow, c_out = dy.shape
        shape = (ctypes.c_int * 9)(b, h, w, c_in, oh, ow, c_out, groups, stride)
        dw = torch.empty(c_out, c_in // groups, 3, 3)
        db = torch.empty(c_out if need_bias else 0)
        ps, pb = (p.float().contiguous() for p in pro) if pro is not None else (None, None)
        tc = ctypes.c_int()
        err = self.lib.emu_wgrad(shape, DTYPE_CODE[x.dtype], ptr(x), ptr(ps), ptr(pb), ptr(dy), ptr(dw),
                                 ptr(db) if need_bias else None, ctypes.byref(tc))
        assert err == 0, f"emu_wgrad returned {err}"
        self.impls.append("wgrad_mma" if tc.value else "wgrad_direct")
        return dw, db

    def bn_forward_finalize(self, partials, count, ref, gamma, beta, eps, momentum, running_mean, running_var):
        c = gamma.numel()
        out = torch.empty(6, c)
        p = partials.float().contiguous()
        t = [x.float().contiguous() if x is not None else None for x in (ref, gamma, beta, running_mean, running_var)]
        err = self.lib.emu_bn_forward_finalize(ptr(p), ctypes.c_int64(p.shape[0]), c, ctypes.c_int64(count), ptr(t[0]),
                                               ptr(t[1]), ptr(t[2]), ctypes.c_float(eps), ctypes.c_float(momentum),
                                               ptr(t[3]), ptr(t[4]), ptr(out))
        assert err == 0
        return out

    def bn_backward_finalize(self, partials, count, gamma, mean, invstd, training):
        c = gamma.numel()
        out = torch.empty(5, c)
        p = partials.float().contiguous()
        t = [x.float().contiguous() for x in (gamma, mean, invstd)]
        err = self.lib.emu_bn_backward_finalize(ptr(p), ctypes.c_int64(p.shape[0]), c, ctypes.c_int64(count),
                                                ptr(t[0]), ptr(t[1]), ptr(t[2]), int(training), ptr(out))
        assert err == 0
        return out

    def affine_act(self, y, scale, shift, act):
        out = torch.empty_like(y)
        s = None if scale is None else scale.float().contiguous()
        t = None if shift is None else shift.float().contiguous()
        c = y.shape[-1]
        err = self.lib.emu_affine_act(DTYPE_CODE[y.dtype], ptr(y), ptr(out), ctypes.c_int64(y.numel() // c), c, ptr(s),
                                      ptr(t), ACT[act])
        assert err == 0
        return out

    def act_backward_stats(self, g, y, z, act, xh):
        c = y.shape[-1]
        rows = y.numel() // c
        n = self.lib.emu_act_backward_stats_rows(ctypes.c_int64(rows), c)
        partials = torch.empty(n, c, 2)
        v = [t.float().contiguous() for t in (*z, *xh)]
        err = self.lib.emu_act_backward_stats(DTYPE_CODE[y.dtype], ptr(g.contiguous()), ptr(y), ctypes.c_int64(rows), c,
                                              ptr(v[0]), ptr(v[1]), ACT[act], ptr(v[2]), ptr(v[3]), ptr(partials))
        assert err == 0
        return partials

    def bn_backward_apply(self, g, y, z, act, a, b, c, inplace):
        dy = g if inplace else torch.empty_like(g)
        ch = y.shape[-1]
        zs, zb = (t.float().contiguous() for t in z) if z is not None else (None, None)
        v = [None if t is None else t.float().contiguous() for t in (a, b, c)]
        err = self.lib.emu_bn_backward_apply(DTYPE_CODE[y.dtype], ptr(g), ptr(y), ptr(dy), ctypes.c_int64(y.numel() // ch),
                                             ch, ptr(zs), ptr(zb), ACT[act], ptr(v[0]), ptr(v[1]), ptr(v[2]))
        assert err == 0
        return dy

    def pcm_fused_supported(self, shape, dtype, device):
        return True  # emu_pcm_fused asks the real planner and fails the test if it says no

    def pcm_fused(self, x, w1, w2, w3, s1, t1, s2, t2, s3, t3, groups, stride1):
        b, h, w, c0 = x.shape
        h1, w1_ = (h - 1) // stride1 + 1, (w - 1) // stride1 + 1
        out = torch.empty(b, h1, w1_, w3.shape[0], dtype=x.dtype)
        shape = (ctypes.c_int * 9)(b, h, w, c0, w1.shape[0], w2.shape[0], w3.shape[0], groups, stride1)
        v = [None if t is None else t.float().contiguous() for t in (s1, t1, s2, t2, s3, t3)]
        gpb = ctypes.c_int()
        err = self.lib.emu_pcm_fused(shape, DTYPE_CODE[x.dtype], ptr(x), ptr(w1), ptr(w2), ptr(w3), *map(ptr, v),
                                     ptr(out), ctypes.byref(gpb))
        assert err == 0, f"emu_pcm_fused returned {err}"
        self.impls.append("pcm_fused")
        return out


@pytest.fixture(scope="module")
def simt():
    # DINOCXR_EMU_LIB: a prebuilt library (the sanitizer run below points it at its own build).
    lib = os.environ.get("DINOCXR_EMU_LIB") or str(build_library())
    kernels = SimtKernels(ctypes.CDLL(lib))
    kernels.config()
    return kernels


# ---- kernels -------------------------------------------------------------------------------------
# c_in, c_out, groups, stride, batch, h, w  (small: every CUDA thread is an OS thread here)
CASES = [
    (64, 64, 1, 1, 1, 5, 7),      # dense: tensor cores (64-wide tiles)
    (64, 128, 1, 2, 1, 7, 6),     # dense 128-wide tiles, stride 2 (dgrad: four parity launches)
    (32, 72, 1, 1, 1, 3, 5),      # Cout not a multiple of the tile
    (16, 64, 4, 1, 2, 5, 4),      # 4 -> 16 per group
    (64, 16, 4, 2, 1, 6, 7),      # 16 -> 4 per group, stride 2
    (1, 16, 1, 2, 1, 9, 7),       # one input channel
    (6, 9, 3, 1, 1, 4, 5),        # 2 -> 3 per group
    (256, 32, 1, 2, 1, 3, 4),     # wide dense input: the direct kernels chunk the input channels
]
PATHS = {torch.bfloat16: ("auto", "direct", "wgmma"), torch.float16: ("auto",), torch.float32: ("auto",)}


def _kernel_params():
    for dtype, paths in PATHS.items():
        for path in paths:
            for case in CASES:
                if path == "wgmma" and not (case[2] == 1 and case[0] % 64 == 0):
                    continue  # wgmma takes only dense Cin % 64 == 0 convs
                yield pytest.param(dtype, path, case, id=f"{str(dtype)[6:]}-{path}-{'x'.join(map(str, case))}")


@pytest.mark.parametrize("dtype, path, case", list(_kernel_params()))
def test_tap_conv_kernels(simt, dtype, path, case):
    simt.config(path=path)
    torch.manual_seed(0)
    emu = KernelEmulation()
    c_in, c_out, groups, stride, b, h, w = case
    weight = torch.randn(c_out, c_in // groups, 3, 3) / (9 * c_in / groups) ** 0.5
    fwd = cuda_mod._forward_plan(b, h, w, c_in, c_out, groups, stride)
    plans = [(fwd, cuda_mod._forward_weight(weight), (b, h, w, c_in), (b, fwd.geom[4], fwd.geom[5], c_out))]
    for plan in cuda_mod._dgrad_plans(b, h, w, c_in, c_out, groups, stride):
        plans.append((plan, cuda_mod._dgrad_weight(weight, groups, plan), (b, fwd.geom[4], fwd.geom[5], c_out),
                      (b, h, w, c_in)))
    simt.impls.clear()
    for plan, wt, in_shape, out_shape in plans:
        wt = wt.to(dtype).contiguous()
        x = torch.randn(in_shape).to(dtype)
        ci, co = in_shape[-1], out_shape[-1]
        for pro in (None, (torch.rand(ci) + 0.5, torch.randn(ci))):
            for kind in (0, 1, 2):
                kw = dict(pro=pro, kind=kind)
                if kind == 0:
                    kw.update(act="silu", scale=torch.rand(co) + 0.5, shift=torch.randn(co))
                elif kind == 1:
                    kw.update(shift=torch.randn(co), ref=torch.randn(co) * 0.1)
                else:
                    kw.update(aux=torch.randn(out_shape).to(dtype), z=(torch.rand(co) + 0.5, torch.randn(co)),
                              xh=(torch.rand(co) + 0.5, torch.randn(co)))
                got = torch.full(out_shape, float("nan"), dtype=dtype)
                want = got.clone()
                p_got = simt.tap_conv(x, wt, got, plan, **kw)
                p_want = emu.tap_conv(x, wt, want, plan, **kw)
                what = f"{case} {plan.geom[9:13]} pro={pro is not None} kind={kind} impl={simt.impls[-1]}"
                mask = ~torch.isnan(want)
                assert bool((torch.isnan(got) == ~mask).all()), f"{what}: wrote outside its positions"
                close(got[mask], want[mask], TOL[dtype], what)
                if kind:
                    close(p_got.double().sum(0), p_want.double().sum(0), 2 * TOL[dtype], what + " partials")
    dense_tc = groups == 1 and c_in % 32 == 0 and c_out % 8 == 0 and dtype != torch.float32
    expected = "direct" if path == "direct" or not dense_tc else ("wgmma" if path == "wgmma" else "mma")
    assert simt.impls[0] == expected, simt.impls  # the forward conv ran on the implementation under test


@pytest.mark.parametrize("dtype, path, case", [p for p in _kernel_params() if p.values[1] != "wgmma"])
def test_wgrad_kernels(simt, dtype, path, case):
    simt.config(path=path)
    torch.manual_seed(1)
    c_in, c_out, groups, stride, b, h, w = case
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    x, dy = torch.randn(b, h, w, c_in).to(dtype), torch.randn(b, oh, ow, c_out).to(dtype)
    emu = KernelEmulation()
    for pro in (None, (torch.rand(c_in) + 0.5, torch.randn(c_in))):
        dw, db = simt.wgrad(x, dy, pro, groups, stride, True)
        dw_want, db_want = emu.wgrad(x, dy, pro, groups, stride, True)
        close(dw, dw_want, 1e-4 if pro is None else TOL[dtype], f"dw {simt.impls[-1]}")
        close(db, db_want, 1e-4, "db")


@pytest.mark.parametrize("dtype", list(PATHS))
@pytest.mark.parametrize("channels", [12, 64])
def test_batchnorm_and_elementwise_kernels(simt, dtype, channels):
    torch.manual_seed(2)
    emu = KernelEmulation()
    vec = lambda lo=-1.0, hi=1.0: torch.empty(channels).uniform_(lo, hi)  # noqa: E731
    partials = torch.randn(7, channels, 2).abs() * 10
    g, be, ref, rm, rv, inv = vec(0.5, 1.5), vec(), vec(), vec(), vec(0.5, 2), vec(0.5, 2)
    torch.testing.assert_close(simt.bn_forward_finalize(partials, 70, ref, g, be, 1e-5, 0.1, rm, rv),
                               emu.bn_forward_finalize(partials, 70, ref, g, be, 1e-5, 0.1, rm, rv), rtol=1e-5, atol=1e-5)
    for training in (True, False):
        torch.testing.assert_close(simt.bn_backward_finalize(partials, 70, g, ref, inv, training),
                                   emu.bn_backward_finalize(partials, 70, g, ref, inv, training), rtol=1e-5, atol=1e-5)
    y, gr = torch.randn(37, channels).to(dtype), torch.randn(37, channels).to(dtype)
    for act in (None, "silu", "gelu", "relu"):
        s, t = vec(0.5, 1.5), vec()
        close(simt.affine_act(y, s, t, act), emu.affine_act(y, s, t, act), TOL[dtype], f"affine_act {act}")
        z, xh = (vec(0.5, 1.5), vec()), (vec(0.5, 1.5), vec())
        close(simt.act_backward_stats(gr, y, z, act, xh).double().sum(0),
              emu.act_backward_stats(gr, y, z, act, xh).double().sum(0), TOL[dtype], f"stats {act}")
        a, b, c = vec(), vec(), vec()
        want = emu.bn_backward_apply(gr, y, z, act, a, b, c, False)
        close(simt.bn_backward_apply(gr, y, z, act, a, b, c, False), want, TOL[dtype], f"apply {act}")
        g2 = gr.clone()
        simt.bn_backward_apply(g2, y, z, act, a, b, c, True)
        close(g2, want, TOL[dtype], "apply in place")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 6, 5, 16, 64, 16, 16, 4, 1), (1, 9, 8, 8, 8, 8, 16, 2, 2)])
def test_fused_pcm_kernel(simt, dtype, shape):
    torch.manual_seed(3)
    b, h, w, c0, c1, c2, c3, groups, s1 = shape
    x = torch.randn(b, h, w, c0).to(dtype)
    ws = [cuda_mod._forward_weight((torch.randn(co, ci // groups, 3, 3) / (9 * ci / groups) ** 0.5).to(dtype))
          for ci, co in ((c0, c1), (c1, c2), (c2, c3))]
    aff = [(torch.rand(c) + 0.5, torch.randn(c) * 0.1) for c in (c1, c2, c3)]
    args = (x, *ws, aff[0][0], aff[0][1], aff[1][0], aff[1][1], None, aff[2][1], groups, s1)
    close(simt.pcm_fused(*args), KernelEmulation().pcm_fused(*args), 2 * TOL[dtype], "fused pcm")


@pytest.mark.parametrize("dtype, k, n_crops, n_global, batch, smem", [
    (torch.bfloat16, 4096, 4, 2, 2, 227 * 1024),   # row cached in shared memory, 16-byte vectors
    (torch.bfloat16, 4096, 3, 2, 2, 4 * 1024),     # row too large: re-read path
    (torch.float32, 1029, 3, 3, 2, 227 * 1024),    # scalar path (K % 4 != 0), three teacher views
    (torch.float16, 520, 2, 1, 3, 227 * 1024),     # one teacher view
])
def test_dino_loss_kernel(simt, dtype, k, n_crops, n_global, batch, smem):
    from dinocxr_fast.ops.dino_loss import dino_loss_reference  # noqa: PLC0415

    simt.config(smem_optin=smem)
    try:
        torch.manual_seed(4)
        student = (torch.randn(n_crops * batch, k) * 3).to(dtype)
        teacher = (torch.randn(n_global * batch, k) * 3).to(dtype)
        center = torch.randn(k) * 0.1
        loss, grad, tsum = torch.zeros(1), torch.empty_like(student), torch.empty(k)
        err = simt.lib.emu_dino_loss(DTYPE_CODE[dtype], ctypes.c_int64(batch), ctypes.c_int64(n_crops),
                                     ctypes.c_int64(n_global), ctypes.c_int64(k), ctypes.c_float(10.0),
                                     ctypes.c_float(25.0), ptr(student), ptr(teacher), ptr(center), ptr(loss), ptr(grad),
                                     ptr(tsum))
        assert err == 0
    finally:
        simt.config()
    s = student.double().requires_grad_()
    want = dino_loss_reference(s, teacher.double(), center.double(), 0.1, 0.04, n_global)
    (want_grad,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(loss[0].double(), want.detach(), rtol=2e-3, atol=2e-3)
    close(grad, want_grad, 1e-2 if dtype != torch.float32 else 1e-4, "grad")
    torch.testing.assert_close(tsum.double(), teacher.double().sum(0), rtol=1e-4, atol=1e-3)


# ---- the ops, end to end on the emulated kernels ---------------------------------------------------
@pytest.fixture
def on_simt(simt, monkeypatch):
    monkeypatch.setattr(cuda_mod, "_PROVIDER", simt)
    simt.config(path="auto")
    return simt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [(True, True), (False, False)])
@pytest.mark.parametrize("c0, c1, c2, c3, groups, strides, batch, h, w", [
    (8, 32, 8, 8, 2, (1, 1, 1), 2, 5, 4),       # grouped normal cell
    (8, 8, 8, 16, 2, (2, 1, 1), 1, 7, 6),       # reduction cell
    (32, 64, 32, 32, 1, (1, 1, 1), 1, 4, 5),    # dense: tensor cores
])
def test_pcm_op_on_emulated_kernels(on_simt, dtype, training, c0, c1, c2, c3, groups, strides, batch, h, w):
    convs, bns = pcm_modules(c0, c1, c2, c3, groups, strides)
    convs_k = [copy.deepcopy(c).float() for c in convs]
    bns_k = [copy.deepcopy(bn).float() for bn in bns]
    x = torch.randn(batch, h, w, c0)
    x1 = x.to(dtype).clone().requires_grad_()
    x64 = x.to(dtype).double().detach().requires_grad_()
    got = cuda_mod._pcm_cuda(x1, [c.weight.to(dtype) for c in convs_k], [c.bias for c in convs_k],
                             [bn_tuple(bn) for bn in bns_k], list(strides), groups, training)
    want = pcm_mod.pcm_reference(x64, [c.weight.to(dtype).double() for c in convs], [c.bias for c in convs],
                                  bn_tuple(bns[0]), bn_tuple(bns[1]), strides=strides, groups=groups,
                                  training=training)
    tol = 2 * TOL[dtype]
    close(got, want, tol, "out")
    for bn, bn64 in zip(bns_k, bns):
        close(bn.running_var, bn64.running_var, tol, "running_var")
    grad = torch.randn(want.shape)
    got.backward(grad.to(dtype))
    want.backward(grad.double())
    close(x1.grad, x64.grad, 2 * tol, "dx")
    for i, (c, c64) in enumerate(zip(convs_k, convs)):
        close(c.weight.grad, c64.weight.grad, 2 * tol, "dw")
        # conv1 / conv2 feed a training BatchNorm: their bias gradient is 0 up to rounding
        floor = 2 * tol * c64.weight.grad.abs().max().item() if i < 2 and training[i] else 0.0
        close(c.bias.grad, c64.bias.grad, 2 * tol, "db", atol=floor)
    for bn, bn64 in zip(bns_k, bns):
        close(bn.weight.grad, bn64.weight.grad, 2 * tol, "dgamma")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["silu", "gelu", None])
def test_conv_op_on_emulated_kernels(on_simt, training, act):
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(8, 16, 3, 2, 1, groups=2)
    bn = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x = torch.randn(2, 7, 6, 8)
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    kw = dict(stride=2, groups=2, eps=bn.eps, momentum=bn.momentum, training=training, activation=act)
    got = cuda_mod._conv_bn_act_cuda(x1, conv.weight, conv.bias, bn_weight=bn.weight, bn_bias=bn.bias,
                                     running_mean=bn.running_mean, running_var=bn.running_var, **kw)
    want = conv_mod.conv_bn_act_reference(x64, conv64.weight, conv64.bias, bn_weight=bn64.weight, bn_bias=bn64.bias,
                                          running_mean=bn64.running_mean, running_var=bn64.running_var, **kw)
    close(got, want, 1e-4, "out")
    close(bn.running_var, bn64.running_var, 1e-5, "running_var")
    grad = torch.randn(want.shape)
    got.backward(grad)
    want.backward(grad.double())
    for a, b, what in ((x1.grad, x64.grad, "dx"), (conv.weight.grad, conv64.weight.grad, "dw"),
                       (bn.weight.grad, bn64.weight.grad, "dgamma"), (bn.bias.grad, bn64.bias.grad, "dbeta")):
        close(a, b, 1e-4, what)


# ---- memory errors: the same kernels under AddressSanitizer + UBSan, in a subprocess ---------------
def test_kernels_under_address_sanitizer():
    lib = build_library(sanitize=True)
    libasan = subprocess.run([os.environ.get("CXX", "g++"), "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.exists(libasan):
        pytest.skip("libasan not found")
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", DINOCXR_EMU_LIB=str(lib))
    select = "test_tap_conv_kernels and (bfloat16-auto or bfloat16-wgmma) or test_wgrad_kernels and bfloat16 " \
             "or test_batchnorm or test_fused or test_dino_loss_kernel"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow", __file__,
                           "-k", select],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout and "ERROR: AddressSanitizer" not in tail and "runtime error" not in tail, tail


# ---- shared-memory races: every kernel under ThreadSanitizer (a standalone program) ---------------
def test_kernels_have_no_shared_memory_races():
    """A shared-memory access not ordered by __syncthreads is a data race between the std::threads
    that stand in for CUDA threads; ThreadSanitizer reports it and the program fails."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler to build the emulation harness")
    proc = subprocess.run([sys.executable, str(BUILD), "--out", str(OUT), "--race-check"], capture_output=True,
                          text=True)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and "race check: all kernels ran" in proc.stdout, tail
    assert "ThreadSanitizer" not in tail, tail


# ---- every ViTAEv2-S PCM (real channel counts and groups), batch 1 ----------------------------------
# every ViTAEv2-S PCM; stage 1 on a smaller grid than at 224 px (CPU time)
VITAEV2_S = {**VITAEV2_S_PCM_SHAPES, "s1_reduction": (1, 64, 64, 64, 1, (2, 2, 1), 28),
             "s1_normal": (64, 256, 64, 64, 1, (1, 1, 1), 10)}


@pytest.mark.parametrize("name", list(VITAEV2_S))
def test_vitaev2_s_pcm_on_emulated_kernels(on_simt, name):
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S[name]
    convs, bns = pcm_modules(c0, c1, c2, c3, groups, strides)
    convs_k = [copy.deepcopy(c).float() for c in convs]
    bns_k = [copy.deepcopy(bn).float() for bn in bns]
    x = torch.randn(1, hw, hw, c0).bfloat16()
    x1 = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    got = cuda_mod._pcm_cuda(x1, [c.weight.bfloat16() for c in convs_k], [c.bias for c in convs_k],
                             [bn_tuple(bn) for bn in bns_k], list(strides), groups, (True, True))
    want = pcm_mod.pcm_reference(x64, [c.weight.bfloat16().double() for c in convs], [c.bias for c in convs],
                                  bn_tuple(bns[0]), bn_tuple(bns[1]), strides=strides, groups=groups,
                                  training=(True, True))
    close(got, want, 4e-2, f"{name} out")
    grad = torch.randn(want.shape)
    got.backward(grad.bfloat16())
    want.backward(grad.double())
    close(x1.grad, x64.grad, 6e-2, f"{name} dx")
    for i, (c, c64) in enumerate(zip(convs_k, convs)):
        close(c.weight.grad, c64.weight.grad, 6e-2, f"{name} dw{i + 1}")
    for i, (bn, bn64) in enumerate(zip(bns_k, bns)):
        close(bn.weight.grad, bn64.weight.grad, 6e-2, f"{name} dgamma{i + 1}")
        close(bn.running_var, bn64.running_var, 1e-2, f"{name} running_var{i + 1}")


@pytest.mark.parametrize("name", list(VITAEV2_S))
def test_vitaev2_s_pcm_inference_on_emulated_kernels(on_simt, name):
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S[name]
    convs, bns = pcm_modules(c0, c1, c2, c3, groups, strides)
    x = torch.randn(2, hw, hw, c0).bfloat16()
    on_simt.impls.clear()
    with torch.no_grad():
        got = cuda_mod._pcm_cuda(x, [c.weight.float().bfloat16() for c in convs], [c.bias.float() for c in convs],
                                 [tuple(t.float() if isinstance(t, torch.Tensor) else t for t in bn_tuple(bn))
                                  for bn in bns], list(strides), groups, (False, False))
        want = pcm_mod.pcm_reference(x.double(), [c.weight.bfloat16().double() for c in convs],
                                      [c.bias for c in convs], bn_tuple(bns[0]), bn_tuple(bns[1]), strides=strides,
                                      groups=groups, training=(False, False))
    close(got, want, 4e-2, f"{name} inference")
    assert on_simt.impls == (["pcm_fused"] if groups > 1 else on_simt.impls[:3]), on_simt.impls
