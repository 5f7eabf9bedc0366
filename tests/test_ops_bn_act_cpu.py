"""The cpp (CPU) backend of ops.conv_bn_act: aten convolution + fused BatchNorm + activation.

Every case runs the cpp backend in float32 and the reference (``conv_bn_act_reference``) in float64
on the same (fp32-representable) inputs, forward and backward, and compares the running statistics.
The kernels are fp32 only, so there is no fp64 gradcheck: tolerances against the fp64 reference.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from dinocxr_fast import _ext
from dinocxr_fast.ops import _backend, _dispatch
from dinocxr_fast.ops.bn_act_cpu import bn_act_cpu
from dinocxr_fast.ops.conv_bn_act import conv_bn_act, conv_bn_act_reference

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
pcm_mod = importlib.import_module("dinocxr_fast.ops.pcm")
bn_act_mod = importlib.import_module("dinocxr_fast.ops.bn_act_cpu")

pytestmark = pytest.mark.skipif(not _ext.has_cpp(), reason="the C++ extension is not built")

ACTIVATIONS = (None, "silu", "gelu", "relu")


def make_case(batch, h, w, c_in, c_out, groups, *, bias=True, seed=0, y_offset=0.0):
    """fp32 inputs; the BatchNorm parameters away from (1, 0) so that their gradients matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h, w, c_in, generator=gen)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=gen) * (1.0 / (9 * c_in / groups) ** 0.5)
    b = (torch.randn(c_out, generator=gen) * 0.1 + y_offset) if bias else None
    gamma = torch.rand(c_out, generator=gen) + 0.5
    beta = torch.randn(c_out, generator=gen) * 0.5
    running_mean = torch.randn(c_out, generator=gen) * 0.1
    running_var = torch.rand(c_out, generator=gen) + 0.5
    return x, weight, b, gamma, beta, running_mean, running_var


def run(case, *, backend, dtype, training, activation, stride=1, groups=1, steps=1, grad_seed=1, momentum=0.1):
    """(outputs of the last step, grads of x / weight / bias / bn weight / bn bias, running mean, var)."""
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
        fn = conv_bn_act_reference if backend == "reference" else conv_bn_act
        kwargs = {} if backend == "reference" else {"backend": backend}
        out = fn(x, weight, bias, stride=stride, groups=groups, bn_weight=gamma, bn_bias=beta,
                 running_mean=running_mean, running_var=running_var, eps=1e-5, momentum=momentum,
                 training=training, activation=activation, **kwargs)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad)
    grads = [None if t is None else t.grad for t in (x, weight, bias, gamma, beta)]
    return out.detach(), grads, running_mean, running_var


def assert_close_to_reference(case, *, training, activation, stride=1, groups=1, steps=1, rtol=2e-5, atol=2e-5):
    got = run(case, backend="cpp", dtype=torch.float32, training=training, activation=activation, stride=stride,
              groups=groups, steps=steps)
    want = run(case, backend="reference", dtype=torch.float64, training=training, activation=activation,
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


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_fp64_reference_each_activation(activation, training):
    case = make_case(3, 9, 10, 8, 24, 1)
    assert_close_to_reference(case, training=training, activation=activation, steps=2)


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
def test_matches_fp64_reference_shapes(batch, h, w, c_in, c_out, groups, stride, bias, training):
    case = make_case(batch, h, w, c_in, c_out, groups, bias=bias, seed=batch + h + c_out)
    assert_close_to_reference(case, training=training, activation="silu", stride=stride, groups=groups)


def test_running_statistics_after_several_steps():
    case = make_case(2, 6, 7, 8, 16, 2)
    got = run(case, backend="cpp", dtype=torch.float32, training=True, activation="silu", groups=2, steps=5,
              momentum=0.3)
    want = run(case, backend="reference", dtype=torch.float64, training=True, activation="silu", groups=2, steps=5,
               momentum=0.3)
    torch.testing.assert_close(got[2], want[2].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3].float(), rtol=1e-5, atol=1e-6)  # unbiased variance


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


