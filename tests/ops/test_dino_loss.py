"""The fused DINO loss: every backend against the reference, forward and backward."""
from __future__ import annotations

import pytest
import torch

from dinocxr_fast import _ext, ops
from dinocxr_fast.ops import _backend
from dinocxr_fast.ops.dino_loss import dino_loss_reference

TS, TT = 0.1, 0.04


def cpu_backends() -> list[str]:
    names = ["torch"]
    if _ext.has_cpp():
        names.append("cpp")
    return names


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


def run_backend(student, teacher, center, n_global, backend):
    s = student.detach().requires_grad_()
    loss, tsum = ops.dino_loss_and_teacher_sum(
        s, teacher, center, student_temp=TS, teacher_temp=TT, n_global=n_global, backend=backend
    )
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad, tsum


CASES = [  # (B, K, n_crops, n_global)
    (1, 1, 2, 2),
    (3, 7, 2, 2),
    (32, 7, 10, 2),
    (3, 4096, 10, 2),
    (32, 4096, 2, 2),
    (1, 4096, 10, 2),
    (3, 1029, 4, 3),  # K not a multiple of the tile or the vector width; three teacher views
    (4, 9, 3, 1),  # one teacher view: crop 0 has no pair
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("batch,k,n_crops,n_global", CASES)
def test_matches_reference_fp32(backend, batch, k, n_crops, n_global):
    student, teacher, center = make_inputs(batch, k, n_crops, n_global)
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, n_global)
    loss, grad, tsum = run_backend(student, teacher, center, n_global, backend)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tsum.double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_large_k_one_case(backend):
    student, teacher, center = make_inputs(3, 65536, 2)
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)
    loss, grad, _ = run_backend(student, teacher, center, 2, backend)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not _ext.has_cpp(), reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n_crops,n_global", CASES[1:])
def test_cpp_row_kernels_of_each_isa_match_reference(isa, dtype, batch, k, n_crops, n_global):
    """Every instruction set's row kernels are checked, not only the one this CPU picks: the
    portable ones (older CPUs, fp64), AVX2 and AVX-512 (from one template, dino_loss_simd.h)."""
    ext = _ext.load()
    ext.limit_cpu_isa(isa)
    try:
        if ext.cpu_isa() != isa:
            pytest.skip(f"this CPU has no {isa}")
        student, teacher, center = make_inputs(batch, k, n_crops, n_global, dtype=dtype)
        ref_loss, ref_grad = reference_and_grad(student, teacher, center, n_global)
        loss, grad, tsum = run_backend(student, teacher, center, n_global, "cpp")
    finally:
        ext.limit_cpu_isa("avx512")
    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    else:  # as test_low_precision_inputs_computed_in_fp32: the gradient is rounded to bf16 once
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3 * ref_grad.abs().max().item())
    torch.testing.assert_close(tsum, teacher.float().sum(0), rtol=1e-5, atol=1e-4)


def test_cpp_force_portable_hook():
    if not _ext.has_cpp():
        pytest.skip("the C++ extension is not built")
    ext = _ext.load()
    ext.force_portable_cpu(True)
    try:
        assert ext.cpu_isa() == "portable"
    finally:
        ext.force_portable_cpu(False)
    with pytest.raises(ValueError, match="limit_cpu_isa"):
        ext.limit_cpu_isa("sse9")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32(backend, dtype):
    student, teacher, center = make_inputs(5, 300, 4, dtype=dtype)
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)  # same rounded inputs, fp64 math
    loss, grad, _ = run_backend(student, teacher, center, 2, backend)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    # the gradient is rounded to the input dtype once
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3 * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend):
    student, teacher, center = make_inputs(2, 5, 3, dtype=torch.float64, scale=1.0)
    center = center.double()
    student.requires_grad_()

    def fn(s):
        return ops.dino_loss(s, teacher, center, student_temp=TS, teacher_temp=TT, backend=backend)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_huge_logits_stay_finite(backend):
    student, teacher, center = make_inputs(4, 257, 4, scale=1e4)
    loss, grad, _ = run_backend(student, teacher, center, 2, backend)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_center_shape_1k_and_teacher_grad_ignored(backend):
    student, teacher, center = make_inputs(3, 11, 2)
    teacher = teacher.clone().requires_grad_()
    loss_a = ops.dino_loss(student, teacher, center.reshape(1, -1), student_temp=TS, teacher_temp=TT, backend=backend)
    loss_b = ops.dino_loss(student, teacher.detach(), center, student_temp=TS, teacher_temp=TT, backend=backend)
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_grad_mode(backend):
    student, teacher, center = make_inputs(3, 64, 2)
    with torch.no_grad():
        loss = ops.dino_loss(student.requires_grad_(), teacher, center, student_temp=TS, teacher_temp=TT,
                             backend=backend)
    assert loss.grad_fn is None
    ref_loss, _ = reference_and_grad(student, teacher, center, 2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)


# ---- bad input: a ValueError naming the argument -----------------------------------------------
def call(student, teacher, center, **kw):
    kw.setdefault("student_temp", TS)
    kw.setdefault("teacher_temp", TT)
    return ops.dino_loss(student, teacher, center, **kw)


