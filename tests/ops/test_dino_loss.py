"""ops.dino_loss / ops.dino_loss_and_teacher_sum: every backend against the reference (the loss, its
gradient, the teacher column sums), on odd shapes and every dtype; bad input; the dispatch.

Backends: ``torch`` and ``cpp`` on the CPU, ``triton`` in the interpreter (without a GPU), ``cuda`` and
``triton`` on a GPU (``pytest -m cuda``). The CPU takes small odd shapes (K of 1, 7, 9, 1029: under one
block and not a multiple of any tile or vector width; one and three teacher views; multi-crop), the
GPU the real sizes (K = 65536, 12 crops at batch 64). Kernel-level checks (each ISA of the cpp rows,
the Triton split path, the CUDA kernel's load paths) are in tests/kernels/.
"""
from __future__ import annotations

import pytest
import torch

from dinocxr_fast import _ext, ops
from dinocxr_fast.ops import _backend, _dispatch
from dinocxr_fast.ops.dino_loss import IMPLEMENTED
from op_helpers import (
    DINO_TS as TS,
    DINO_TT as TT,
    Tol,
    assert_dino_matches_reference,
    backend_cases,
    backends,
    dino_inputs,
    dino_reference,
    dino_run,
    dino_tolerance,
    needs_cpp,
)

CPU = ("torch", "cpp", "triton-interpreter")
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

INTERPRETER_CASES = [  # (dtype, B, K, n_crops, n_global): small enough for the Triton interpreter
    (F32, 1, 1, 2, 2),     # one column, one image
    (F32, 3, 7, 2, 2),     # K under one block
    (F32, 6, 7, 10, 2),    # multi-crop: 8 crops the teacher never sees
    (F32, 3, 1029, 4, 3),  # K not a multiple of the tile or the vector width; three teacher views
    (F32, 4, 9, 3, 1),     # one teacher view: crop 0 has no pair, zero gradient
    (F32, 1, 300, 2, 2),   # two rows: split over several programs (triton) by default
    (BF16, 5, 300, 4, 2),  # low precision: computed in fp32, the gradient rounded once
    (F16, 5, 300, 4, 2),
]
CPU_CASES = INTERPRETER_CASES + [
    (F32, 32, 7, 10, 2),
    (F32, 3, 4096, 10, 2),
    (F32, 32, 4096, 2, 2),
    (F32, 1, 4096, 10, 2),
]
GPU_CASES = [
    (BF16, 64, 65536, 12, 2),  # the multi-crop size of the design doc: one program per row
    (BF16, 32, 65536, 2, 2),   # DINO-CXR's two views: 64 rows, split over programs
    (BF16, 64, 65536, 2, 2),
    (BF16, 5, 1029, 10, 2),
    (BF16, 7, 3001, 5, 3),
    (BF16, 4, 9, 3, 1),
    (BF16, 3, 7, 2, 2),
    (F16, 64, 65536, 12, 2),
    (F32, 64, 65536, 12, 2),
    (F32, 32, 65536, 2, 2),
    (F32, 7, 3001, 5, 3),
    (F32, 5, 1029, 10, 2),
    (F32, 3, 7, 2, 2),
]


# ---- forward and backward against the reference ---------------------------------------------------
@pytest.mark.parametrize("backend, dtype, batch, k, n_crops, n_global", backend_cases({
    ("torch", "cpp"): CPU_CASES,
    "triton-interpreter": INTERPRETER_CASES,
    ("cuda", "triton-cuda"): GPU_CASES,
}))
def test_matches_reference(backend, dtype, batch, k, n_crops, n_global):
    student, teacher, center = dino_inputs(batch, k, n_crops, n_global, dtype=dtype, device=backend.device)
    loss, grad, tsum = dino_run(student, teacher, center, n_global, backend.name)
    assert_dino_matches_reference(loss, grad, tsum, student, teacher, center, n_global,
                                  dino_tolerance(backend, dtype))


@pytest.mark.parametrize("backend", backends("torch", "cpp"))  # K = 65536 takes the interpreter 40 s
def test_large_k_one_case(backend):
    student, teacher, center = dino_inputs(3, 65536, 2)
    ref_loss, ref_grad = dino_reference(student, teacher, center, 2)
    loss, grad, _ = dino_run(student, teacher, center, 2, backend.name)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", backends(*CPU))
