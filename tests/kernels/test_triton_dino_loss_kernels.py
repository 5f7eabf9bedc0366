"""The Triton DINO loss (backend="triton") against the reference, forward and backward.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py), on small
shapes: K not a multiple of the column blocks, one and three teacher views, rows split over
several programs and not, fp32 / fp16 / fp64. The ``cuda`` tests take the real sizes (K = 65536,
12 crops at batch 64) and bf16.
"""
from __future__ import annotations

import os

import pytest
import torch

from dinocxr_fast import ops
from dinocxr_fast.ops.dino_loss import dino_loss_reference

TS, TT = 0.1, 0.04
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter test (TRITON_INTERPRET=1, set without a GPU)")


def kernels():
    from dinocxr_fast.kernels.triton import dino_loss  # noqa: PLC0415 - after TRITON_INTERPRET is set

    return dino_loss


def make_inputs(batch, k, n_crops, n_global=2, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_crops * batch, k, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    teacher = (torch.randn(n_global * batch, k, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    center = (torch.randn(k, generator=gen, dtype=torch.float64) * 0.1).to(device, torch.float32)
    return student, teacher, center


def reference_and_grad(student, teacher, center, n_global):
    s = student.detach().double().requires_grad_()
    loss = dino_loss_reference(s, teacher.double(), center.double(), TS, TT, n_global)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def run_op(student, teacher, center, n_global):
    s = student.detach().requires_grad_()
    loss, tsum = ops.dino_loss_and_teacher_sum(s, teacher, center, student_temp=TS, teacher_temp=TT,
                                               n_global=n_global, backend="triton")
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad, tsum


def check(loss, grad, tsum, student, teacher, center, n_global, tol=2e-5, grad_tol=1e-4):
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, n_global)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=grad_tol,
                               atol=grad_tol * ref_grad.abs().max().item())
    if tsum is not None:
        torch.testing.assert_close(tsum.double().cpu(), teacher.double().sum(0).cpu(), rtol=1e-5, atol=1e-4)


# ---- interpreter (CI) --------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("batch,k,n_crops,n_global", [
    (1, 1, 2, 2),     # one column, one image
    (3, 7, 2, 2),     # K under one block
    (6, 7, 10, 2),    # multi-crop: 8 crops the teacher never sees
    (3, 1029, 4, 3),  # K over several blocks and not a multiple of them; three teacher views
    (4, 9, 3, 1),     # one teacher view: crop 0 has no pair, zero gradient
    (1, 300, 2, 2),   # two rows: split over several programs by default
])
def test_matches_reference_fp32(batch, k, n_crops, n_global):
    student, teacher, center = make_inputs(batch, k, n_crops, n_global)
    check(*run_op(student, teacher, center, n_global), student, teacher, center, n_global)


@interpreted
@pytest.mark.parametrize("batch,k,n_crops,n_global,split", [(2, 700, 4, 3, 3), (3, 300, 3, 1, 2), (2, 7, 2, 2, 4)])
def test_rows_split_over_programs_match_one_program_per_row(batch, k, n_crops, n_global, split):
    student, teacher, center = make_inputs(batch, k, n_crops, n_global)
    fused = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, True, True, split=1)
    parts = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, True, True, split=split)
    check(*parts, student, teacher, center, n_global)
    torch.testing.assert_close(parts[0], fused[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts[1], fused[1], rtol=1e-6, atol=1e-8)
    # without the gradient the split path still writes every row's loss
    no_grad = kernels().dino_loss_fwd(student, teacher, center, TS, TT, n_global, False, False, split=split)
    assert no_grad[1].numel() == 0 and no_grad[2].numel() == 0
    torch.testing.assert_close(no_grad[0], fused[0], rtol=1e-6, atol=1e-6)


@interpreted
def test_fp16_inputs_are_computed_in_fp32():
    student, teacher, center = make_inputs(5, 300, 4, dtype=torch.float16)
    loss, grad, tsum = run_op(student, teacher, center, 2)
    check(loss, grad, tsum, student, teacher, center, 2, tol=1e-4, grad_tol=1e-2)


@interpreted
def test_gradcheck_float64():
    student, teacher, center = make_inputs(2, 5, 3, dtype=torch.float64, scale=1.0)
    center = center.double()
    student.requires_grad_()

    def fn(s):
        return ops.dino_loss(s, teacher, center, student_temp=TS, teacher_temp=TT, backend="triton")

    # fast mode: a few random directions instead of one forward per input element (interpreter time)
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6, fast_mode=True)
    # fp64 math end to end: the loss matches the reference to fp64 precision
    ref, _ = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(fn(student).detach(), ref, rtol=1e-12, atol=1e-12)


