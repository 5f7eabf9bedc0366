"""Helpers shared by the op tests (tests/ops/) and the kernel tests (tests/kernels/).

- ``backends`` / ``backend_cases``: the ``backend`` parameter of a test, one ``Backend`` (the name a
  call passes as ``backend=``, and the device its tensors live on) per backend, each with the marks
  that skip it, saying why, where it cannot run: ``cpp`` without the extension, ``triton-interpreter``
  on a GPU machine (there the ``triton-cuda`` cases run), ``cuda`` / ``triton-cuda`` without a GPU
  (``@pytest.mark.cuda``, tests/conftest.py). ``backend_cases`` gives each backend its own cases
  (the CPU small odd shapes, the GPU the model's sizes).
- ``Tol``: an elementwise tolerance; ``close``: the max-error check of the CUDA kernel tests.
- per op: inputs, the float64 reference, a run of one backend, the tolerances: dino_loss (per
  backend and dtype), attention / window_attention (on a GPU: no worse than SDPA), conv_bn_act /
  pcm (nn modules, the cpp backend's fp32-vs-fp64 check, the cuda backend's GPU fixture and paths).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn as nn

from dinocxr_fast import _ext, ops
from dinocxr_fast.ops import _backend, _dispatch

# ---- the backend parameter -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend of an op on one device: ``name`` is what the call passes as ``backend=``."""

    name: str
    device: str

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


needs_cpp = pytest.mark.skipif(not _ext.has_cpp(), reason="the C++ extension dinocxr_fast._C is not built "
                               "(python setup.py build_ext --inplace)")
needs_triton = pytest.mark.skipif(not _backend.triton_installed(), reason="triton is not installed")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="a Triton interpreter case (TRITON_INTERPRET=1, which tests/conftest.py sets "
                                        "without a GPU); on a GPU machine the triton-cuda cases run instead")