def test_gradcheck_float64(backend):
    student, teacher, center = dino_inputs(2, 5, 3, dtype=F64, scale=1.0)
    center = center.double()
    student.requires_grad_()

    def fn(s):
        return ops.dino_loss(s, teacher, center, student_temp=TS, teacher_temp=TT, backend=backend.name)

    # the interpreter: a few random directions instead of one forward per input element
    fast = backend.name == "triton"
    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend, batch, k, n_crops", backend_cases({
    (*CPU, "triton-cuda"): [(2, 5, 3), (2, 37, 3)],
}))
def test_float64_matches_reference_to_fp64_precision(backend, batch, k, n_crops):
    """fp64 math end to end (cuda computes fp32/bf16/fp16 only)."""
    student, teacher, center = dino_inputs(batch, k, n_crops, dtype=F64, device=backend.device, scale=1.0)
    center = center.double()
    loss, grad, _ = dino_run(student, teacher, center, 2, backend.name)
    ref_loss, ref_grad = dino_reference(student, teacher, center, 2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backends(*CPU))
def test_huge_logits_stay_finite(backend):
    student, teacher, center = dino_inputs(4, 257, 4, scale=1e4)
    loss, grad, _ = dino_run(student, teacher, center, 2, backend.name)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = dino_reference(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", backends(*CPU))
def test_center_shape_1k_and_teacher_grad_ignored(backend):
    student, teacher, center = dino_inputs(3, 11, 2)
    teacher = teacher.clone().requires_grad_()
    kw = dict(student_temp=TS, teacher_temp=TT, backend=backend.name)
    loss_a = ops.dino_loss(student, teacher, center.reshape(1, -1), **kw)
    loss_b = ops.dino_loss(student, teacher.detach(), center, **kw)
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("backend", backends(*CPU))
def test_no_grad_mode(backend):
    student, teacher, center = dino_inputs(3, 64, 2)
    with torch.no_grad():
        loss = ops.dino_loss(student.requires_grad_(), teacher, center, student_temp=TS, teacher_temp=TT,
                             backend=backend.name)
    assert loss.grad_fn is None
    ref_loss, _ = dino_reference(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend, dtype, batch, k, n_crops, factor, grad_tol", backend_cases({
    CPU: [(F32, 3, 50, 4, 3.0, Tol(1e-4, 1e-6))],
    "cuda": [(BF16, 8, 65536, 4, 2.0, Tol(0.0, of_max=1e-2))],
}))
def test_backward_scaled_and_through_other_outputs(backend, dtype, batch, k, n_crops, factor, grad_tol):
    """A non-unit upstream gradient scales the result; the unused outputs need no zero gradient."""
    student, teacher, center = dino_inputs(batch, k, n_crops, dtype=dtype, device=backend.device)
    ref_loss, ref_grad = dino_reference(student, teacher, center, 2)
    s = student.detach().requires_grad_()
    loss, tsum = ops.dino_loss_and_teacher_sum(s, teacher, center, student_temp=TS, teacher_temp=TT,
                                               backend=backend.name)
    (grad,) = torch.autograd.grad(loss * factor + tsum.sum() * 0, s, allow_unused=True)
    tol = dino_tolerance(backend, dtype)
    tol.loss.check(loss, ref_loss, "loss")
    grad_tol.check(grad, ref_grad * factor, "d loss / d student")
    tol.tsum.check(tsum, teacher.double().sum(0), "teacher column sums")


@needs_cpp
def test_cpp_gradient_buffer_recycled_only_when_free():
    """The cpp backend reuses its gradient buffer across calls (no 80 MB of fresh pages per step),
    but never one a caller still holds, and a backward after a second forward uses its own."""
    student, teacher, center = dino_inputs(4, 300, 3)
    _, expected = dino_reference(student, teacher, center, 2)
    s = student.detach().requires_grad_()

    def grad_of(x):
        loss = ops.dino_loss(x, teacher, center, student_temp=TS, teacher_temp=TT, backend="cpp")
        return torch.autograd.grad(loss, x)[0]

    held = grad_of(s)
    held_copy = held.clone()
    other = grad_of((s * 2).detach().requires_grad_())  # must not write into `held`
    assert torch.equal(held, held_copy) and held.data_ptr() != other.data_ptr()
    ptr = other.data_ptr()
    del other
    again = grad_of(s)  # `other` was released: its buffer is reused
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again.double(), expected, rtol=1e-4, atol=1e-6)


