"""ops.pcm (ViTAEv2's parallel convolution module, conv3x3-BN-SiLU -> conv3x3-BN-SiLU -> conv3x3, as
one op): every backend against ``pcm_reference`` in float64 (forward, every gradient, the BatchNorm
running statistics), in training and inference; bad input; the dispatch.

Backends: ``torch`` (the reference) and ``cpp`` (three conv_bn_act calls, BatchNorm + SiLU fused) on
the CPU; ``cuda`` (the whole chain as one op) on a GPU (``pytest -m cuda``): every cell of ViTAEv2-S
(dense and grouped, strides 1 and 2, the one-channel stem), odd sizes, batch 1 to 64, bf16 / fp16 /
fp32, tensor cores, direct and wgmma. The kernels and the chain's orchestration on emulated kernels
are tested in tests/kernels/.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from dinocxr_fast.models.vitaev2 import VITAEV2_S_PCM_SHAPES
from dinocxr_fast.ops import _dispatch
from op_helpers import (
    CUDA_OP_MODES,
    CUDA_TOL,
    backends,
    bn_tuple,
    backward_both,
    close,
    close_running_stats,
    cuda_conv,  # noqa: F401 - a fixture
    mode_id,
    need_wgmma,
    needs_cpp,
    pcm_call,
    pcm_modules,
    rnd,
    set_conv_path,
)

pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")


# ---- the CPU backends, against the reference in float64 -------------------------------------------------
def _cpu_case(dtype, *, groups=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    chans = (4, 8, 4, 4)
    x = torch.randn(2, 7, 5, chans[0], generator=gen).to(dtype).requires_grad_()
    weights = [(torch.randn(chans[i + 1], chans[i] // groups, 3, 3, generator=gen) * 0.3).to(dtype).requires_grad_()
               for i in range(3)]
    biases = [(torch.randn(chans[i + 1], generator=gen) * 0.1).to(dtype).requires_grad_() for i in range(3)]
    bns = []
    for c in chans[1:3]:
        bns.append([(torch.rand(c, generator=gen) + 0.5).to(dtype).requires_grad_(),
                    (torch.randn(c, generator=gen) * 0.5).to(dtype).requires_grad_(),
                    torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), 1e-5, 0.1])
    return x, weights, biases, bns


@pytest.mark.parametrize("backend", backends("torch", "cpp"))
@pytest.mark.parametrize("training", [True, False])
def test_matches_fp64_reference(backend, training):
    got_in, want_in = _cpu_case(torch.float32), _cpu_case(torch.float64)
    strides = (2, 1, 1)
    got = pcm_mod.pcm(got_in[0], got_in[1], got_in[2], *got_in[3], strides=strides, groups=2, training=training,
                      backend=backend.name)
    want = pcm_mod.pcm_reference(want_in[0], want_in[1], want_in[2], *want_in[3], strides=strides, groups=2,
                                 training=training)
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=2e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(9))
    got.backward(grad)
    want.backward(grad.double())
    leaves = lambda case: [case[0], *case[1], *case[2], *(t for bn in case[3] for t in bn[:2])]  # noqa: E731
    for g, w in zip(leaves(got_in), leaves(want_in)):
        # at least 1: a conv bias under a training BatchNorm has a zero gradient in exact arithmetic
        scale = max(float(w.grad.abs().max()), 1.0)
        torch.testing.assert_close(g.grad / scale, (w.grad / scale).float(), rtol=0, atol=5e-5)
    for g_bn, w_bn in zip(got_in[3], want_in[3]):  # running statistics
        torch.testing.assert_close(g_bn[2], w_bn[2].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_bn[3], w_bn[3].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends("auto", "torch"))
def test_on_cpu_in_float64_is_the_reference(backend):
    convs, bns = pcm_modules(8, 16, 8, 8, 2)
    x = torch.randn(2, 5, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = pcm_call(pcm_mod.pcm, x, convs, bns, (1, 1, 1), 2, (False, False), backend=backend.name)
        want = pcm_call(pcm_mod.pcm_reference, x, convs, bns, (1, 1, 1), 2, (False, False))
    torch.testing.assert_close(got, want)


@needs_cpp
def test_auto_on_cpu_takes_cpp_once_verified_and_cpp_refuses_bf16(monkeypatch):
    calls = []
    real = pcm_mod._pcm_chain
    monkeypatch.setattr(pcm_mod, "_pcm_chain", lambda *a: calls.append(a[-1]) or real(*a))
    x, weights, biases, bns = _cpu_case(torch.float32)
    pcm_mod.pcm(x, weights, biases, *bns, groups=2, training=True)
    assert calls == []  # not verified on this machine: the vendor path
    monkeypatch.setattr(_dispatch, "_auto_backend", lambda op, device, names, case: "cpp")  # as if verified
    pcm_mod.pcm(x, weights, biases, *bns, groups=2, training=True)
    assert calls == ["cpp"]
    xb, wb, bb, bnb = _cpu_case(torch.bfloat16)
    out = pcm_mod.pcm(xb, wb, bb, *bnb, groups=2, training=True)  # auto: each conv falls back
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x"):
        pcm_mod.pcm(xb, wb, bb, *bnb, groups=2, training=True, backend="cpp")


# ---- the cuda backend on a GPU, against the reference in float64 ------------------------------------------
# c0, c1, c2, c3, groups, strides, batch, h, w
GPU_CASES = [
    (64, 256, 64, 64, 1, (1, 1, 1), 2, 13, 11),   # stage-1 normal cell (dense, tensor cores)
    (1, 64, 64, 64, 1, (2, 2, 1), 2, 23, 21),     # stage-1 reduction cell (stem, two stride-2 convs)
    (128, 512, 128, 128, 32, (1, 1, 1), 3, 7, 9),  # stage-2 normal cell (4 channels per group)
    (64, 64, 64, 128, 16, (2, 1, 1), 2, 11, 13),   # stage-2 reduction cell
    (16, 64, 16, 16, 4, (1, 1, 1), 1, 5, 4),       # batch 1
]


def gpu_modules(c0, c1, c2, c3, groups, strides, dtype):
    return pcm_modules(c0, c1, c2, c3, groups, strides, dtype=dtype, bn_dtype=torch.float32, device="cuda",
                       bias_std=0.5, mean_std=0.1)


def _double(convs, bns):
    convs64, bns64 = copy.deepcopy(convs), copy.deepcopy(bns)
    for m in convs64 + bns64:
        m.double()
    return convs64, bns64


def check_gpu_step(backend, dtype, case, training):
    """One training (or eval-BatchNorm) step of ``pcm(backend=...)`` against the reference in float64."""
    c0, c1, c2, c3, groups, strides, batch, h, w = case
    convs, bns = gpu_modules(c0, c1, c2, c3, groups, strides, dtype)
    convs64, bns64 = _double(convs, bns)
    x = rnd(batch, h, w, c0, dtype=dtype)
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = pcm_call(pcm_mod.pcm, x1, convs, bns, strides, groups, training, backend=backend.name)
    want = pcm_call(pcm_mod.pcm_reference, x64, convs64, bns64, strides, groups, training)
    tol = CUDA_TOL[dtype]
    close(got, want, 2 * tol, "out")
    for bn, bn64 in zip(bns, bns64):
        close_running_stats(bn, bn64, tol)
    backward_both(got, want, dtype)
    close(x1.grad, x64.grad, 3 * tol, "dx")
    for i, (c, c64) in enumerate(zip(convs, convs64)):
        close(c.weight.grad, c64.weight.grad, 3 * tol, f"dw{i + 1}")
        # conv1 / conv2 feed a training BatchNorm: their bias gradient is 0 up to rounding
        floor = 3 * tol * c64.weight.grad.abs().max().item() if i < 2 and training[i] else 0.0
        close(c.bias.grad, c64.bias.grad, 3 * tol, f"db{i + 1}", atol=floor)
    for i, (bn, bn64) in enumerate(zip(bns, bns64)):
        close(bn.weight.grad, bn64.weight.grad, 3 * tol, f"dgamma{i + 1}")
        close(bn.bias.grad, bn64.bias.grad, 3 * tol, f"dbeta{i + 1}")


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("training", [(True, True), (False, False)])
@pytest.mark.parametrize("mode", CUDA_OP_MODES, ids=mode_id)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_fp64_reference(backend, mode, case, training):
    set_conv_path(mode[1])
    check_gpu_step(backend, mode[0], case, training)


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[2]])
def test_gpu_fp16_training_matches_fp64_reference(backend, case):
    check_gpu_step(backend, torch.float16, case, (True, True))


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_inference_matches_fp64_reference(backend, dtype, case):
    c0, c1, c2, c3, groups, strides, batch, h, w = case
    convs, bns = gpu_modules(c0, c1, c2, c3, groups, strides, dtype)
    x = rnd(batch, h, w, c0, dtype=dtype)
    with torch.no_grad():
        got = pcm_call(pcm_mod.pcm, x, convs, bns, strides, groups, False, backend=backend.name)
        convs64, bns64 = _double(convs, bns)
        want = pcm_call(pcm_mod.pcm_reference, x.double(), convs64, bns64, strides, groups, False)
    close(got, want, 2 * CUDA_TOL[dtype], "inference")


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("name", list(VITAEV2_S_PCM_SHAPES))
def test_gpu_vitaev2_s_batch64_bf16_training(backend, name):
    """The real shapes at the real batch: bf16 training step against an fp32 reference on the GPU."""
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S_PCM_SHAPES[name]
    convs, bns = gpu_modules(c0, c1, c2, c3, groups, strides, torch.bfloat16)
    convs32, bns32 = copy.deepcopy(convs), copy.deepcopy(bns)
    for m in convs32:
        m.float()
    x = rnd(64, hw, hw, c0, dtype=torch.bfloat16)
    x1, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    got = pcm_call(pcm_mod.pcm, x1, convs, bns, strides, groups, True, backend=backend.name)
    want = pcm_call(pcm_mod.pcm_reference, x32, convs32, bns32, strides, groups, True)
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


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
def test_gpu_is_deterministic(backend):
    c0, c1, c2, c3, groups, strides, hw = VITAEV2_S_PCM_SHAPES["s2_normal"]
    results = []
    for _ in range(2):
        convs, bns = gpu_modules(c0, c1, c2, c3, groups, strides, torch.bfloat16)
        torch.manual_seed(5)
        x = rnd(8, hw, hw, c0, dtype=torch.bfloat16).requires_grad_()
        out = pcm_call(pcm_mod.pcm, x, convs, bns, strides, groups, True, backend=backend.name)
        out.float().square().sum().backward()
        results.append([out, x.grad] + [c.weight.grad for c in convs] + [bn.running_var for bn in bns])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# the wgmma (sm_90a) path, last: it is the least proven kernel
@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[1]])
def test_gpu_wgmma_matches_fp64_reference(backend, case):
    need_wgmma()
    set_conv_path("wgmma")
    check_gpu_step(backend, torch.bfloat16, case, (True, True))


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
def test_gpu_wgmma_vitaev2_s_stage1_batch64(backend):
    need_wgmma()
    set_conv_path("wgmma")
    test_gpu_vitaev2_s_batch64_bf16_training(backend, "s1_normal")


# ---- bad input: a ValueError naming the argument, before any backend runs --------------------------------
@pytest.mark.parametrize("backend", backends("auto", "torch", "cpp"))
def test_bad_input_names_the_argument(backend):
    convs, bns = pcm_modules(8, 16, 8, 8, 2)
    x = torch.randn(2, 5, 5, 8)
    weights = [c.weight.float() for c in convs]
    biases = [c.bias.float() for c in convs]
    bn = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in bn_tuple(bns[0]))
    bn2 = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in bn_tuple(bns[1]))
    kw = dict(groups=2, backend=backend.name)
    with pytest.raises(ValueError, match="channels"):
        pcm_mod.pcm(x[..., :4], weights, biases, bn, bn2, **kw)
    with pytest.raises(ValueError, match="strides"):
        pcm_mod.pcm(x, weights, biases, bn, bn2, strides=(1, 0, 1), **kw)
    with pytest.raises(ValueError, match="bn2"):
        pcm_mod.pcm(x, weights, biases, bn, bn2[:4], **kw)
    with pytest.raises(ValueError, match="weight expects"):  # conv2's input width does not chain
        pcm_mod.pcm(x, [weights[0], torch.randn(8, 3, 3, 3), weights[2]], biases, bn, bn2, **kw)