# key (the test id) -> (backend, marks)
_BACKENDS = {
    "torch": (Backend("torch", "cpu"), ()),
    "auto": (Backend("auto", "cpu"), ()),
    "cpp": (Backend("cpp", "cpu"), (needs_cpp,)),
    "triton-interpreter": (Backend("triton", "cpu"), (needs_triton, interpreted)),
    "cuda": (Backend("cuda", "cuda"), (pytest.mark.cuda,)),
    "triton-cuda": (Backend("triton", "cuda"), (pytest.mark.cuda, needs_triton)),
    "auto-cuda": (Backend("auto", "cuda"), (pytest.mark.cuda,)),
}


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return "x".join(map(_case_id, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def backends(*keys: str) -> list:
    """``@pytest.mark.parametrize("backend", backends("torch", "cpp", "cuda"))``."""
    return [pytest.param(_BACKENDS[k][0], marks=_BACKENDS[k][1], id=k) for k in keys]


def backend_cases(table: dict) -> list:
    """``{backend key or tuple of keys: [case tuple, ...]}`` -> params ``(backend, *case)``: each
    backend runs its own cases (the CPU small odd shapes, the GPU the model's sizes)."""
    params = []
    for keys, cases in table.items():
        for key in (keys,) if isinstance(keys, str) else keys:
            backend, marks = _BACKENDS[key]
            for case in cases:
                case = case if isinstance(case, tuple) else (case,)
                params.append(pytest.param(backend, *case, marks=marks, id="-".join([key, *map(_case_id, case)])))
    return params


def assert_backend_table(op: str, implemented: dict, kernels: dict, cpu_candidates: list) -> None:
    """The contract later kernels rely on: ``IMPLEMENTED`` lists names and the op's kernel table maps
    them; what ``auto`` may take on the CPU (never the Triton interpreter)."""
    for names in implemented.values():
        assert set(names) <= set(kernels)
    assert _dispatch.candidates(op, torch.device("cpu"), implemented) == cpu_candidates


# ---- tolerances ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tol:
    """Elementwise: |got - want| <= atol + of_max * max |want| + rtol * |want| (compared in float64)."""

    rtol: float = 0.0
    atol: float = 0.0
    of_max: float = 0.0

    def check(self, got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
        got, want = got.detach().double(), want.detach().double()
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=self.rtol, atol=self.atol + self.of_max * scale,
                                   msg=lambda m: f"{what}: {m}" if what else m)


def close(got, want, tol, what="", atol=0.0):
    """max |got - want| <= tol * max |want| + atol (atol for quantities that are zero in exact arithmetic)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-6) + max(atol, 1e-6), (
        f"{what}: max error {err:.3g} vs max magnitude {scale:.3g} (tol {tol})")


# ---- dino_loss -------------------------------------------------------------------------------------
DINO_TS, DINO_TT = 0.1, 0.04  # student, teacher temperature


def dino_inputs(batch, k, n_crops, n_global=2, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """Student [n_crops*B, K], teacher [n_global*B, K] (``dtype``), centre [K] (float32)."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_crops * batch, k, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    teacher = (torch.randn(n_global * batch, k, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
    center = (torch.randn(k, generator=gen, dtype=torch.float64) * 0.1).to(device, torch.float32)
    return student, teacher, center


def dino_reference(student, teacher, center, n_global):
    """The reference in float64 on the same (rounded) inputs: (loss, d loss / d student)."""
    s = student.detach().double().requires_grad_()
    loss = ops.dino_loss_reference(s, teacher.double(), center.double(), DINO_TS, DINO_TT, n_global)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def dino_run(student, teacher, center, n_global, backend: str):
    """(loss, d loss / d student, teacher column sums) of ``dino_loss_and_teacher_sum`` on ``backend``."""
    s = student.detach().requires_grad_()
    loss, tsum = ops.dino_loss_and_teacher_sum(s, teacher, center, student_temp=DINO_TS, teacher_temp=DINO_TT,
                                               n_global=n_global, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad, tsum


@dataclasses.dataclass(frozen=True)
class DinoTol:
    loss: Tol
    grad: tuple  # every Tol the gradient must meet
    tsum: Tol


def dino_tolerance(backend: Backend, dtype: torch.dtype) -> DinoTol:
    """The strictest tolerance any earlier test held this backend to, per device and dtype."""
    low = dtype in (torch.bfloat16, torch.float16)
    if not backend.on_gpu:
        if low:  # computed in fp32; the gradient is rounded to the input dtype once
            return DinoTol(Tol(1e-4, 1e-4), (Tol(1e-2, of_max=1e-3),), Tol(1e-5, 1e-4))
        grad = (Tol(1e-4, 1e-6),)
        if backend.name != "cpp":  # the cpp rows leave ~5e-12 where a K=1 gradient is exactly 0
            grad += (Tol(1e-4, of_max=1e-4),)
        return DinoTol(Tol(2e-5, 2e-5), grad, Tol(1e-5, 1e-4))
    tsum = Tol(1e-4, 1e-3) if backend.name == "cuda" else Tol(1e-5, 1e-4)
    if not low:
        return DinoTol(Tol(1e-4, 1e-4), (Tol(1e-4, of_max=1e-4),), tsum)
    return DinoTol(Tol(2e-3, 2e-3), (Tol(1e-2, of_max=2e-3 if dtype == torch.bfloat16 else 1e-2),), tsum)


def assert_dino_matches_reference(loss, grad, tsum, student, teacher, center, n_global, tol: DinoTol):
    ref_loss, ref_grad = dino_reference(student, teacher, center, n_global)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    tol.loss.check(loss, ref_loss, "loss")
    for t in tol.grad:
        t.check(grad, ref_grad, "d loss / d student")
    if tsum is not None:
        tol.tsum.check(tsum, teacher.double().sum(0), "teacher column sums")


# ---- attention / window_attention --------------------------------------------------------------------
def attn_randn(*shape, seed, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)


def window_case(batch, hw, heads, head_dim, dtype, pad, device="cpu", pad_dtype=None):
    """qkv B x H x W x 3C, pad_value [3C] (or None), the upstream gradient B x H x W x C."""
    c = heads * head_dim
    qkv = attn_randn(batch, *hw, 3 * c, seed=0, device=device).to(dtype)
    pad_value = attn_randn(3 * c, seed=1, device=device).to(pad_dtype or dtype) if pad else None
    grad_out = attn_randn(batch, *hw, c, seed=2, device=device).to(dtype)
    return qkv, pad_value, grad_out


def full_case(shape, dtype, device="cpu"):
    """qkv B x *tokens x 3C and the upstream gradient B x *tokens x C."""
    qkv = attn_randn(*shape, seed=0, device=device).to(dtype)
    grad_out = attn_randn(*shape[:-1], shape[-1] // 3, seed=2, device=device).to(dtype)
    return qkv, grad_out


def _window_grads(fn, qkv, pad_value, grad_out, cast):
    x = cast(qkv).detach().requires_grad_()
    p = cast(pad_value).detach().requires_grad_() if pad_value is not None else None
    out = fn(x, p)
    inputs = [x] + ([p] if p is not None else [])
    grads = torch.autograd.grad(out, inputs, cast(grad_out), materialize_grads=True)
    return [out.detach(), *grads]


def run_window(qkv, pad_value, grad_out, heads, ws, backend):
    """[out, d qkv, d pad_value (when given)] of ``window_attention`` on ``backend``."""
    return _window_grads(lambda x, p: ops.window_attention(x, heads, ws, pad_value=p, backend=backend),
                         qkv, pad_value, grad_out, lambda t: t)


def reference_window(qkv, pad_value, grad_out, heads, ws):
    """The specification in fp64 on the same (rounded) inputs."""
    return _window_grads(lambda x, p: ops.window_attention_reference(x, heads, ws, pad_value=p),
                         qkv, pad_value, grad_out, lambda t: t.double())


def run_full(qkv, grad_out, heads, backend, scale=None):
    x = qkv.detach().requires_grad_()
    out = ops.attention(x, heads, scale=scale, backend=backend)
    (g,) = torch.autograd.grad(out, x, grad_out)
    return [out.detach(), g]


def reference_full(qkv, grad_out, heads, scale=None):
    x = qkv.detach().double().requires_grad_()
    out = ops.attention_reference(x, heads, scale=scale)
    (g,) = torch.autograd.grad(out, x, grad_out.double())
    return [out.detach(), g]


def assert_attention_accurate(got, want, dtype, names, peer=None):
    """Outputs and gradients against the fp64 reference ``want``, each relative to its largest value.
    Without ``peer`` (the CPU): within a few ulps of ``dtype`` (float32 also elementwise). With the
    vendor path's own results on a GPU as ``peer``: no worse than SDPA in the same dtype (2x its
    error), with a floor for cases it gets exactly."""
    for i, (g, w, name) in enumerate(zip(got, want, names)):
        assert g.dtype == dtype or name.endswith("d pad_value"), name
        scale = w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        if peer is not None:
            peer_err = (peer[i].double() - w).abs().max().item()
            floor = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            assert err <= max(2 * peer_err, floor * scale), (
                f"{name}: {err:.3g} vs SDPA {peer_err:.3g} (scale {scale:.3g})")
            continue
        tol = (2e-5 if dtype == torch.float32 else 4e-3) * (scale or 1.0)
        assert err <= tol, f"{name}: max error {err:.3g} over {tol:.3g} (scale {scale:.3g})"
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), w, rtol=1e-5 if i == 0 else 1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


# ---- conv_bn_act / pcm -----------------------------------------------------------------------------
def conv_bn_modules(c_in, c_out, stride=1, groups=1, *, dilation=1, dtype=torch.float32, bn_dtype=torch.float32,
                    device="cpu", mean_std=1.0, seed=0):
    """A 3x3 nn.Conv2d (padding = dilation) and an nn.BatchNorm2d whose parameters and running
    statistics are away from (1, 0) so that every gradient matters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, groups).to(device, dtype)
    bn = nn.BatchNorm2d(c_out).to(device, bn_dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0, mean_std)
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def conv_call(fn, x, conv, bn, activation, training, use_bn=True, use_bias=True, **kw):
    """``fn`` (conv_bn_act, its reference or a backend) with the modules' parameters; x B x H x W x C."""
    if use_bn:
        kw.update(bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
                  eps=bn.eps, momentum=bn.momentum, training=training)
    return fn(x, conv.weight, conv.bias if use_bias else None, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=conv.groups, activation=activation, **kw)


def pcm_modules(c0, c1, c2, c3, groups, strides=(1, 1, 1), *, dtype=torch.float64, bn_dtype=torch.float64,
                device="cpu", bias_std=1.0, mean_std=0.2, seed=0):
    """The PCM's three convolutions and two BatchNorms (statistics away from (1, 0))."""
    torch.manual_seed(seed)
    convs = [nn.Conv2d(a, b, 3, s, 1, groups=groups).to(device, dtype)
             for (a, b), s in zip(((c0, c1), (c1, c2), (c2, c3)), strides)]
    bns = [nn.BatchNorm2d(c).to(device, bn_dtype) for c in (c1, c2)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, bias_std)
            bn.running_mean.normal_(0, mean_std)
            bn.running_var.uniform_(0.5, 2.0)
    return convs, bns


def bn_tuple(bn):
    """A BatchNorm as ops.pcm takes it."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.momentum)


def pcm_call(fn, x, convs, bns, strides, groups, training, **kw):
    return fn(x, [c.weight for c in convs], [c.bias for c in convs], bn_tuple(bns[0]), bn_tuple(bns[1]),
              strides=strides, groups=groups, training=training, **kw)


# The cpp backend's tests: fp32 against the reference in fp64 on the same (fp32-representable) inputs.
ACTIVATIONS = (None, "silu", "gelu", "relu")


def conv_case(batch, h, w, c_in, c_out, groups, *, bias=True, seed=0, y_offset=0.0):
    """fp32 x, weight, bias, BatchNorm weight / bias / running mean / var (away from (1, 0))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h, w, c_in, generator=gen)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=gen) * (1.0 / (9 * c_in / groups) ** 0.5)
    b = (torch.randn(c_out, generator=gen) * 0.1 + y_offset) if bias else None
    gamma = torch.rand(c_out, generator=gen) + 0.5
    beta = torch.randn(c_out, generator=gen) * 0.5
    running_mean = torch.randn(c_out, generator=gen) * 0.1
    running_var = torch.rand(c_out, generator=gen) + 0.5
    return x, weight, b, gamma, beta, running_mean, running_var


def conv_run(case, *, backend, dtype, training, activation, stride=1, groups=1, steps=1, grad_seed=1, momentum=0.1):
    """(outputs of the last step, grads of x / weight / bias / bn weight / bn bias, running mean, var);
    ``backend="reference"`` runs conv_bn_act_reference."""
    x0, w0, b0, g0, be0, rm0, rv0 = case
    leaf = lambda t: None if t is None else t.to(dtype).clone().requires_grad_()  # noqa: E731
    weight, bias, gamma, beta = leaf(w0), leaf(b0), leaf(g0), leaf(be0)
    running_mean, running_var = rm0.to(dtype).clone(), rv0.to(dtype).clone()
    gen = torch.Generator().manual_seed(grad_seed)
    for step in range(steps):
        x = (x0 * (1.0 + 0.25 * step)).to(dtype).requires_grad_()  # different batches, fp32-representable
        for p in (weight, bias, gamma, beta):
            if p is not None:
                p.grad = None
        fn = ops.conv_bn_act_reference if backend == "reference" else ops.conv_bn_act
        kwargs = {} if backend == "reference" else {"backend": backend}
        out = fn(x, weight, bias, stride=stride, groups=groups, bn_weight=gamma, bn_bias=beta,
                 running_mean=running_mean, running_var=running_var, eps=1e-5, momentum=momentum,
                 training=training, activation=activation, **kwargs)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad)
    grads = [None if t is None else t.grad for t in (x, weight, bias, gamma, beta)]
    return out.detach(), grads, running_mean, running_var


