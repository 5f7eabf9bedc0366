"""GPU tests of the CUDA conv3x3 kernels (kernels/cuda/conv3x3.cuh, conv_batchnorm.cu), called
through ``conv_bn_act_cuda._CudaKernels``, against ``KernelEmulation`` (cuda_emulation.py: the
kernels' semantics in float64 PyTorch) on the same inputs: both implementations of each convolution
(tensor cores and direct, forced with the extension's testing hook; wgmma on sm_90a), odd sizes, odd
channel counts, groups 1 and C/4, strides 1 and 2, every prologue / epilogue combination; the
BatchNorm and elementwise passes; the fused grouped PCM; the extension's own size checks.

    pytest -m cuda tests/kernels/test_cuda_conv3x3_kernels.py   (extension built with DINOCXR_CUDA=1)

The ops built on them (``conv_bn_act(backend="cuda")``, ``pcm(backend="cuda")``) are tested against
their references in tests/ops/.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from cuda_emulation import KernelEmulation
from dinocxr_fast import _ext
from op_helpers import CUDA_TOL as TOL
from op_helpers import close, cuda_conv, mode_id, need_wgmma, rnd  # noqa: F401 (cuda_conv: a fixture)
from op_helpers import set_conv_path as set_path

cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("cuda_conv")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (dtype, path): "auto" is the dispatcher's choice (tensor cores where eligible), "direct" forces the
# CUDA-core kernels; fp32 always runs direct, so it is not repeated.
# Kept small: scripts/gpu_check.sh gives every GPU test of the project 130 s together.
KERNEL_MODES = [(torch.bfloat16, "auto"), (torch.bfloat16, "direct"), (torch.float16, "auto"),
                (torch.float32, "auto")]


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
