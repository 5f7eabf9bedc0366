"""GPU tests of the CUDA DINO loss kernel (kernels/cuda/dino_loss.cu), called through the extension,
beyond the op's backend tests in tests/ops/test_dino_loss.py: every code path of the kernel (row
cached in shared memory or re-read, 16-byte vector or scalar loads), fp16, odd K, misaligned rows, 1
to 3 teacher views, the fused centre column sums, non-finite inputs, determinism.

    pytest -m cuda tests/kernels/test_cuda_dino_loss_kernel.py
"""
from __future__ import annotations

import pytest
import torch

from dinocxr_fast import _ext, ops
from op_helpers import DINO_TS as ST
from op_helpers import DINO_TT as TT
from op_helpers import dino_reference as reference

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def cuda_build():
    assert torch.cuda.is_available()
    assert _ext.has_cuda(), "the extension was built without CUDA: rebuild with DINOCXR_CUDA=1"


def inputs(batch, k, n_crops, n_global, dtype, offset=0, seed=0):
    """Student / teacher rows; offset > 0 starts them `offset` elements into their storage, so the
    rows are not 16-byte aligned and the kernel must take its scalar path."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def make(rows):
        flat = torch.empty(rows * k + offset, device="cuda", dtype=dtype)
        view = flat[offset:].view(rows, k)
        view.copy_((torch.randn(rows, k, generator=gen) * 3).to(dtype))
        return view

    student, teacher = make(n_crops * batch), make(n_global * batch)
    center = (torch.randn(k, generator=gen) * 0.1).cuda()
    return student, teacher, center


def run(student, teacher, center, n_global, need_grad=True, need_sum=True):
    return _ext.require().dino_loss_cuda(student, teacher, center, ST, TT, n_global, need_grad, need_sum)


CASES = [
    # batch, k, n_crops, n_global, dtype, offset   -> path exercised
    (64, 65536, 12, 2, torch.bfloat16, 0),   # the training step: row cached in shared memory, 16-byte loads
    (8, 65536, 4, 2, torch.float32, 0),      # fp32 row (256 KB) does not fit: re-read through L2
    (4, 200_000, 3, 2, torch.bfloat16, 0),   # bf16 row too large for shared memory
    (16, 65536, 6, 2, torch.float16, 0),     # fp16 natively
    (5, 1029, 10, 2, torch.bfloat16, 0),     # K not a multiple of the vector width: scalar path
    (7, 4096, 5, 3, torch.float32, 1),       # misaligned rows, three teacher views
    (3, 7, 2, 1, torch.float32, 0),          # tiny K, one teacher view
    (33, 8192, 2, 2, torch.float16, 3),      # misaligned fp16
]


@pytest.mark.parametrize("batch, k, n_crops, n_global, dtype, offset", CASES)
def test_cuda_dino_loss_matches_reference(batch, k, n_crops, n_global, dtype, offset):
    student, teacher, center = inputs(batch, k, n_crops, n_global, dtype, offset)
    loss, grad, tsum = run(student, teacher, center, n_global)
    ref_loss, ref_grad = reference(student, teacher, center, n_global)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    assert grad.dtype == dtype and grad.shape == student.shape
    scale = ref_grad.abs().max().item()
    err = (grad.double() - ref_grad).abs().max().item()
    assert err <= (1e-4 if dtype == torch.float32 else 1e-2) * scale, f"gradient error {err} of {scale}"
    torch.testing.assert_close(tsum.double(), teacher.double().sum(0), rtol=1e-4, atol=1e-3)


def test_cuda_dino_loss_without_gradient_or_sums():
    student, teacher, center = inputs(4, 4096, 3, 2, torch.bfloat16)
    loss, grad, tsum = run(student, teacher, center, 2, need_grad=False, need_sum=False)
    assert grad.numel() == 0 and tsum.numel() == 0
    torch.testing.assert_close(loss.double(), reference(student, teacher, center, 2)[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_cuda_dino_loss_is_nan_for_non_finite_input(where):
    student, teacher, center = inputs(4, 4096, 3, 2, torch.bfloat16)
    (student if where == "student" else teacher)[1, 17] = float("inf")
    loss, _, _ = run(student, teacher, center, 2)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match=where):
        ops.dino_loss(student, teacher, center, student_temp=ST, teacher_temp=TT, backend="cuda")


def test_cuda_dino_loss_is_deterministic():
    student, teacher, center = inputs(64, 65536, 12, 2, torch.bfloat16)
    first = run(student, teacher, center, 2)
    second = run(student, teacher, center, 2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
