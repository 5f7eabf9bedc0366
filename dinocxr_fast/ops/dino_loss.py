"""The DINO self-distillation loss as one fused op.

Semantics are exactly those of ``DINOLoss`` in facebookresearch/dino::

    q_i    = softmax((t_i - center) / teacher_temp)        for each teacher (global) view i
    logp_v = log_softmax(s_v / student_temp)               for each student crop v
    loss   = mean over pairs (i, v != i) of  mean_b  sum_k -q_i[b, k] * logp_v[b, k]

Rows are crop-major: ``student_out`` is ``[n_crops*B, K]`` (all crop-0 rows, then crop-1 rows,
...), ``teacher_out`` is ``[n_global*B, K]``. Gradient flows to ``student_out`` only.

The fused backends compute one log-softmax per student crop rather than one per pair: the loss is
linear in the targets, so the paired teacher targets are summed first,
``T_v = sum_{i != v} q_i``, and ``d loss / d s_v = (W_v * softmax(s_v/tau_s) - T_v) / (tau_s*n_pairs*B)``
with ``W_v = sum_k T_v[k]``. They also return the gradient from the same pass and, on request, the
column sums of the teacher rows for the centre EMA, so the teacher is read once per step.

``dino_loss_reference`` below is the specification; every backend is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dinocxr_fast import _ext
from dinocxr_fast.ops import _dispatch, _verify
from dinocxr_fast.ops._checks import (
    NonFiniteInputError,
    check_positive,
    check_same_device,
    check_tensor,
    first_non_finite,
)

# The backends per device type; ``auto`` takes a custom one only once it is verified and timed
# faster than the vendor path on this device (ops/_dispatch.py).
IMPLEMENTED = {"cpu": ("cpp", "torch", "triton"), "cuda": ("cuda", "triton", "torch")}
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # kernels/cuda/dino_loss.cu
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------
# Reference (the specification)
# ----------------------------------------------------------------------------------------------
def dino_loss_reference(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int = 2,
) -> torch.Tensor:
    """DINOLoss.forward of facebookresearch/dino, in fp32 (fp64 stays fp64)."""
    compute = torch.float64 if student_out.dtype == torch.float64 else torch.float32
    batch = teacher_out.shape[0] // n_global
    n_crops = student_out.shape[0] // batch
    student = (student_out.to(compute) / student_temp).chunk(n_crops)
    teacher = F.softmax((teacher_out.to(compute) - center.to(compute).reshape(1, -1)) / teacher_temp, dim=-1)
    teacher = teacher.detach().chunk(n_global)
    total = student_out.new_zeros((), dtype=compute)
    n_terms = 0
    for iq, q in enumerate(teacher):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def _cpp_forward(student, teacher, center, student_temp, teacher_temp, n_global, need_grad, need_sum):
    return tuple(_ext.require().dino_loss_cpu(
        student, teacher, center, float(student_temp), float(teacher_temp), int(n_global), need_grad, need_sum
    ))


def _cuda_forward(student, teacher, center, student_temp, teacher_temp, n_global, need_grad, need_sum):
    return tuple(_ext.require().dino_loss_cuda(
        student, teacher, center, float(student_temp), float(teacher_temp), int(n_global), need_grad, need_sum
    ))


def _triton_forward(student, teacher, center, student_temp, teacher_temp, n_global, need_grad, need_sum):
    from dinocxr_fast.ops.triton import dino_loss as triton_dino_loss  # noqa: PLC0415

    return triton_dino_loss.dino_loss_fwd(
        student, teacher, center, student_temp, teacher_temp, n_global, need_grad, need_sum
    )


_FORWARD = {"cpp": _cpp_forward, "cuda": _cuda_forward, "triton": _triton_forward}


# ----------------------------------------------------------------------------------------------
# One autograd entry, registered with torch.library so torch.compile and export see one op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("dinocxr::dino_loss", mutates_args=())
def _dino_loss_op(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int,
    backend: str,
    need_grad: bool,
    need_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss / d student_out or empty, teacher column sums or empty)."""
    return _FORWARD[backend](
        student_out.contiguous(), teacher_out.contiguous(), center.contiguous().reshape(-1),
        student_temp, teacher_temp, n_global, need_grad, need_sum,
    )


