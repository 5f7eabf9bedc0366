"""ops.conv_bn_act: every backend against nn.Conv2d -> nn.BatchNorm2d -> activation and against the
reference in float64 (forward, every gradient, BatchNorm running statistics), in both BatchNorm
modes; bad input; the dispatch.

Backends: ``torch`` (the reference; what ``auto`` runs until a custom backend is verified) and ``cpp``
(the aten convolution, then BatchNorm + activation fused, fp32 only) on the CPU; ``cuda`` (the
conv3x3 kernels) on a GPU (``pytest -m cuda``), where it runs bf16 / fp16 / fp32, tensor cores and
direct, batch 1 to 3 on odd sizes and channel counts. The kernels themselves, the cuda backend's
orchestration on emulated kernels and the CPU kernels' ISA variants are tested in tests/kernels/.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from dinocxr_fast.ops import _backend, _dispatch
from dinocxr_fast.ops.conv_bn_act import conv_bn_act, conv_bn_act_reference
from op_helpers import (
    ACTIVATIONS,
    CUDA_OP_MODES,
    CUDA_TOL,
    assert_conv_close_to_fp64_reference,
    backends,
    backward_both,
    close,
    close_running_stats,
    conv_bn_modules,
    conv_call,
    conv_case,
    conv_run,
    cuda_conv,  # noqa: F401 - a fixture
    mode_id,
    needs_cpp,
    rnd,
    set_conv_path,
)

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")
ACT = {"silu": nn.SiLU(), "gelu": nn.GELU(), "relu": nn.ReLU(), None: nn.Identity()}
CPU = ("auto", "torch", "cpp")


# ---- against the NCHW modules ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends(*CPU))
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "c_in, c_out, stride, dilation, groups, activation",
    [(1, 8, 2, 1, 1, "silu"), (16, 64, 1, 1, 4, "silu"), (12, 12, 2, 2, 3, "gelu"), (8, 4, 1, 1, 1, None)],
)
def test_matches_nchw_modules_forward_backward_and_running_stats(backend, c_in, c_out, stride, dilation, groups,
                                                                 activation, training):
    conv, bn = conv_bn_modules(c_in, c_out, stride, groups, dilation=dilation)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    bn2.train(training)
    x = torch.randn(3, c_in, 10, 12)

    want = ACT[activation](bn2(conv2(x))).permute(0, 2, 3, 1)
    x_bhwc = x.permute(0, 2, 3, 1).contiguous().requires_grad_()
    got = conv_call(conv_bn_act, x_bhwc, conv, bn, activation, training, backend=backend.name)

    assert got.shape == want.shape and got.is_contiguous()  # B x H' x W' x C, no copy needed after
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)

    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.weight.grad, bn2.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backends(*CPU))
def test_plain_convolution_without_norm(backend):
    conv = nn.Conv2d(6, 9, 3, 1, 1, groups=3)
    x = torch.randn(2, 6, 5, 7)
    got = conv_bn_act(x.permute(0, 2, 3, 1), conv.weight, conv.bias, groups=3, backend=backend.name)
    torch.testing.assert_close(got, conv(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(got, conv_bn_act_reference(x.permute(0, 2, 3, 1), conv.weight, conv.bias, groups=3))


@pytest.mark.parametrize("backend", backends(*CPU))
def test_channels_last_input_is_read_without_a_copy(backend):
    # The NCHW view of contiguous B x H x W x C tokens has channels-last strides; the conv keeps them.
    x = torch.randn(2, 9, 9, 16)
    assert x.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(x, torch.randn(32, 16, 3, 3), None, backend=backend.name)
    assert out.is_contiguous()


# ---- against the reference in float64 (fp32 backends on fp32-representable inputs) -------------------------
@pytest.mark.parametrize("backend", backends("torch", "cpp"))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_fp64_reference_each_activation(backend, activation, training):
    case = conv_case(3, 9, 10, 8, 24, 1)
    assert_conv_close_to_fp64_reference(case, backend=backend.name, training=training, activation=activation, steps=2)


@pytest.mark.parametrize("backend", backends("torch", "cpp"))
@pytest.mark.parametrize(
    "batch, h, w, c_in, c_out, groups, stride, bias",
    [
        (2, 7, 5, 6, 12, 1, 1, True),  # odd spatial size; 12 channels: one vector + a masked tail
        (1, 6, 6, 4, 8, 1, 1, True),  # batch 1
        (3, 8, 8, 16, 32, 4, 1, False),  # groups > 1, no conv bias
        (2, 9, 7, 8, 16, 2, 2, True),  # stride 2 with an odd input (5 x 4 output)
        (4, 5, 5, 3, 3, 1, 1, True),  # fewer channels than a vector
        (2, 4, 6, 32, 40, 8, 2, True),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_matches_fp64_reference_shapes(backend, batch, h, w, c_in, c_out, groups, stride, bias, training):
    case = conv_case(batch, h, w, c_in, c_out, groups, bias=bias, seed=batch + h + c_out)
    assert_conv_close_to_fp64_reference(case, backend=backend.name, training=training, activation="silu",
                                        stride=stride, groups=groups)


@pytest.mark.parametrize("backend", backends("torch", "cpp"))
def test_running_statistics_after_several_steps(backend):
    case = conv_case(2, 6, 7, 8, 16, 2)
    got = conv_run(case, backend=backend.name, dtype=torch.float32, training=True, activation="silu", groups=2,
                   steps=5, momentum=0.3)
    want = conv_run(case, backend="reference", dtype=torch.float64, training=True, activation="silu", groups=2,
                    steps=5, momentum=0.3)
    torch.testing.assert_close(got[2], want[2].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3].float(), rtol=1e-5, atol=1e-6)  # unbiased variance


@pytest.mark.parametrize("backend", backends("cpp"))  # the vendor path's fp32 BatchNorm is 5e-4 off here
def test_large_mean_through_conv_bias(backend):
    # The conv output itself is 1000 + O(1) (a bias of 1000): as close to fp64 as fp32 storage allows.
    case = conv_case(4, 8, 8, 8, 16, 1, y_offset=1000.0)
    assert_conv_close_to_fp64_reference(case, backend=backend.name, training=True, activation="silu", rtol=1e-4,
                                        atol=1e-4)


@pytest.mark.parametrize("backend", backends("torch", "cpp"))
def test_deterministic_for_a_fixed_thread_count(backend):
    case = conv_case(4, 16, 16, 16, 32, 4, seed=7)
    a = conv_run(case, backend=backend.name, dtype=torch.float32, training=True, activation="silu", groups=4)
    b = conv_run(case, backend=backend.name, dtype=torch.float32, training=True, activation="silu", groups=4)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert torch.equal(ga, gb)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


# ---- the cuda backend on a GPU, against the reference in float64 ------------------------------------------
# c_in, c_out, stride, groups, act, use_bn, batch, h, w
GPU_CASES = [
    (64, 256, 1, 1, "silu", True, 2, 9, 7),
    (64, 64, 2, 1, "silu", True, 1, 11, 10),
    (128, 512, 1, 32, "silu", True, 2, 7, 7),
    (512, 128, 1, 32, "silu", True, 1, 5, 6),
    (64, 64, 2, 16, "silu", True, 3, 9, 9),
    (64, 64, 1, 16, None, False, 2, 6, 6),
    (1, 64, 2, 1, "silu", True, 2, 15, 13),
    (12, 8, 1, 4, "gelu", True, 2, 5, 5),
    (8, 16, 1, 1, "relu", False, 1, 4, 3),
]


def _double(conv, bn):
    return copy.deepcopy(conv).double(), copy.deepcopy(bn).double()


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", CUDA_OP_MODES, ids=mode_id)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_matches_fp64_reference(backend, mode, case, training):
    dtype, path = mode
    set_conv_path(path)
    c_in, c_out, stride, groups, act, use_bn, batch, h, w = case
    conv, bn = conv_bn_modules(c_in, c_out, stride, groups, dtype=dtype, device=backend.device, mean_std=0.1)
    conv64, bn64 = _double(conv, bn)
    x = rnd(batch, h, w, c_in, dtype=dtype)
    x1, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got = conv_call(conv_bn_act, x1, conv, bn, act, training, use_bn, backend=backend.name)
    want = conv_call(conv_bn_act_reference, x64, conv64, bn64, act, training, use_bn)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    tol = CUDA_TOL[dtype]
    close(got, want, tol, "out")
    if use_bn:
        close_running_stats(bn, bn64, tol)
    backward_both(got, want, dtype)
    close(x1.grad, x64.grad, 2 * tol, "dx")
    close(conv.weight.grad, conv64.weight.grad, 2 * tol, "dw")
    floor = 2 * tol * conv64.weight.grad.abs().max().item() if use_bn and training else 0.0  # 0 in exact arithmetic
    close(conv.bias.grad, conv64.bias.grad, 2 * tol, "db", atol=floor)
    if use_bn:
        close(bn.weight.grad, bn64.weight.grad, 2 * tol, "dgamma")
        close(bn.bias.grad, bn64.bias.grad, 2 * tol, "dbeta")


@pytest.mark.parametrize("backend", backends("auto-cuda"))
def test_auto_on_gpu_matches_cpu(backend):
    conv, bn = conv_bn_modules(128, 512, 1, 32)
    x = torch.randn(4, 28, 28, 128)
    want = conv_call(conv_bn_act, x, conv, bn, "silu", False)
    got = conv_call(conv_bn_act, x.to(backend.device), conv.to(backend.device), bn.to(backend.device), "silu", False)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
def test_gpu_under_autocast_matches_bf16_inputs(backend):
    conv, bn = conv_bn_modules(64, 256, 1, 1, device=backend.device, mean_std=0.1)
    x = rnd(2, 9, 9, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = conv_call(conv_bn_act, x.requires_grad_(), conv, bn, "silu", True, backend=backend.name)
    assert got.dtype == torch.bfloat16
    got.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    conv64, bn64 = _double(conv, bn)
    with torch.no_grad():
        conv64.weight.copy_(conv.weight.bfloat16().double())
    want = conv_call(conv_bn_act_reference, x.detach().bfloat16().double(), conv64, bn64, "silu", True)
    close(got, want, CUDA_TOL[torch.bfloat16], "autocast")
    # Inside the model a grouped conv sees a bf16 activation and fp32 weights: still the cuda backend.
    spec = {"bn_weight": bn.weight, "bn_bias": bn.bias, "running_mean": bn.running_mean, "running_var": bn.running_var}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        choice = conv_mod.rule.Choice("cuda", "auto")
        assert cuda_mod.cuda_or_fallback(choice, got, torch.randn(256, 8, 3, 3, device="cuda"), 1, 1, 1, 32, spec,
                                         True).backend == "cuda"


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
def test_gpu_model_runs_the_backend_and_matches_the_reference(backend, monkeypatch):
    from dinocxr_fast.models.vitaev2 import CONFIGS, ViTAEv2

    torch.manual_seed(0)
    model = ViTAEv2(CONFIGS["vitaev2_tiny"]).cuda().train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 1, 64, 64, device="cuda")
    monkeypatch.setenv("DINOCXR_BACKEND", backend.name)  # auto would wait for a verdict (ops/_dispatch.py)
    got = model(x)
    monkeypatch.setenv("DINOCXR_BACKEND", "torch")
    want = ref(x)
    close(got, want, 1e-3, "vitaev2_tiny features")
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p_ref.grad is not None:
            close(p.grad, p_ref.grad, 5e-3, name)


# ---- the cpp backend -----------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("first, second", [("torch", "cpp"), ("cpp", "torch"), ("cpp", "cpp")])
def test_one_batchnorm_on_two_backends_in_one_graph_backpropagates(first, second):
    """A BatchNorm can run on the vendor path and then on cpp in one step (auto decides per shape:
    the global and the local crops). F.batch_norm saved the running statistics for its backward, so
    the fused path must update them without bumping their autograd version (ops/bn_act_cpu.py)."""
    def step(backends):
        torch.manual_seed(0)
        w = torch.randn(8, 4, 3, 3, requires_grad=True)
        gamma, beta = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
        stats = torch.zeros(8), torch.ones(8)
        kw = dict(bn_weight=gamma, bn_bias=beta, running_mean=stats[0], running_var=stats[1], training=True,
                  activation="silu")
        xs = torch.randn(2, 6, 6, 4), torch.randn(2, 5, 5, 4)
        loss = sum(conv_bn_act(x, w, backend=b, **kw).square().sum() for x, b in zip(xs, backends))
        loss.backward()
        return w.grad, gamma.grad, beta.grad, *stats

    for got, want in zip(step((first, second)), step(("torch", "torch"))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_cpp
def test_gradients_of_bn_parameters_only():
    # Neither x nor the conv parameters need a gradient: the backward skips dy.
    x, weight, bias, gamma, beta, rm, rv = conv_case(2, 6, 6, 4, 8, 1)
    out = {}
    for backend in ("cpp", "torch"):
        g, b = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        y = conv_bn_act(x, weight, bias, bn_weight=g, bn_bias=b, running_mean=rm.clone(), running_var=rv.clone(),
                        training=True, activation="gelu", backend=backend)
        y.backward(torch.ones_like(y))
        out[backend] = (g.grad, b.grad)
    for got, want in zip(out["cpp"], out["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_no_batch_norm_is_the_reference():
    x, weight, bias, *_ = conv_case(2, 5, 7, 6, 9, 3)
    for activation in ACTIVATIONS:
        got = conv_bn_act(x, weight, bias, groups=3, activation=activation, backend="cpp")
        torch.testing.assert_close(got, conv_bn_act_reference(x, weight, bias, groups=3, activation=activation),
                                   rtol=0, atol=0)


@needs_cpp
def test_cpp_is_a_candidate_and_torch_is_the_pure_reference(monkeypatch):
    assert "cpp" in _dispatch.candidates("conv_bn_act", torch.device("cpu"), conv_mod.IMPLEMENTED)
    case = conv_case(2, 6, 6, 4, 8, 1)
    want = conv_run(case, backend="reference", dtype=torch.float32, training=True, activation="silu")
    for how in ("argument", "environment"):
        if how == "environment":
            monkeypatch.setenv(_backend.ENV_VAR, "torch")
            got = conv_run(case, backend="auto", dtype=torch.float32, training=True, activation="silu")
        else:
            got = conv_run(case, backend="torch", dtype=torch.float32, training=True, activation="silu")
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
        for g, r in zip(got[1], want[1]):
            assert torch.equal(g, r)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_fall_back_under_auto(dtype):
    case = conv_case(2, 6, 6, 4, 8, 1)
    got = conv_run(case, backend="auto", dtype=dtype, training=True, activation="silu")
    want = conv_run(case, backend="reference", dtype=dtype, training=True, activation="silu")
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


@needs_cpp
def test_cpu_autocast_falls_back_under_auto_and_is_refused_by_cpp():
    x, weight, bias, gamma, beta, rm, rv = conv_case(2, 6, 6, 4, 8, 1)
    kw = dict(bn_weight=gamma, bn_bias=beta, running_mean=rm.clone(), running_var=rv.clone(), training=True,
              activation="silu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_bn_act(x, weight, bias, **kw)
        kw.update(running_mean=rm.clone(), running_var=rv.clone())
        want = conv_bn_act_reference(x, weight, bias, **kw)
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="x: .*autocast"):
            conv_bn_act(x, weight, bias, backend="cpp", **kw)


@needs_cpp
def test_custom_ops_pass_opcheck():
    """The cpp backend's BatchNorm + activation ops (ops/bn_act_cpu.py): schema, fake kernels, autograd."""
    bn_act_mod = importlib.import_module("dinocxr_fast.ops.bn_act_cpu")
    y = torch.randn(40, 12, requires_grad=True)
    g, b = torch.rand(12, requires_grad=True), torch.randn(12, requires_grad=True)
    for training in (True, False):
        args = (y, g, b, torch.zeros(12), torch.ones(12), 1e-5, 0.1, training, 1)
        torch.library.opcheck(bn_act_mod._bn_act_op, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        _, stats, _ = bn_act_mod._bn_act_op(*args)
        bargs = (torch.randn(40, 12), y.detach(), g.detach(), b.detach(), stats, training, 1, True)
        torch.library.opcheck(bn_act_mod._bn_act_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))


