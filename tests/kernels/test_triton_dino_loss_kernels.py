"""The Triton DINO loss kernels (dinocxr_fast/ops/triton/dino_loss.py) called directly: a student row split
over several programs agrees with one program per row and with the reference, and a non-finite
input makes the loss NaN (the kernels' own contract; the op then names the argument, tests/ops/).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py) on small shapes; the
``cuda`` tests take K = 65536 in bf16.
"""
from __future__ import annotations

import pytest
import torch

from op_helpers import (
    DINO_TS as TS,
    DINO_TT as TT,
    DinoTol,
    Tol,
    assert_dino_matches_reference,
    dino_inputs,
    interpreted,
)


def kernels():
    from dinocxr_fast.ops.triton import dino_loss  # noqa: PLC0415 - after TRITON_INTERPRET is set

    return dino_loss


# ---- interpreter (CI) --------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("batch,k,n_crops,n_global,split", [(2, 700, 4, 3, 3), (3, 300, 3, 1, 2), (2, 7, 2, 2, 4)])
def test_rows_split_over_programs_match_one_program_per_row(batch, k, n_crops, n_global, split):
    student, teacher, center = dino_inputs(batch, k, n_crops, n_global)
    fused = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, True, True, split=1)
    parts = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, True, True, split=split)
    assert_dino_matches_reference(*parts, student, teacher, center, n_global,
                                  DinoTol(Tol(2e-5, 2e-5), (Tol(1e-4, of_max=1e-4),), Tol(1e-5, 1e-4)))
    torch.testing.assert_close(parts[0], fused[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts[1], fused[1], rtol=1e-6, atol=1e-8)
    # without the gradient the split path still writes every row's loss
    no_grad = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, False, False, split=split)
    assert no_grad[1].numel() == 0 and no_grad[2].numel() == 0
    torch.testing.assert_close(no_grad[0], fused[0], rtol=1e-6, atol=1e-6)


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("which", [0, 1, 2])  # student, teacher, center
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_gives_a_nan_loss(which, value):
    tensors = list(dino_inputs(3, 8, 4))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[5] = value
    loss, _, _ = kernels().dino_loss_fwd(*tensors, TS, TT, 2, False, False)
    assert torch.isnan(loss)


# ---- GPU (pytest -m cuda) ------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("split", [1, 2, 7, 16])
def test_gpu_split_paths_agree(split):
    student, teacher, center = dino_inputs(8, 65536, 4, dtype=torch.bfloat16, device="cuda")
    parts = kernels().dino_loss_fwd(student, teacher, center, TS, TT, 2, True, True, split=split)
    assert_dino_matches_reference(*parts, student, teacher, center, 2,
                                  DinoTol(Tol(2e-3, 2e-3), (Tol(1e-2, of_max=1e-2),), Tol(1e-5, 1e-4)))


@pytest.mark.cuda
@pytest.mark.parametrize("which", [0, 1, 2])
def test_gpu_non_finite_gives_nan(which):
    tensors = list(dino_inputs(16, 4096, 4, dtype=torch.bfloat16, device="cuda"))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[1234] = float("inf")
    for split in (1, 4):
        loss, _, _ = kernels().dino_loss_fwd(*tensors, TS, TT, 2, True, False, split=split)
        assert torch.isnan(loss)