def test_large_mean_is_normalised_accurately():
    # Values 1000 + N(0, 1): a one-pass E[y^2] - E[y]^2 in fp32 would lose everything.
    gen = torch.Generator().manual_seed(3)
    c = 20
    y = (1000.0 + torch.randn(4096, c, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2, c, dtype=torch.float64))
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
        ref = conv_mod.activate(F.batch_norm(y64, rm64, rv64, g64, b64, True, 0.1, 1e-5), activation)
        ref.backward(grad.double())
        torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yy.grad, y64.grad.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gg.grad, g64.grad.float(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(bb.grad, b64.grad.float(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rm, rm64.float(), rtol=1e-7, atol=1e-4)
        torch.testing.assert_close(rv, rv64.float(), rtol=1e-5, atol=1e-6)


def test_large_mean_through_conv_bias():
    # The conv output itself is 1000 + O(1) (a bias of 1000): as close to fp64 as fp32 storage allows.
    case = make_case(4, 8, 8, 8, 16, 1, y_offset=1000.0)
    assert_close_to_reference(case, training=True, activation="silu", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_portable_kernels_match_reference(activation, training):
    ext = _ext.require()
    ext.force_portable_cpu(True)
    try:
        assert ext.bn_act_isa() == "portable"
        case = make_case(2, 7, 5, 4, 12, 1)
        assert_close_to_reference(case, training=training, activation=activation)
    finally:
        ext.force_portable_cpu(False)


def test_gradients_of_bn_parameters_only():
    # Neither x nor the conv parameters need a gradient: the backward skips dy.
    x, weight, bias, gamma, beta, rm, rv = make_case(2, 6, 6, 4, 8, 1)
    out = {}
    for backend in ("cpp", "torch"):
        g, b = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        y = conv_bn_act(x, weight, bias, bn_weight=g, bn_bias=b, running_mean=rm.clone(), running_var=rv.clone(),
                        training=True, activation="gelu", backend=backend)
        y.backward(torch.ones_like(y))
        out[backend] = (g.grad, b.grad)
    for got, want in zip(out["cpp"], out["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_deterministic_for_a_fixed_thread_count():
    case = make_case(4, 16, 16, 16, 32, 4, seed=7)
    a = run(case, backend="cpp", dtype=torch.float32, training=True, activation="silu", groups=4)
    b = run(case, backend="cpp", dtype=torch.float32, training=True, activation="silu", groups=4)
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert torch.equal(ga, gb)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_no_batch_norm_is_the_reference():
    x, weight, bias, *_ = make_case(2, 5, 7, 6, 9, 3)
    for activation in ACTIVATIONS:
        got = conv_bn_act(x, weight, bias, groups=3, activation=activation, backend="cpp")
        torch.testing.assert_close(got, conv_bn_act_reference(x, weight, bias, groups=3, activation=activation),
                                   rtol=0, atol=0)


def test_cpp_is_a_candidate_and_torch_is_the_pure_reference(monkeypatch):
    assert "cpp" in _dispatch.candidates("conv_bn_act", torch.device("cpu"), conv_mod.IMPLEMENTED)
    case = make_case(2, 6, 6, 4, 8, 1)
    want = run(case, backend="reference", dtype=torch.float32, training=True, activation="silu")
    for how in ("argument", "environment"):
        if how == "environment":
            monkeypatch.setenv(_backend.ENV_VAR, "torch")
            got = run(case, backend="auto", dtype=torch.float32, training=True, activation="silu")
        else:
            got = run(case, backend="torch", dtype=torch.float32, training=True, activation="silu")
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
        for g, r in zip(got[1], want[1]):
            assert torch.equal(g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_fall_back_under_auto(dtype):
    case = make_case(2, 6, 6, 4, 8, 1)
    got = run(case, backend="auto", dtype=dtype, training=True, activation="silu")
    want = run(case, backend="reference", dtype=dtype, training=True, activation="silu")
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


def test_cpu_autocast_falls_back_under_auto_and_is_refused_by_cpp():
    x, weight, bias, gamma, beta, rm, rv = make_case(2, 6, 6, 4, 8, 1)
    kw = dict(bn_weight=gamma, bn_bias=beta, running_mean=rm.clone(), running_var=rv.clone(), training=True,
              activation="silu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_bn_act(x, weight, bias, **kw)
        kw.update(running_mean=rm.clone(), running_var=rv.clone())
        want = conv_bn_act_reference(x, weight, bias, **kw)
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="x: .*autocast"):
            conv_bn_act(x, weight, bias, backend="cpp", **kw)


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
    x, weight, bias, gamma, beta, rm, rv = make_case(2, 6, 6, 4, 8, 1)
    args = dict(x=x, weight=weight, bias=bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv)
    for name, dtype in change.items():
        args[name] = args[name].to(dtype)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), training=True, activation="silu",
                    backend="cpp", **args)


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
def test_bad_shapes_raise_value_error_naming_the_argument(kwargs, match):
    args = dict(x=torch.randn(2, 8, 8, 4), weight=torch.randn(6, 4, 3, 3), bias=None, bn_weight=torch.ones(6),
                bn_bias=torch.zeros(6), running_mean=torch.zeros(6), running_var=torch.ones(6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), training=True, backend="cpp", **args)


def test_one_value_per_channel_in_training_raises_like_torch():
    x, weight, bias, gamma, beta, rm, rv = make_case(1, 1, 1, 4, 8, 1)  # 3x3, padding 1: a 1 x 1 output
    for backend in ("cpp", "torch"):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            conv_bn_act(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm.clone(),
                        running_var=rv.clone(), training=True, activation="silu", backend=backend)
    # In eval one row is fine.
    got = conv_bn_act(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                      activation="silu", backend="cpp")
    want = conv_bn_act_reference(x, weight, bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv,
                                 activation="silu")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e, y, v: e.bn_act_forward_cpu(y.t(), v, v, v, v, 1e-5, 0.1, True, 1), "y must be contiguous"),
        (lambda e, y, v: e.bn_act_forward_cpu(y.double(), v, v, v, v, 1e-5, 0.1, True, 1), "y must be float32"),
        (lambda e, y, v: e.bn_act_forward_cpu(y, v[:3], v, v, v, 1e-5, 0.1, True, 1), "bn_weight must have shape"),
        (lambda e, y, v: e.bn_act_forward_cpu(y, v, v, v, v[:3], 1e-5, 0.1, True, 1), "running_var must have"),
        (lambda e, y, v: e.bn_act_forward_cpu(y, v, v, v, v, -1.0, 0.1, True, 1), "eps"),
        (lambda e, y, v: e.bn_act_forward_cpu(y, v, v, v, v, 1e-5, 0.1, True, 7), "activation"),
        (lambda e, y, v: e.bn_act_forward_cpu(y[:1], v, v, v, v, 1e-5, 0.1, True, 1), "more than 1 value"),
        (lambda e, y, v: e.bn_act_backward_cpu(y[:2], y, v, v, torch.zeros(3, 6), True, 1, True), "grad must have"),
        (lambda e, y, v: e.bn_act_backward_cpu(y, y, v, v, torch.zeros(2, 6), True, 1, True), "stats must be"),
    ],
)
def test_extension_checks_its_arguments(call, match):
    # The extension is safe to call directly: every bad argument is a ValueError, never a bad read.
    y, v = torch.randn(5, 6), torch.ones(6)
    with pytest.raises(ValueError, match=match):
        call(_ext.require(), y, v)


def test_custom_ops_pass_opcheck():
    y = torch.randn(40, 12, requires_grad=True)
    g, b = torch.rand(12, requires_grad=True), torch.randn(12, requires_grad=True)
    for training in (True, False):
        args = (y, g, b, torch.zeros(12), torch.ones(12), 1e-5, 0.1, training, 1)
        torch.library.opcheck(bn_act_mod._bn_act_op, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        _, stats, _ = bn_act_mod._bn_act_op(*args)
        bargs = (torch.randn(40, 12), y.detach(), g.detach(), b.detach(), stats, training, 1, True)
        torch.library.opcheck(bn_act_mod._bn_act_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))


# ---- the whole PCM chain (ops.pcm) on the CPU: three conv_bn_act calls on the cpp backend ----
def _pcm_case(dtype, *, groups=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    chans = (4, 8, 4, 4)
    x = torch.randn(2, 7, 5, chans[0], generator=gen).to(dtype).requires_grad_()
    weights = [(torch.randn(chans[i + 1], chans[i] // groups, 3, 3, generator=gen) * 0.3).to(dtype).requires_grad_()
               for i in range(3)]
    biases = [(torch.randn(chans[i + 1], generator=gen) * 0.1).to(dtype).requires_grad_() for i in range(3)]
    bns = []
    for c in chans[1:3]:
        bns.append([(torch.rand(c, generator=gen) + 0.5).to(dtype).requires_grad_(),
                    (torch.randn(c, generator=gen) * 0.5).to(dtype).requires_grad_(),
                    torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), 1e-5, 0.1])
    return x, weights, biases, bns


@pytest.mark.parametrize("training", [True, False])
def test_pcm_chain_on_cpp_matches_fp64_reference(training):
    pcm_op = pcm_mod.pcm
    got_in, want_in = _pcm_case(torch.float32), _pcm_case(torch.float64)
    strides = (2, 1, 1)
    got = pcm_op(got_in[0], got_in[1], got_in[2], *got_in[3], strides=strides, groups=2, training=training,
                 backend="cpp")
    want = pcm_mod.pcm_reference(want_in[0], want_in[1], want_in[2], *want_in[3], strides=strides, groups=2,
                                  training=training)
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=2e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(9))
    got.backward(grad)
    want.backward(grad.double())
    leaves = lambda case: [case[0], *case[1], *case[2], *(t for bn in case[3] for t in bn[:2])]  # noqa: E731
    for g, w in zip(leaves(got_in), leaves(want_in)):
        # at least 1: a conv bias under a training BatchNorm has a zero gradient in exact arithmetic
        scale = max(float(w.grad.abs().max()), 1.0)
        torch.testing.assert_close(g.grad / scale, (w.grad / scale).float(), rtol=0, atol=5e-5)
    for g_bn, w_bn in zip(got_in[3], want_in[3]):  # running statistics
        torch.testing.assert_close(g_bn[2], w_bn[2].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_bn[3], w_bn[3].float(), rtol=1e-5, atol=1e-6)


def test_pcm_auto_on_cpu_takes_cpp_once_verified_and_cpp_refuses_bf16(monkeypatch):
    calls = []
    real = pcm_mod._pcm_chain
    monkeypatch.setattr(pcm_mod, "_pcm_chain", lambda *a: calls.append(a[-1]) or real(*a))
    x, weights, biases, bns = _pcm_case(torch.float32)
    pcm_mod.pcm(x, weights, biases, *bns, groups=2, training=True)
    assert calls == []  # not verified on this machine: the vendor path
    monkeypatch.setattr(_dispatch, "_auto_backend", lambda op, device, names, case: "cpp")  # as if verified
    pcm_mod.pcm(x, weights, biases, *bns, groups=2, training=True)
    assert calls == ["cpp"]
    xb, wb, bb, bnb = _pcm_case(torch.bfloat16)
    out = pcm_mod.pcm(xb, wb, bb, *bnb, groups=2, training=True)  # auto: each conv falls back
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="x"):
        pcm_mod.pcm(xb, wb, bb, *bnb, groups=2, training=True, backend="cpp")