@pytest.mark.parametrize("backend", cpu_backends())
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
    student, teacher, center = make_inputs(3, 8, 4)
    with pytest.raises(ValueError, match=match):
        call(*mutate(student, teacher, center), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("which", ["student_out", "teacher_out", "center"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_argument(backend, which, value):
    tensors = dict(zip(("student_out", "teacher_out", "center"), make_inputs(3, 8, 4)))
    tensors[which] = tensors[which].clone()
    tensors[which].view(-1)[5] = value
    with pytest.raises(ValueError, match=which):
        call(tensors["student_out"], tensors["teacher_out"], tensors["center"], backend=backend)


def test_bad_temperatures_and_n_global():
    student, teacher, center = make_inputs(3, 8, 4)
    with pytest.raises(ValueError, match="student_temp"):
        call(student, teacher, center, student_temp=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        call(student, teacher, center, teacher_temp=float("nan"))
    with pytest.raises(ValueError, match="n_global"):
        call(student, teacher, center, n_global=0)
    with pytest.raises(ValueError, match="n_global"):  # 6 teacher rows / 4 views: not a multiple
        call(student, teacher, center, n_global=4)
    s1, t1, c1 = make_inputs(3, 8, 1, n_global=1)
    with pytest.raises(ValueError, match="at least 2 crops"):
        call(s1, t1, c1, n_global=1)


def test_wrong_device_is_named():
    student, teacher, center = make_inputs(3, 8, 2)
    with pytest.raises(ValueError, match="center"):
        call(student, teacher, center.to("meta"))


def test_unknown_and_unavailable_backends():
    student, teacher, center = make_inputs(3, 8, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        call(student, teacher, center, backend="fastest")
    with pytest.raises(RuntimeError, match="cuda"):
        call(student, teacher, center, backend="cuda")


def test_env_var_forces_backend(monkeypatch):
    from dinocxr_fast.ops import _dispatch

    student, teacher, center = make_inputs(3, 8, 2)
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _dispatch.choose("dino_loss", "auto", student.device, ops.dino_loss.__globals__["IMPLEMENTED"]).backend == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        call(student, teacher, center)


def test_auto_takes_cpp_on_cpu_only_once_verified(tmp_path, monkeypatch):
    from dinocxr_fast.ops import _dispatch
    from dinocxr_fast.ops.dino_loss import IMPLEMENTED

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


def test_torch_compile_sees_one_op():
    """The custom op traces as a single node under torch.compile (no graph break inside)."""
    if not _ext.has_cpp():
        pytest.skip("the C++ extension is not built")
    student, teacher, center = make_inputs(2, 16, 2)

    def fn(s):
        return torch.ops.dinocxr.dino_loss(s, teacher, center, TS, TT, 2, "cpp", False, False)[0]

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(student), fn(student))


# ---- update_center ---------------------------------------------------------------------------------
def test_update_center_matches_reference_and_fused_sum():
    student, teacher, center = make_inputs(4, 33, 3)
    expected = ops.update_center_reference(center.clone(), teacher, 0.9)
    got = ops.update_center(center.clone(), teacher, 0.9)
    torch.testing.assert_close(got, expected)
    _, tsum = ops.dino_loss_and_teacher_sum(student, teacher, center, student_temp=TS, teacher_temp=TT)
    fused = ops.update_center(center.clone(), teacher, 0.9, teacher_sum=tsum)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def test_update_center_bad_input():
    _, teacher, center = make_inputs(2, 8, 2)
    with pytest.raises(ValueError, match="center"):
        ops.update_center(center[:-1].clone(), teacher, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ops.update_center(center.clone(), teacher, 1.5)
    with pytest.raises(ValueError, match="teacher_sum"):
        ops.update_center(center.clone(), teacher, 0.9, teacher_sum=torch.zeros(3))


# ---- GPU (run with -m cuda on a GPU machine) ------------------------------------------------------
def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["cuda", "triton"]
    device = torch.device("cuda")
    return [b for b in ("cuda", "triton") if _backend.why_unavailable(b, device) is None]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k,n_crops", [(3, 7, 2), (32, 65536, 2), (64, 65536, 12), (5, 1029, 10)])
def test_gpu_backends_match_reference(backend, dtype, batch, k, n_crops):
    student, teacher, center = make_inputs(batch, k, n_crops, dtype=dtype, device="cuda")
    ref_loss, ref_grad = reference_and_grad(student, teacher, center, 2)
    loss, grad, tsum = run_backend(student, teacher, center, 2, backend)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=tol * ref_grad.abs().max().item())
    torch.testing.assert_close(tsum.double(), teacher.double().sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not _ext.has_cpp(), reason="the C++ extension is not built")
def test_cpp_gradient_buffer_recycled_only_when_free():
    """The cpp backend reuses its gradient buffer across calls (no 80 MB of fresh pages per step),
    but never one a caller still holds, and a backward after a second forward uses its own."""
    student, teacher, center = make_inputs(4, 300, 3)
    _, expected = reference_and_grad(student, teacher, center, 2)
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


@pytest.mark.parametrize("backend", cpu_backends())
def test_backward_scaled_and_through_other_outputs(backend):
    """A non-unit upstream gradient scales the result; the unused outputs need no zero gradient."""
    student, teacher, center = make_inputs(3, 50, 4)
    _, expected = reference_and_grad(student, teacher, center, 2)
    s = student.detach().requires_grad_()
    loss, tsum = ops.dino_loss_and_teacher_sum(s, teacher, center, student_temp=TS, teacher_temp=TT, backend=backend)
    (grad,) = torch.autograd.grad(loss * 3.0 + tsum.sum() * 0, s, allow_unused=True)
    torch.testing.assert_close(grad.double(), expected * 3.0, rtol=1e-4, atol=1e-6)