@_dino_loss_op.register_fake
def _(student_out, teacher_out, center, student_temp, teacher_temp, n_global, backend, need_grad, need_sum):
    loss_dtype = torch.float64 if student_out.dtype == torch.float64 else torch.float32
    loss = student_out.new_empty((), dtype=loss_dtype)
    grad = torch.empty_like(student_out) if need_grad else student_out.new_empty(0)
    tsum = teacher_out.new_empty((teacher_out.shape[1],) if need_sum else (0,), dtype=torch.float32)
    return loss, grad, tsum


def _setup_context(ctx, inputs, output):
    # Only the loss is differentiated: without this, autograd would fill a zero gradient for the
    # (student-sized) gradient output before every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.need_grad = inputs[7]


def _backward(ctx, grad_loss, _grad_grad, _grad_sum):
    if not ctx.need_grad:
        raise RuntimeError("dino_loss: backward called but the forward was run without need_grad")
    (grad_student,) = ctx.saved_tensors
    if grad_loss is None:  # gradients not materialised: nothing flowed into the loss
        return None, None, None, None, None, None, None, None, None
    # The loss is usually the root of backward (grad_loss == 1): hand the gradient over without a
    # copy. The check is free on the CPU; on CUDA it would sync, so multiply there.
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return grad_student, None, None, None, None, None, None, None, None
    return (grad_student * grad_loss).to(grad_student.dtype), None, None, None, None, None, None, None, None


_dino_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _validate(student_out, teacher_out, center, student_temp, teacher_temp, n_global):
    check_tensor("student_out", student_out, ndim=2, dtypes=_DTYPES)
    check_tensor("teacher_out", teacher_out, ndim=2, dtypes=_DTYPES)
    check_tensor("center", center, ndim=(1, 2), dtypes=_DTYPES)
    device = check_same_device(student_out=student_out, teacher_out=teacher_out, center=center)
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    if not isinstance(n_global, int) or isinstance(n_global, bool) or n_global < 1:
        raise ValueError(f"n_global must be a positive int, got {n_global!r}")
    k = student_out.shape[1]
    if k < 1:
        raise ValueError("student_out must have at least one column (K >= 1)")
    if teacher_out.shape[1] != k:
        raise ValueError(f"teacher_out has K={teacher_out.shape[1]} columns but student_out has K={k}")
    if center.numel() != k or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape [K] or [1, K] with K={k}, got {tuple(center.shape)}")
    if teacher_out.shape[0] == 0 or teacher_out.shape[0] % n_global:
        raise ValueError(f"teacher_out has {teacher_out.shape[0]} rows, not a positive multiple of n_global={n_global}")
    batch = teacher_out.shape[0] // n_global
    if student_out.shape[0] % batch:
        raise ValueError(
            f"student_out has {student_out.shape[0]} rows, not a multiple of the batch size {batch} "
            f"(teacher_out rows / n_global)"
        )
    n_crops = student_out.shape[0] // batch
    if n_crops < n_global:
        raise ValueError(f"student_out holds {n_crops} crops but the teacher has n_global={n_global} views")
    if n_crops < 2:
        raise ValueError("student_out must hold at least 2 crops: with one crop there is no (teacher, student) pair")
    return device


def _case(student_out, teacher_out, n_global) -> dict:
    batch = teacher_out.shape[0] // n_global
    return {"batch": batch, "crops": student_out.shape[0] // batch, "n_global": n_global,
            "k": student_out.shape[1], "dtype": str(student_out.dtype).removeprefix("torch.")}


def _choose(backend, device, student_out, teacher_out, n_global) -> _dispatch.Choice:
    choice = _dispatch.choose("dino_loss", backend, device, IMPLEMENTED,
                              lambda: _case(student_out, teacher_out, n_global))
    if choice.backend == "cuda" and student_out.dtype not in _CUDA_DTYPES:
        why = f"the cuda kernel computes float32, bfloat16 and float16, got {student_out.dtype}"
        choice = _dispatch.unless_uncovered("dino_loss", choice, ("student_out", why))
    return choice