# ---- bad input: a ValueError naming the argument, before any backend runs --------------------------------
@pytest.mark.parametrize("backend", backends(*CPU))
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(2, 8, 8)), "x must have 4"),
        (dict(x=torch.randn(2, 8, 8, 5)), "channels"),
        (dict(weight=torch.randn(6, 4, 3)), "weight"),
        (dict(weight=torch.randn(5, 2, 3, 3), groups=2), "groups"),
        (dict(bias=torch.randn(3)), "bias"),
        (dict(stride=0), "stride"),
        (dict(padding=-1), "padding"),
        (dict(groups=0), "groups"),
        (dict(activation="tanh"), "activation"),
        (dict(bn_weight=torch.ones(6)), "bn_bias"),
        (dict(bn_weight=torch.ones(6), bn_bias=torch.zeros(6), running_mean=torch.zeros(6),
              running_var=torch.ones(5)), "running_var"),
        (dict(x=torch.randn(2, 8, 8, 4).long()), "x"),
        (dict(backend="gpu-please"), "backend"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(backend, kwargs, match):
    args = dict(x=torch.randn(2, 8, 8, 4), weight=torch.randn(6, 4, 3, 3), bias=None, backend=backend.name)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize("backend", backends(*CPU))
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(2, 8, 8)), "x must have 4"),
        (dict(x=torch.randn(2, 8, 8, 5)), "channels"),
        (dict(running_var=torch.ones(5)), "running_var"),
        (dict(bn_bias=torch.zeros(6, 1)), "bn_bias"),
        (dict(running_mean=None), "running_mean"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_bad_shapes_with_batchnorm_raise_value_error_naming_the_argument(backend, kwargs, match):
    args = dict(x=torch.randn(2, 8, 8, 4), weight=torch.randn(6, 4, 3, 3), bias=None, bn_weight=torch.ones(6),
                bn_bias=torch.zeros(6), running_mean=torch.zeros(6), running_var=torch.ones(6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), training=True, backend=backend.name, **args)


@needs_cpp
@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": torch.bfloat16}, "^x: .*float32"),
        ({"x": torch.float64, "weight": torch.float64, "bias": torch.float64}, "^x: .*float32"),
        ({"weight": torch.float64}, "^weight: .*float32"),
        ({"bias": torch.float16}, "^bias: .*float32"),
        ({"bn_weight": torch.float64}, "^bn_weight: .*float32"),
        ({"running_var": torch.float64}, "^running_var: .*float32"),
    ],
)
def test_cpp_with_unsupported_dtype_raises_value_error_naming_the_argument(change, match):
    x, weight, bias, gamma, beta, rm, rv = conv_case(2, 6, 6, 4, 8, 1)
    args = dict(x=x, weight=weight, bias=bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv)
    for name, dtype in change.items():
        args[name] = args[name].to(dtype)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), training=True, activation="silu",
                    backend="cpp", **args)


