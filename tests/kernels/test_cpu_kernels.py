"""The C++ CPU kernels of the extension (csrc/cpu) below the ops: every instruction set's variant,
not only the one this CPU picks (the portable kernels serve older CPUs and fp64; AVX2 and AVX-512
come from one template), and the extension's hooks that force them.

The ops' contracts (the cpp backend against the reference on the ISA this CPU runs) are tested in
tests/ops/.
"""
from __future__ import annotations

import pytest
import torch

from dinocxr_fast import _ext
from op_helpers import Backend, assert_dino_matches_reference, dino_inputs, dino_run, dino_tolerance, needs_cpp

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