@interpreted
def test_huge_logits_stay_finite():
    student, teacher, center = make_inputs(4, 257, 4, scale=1e4)
    loss, grad, _ = run_op(student, teacher, center, 2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@interpreted
def test_no_grad_and_no_sum():
    student, teacher, center = make_inputs(3, 64, 2)
    with torch.no_grad():
        loss = ops.dino_loss(student.requires_grad_(), teacher, center, student_temp=TS, teacher_temp=TT,
                             backend="triton")
    assert loss.grad_fn is None
    ref_loss, _ = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("which", ["student_out", "teacher_out", "center"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_argument(which, value):
    tensors = dict(zip(("student_out", "teacher_out", "center"), make_inputs(3, 8, 4)))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[5] = value
    raw = kernels().dino_loss_fwd(tensors["student_out"], tensors["teacher_out"], tensors["center"], TS, TT, 2,
                                  False, False)
    assert torch.isnan(raw[0])  # the kernel's own contract: NaN loss
    with pytest.raises(ValueError, match=which):
        ops.dino_loss(tensors["student_out"], tensors["teacher_out"], tensors["center"], student_temp=TS,
                      teacher_temp=TT, backend="triton")


@interpreted
def test_bad_input_is_rejected_before_the_kernel():
    student, teacher, center = make_inputs(3, 8, 4)
    with pytest.raises(ValueError, match="teacher_out"):
        ops.dino_loss(student, teacher[:, :-1], center, student_temp=TS, teacher_temp=TT, backend="triton")
    with pytest.raises(ValueError, match="student_out"):
        ops.dino_loss(student[:-1], teacher, center, student_temp=TS, teacher_temp=TT, backend="triton")


def test_auto_never_takes_the_interpreter():
    from dinocxr_fast.ops import _dispatch
    from dinocxr_fast.ops.dino_loss import IMPLEMENTED

    assert "triton" not in _dispatch.candidates("dino_loss", torch.device("cpu"), IMPLEMENTED)


# ---- GPU (pytest -m cuda) ------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,batch,k,n_crops,n_global", [
    (torch.bfloat16, 64, 65536, 12, 2),  # the multi-crop size of the design doc: one program per row
    (torch.bfloat16, 32, 65536, 2, 2),   # DINO-CXR's two views: 64 rows, split over programs
    (torch.bfloat16, 64, 65536, 2, 2),
    (torch.bfloat16, 5, 1029, 10, 2),
    (torch.bfloat16, 7, 3001, 5, 3),
    (torch.bfloat16, 4, 9, 3, 1),
    (torch.float16, 64, 65536, 12, 2),
    (torch.float32, 64, 65536, 12, 2),
    (torch.float32, 32, 65536, 2, 2),
    (torch.float32, 7, 3001, 5, 3),
])
def test_gpu_matches_reference(dtype, batch, k, n_crops, n_global):
    student, teacher, center = make_inputs(batch, k, n_crops, n_global, dtype=dtype, device="cuda")
    loss, grad, tsum = run_op(student, teacher, center, n_global)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    check(loss, grad, tsum, student, teacher, center, n_global, tol=tol,
          grad_tol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [1, 2, 7, 16])
def test_gpu_split_paths_agree(split):
    student, teacher, center = make_inputs(8, 65536, 4, dtype=torch.bfloat16, device="cuda")
    loss, grad, tsum = kernels().dino_loss_fwd(student, teacher, center, TS, TT, 2, True, True, split=split)
    check(loss, grad, tsum, student, teacher, center, 2, tol=2e-3, grad_tol=1e-2)


@pytest.mark.cuda
def test_gpu_float64_matches_reference_to_fp64_precision():
    student, teacher, center = make_inputs(2, 37, 3, dtype=torch.float64, device="cuda", scale=1.0)
    center = center.double()
    loss, grad, _ = kernels().dino_loss_fwd(student, teacher, center, TS, TT, 2, True, False)
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("which", [0, 1, 2])
def test_gpu_non_finite_gives_nan(which):
    tensors = list(make_inputs(16, 4096, 4, dtype=torch.bfloat16, device="cuda"))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[1234] = float("inf")
    for split in (1, 4):
        loss, _, _ = kernels().dino_loss_fwd(*tensors, TS, TT, 2, True, False, split=split)
        assert torch.isnan(loss)