def assert_conv_close_to_fp64_reference(case, *, backend, training, activation, stride=1, groups=1, steps=1,
                                        rtol=2e-5, atol=2e-5):
    got = conv_run(case, backend=backend, dtype=torch.float32, training=training, activation=activation,
                   stride=stride, groups=groups, steps=steps)
    want = conv_run(case, backend="reference", dtype=torch.float64, training=training, activation=activation,
                    stride=stride, groups=groups, steps=steps)
    assert got[0].dtype == torch.float32 and got[0].is_contiguous()
    torch.testing.assert_close(got[0], want[0].float(), rtol=rtol, atol=atol)
    names = ("x", "weight", "bias", "bn_weight", "bn_bias")
    for name, g, r in zip(names, got[1], want[1]):
        assert (g is None) == (r is None), name
        if g is None:
            continue
        # Gradients are sums over the batch: compare against their own scale. The conv bias's is
        # zero in exact arithmetic under a training BatchNorm (dy sums to zero per channel): against
        # the scale of the BatchNorm bias's, a sum over the same rows.
        scale = float(r.abs().max()) + 1e-6
        if name == "bias":
            scale = max(scale, float(want[1][4].abs().max()))
        torch.testing.assert_close(g / scale, (r / scale).float(), rtol=0, atol=5e-5, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got[2], want[2].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3].float(), rtol=1e-5, atol=1e-6)