# ---- bad input: a ValueError naming the argument, before any backend runs --------------------------
def call(student, teacher, center, **kw):
    kw.setdefault("student_temp", TS)
    kw.setdefault("teacher_temp", TT)
    return ops.dino_loss(student, teacher, center, **kw)


@pytest.mark.parametrize("backend", backends(*CPU))
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s, t, c: (s[0], t, c), "student_out"),
        (lambda s, t, c: (s, t[:, :-1], c), "teacher_out"),
        (lambda s, t, c: (s, t, c[:-1]), "center"),
        (lambda s, t, c: (s[:-1], t, c), "student_out"),  # rows not a multiple of B
        (lambda s, t, c: (s, t[:-1], c), "teacher_out"),  # rows not a multiple of n_global
        (lambda s, t, c: (s.int(), t, c), "student_out"),
        (lambda s, t, c: ([1.0], t, c), "student_out"),
        (lambda s, t, c: (s, t, c.reshape(1, 1, -1)), "center"),
    ],
)
def test_bad_shapes_and_types(backend, mutate, match):
    student, teacher, center = dino_inputs(3, 8, 4)
    with pytest.raises(ValueError, match=match):
        call(*mutate(student, teacher, center), backend=backend.name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", backends(*CPU))
@pytest.mark.parametrize("which", ["student_out", "teacher_out", "center"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_argument(backend, which, value):
    tensors = dict(zip(("student_out", "teacher_out", "center"), dino_inputs(3, 8, 4)))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[5] = value
    with pytest.raises(ValueError, match=which):
        call(tensors["student_out"], tensors["teacher_out"], tensors["center"], backend=backend.name)


def test_bad_temperatures_and_n_global():
    student, teacher, center = dino_inputs(3, 8, 4)
    with pytest.raises(ValueError, match="student_temp"):
        call(student, teacher, center, student_temp=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        call(student, teacher, center, teacher_temp=float("nan"))
    with pytest.raises(ValueError, match="n_global"):
        call(student, teacher, center, n_global=0)
    with pytest.raises(ValueError, match="n_global"):  # 6 teacher rows / 4 views: not a multiple
        call(student, teacher, center, n_global=4)
    s1, t1, c1 = dino_inputs(3, 8, 1, n_global=1)
    with pytest.raises(ValueError, match="at least 2 crops"):
        call(s1, t1, c1, n_global=1)


def test_wrong_device_is_named():
    student, teacher, center = dino_inputs(3, 8, 2)
    with pytest.raises(ValueError, match="center"):
        call(student, teacher, center.to("meta"))


def test_unknown_and_unavailable_backends():
    student, teacher, center = dino_inputs(3, 8, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        call(student, teacher, center, backend="fastest")
    with pytest.raises(RuntimeError, match="cuda"):
        call(student, teacher, center, backend="cuda")


# ---- which backend runs ------------------------------------------------------------------------------
def test_env_var_forces_backend(monkeypatch):
    student, teacher, center = dino_inputs(3, 8, 2)
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _dispatch.choose("dino_loss", "auto", student.device, IMPLEMENTED).backend == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        call(student, teacher, center)


def test_auto_takes_cpp_on_cpu_only_once_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOCXR_CACHE_DIR", str(tmp_path))
    _dispatch.reset()
    case = {"batch": 4, "crops": 2, "n_global": 2, "k": 64, "dtype": "float32"}
    cpu = torch.device("cpu")
    assert _dispatch.choose("dino_loss", "auto", cpu, IMPLEMENTED, lambda: case).backend == "torch"
    if _ext.has_cpp():
        key = _dispatch.verdict_key("dino_loss", "cpp", case)
        _dispatch._verdicts_for(cpu)[key] = {"backend": "cpp", "ok": True, "speedup": 2.0}
        assert _dispatch.choose("dino_loss", "auto", cpu, IMPLEMENTED, lambda: case).backend == "cpp"
    _dispatch.reset()


def test_auto_never_takes_the_interpreter():
    assert "triton" not in _dispatch.candidates("dino_loss", torch.device("cpu"), IMPLEMENTED)


@needs_cpp
def test_torch_compile_sees_one_op():
    """The custom op traces as a single node under torch.compile (no graph break inside)."""
    student, teacher, center = dino_inputs(2, 16, 2)

    def fn(s):
        return torch.ops.dinocxr.dino_loss(s, teacher, center, TS, TT, 2, "cpp", False, False)[0]

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(student), fn(student))