# What the cuda kernels do not cover: (change, the argument named).
CUDA_UNCOVERED = [
    (dict(weight_shape=(8, 4, 5, 5)), "weight"),
    (dict(padding=2), "padding"),
    (dict(dilation=2), "dilation"),
    (dict(stride=3), "stride"),
    (dict(dtype=torch.float64), "x"),
]


def _uncovered_call(change, device):
    dtype = change.get("dtype", torch.float32)
    x = torch.randn(2, 8, 8, 4, device=device, dtype=dtype)
    weight = torch.randn(*change.get("weight_shape", (8, 4, 3, 3)), device=device, dtype=dtype)
    return x, weight, {k: v for k, v in change.items() if k in ("padding", "dilation", "stride")}


@pytest.mark.parametrize("change, name", CUDA_UNCOVERED)
def test_what_cuda_does_not_cover_is_named(change, name):
    x, weight, kw = _uncovered_call(change, "cpu")
    kw = dict(dict(stride=1, padding=1, dilation=1), **kw)
    got = cuda_mod._cuda_unsupported(x, weight, kw["stride"], kw["padding"], kw["dilation"], 1, {"bn_weight": None},
                                     False)
    assert got is not None and got[0] == name


@pytest.mark.usefixtures("cuda_conv")
@pytest.mark.parametrize("backend", backends("cuda"))
@pytest.mark.parametrize("change, name", CUDA_UNCOVERED)
def test_gpu_what_cuda_does_not_cover_is_a_value_error(backend, change, name):
    x, weight, kw = _uncovered_call(change, backend.device)
    with pytest.raises(ValueError, match=name):
        conv_bn_act(x, weight, None, backend=backend.name, **kw)
    # auto falls back to the reference instead
    out = conv_bn_act(x, weight, None, **kw)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", backends("torch", "cpp", "cuda"))
def test_one_value_per_channel_in_training_raises_like_torch(backend):
    x, weight, bias, gamma, beta, rm, rv = (t.to(backend.device) for t in conv_case(1, 1, 1, 4, 8, 1))  # a 1 x 1 output
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_bn_act(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm.clone(), running_var=rv.clone(),
                    training=True, activation="silu", backend=backend.name)


@needs_cpp
def test_one_value_per_channel_in_eval_is_fine():
    x, weight, bias, gamma, beta, rm, rv = conv_case(1, 1, 1, 4, 8, 1)
    got = conv_bn_act(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                      activation="silu", backend="cpp")
    want = conv_bn_act_reference(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                                 activation="silu")
    torch.testing.assert_close(got, want)


def test_cuda_backend_on_cpu_tensors_is_refused():
    x, weight = torch.randn(2, 6, 6, 4), torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match="cuda"):
        conv_bn_act(x, weight, backend="cuda")


# ---- which backend runs ----------------------------------------------------------------------------------
def test_backends_register_by_name_only():
    for names in conv_mod.IMPLEMENTED.values():
        assert set(names) <= set(conv_mod._KERNELS)