def _run(student_out, teacher_out, center, student_temp, teacher_temp, n_global, backend, need_sum, check_finite):
    device = _validate(student_out, teacher_out, center, student_temp, teacher_temp, n_global)
    choice = _choose(backend, device, student_out, teacher_out, n_global)
    if choice.backend != "torch":
        need_grad = torch.is_grad_enabled() and student_out.requires_grad
        try:
            loss, _, tsum = _dino_loss_op(
                student_out, teacher_out, center, float(student_temp), float(teacher_temp), n_global, choice.backend,
                need_grad, need_sum,
            )
        except Exception as exc:
            if not choice.may_demote:
                raise
            _dispatch.demote("dino_loss", choice.backend, exc)
        else:
            if check_finite and not bool(torch.isfinite(loss)):
                bad = first_non_finite(student_out=student_out, teacher_out=teacher_out, center=center)
                raise NonFiniteInputError(
                    f"{bad or 'an input'} holds non-finite values (NaN or inf): the loss is {loss.item()}")
            return loss, tsum
    if check_finite:  # the reference has no pass of its own to notice
        bad = first_non_finite(student_out=student_out, teacher_out=teacher_out, center=center)
        if bad:
            raise NonFiniteInputError(f"{bad} holds non-finite values (NaN or inf)")
    # The reference itself, differentiated by autograd.
    loss = dino_loss_reference(student_out, teacher_out, center, student_temp, teacher_temp, n_global)
    if loss.dtype != torch.float64:
        loss = loss.float()
    tsum = teacher_out.detach().float().sum(0) if need_sum else None
    return loss, tsum


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, *, student_temp: float,
              teacher_temp: float, n_global: int = 2, backend: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """DINO cross-entropy between centred, sharpened teacher softmax and student log-softmax.

    ``check_finite`` raises ``ValueError`` naming the argument that holds NaN/inf. On CUDA that
    check reads the loss back to the host (one sync); the trainer turns it off and watches the
    loss itself at logging steps.
    """
    loss, _ = _run(student_out, teacher_out, center, student_temp, teacher_temp, n_global, backend, False, check_finite)
    return loss


def dino_loss_and_teacher_sum(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, *,
                              student_temp: float, teacher_temp: float, n_global: int = 2, backend: str = "auto",
                              check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``dino_loss`` plus the fp32 column sums of ``teacher_out`` (for ``update_center``), which the
    fused backends compute in the same pass."""
    return _run(student_out, teacher_out, center, student_temp, teacher_temp, n_global, backend, True, check_finite)


# ----------------------------------------------------------------------------------------------
# Verification of the custom backends (ops/_verify.py)
# ----------------------------------------------------------------------------------------------
_STUDENT_TEMP, _TEACHER_TEMP = 0.1, 0.04


def _verify_inputs(case: dict, device: torch.device) -> dict:
    gen = _verify.seeded(case)
    dtype = getattr(torch, case["dtype"])
    b, k = case["batch"], case["k"]
    return {
        "student": _verify.randn(gen, (case["crops"] * b, k), device, dtype, scale=3.0),
        "teacher": _verify.randn(gen, (case["n_global"] * b, k), device, dtype, scale=3.0, grad=False),
        "center": _verify.randn(gen, (k,), device, torch.float32, scale=0.1, grad=False),
        "n_global": case["n_global"],
    }


def _verify_run(backend: str, x: dict) -> list:
    args = (x["student"], x["teacher"], x["center"])
    if backend == _verify.REFERENCE:
        def fn():
            loss = dino_loss_reference(*args, _STUDENT_TEMP, _TEACHER_TEMP, x["n_global"])
            return loss, x["teacher"].sum(0)
    else:
        def fn():
            return dino_loss_and_teacher_sum(*args, student_temp=_STUDENT_TEMP, teacher_temp=_TEACHER_TEMP,
                                             n_global=x["n_global"], backend=backend, check_finite=False)
    return _verify.forward_backward(fn, x)


def _describe(case: dict) -> str:
    return f"{case['crops']}x{case['batch']} x K={case['k']}"


VERIFY = _verify.OpSpec("dino_loss", IMPLEMENTED, _verify_inputs, _verify_run, _describe)
_verify.register("dino_loss", f"{__name__}:VERIFY")