def close_running_stats(bn, bn64, tol):
    close(bn.running_mean, bn64.running_mean, tol, "running_mean")
    close(bn.running_var, bn64.running_var, tol, "running_var")


def backward_both(got, want, dtype):
    """Backward through the backend's output and the reference's with one upstream gradient."""
    grad = torch.randn_like(want)
    got.backward(grad.to(dtype))
    want.backward(grad)


# The cuda backend's GPU tests.
# Relative tolerance (of the largest magnitude) per dtype: outputs are rounded to the dtype once.
CUDA_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-4}
# (dtype, path): "auto" is the dispatcher's choice (tensor cores where eligible), "direct" forces the
# CUDA-core kernels; fp32 always runs direct, so it is not repeated.
# Kept small: scripts/gpu_check.sh gives every GPU test of the project 130 s together.
CUDA_OP_MODES = [(torch.bfloat16, "auto"), (torch.bfloat16, "direct"), (torch.float32, "auto")]


def mode_id(mode):
    return f"{str(mode[0]).removeprefix('torch.')}-{mode[1]}"


def set_conv_path(path: str) -> None:
    """auto: mma.sync for dense convs (the default); direct: CUDA cores only; wgmma: the sm_90a kernel."""
    ext = _ext.require()
    ext.force_direct_conv(path == "direct")
    ext.conv_use_wgmma(path == "wgmma")


@pytest.fixture
def cuda_conv():
    """The GPU conv tests: the extension built with CUDA, fp32 references really in fp32, the
    kernel path reset afterwards."""
    assert torch.cuda.is_available()
    assert _ext.has_cuda(), "the extension was built without CUDA: rebuild with DINOCXR_CUDA=1"
    torch.backends.cudnn.allow_tf32 = False  # references in fp32 really in fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    _ext.require().force_direct_conv(False)
    _ext.require().conv_use_wgmma(False)


def need_wgmma():
    if not _ext.require().wgmma_available(torch.cuda.current_device()):
        pytest.skip("the wgmma kernel needs an sm_90 GPU and sm_90a code in the build (DINOCXR_CUDA_ARCHS=90a)")


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)
