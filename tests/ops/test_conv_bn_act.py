"""ops.conv_bn_act against nn.Conv2d -> nn.BatchNorm2d -> activation on NCHW, in both BN modes."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from dinocxr_fast.ops.conv_bn_act import conv_bn_act, conv_bn_act_reference

conv_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act")
ACT = {"silu": nn.SiLU(), "gelu": nn.GELU(), "relu": nn.ReLU(), None: nn.Identity()}


def _modules(c_in, c_out, stride, dilation, groups, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation, groups)
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return conv, bn


def _run_op(x_bhwc, conv, bn, activation, training):
    return conv_bn_act(
        x_bhwc, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean,
        running_var=bn.running_var, eps=bn.eps, momentum=bn.momentum, training=training, activation=activation,
    )


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "c_in, c_out, stride, dilation, groups, activation",
    [(1, 8, 2, 1, 1, "silu"), (16, 64, 1, 1, 4, "silu"), (12, 12, 2, 2, 3, "gelu"), (8, 4, 1, 1, 1, None)],
)
def test_matches_nchw_modules_forward_backward_and_running_stats(c_in, c_out, stride, dilation, groups, activation,
                                                                 training):
    conv, bn = _modules(c_in, c_out, stride, dilation, groups)
    conv2, bn2 = copy.deepcopy(conv), copy.deepcopy(bn)
    bn2.train(training)
    x = torch.randn(3, c_in, 10, 12)

    want = ACT[activation](bn2(conv2(x))).permute(0, 2, 3, 1)
    x_bhwc = x.permute(0, 2, 3, 1).contiguous().requires_grad_()
    got = _run_op(x_bhwc, conv, bn, activation, training)

    assert got.shape == want.shape and got.is_contiguous()  # B x H' x W' x C, no copy needed after
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)

    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(conv.weight.grad, conv2.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.weight.grad, bn2.weight.grad, rtol=1e-4, atol=1e-4)


def test_plain_convolution_without_norm():
    conv = nn.Conv2d(6, 9, 3, 1, 1, groups=3)
    x = torch.randn(2, 6, 5, 7)
    got = conv_bn_act(x.permute(0, 2, 3, 1), conv.weight, conv.bias, groups=3)
    torch.testing.assert_close(got, conv(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(got, conv_bn_act_reference(x.permute(0, 2, 3, 1), conv.weight, conv.bias, groups=3))


def test_channels_last_input_is_read_without_a_copy():
    # The NCHW view of contiguous B x H x W x C tokens has channels-last strides; the conv keeps them.
    x = torch.randn(2, 9, 9, 16)
    assert x.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(x, torch.randn(32, 16, 3, 3), None)
    assert out.is_contiguous()


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
def test_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    args = dict(x=torch.randn(2, 8, 8, 4), weight=torch.randn(6, 4, 3, 3), bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv_bn_act(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


def test_backends_register_by_name_only():
    for names in conv_mod.IMPLEMENTED.values():
        assert set(names) <= set(conv_mod._KERNELS)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    conv, bn = _modules(128, 512, 1, 1, 32)
    x = torch.randn(4, 28, 28, 128)
    want = _run_op(x, conv, bn, "silu", False)
    got = _run_op(x.cuda(), conv.cuda(), bn.cuda(), "silu", False)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)
