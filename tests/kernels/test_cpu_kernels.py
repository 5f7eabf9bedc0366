"""The C++ CPU kernels of the extension (csrc/cpu) below the ops: every instruction set's variant,
not only the one this CPU picks (the portable kernels serve older CPUs and fp64; AVX2 and AVX-512
come from one template), and the extension's hooks that force them; the BatchNorm + activation
kernel's numerics and its own argument checks (it is safe to call directly).

The ops' contracts (the cpp backend against the reference on the ISA this CPU runs) are tested in
tests/ops/.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinocxr_fast import _ext
from dinocxr_fast.ops.bn_act_cpu import bn_act_cpu
from dinocxr_fast.ops.conv_bn_act import activate
from op_helpers import (
    ACTIVATIONS,
    Backend,
    assert_conv_close_to_fp64_reference,
    assert_dino_matches_reference,
    conv_case,
    dino_inputs,
    dino_run,
    dino_tolerance,
    needs_cpp,
)

pytestmark = needs_cpp
CPP = Backend("cpp", "cpu")


# ---- the DINO loss rows (csrc/cpu/dino_loss*.cpp, dino_loss_simd.h) ------------------------------------
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n_crops,n_global", [
    (3, 7, 2, 2),
    (32, 7, 10, 2),
    (3, 4096, 10, 2),
    (32, 4096, 2, 2),
    (1, 4096, 10, 2),
    (3, 1029, 4, 3),  # K not a multiple of the tile or the vector width; three teacher views
    (4, 9, 3, 1),  # one teacher view: crop 0 has no pair
])
def test_dino_loss_rows_of_each_isa_match_reference(isa, dtype, batch, k, n_crops, n_global):
    ext = _ext.load()
    ext.limit_cpu_isa(isa)
    try:
        if ext.cpu_isa() != isa:
            pytest.skip(f"this CPU has no {isa}")
        student, teacher, center = dino_inputs(batch, k, n_crops, n_global, dtype=dtype)
        got = dino_run(student, teacher, center, n_global, "cpp")
    finally:
        ext.limit_cpu_isa("avx512")
    assert_dino_matches_reference(*got, student, teacher, center, n_global, dino_tolerance(CPP, dtype))


def test_force_portable_hook():
    ext = _ext.load()
    ext.force_portable_cpu(True)
    try:
        assert ext.cpu_isa() == "portable"
    finally:
        ext.force_portable_cpu(False)
    with pytest.raises(ValueError, match="limit_cpu_isa"):
        ext.limit_cpu_isa("sse9")


# ---- BatchNorm + activation (csrc/cpu/bn_act*.cpp, ops/bn_act_cpu.py) ------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bn_act_portable_kernels_match_reference(activation, training):
    ext = _ext.require()
    ext.force_portable_cpu(True)
    try:
        assert ext.bn_act_isa() == "portable"
        case = conv_case(2, 7, 5, 4, 12, 1)
        assert_conv_close_to_fp64_reference(case, backend="cpp", training=training, activation=activation)
    finally:
        ext.force_portable_cpu(False)


def test_bn_act_large_mean_is_normalised_accurately():
    # Values 1000 + N(0, 1): a one-pass E[y^2] - E[y]^2 in fp32 would lose everything.
    gen = torch.Generator().manual_seed(3)
    c = 20
    spread = torch.linspace(0.5, 2, c, dtype=torch.float64)
    y = 1000.0 + torch.randn(4096, c, generator=gen, dtype=torch.float64) * spread
    y = y.float()  # the values the kernel sees, exactly, also in the fp64 reference below
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    grad = torch.randn(4096, c, generator=gen)
    for activation in ("silu", "gelu"):
        rm, rv = torch.full((c,), 999.0), torch.ones(c)
        yy, gg, bb = (t.clone().requires_grad_() for t in (y, gamma, beta))
        out = bn_act_cpu(yy, gg, bb, rm, rv, 1e-5, 0.1, True, activation)
        out.backward(grad)

        rm64, rv64 = torch.full((c,), 999.0, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        y64, g64, b64 = (t.double().requires_grad_() for t in (y, gamma, beta))
        ref = activate(F.batch_norm(y64, rm64, rv64, g64, b64, True, 0.1, 1e-5), activation)
        ref.backward(grad.double())
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yy.grad, y64.grad.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gg.grad, g64.grad.float(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(bb.grad, b64.grad.float(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rm, rm64.float(), rtol=1e-7, atol=1e-4)
        torch.testing.assert_close(rv, rv64.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ops, y, v: ops.bn_act_cpu(y.t(), v, v, v, v, 1e-5, 0.1, True, 1), "y must be contiguous"),
        (lambda ops, y, v: ops.bn_act_cpu(y.double(), v, v, v, v, 1e-5, 0.1, True, 1), "y must be float32"),
        (lambda ops, y, v: ops.bn_act_cpu(y, v[:3], v, v, v, 1e-5, 0.1, True, 1), "bn_weight must have shape"),
        (lambda ops, y, v: ops.bn_act_cpu(y, v, v, v, v[:3], 1e-5, 0.1, True, 1), "running_var must have"),
        (lambda ops, y, v: ops.bn_act_cpu(y, v, v, v, v, -1.0, 0.1, True, 1), "eps"),
        (lambda ops, y, v: ops.bn_act_cpu(y, v, v, v, v, 1e-5, 0.1, True, 7), "activation"),
        (lambda ops, y, v: ops.bn_act_cpu(y[:1], v, v, v, v, 1e-5, 0.1, True, 1), "more than 1 value"),
        (lambda ops, y, v: ops.bn_act_cpu_backward(y[:2], y, v, v, torch.zeros(3, 6), True, 1, True), "grad must have"),
        (lambda ops, y, v: ops.bn_act_cpu_backward(y, y, v, v, torch.zeros(2, 6), True, 1, True), "stats must be"),
    ],
)
def test_bn_act_extension_checks_its_arguments(call, match):
    # The registered ops are safe to call directly (torch.ops.dinocxr.*, no Python layer in between):
    # every bad argument is a ValueError, never a bad read.
    _ext.require()  # loading the extension registers the ops
    y, v = torch.randn(5, 6), torch.ones(6)
    with pytest.raises(ValueError, match=match):
        call(torch.ops.dinocxr, y, v)


def test_bn_act_has_one_binding():
    # The kernel is reached through the dispatcher ops only, not through a second pybind11 binding.
    ext = _ext.require()
    assert not hasattr(ext, "bn_act_forward_cpu") and not hasattr(ext, "bn_act_backward_cpu")
    assert hasattr(torch.ops.dinocxr, "bn_act_cpu") and hasattr(torch.ops.dinocxr, "bn_act_cpu_backward")
