"""The ``cuda`` backend of ``conv_bn_act`` and ``pcm`` (kernels/cuda/conv3x3.cuh): planning, launch
and the ``torch.library`` ops.

The kernels cover the PCM's convolutions: 3x3, padding 1, dilation 1, stride 1 or 2, any groups,
float32 / float16 / bfloat16 (under autocast, the autocast dtype). BatchNorm and the activation run
in the convolution's epilogue (inference: folded into a per-channel affine map; training: the
epilogue sums the batch statistics, a small pass applies them). ``_pcm_cuda`` runs a whole PCM
chain (conv-BN-SiLU-conv-BN-SiLU-conv) as one op: in training the second and third convs
normalise their input on the fly while loading it, so the normalised activations are never
written, and the backward recomputes them; at inference a grouped PCM runs as a single kernel.

A convolution is a set of *tap convolutions* (``_TapPlan``): the forward one, and per output
parity one for the data gradient of a strided conv. ``_CudaKernels`` is the only place that
touches the extension; tests/kernels/test_cuda_conv3x3_planning.py swaps in a plain-PyTorch emulation of it
to check the orchestration here on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional  # noqa: UP035 (torch.library reads these annotations)

import torch

from dinocxr_fast import _ext
from dinocxr_fast.ops import _dispatch as rule
from dinocxr_fast.ops._batchnorm import update_running_stats

_ACT_CODE = {None: 0, "silu": 1, "gelu": 2, "relu": 3}
_ACT_NAME = {code: name for name, code in _ACT_CODE.items()}
_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EPI_AFFINE, _EPI_STATS, _EPI_SILU_BWD = 0, 1, 2  # kernels/cuda/conv3x3.cuh EpiKind


def _out_size(n: int, stride: int) -> int:
    """Output length of a 3x3 convolution with padding 1."""
    return (n - 1) // stride + 1


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclasses.dataclass(frozen=True)
class _TapPlan:
    """One tap convolution (kernels/cuda/conv3x3.cuh, TapConv): geometry, tap offsets, and which
    kernel taps (kh0::step, kw0::step of the 3x3 weight) it uses."""

    geom: tuple[int, ...]  # batch, in_h, in_w, in_c, out_h, out_w, out_c, grid_h, grid_w, in_stride,
    #                        out_stride, out_y0, out_x0, groups
    tap_dy: tuple[int, ...]
    tap_dx: tuple[int, ...]
    kh0: int = 0
    kw0: int = 0
    step: int = 1


@functools.lru_cache(maxsize=512)
def _forward_plan(b: int, h: int, w: int, c_in: int, c_out: int, groups: int, stride: int) -> _TapPlan:
    oh, ow = _out_size(h, stride), _out_size(w, stride)
    return _TapPlan((b, h, w, c_in, oh, ow, c_out, oh, ow, stride, 1, 0, 0, groups),
                    tuple(t // 3 - 1 for t in range(9)), tuple(t % 3 - 1 for t in range(9)))


@functools.lru_cache(maxsize=512)
def _dgrad_plans(b: int, h: int, w: int, c_in: int, c_out: int, groups: int, stride: int) -> tuple[_TapPlan, ...]:
    """d x of the forward conv (x: b x h x w x c_in -> c_out, stride s) as tap convolutions of dy.

    dx[s*i + py, s*j + px] = sum over taps with kh = py + 1 (mod s), kw = px + 1 (mod s) of
    dy[i + (py + 1 - kh) / s, j + (px + 1 - kw) / s] * w[kh, kw]: one launch per output parity
    (py, px), each writing its own positions of dx; stride 1 is the single flipped convolution.
    """
    oh, ow = _out_size(h, stride), _out_size(w, stride)
    plans = []
    for py in range(stride):
        for px in range(stride):
            khs = [k for k in range(3) if (py + 1 - k) % stride == 0]
            kws = [k for k in range(3) if (px + 1 - k) % stride == 0]
            grid_h, grid_w = -(-(h - py) // stride), -(-(w - px) // stride)
            if grid_h <= 0 or grid_w <= 0:
                continue  # no positions of this parity (h or w smaller than the stride)
            if not khs or not kws:
                raise ValueError(f"stride {stride} leaves output parity ({py}, {px}) without taps")
            taps = [(kh, kw) for kh in khs for kw in kws]
            plans.append(_TapPlan(
                (b, oh, ow, c_out, h, w, c_in, grid_h, grid_w, 1, stride, py, px, groups),
                tuple((py + 1 - kh) // stride for kh, _ in taps), tuple((px + 1 - kw) // stride for _, kw in taps),
                khs[0], kws[0], stride,
            ))
    return tuple(plans)


def _forward_weight(w: torch.Tensor) -> torch.Tensor:
    """[Cout, cin_g, 3, 3] -> [Cout, 9 taps, cin_g] (taps kh-major, as _forward_plan)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], 9, w.shape[1]).contiguous()


def _dgrad_weight(w: torch.Tensor, groups: int, plan: _TapPlan) -> torch.Tensor:
    """The taps of ``plan`` of the transposed kernel: [Cin, taps, cout_g] with
    out[g*cin_g + ci, t, co] = w[g*cout_g + co, ci, kh_t, kw_t]."""
    c_out, cin_g = w.shape[:2]
    sel = w[:, :, plan.kh0::plan.step, plan.kw0::plan.step]
    taps = sel.shape[2] * sel.shape[3]
    return (sel.reshape(groups, c_out // groups, cin_g, taps).permute(0, 2, 3, 1)
            .reshape(groups * cin_g, taps, c_out // groups).contiguous())


class _CudaKernels:
    """The kernels through dinocxr_fast._C. tests/kernels/test_cuda_conv3x3_planning.py swaps in a plain-PyTorch
    emulation with the same interface to check the orchestration below on the CPU."""

    def tap_conv(self, x, w, out, plan: _TapPlan, *, pro=None, kind=_EPI_AFFINE, act=None, scale=None, shift=None,
                 ref=None, aux=None, z=None, xh=None):
        ps, pb = pro if pro is not None else (None, None)
        zs, zb = z if z is not None else (None, None)
        xs, xb = xh if xh is not None else (None, None)
        return _ext.require().tap_conv_cuda(x, w, out, list(plan.geom), list(plan.tap_dy), list(plan.tap_dx), ps, pb,
                                            kind, _ACT_CODE[act], scale, shift, ref, aux, zs, zb, xs, xb)

    def wgrad(self, x, dy, pro, groups, stride, need_bias):
        ps, pb = pro if pro is not None else (None, None)
        return _ext.require().wgrad_cuda(x, dy, ps, pb, groups, stride, need_bias)

    def bn_forward_finalize(self, partials, count, ref, gamma, beta, eps, momentum, running_mean, running_var):
        return _ext.require().bn_forward_finalize_cuda(partials, count, ref, gamma, beta, eps, momentum,
                                                       running_mean, running_var)

    def bn_backward_finalize(self, partials, count, gamma, mean, invstd, training):
        return _ext.require().bn_backward_finalize_cuda(partials, count, gamma, mean, invstd, training)

    def affine_act(self, y, scale, shift, act):
        return _ext.require().affine_act_cuda(y, scale, shift, _ACT_CODE[act])

    def act_backward_stats(self, g, y, z, act, xh):
        return _ext.require().act_backward_stats_cuda(g, y, z[0], z[1], _ACT_CODE[act], xh[0], xh[1])

    def bn_backward_apply(self, g, y, z, act, a, b, c, inplace):
        zs, zb = z if z is not None else (None, None)
        return _ext.require().bn_backward_apply_cuda(g, y, zs, zb, _ACT_CODE[act], a, b, c, inplace)

    def pcm_fused_supported(self, shape, dtype, device) -> bool:
        return bool(_pcm_fused_info(tuple(shape), _CUDA_DTYPES[dtype], device.index or 0)[0])

    def pcm_fused(self, x, w1, w2, w3, s1, t1, s2, t2, s3, t3, groups, stride1):
        return _ext.require().pcm_fused_cuda(x, w1, w2, w3, s1, t1, s2, t2, s3, t3, groups, stride1)


_PROVIDER = _CudaKernels()


def _kernels():
    return _PROVIDER


@functools.lru_cache(maxsize=1024)
def _pcm_fused_info(shape, dtype_code, device_index):
    return _ext.require().pcm_fused_info(list(shape), dtype_code, device_index)


@functools.lru_cache(maxsize=1024)
def _cuda_plan_reason(b, h, w, c_in, c_out, groups, stride, dtype_code, device_index) -> str | None:
    """Why the kernels cannot run this conv (forward, data and weight gradient), or None."""
    ext = _ext.require()
    plans = (_forward_plan(b, h, w, c_in, c_out, groups, stride),) + _dgrad_plans(b, h, w, c_in, c_out, groups, stride)
    for plan in plans:
        ok, _, reason = ext.tap_conv_info(list(plan.geom), list(plan.tap_dy), list(plan.tap_dx), dtype_code,
                                          device_index)
        if not ok:
            return reason
    oh, ow = _out_size(h, stride), _out_size(w, stride)
    ok, _, _, reason = ext.wgrad_info([b, h, w, c_in, oh, ow, c_out, groups, stride], dtype_code, device_index)
    return None if ok else reason


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference's convolution runs in: the autocast dtype inside autocast."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _cuda_unsupported(x, weight, stride, padding, dilation, groups, bn, training) -> tuple[str, str] | None:
    """(argument, why) when the CUDA kernels do not cover this call, else None."""
    dtype = compute_dtype(x)
    if dtype not in _CUDA_DTYPES:
        return "x", f"the cuda backend computes in float32, float16 or bfloat16, got {dtype}"
    autocast = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    if not autocast and weight.dtype != x.dtype:  # autocast casts both, as it does for F.conv2d
        return "weight", f"weight has dtype {weight.dtype} but x has {x.dtype}"
    if tuple(weight.shape[2:]) != (3, 3):
        return "weight", f"the cuda backend runs 3x3 kernels, got {tuple(weight.shape[2:])}"
    if _pair(padding) != (1, 1):
        return "padding", f"the cuda backend runs padding 1, got {padding!r}"
    if _pair(dilation) != (1, 1):
        return "dilation", f"the cuda backend runs dilation 1, got {dilation!r}"
    s = _pair(stride)
    if s[0] != s[1] or s[0] not in (1, 2):
        return "stride", f"the cuda backend runs stride 1 or 2, got {stride!r}"
    b, h, w, c_in = x.shape
    if bn["bn_weight"] is not None and training and b * _out_size(h, s[0]) * _out_size(w, s[0]) <= 1:
        return "x", "Expected more than 1 value per channel when training (batch statistics of one value)"
    reason = _cuda_plan_reason(b, h, w, c_in, weight.shape[0], groups, s[0], _CUDA_DTYPES[dtype], x.device.index or 0)
    return None if reason is None else ("weight", f"the cuda kernels do not cover this convolution: {reason}")


def cuda_or_fallback(choice, x, weight, stride, padding, dilation, groups, bn, training) -> rule.Choice:
    """``choice`` when the kernels cover the call; else a ValueError naming the argument for
    ``backend="cuda"`` on the call, the vendor path otherwise."""
    if choice.backend != "cuda":
        return choice
    return rule.unless_uncovered("conv_bn_act", choice,
                                 _cuda_unsupported(x, weight, stride, padding, dilation, groups, bn, training))


# ---- one conv -----------------------------------------------------------------------------------
def _eval_stats(gamma, beta, running_mean, running_var, eps) -> torch.Tensor:
    """The [6, C] statistics block of an eval BatchNorm: mean, invstd, scale, shift, running stats."""
    invstd = torch.rsqrt(running_var + eps)
    scale = gamma * invstd
    return torch.stack([running_mean, invstd, scale, beta - running_mean * scale, running_mean, running_var]).float()


def _conv_forward(k, x, w, bias, bn, stride, groups, act, training, save):
    """(out, y, stats): y = conv(x) + bias (kept when ``save``), stats the [6, C] BatchNorm block."""
    b, h, wd, c_in = x.shape
    c_out = w.shape[0]
    plan = _forward_plan(b, h, wd, c_in, c_out, groups, stride)
    wt = _forward_weight(w)
    y = x.new_empty((b, plan.geom[4], plan.geom[5], c_out))
    none = x.new_empty(0)
    no_stats = x.new_empty(0, dtype=torch.float32)
    if bn is None:
        if act is None or not save:  # one kernel: bias and activation in the epilogue
            k.tap_conv(x, wt, y, plan, act=act, shift=bias)
            return y, none, no_stats
        k.tap_conv(x, wt, y, plan, shift=bias)
        return k.affine_act(y, None, None, act), y, no_stats
    gamma, beta, running_mean, running_var, eps, momentum = bn
    if training:
        count = b * plan.geom[4] * plan.geom[5]
        partials = k.tap_conv(x, wt, y, plan, kind=_EPI_STATS, shift=bias, ref=running_mean)
        stats = k.bn_forward_finalize(partials, count, running_mean, gamma, beta, eps, momentum, running_mean,
                                      running_var)
    else:
        stats = _eval_stats(gamma, beta, running_mean, running_var, eps)
        if not save:  # inference: BatchNorm folded into the epilogue's affine map
            shift = stats[3] if bias is None else torch.addcmul(stats[3], bias, stats[2])
            k.tap_conv(x, wt, y, plan, act=act, scale=stats[2], shift=shift)
            return y, none, stats
        k.tap_conv(x, wt, y, plan, shift=bias)
    return k.affine_act(y, stats[2], stats[3], act), (y if save else none), stats


def _dgrad(k, dy, w, x_shape, groups, stride, silu=None):
    """(dx, partials): the data gradient of a conv. With ``silu = (y, stats)`` the conv's input was
    silu(BN(y)) and the epilogue returns d z (z = BN(y)) with the BatchNorm backward sums."""
    b, h, wd, c_in = x_shape
    dx = dy.new_empty((b, h, wd, c_in))
    parts = []
    for plan in _dgrad_plans(b, h, wd, c_in, w.shape[0], groups, stride):
        wt = _dgrad_weight(w, groups, plan)
        if silu is None:
            k.tap_conv(dy, wt, dx, plan)
        else:
            y, stats = silu
            parts.append(k.tap_conv(dy, wt, dx, plan, kind=_EPI_SILU_BWD, aux=y, z=(stats[2], stats[3]),
                                    xh=(stats[1], -stats[0] * stats[1])))
    return dx, (torch.cat(parts) if parts else None)


def _bn_backward(k, dz_partials, y, stats, gamma, training):
    """(coefficients [5, C]) of the BatchNorm backward from the sums of dz and dz * xhat."""
    return k.bn_backward_finalize(dz_partials, y.numel() // y.shape[-1], gamma, stats[0], stats[1], training)


def _conv_backward(k, g, x, w, y, stats, gamma, stride, groups, act, training, has_bn, need):
    """(dx, dw, db, dgamma, dbeta); ``need`` = which of them are wanted (x, w, bias, gamma, beta)."""
    g = g.contiguous()
    c_out = w.shape[0]
    dgamma = dbeta = None
    if has_bn:
        z = (stats[2], stats[3])
        partials = k.act_backward_stats(g, y, z, act, (stats[1], -stats[0] * stats[1]))
        coef = _bn_backward(k, partials, y, stats, gamma, training)
        dgamma, dbeta = coef[0].clone(), coef[1].clone()  # op outputs may not alias each other
        dy = k.bn_backward_apply(g, y, z, act, coef[2], coef[3], coef[4], False)
    elif act is not None:
        dy = k.bn_backward_apply(g, y, None, act, torch.ones(c_out, device=g.device), None, None, False)
    else:
        dy = g
    dw = db = dx = None
    if need[1] or need[2]:
        dw, db = k.wgrad(x, dy, None, groups, stride, need[2])
    if need[0]:
        dx = _dgrad(k, dy, w, tuple(x.shape), groups, stride)[0]
    return dx, dw, db, dgamma, dbeta


# ---- the chain ------------------------------------------------------------------------------------
def _raw_conv(k, x, w, bias, bn, training, stride, groups, pro):
    """y = conv(prologue(x)) + bias, stored as it is, and the [6, C] block of the BatchNorm after it
    (batch statistics from the epilogue's sums when training, the running ones otherwise)."""
    b, h, wd, c_in = x.shape
    plan = _forward_plan(b, h, wd, c_in, w.shape[0], groups, stride)
    y = x.new_empty((b, plan.geom[4], plan.geom[5], w.shape[0]))
    gamma, beta, running_mean, running_var, eps, momentum = bn
    if training:
        partials = k.tap_conv(x, _forward_weight(w), y, plan, pro=pro, kind=_EPI_STATS, shift=bias, ref=running_mean)
        stats = k.bn_forward_finalize(partials, b * plan.geom[4] * plan.geom[5], running_mean, gamma, beta, eps,
                                      momentum, running_mean, running_var)
    else:
        k.tap_conv(x, _forward_weight(w), y, plan, pro=pro, shift=bias)
        stats = _eval_stats(gamma, beta, running_mean, running_var, eps)
    return y, stats


def _pcm_forward(k, x, ws, bs, bns, strides, groups, training, save):
    """(out, y1, y2, stats1, stats2). Inference folds each BatchNorm into its conv's epilogue (and
    runs a grouped PCM as one kernel when it fits); otherwise the convs store their raw outputs y1,
    y2 and the next conv applies BatchNorm + SiLU while loading them."""
    none = x.new_empty(0)
    if not save and not any(training):
        st = [_eval_stats(*bn[:4], bn[4]) for bn in bns]
        shifts = [st[i][3] if bs[i] is None else torch.addcmul(st[i][3], bs[i], st[i][2]) for i in range(2)]
        t3 = bs[2] if bs[2] is not None else torch.zeros(ws[2].shape[0], device=x.device)
        shape = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], ws[0].shape[0], ws[1].shape[0], ws[2].shape[0],
                 groups, strides[0])
        if groups > 1 and strides[1] == strides[2] == 1 and k.pcm_fused_supported(shape, x.dtype, x.device):
            out = k.pcm_fused(x, *(_forward_weight(w) for w in ws), st[0][2], shifts[0], st[1][2], shifts[1], None,
                              t3, groups, strides[0])
            return out, none, x.new_empty(0), st[0], st[1]
        a = x
        for i in range(3):
            b, h, wd, c_in = a.shape
            plan = _forward_plan(b, h, wd, c_in, ws[i].shape[0], groups, strides[i])
            nxt = a.new_empty((b, plan.geom[4], plan.geom[5], ws[i].shape[0]))
            if i < 2:
                k.tap_conv(a, _forward_weight(ws[i]), nxt, plan, act="silu", scale=st[i][2], shift=shifts[i])
            else:
                k.tap_conv(a, _forward_weight(ws[i]), nxt, plan, shift=t3)
            a = nxt
        return a, none, x.new_empty(0), st[0], st[1]  # distinct empties: outputs may not alias
    y1, st1 = _raw_conv(k, x, ws[0], bs[0], bns[0], training[0], strides[0], groups, None)
    y2, st2 = _raw_conv(k, y1, ws[1], bs[1], bns[1], training[1], strides[1], groups, (st1[2], st1[3]))
    b, h, wd, c_in = y2.shape
    plan = _forward_plan(b, h, wd, c_in, ws[2].shape[0], groups, strides[2])
    out = y2.new_empty((b, plan.geom[4], plan.geom[5], ws[2].shape[0]))
    k.tap_conv(y2, _forward_weight(ws[2]), out, plan, pro=(st2[2], st2[3]), shift=bs[2])
    return out, y1, y2, st1, st2


def _pcm_backward(k, g, x, ws, y1, y2, st1, st2, gammas, strides, groups, training, need_x):
    """(dx, dw1, db1, dw2, db2, dw3, db3, dgamma1, dbeta1, dgamma2, dbeta2). The normalised
    activations silu(BN(y)) are recomputed from y1 / y2 wherever a kernel reads them."""
    g = g.contiguous()
    dw3, db3 = k.wgrad(y2, g, (st2[2], st2[3]), groups, strides[2], True)
    dz2, part2 = _dgrad(k, g, ws[2], tuple(y2.shape), groups, strides[2], silu=(y2, st2))
    coef2 = _bn_backward(k, part2, y2, st2, gammas[1], training[1])
    dy2 = k.bn_backward_apply(dz2, y2, None, None, coef2[2], coef2[3], coef2[4], True)
    dw2, db2 = k.wgrad(y1, dy2, (st1[2], st1[3]), groups, strides[1], True)
    dz1, part1 = _dgrad(k, dy2, ws[1], tuple(y1.shape), groups, strides[1], silu=(y1, st1))
    coef1 = _bn_backward(k, part1, y1, st1, gammas[0], training[0])
    dy1 = k.bn_backward_apply(dz1, y1, None, None, coef1[2], coef1[3], coef1[4], True)
    dw1, db1 = k.wgrad(x, dy1, None, groups, strides[0], True)
    dx = _dgrad(k, dy1, ws[0], tuple(x.shape), groups, strides[0])[0] if need_x else None
    # Rows of one tensor would alias each other as op outputs: split into copies.
    dg1, dbe1, dg2, dbe2 = (t.clone() for t in (coef1[0], coef1[1], coef2[0], coef2[1]))
    return dx, dw1, db1, dw2, db2, dw3, db3, dg1, dbe1, dg2, dbe2


# ---- torch.library ops (one forward op, one backward op, each) -----------------------------------
@torch.library.custom_op("dinocxr::conv_bn_act_cuda", mutates_args=())
def _conv_cuda_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    stride: int, groups: int, eps: float, momentum: float, training: bool, activation: int, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, y saved for backward or empty, BatchNorm block [6, C] or empty)."""
    bn = None if bn_weight is None else (bn_weight, bn_bias, running_mean, running_var, eps, momentum)
    out, y, stats = _conv_forward(_kernels(), x, weight, bias, bn, stride, groups, _ACT_NAME[activation], training, save)
    # Outputs must not alias inputs or each other (y is out when there is nothing to apply).
    return out, (y.clone() if y.numel() and y.data_ptr() == out.data_ptr() else y), stats


@_conv_cuda_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, groups, eps, momentum, training,
      activation, save):
    b, h, w, _ = x.shape
    out = x.new_empty((b, _out_size(h, stride), _out_size(w, stride), weight.shape[0]))
    keep = save and (bn_weight is not None or activation != 0)
    y = torch.empty_like(out) if keep else x.new_empty(0)
    stats = x.new_empty((6, weight.shape[0]) if bn_weight is not None else (0,), dtype=torch.float32)
    return out, y, stats


@torch.library.custom_op("dinocxr::conv_bn_act_cuda_backward", mutates_args=())
def _conv_cuda_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, stats: torch.Tensor,
    bn_weight: Optional[torch.Tensor], stride: int, groups: int, training: bool, activation: int,
    need: List[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw fp32, db fp32, dgamma, dbeta); empty where ``need`` is False."""
    has_bn = bn_weight is not None
    grads = _conv_backward(_kernels(), grad, x, weight, y, stats, bn_weight, stride, groups, _ACT_NAME[activation],
                           training, has_bn, need)
    return tuple(t if t is not None and need[i] else x.new_empty(0) for i, t in enumerate(grads))


@_conv_cuda_backward_op.register_fake
def _(grad, x, weight, y, stats, bn_weight, stride, groups, training, activation, need):
    c_out = weight.shape[0]
    f32 = torch.float32
    shapes = (x.shape, (c_out, weight.shape[1], 3, 3), (c_out,), (c_out,), (c_out,))
    dtypes = (x.dtype, f32, f32, f32, f32)
    return tuple(x.new_empty(shapes[i] if need[i] else (0,), dtype=dtypes[i]) for i in range(5))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, _, _, _, stride, groups, _, _, training, activation, _ = inputs
    _, y, stats = output
    ctx.save_for_backward(x, weight, y, stats, bn_weight)
    ctx.config = (bias is not None, bn_weight is not None, stride, groups, training, activation)


def _conv_autograd_backward(ctx, grad, _grad_y, _grad_stats):
    x, weight, y, stats, bn_weight = ctx.saved_tensors
    has_bias, has_bn, stride, groups, training, activation = ctx.config
    if (has_bn or activation != 0) and y.numel() == 0:
        raise RuntimeError("conv_bn_act: backward through a forward that ran with save=False (no saved activation)")
    n = ctx.needs_input_grad
    need = [n[0], n[1], has_bias and n[2], has_bn and n[3], has_bn and n[4]]
    with rule.backward_of("conv_bn_act", "cuda"):
        dx, dw, db, dgamma, dbeta = _conv_cuda_backward_op(grad, x, weight, y, stats, bn_weight, stride, groups,
                                                           training, activation, need)
    return (dx if need[0] else None, dw.to(weight.dtype) if need[1] else None, db if need[2] else None,
            dgamma if need[3] else None, dbeta if need[4] else None) + (None,) * 9


_conv_cuda_op.register_autograd(_conv_autograd_backward, setup_context=_conv_setup_context)


@torch.library.custom_op("dinocxr::pcm_cuda", mutates_args=())
def _pcm_cuda_op(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    w3: torch.Tensor, b3: Optional[torch.Tensor], g1: torch.Tensor, be1: torch.Tensor, rm1: torch.Tensor,
    rv1: torch.Tensor, g2: torch.Tensor, be2: torch.Tensor, rm2: torch.Tensor, rv2: torch.Tensor,
    strides: List[int], groups: int, eps: List[float], momentum: List[float], training: List[bool], save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, y1, y2, stats1, stats2); y1 / y2 are empty at inference."""
    bns = ((g1, be1, rm1, rv1, eps[0], momentum[0]), (g2, be2, rm2, rv2, eps[1], momentum[1]))
    return _pcm_forward(_kernels(), x, (w1, w2, w3), (b1, b2, b3), bns, list(strides), groups, tuple(training), save)


@_pcm_cuda_op.register_fake
def _(x, w1, b1, w2, b2, w3, b3, g1, be1, rm1, rv1, g2, be2, rm2, rv2, strides, groups, eps, momentum, training, save):
    b, h, w = x.shape[:3]
    h1, w1_ = _out_size(h, strides[0]), _out_size(w, strides[0])
    h2, w2_ = _out_size(h1, strides[1]), _out_size(w1_, strides[1])
    h3, w3_ = _out_size(h2, strides[2]), _out_size(w2_, strides[2])
    raw = save or any(training)
    y1 = x.new_empty((b, h1, w1_, w1.shape[0]) if raw else (0,))
    y2 = x.new_empty((b, h2, w2_, w2.shape[0]) if raw else (0,))
    return (x.new_empty((b, h3, w3_, w3.shape[0])), y1, y2, x.new_empty((6, w1.shape[0]), dtype=torch.float32),
            x.new_empty((6, w2.shape[0]), dtype=torch.float32))


@torch.library.custom_op("dinocxr::pcm_cuda_backward", mutates_args=())
def _pcm_cuda_backward_op(
    grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, y1: torch.Tensor,
    y2: torch.Tensor, st1: torch.Tensor, st2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, strides: List[int],
    groups: int, training: List[bool], need_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _pcm_backward(_kernels(), grad, x, (w1, w2, w3), y1, y2, st1, st2, (g1, g2), list(strides), groups,
                          tuple(training), need_x)
    return tuple(t if t is not None else x.new_empty(0) for t in grads)


@_pcm_cuda_backward_op.register_fake
def _(grad, x, w1, w2, w3, y1, y2, st1, st2, g1, g2, strides, groups, training, need_x):
    f32 = torch.float32
    out = [x.new_empty(x.shape if need_x else (0,))]
    for w in (w1, w2, w3):
        out += [x.new_empty((w.shape[0], w.shape[1], 3, 3), dtype=f32), x.new_empty((w.shape[0],), dtype=f32)]
    for w in (w1, w2):
        out += [x.new_empty((w.shape[0],), dtype=f32), x.new_empty((w.shape[0],), dtype=f32)]
    return tuple(out)


def _pcm_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, w3, b3, g1, _, _, _, g2, _, _, _, strides, groups, _, _, training, _ = inputs
    _, y1, y2, st1, st2 = output
    ctx.save_for_backward(x, w1, w2, w3, y1, y2, st1, st2, g1, g2)
    ctx.config = (list(strides), groups, list(training), (b1 is not None, b2 is not None, b3 is not None))


def _pcm_autograd_backward(ctx, grad, *_):
    x, w1, w2, w3, y1, y2, st1, st2, g1, g2 = ctx.saved_tensors
    strides, groups, training, has_bias = ctx.config
    if y1.numel() == 0:
        raise RuntimeError("pcm: backward through a forward that ran with save=False (no saved activations)")
    n = ctx.needs_input_grad
    with rule.backward_of("pcm", "cuda"):
        dx, dw1, db1, dw2, db2, dw3, db3, dg1, dbe1, dg2, dbe2 = _pcm_cuda_backward_op(
            grad, x, w1, w2, w3, y1, y2, st1, st2, g1, g2, strides, groups, training, n[0])
    pick = lambda t, i: t if n[i] else None  # noqa: E731
    return (pick(dx, 0), pick(dw1.to(w1.dtype), 1), pick(db1, 2) if has_bias[0] else None,
            pick(dw2.to(w2.dtype), 3), pick(db2, 4) if has_bias[1] else None,
            pick(dw3.to(w3.dtype), 5), pick(db3, 6) if has_bias[2] else None,
            pick(dg1, 7), pick(dbe1, 8), None, None, pick(dg2, 11), pick(dbe2, 12), None, None) + (None,) * 6


_pcm_cuda_op.register_autograd(_pcm_autograd_backward, setup_context=_pcm_setup_context)


# ---- entry points of the cuda backend ------------------------------------------------------------
def _bn_tensors(bn_weight, bn_bias, running_mean, running_var):
    """fp32 contiguous copies (views when already so); gradients flow back through the casts."""
    return (bn_weight.float().contiguous(), bn_bias.float().contiguous(), running_mean.detach().float().contiguous(),
            running_var.detach().float().contiguous())


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_bn_act_cuda(
    x, weight, bias=None, *, stride=1, padding=1, dilation=1, groups=1,
    bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
    eps=1e-5, momentum=0.1, training=False, activation=None,
):
    """The cuda backend of ``conv_bn_act`` (the caller checked that the kernels cover the call)."""
    dtype = compute_dtype(x)
    xc = x.to(dtype).contiguous()
    wc = weight.to(dtype).contiguous()
    bc = None if bias is None else bias.float().contiguous()
    has_bn = bn_weight is not None
    bn = _bn_tensors(bn_weight, bn_bias, running_mean, running_var) if has_bn else (None,) * 4
    save = _needs_grad(x, weight, bias, bn_weight, bn_bias)
    out, _, stats = _conv_cuda_op(xc, wc, bc, *bn, _pair(stride)[0], groups, float(eps), float(momentum),
                                  bool(training) and has_bn, _ACT_CODE[activation], save)
    if has_bn and training:
        update_running_stats(running_mean, running_var, stats[4], stats[5])
    return out


def _pcm_cuda(x, weights, biases, bns, strides, groups, training):
    dtype = compute_dtype(x)
    xc = x.to(dtype).contiguous()
    ws = [w.to(dtype).contiguous() for w in weights]
    bs = [None if b is None else b.float().contiguous() for b in biases]
    bn_t = [_bn_tensors(*bn[:4]) for bn in bns]
    save = _needs_grad(x, *weights, *biases, bns[0][0], bns[0][1], bns[1][0], bns[1][1])
    out, _, _, st1, st2 = _pcm_cuda_op(
        xc, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], *bn_t[0], *bn_t[1], list(strides), groups,
        [float(bns[0][4]), float(bns[1][4])], [float(bns[0][5]), float(bns[1][5])], list(training), save,
    )
    for bn, st, flag in ((bns[0], st1, training[0]), (bns[1], st2, training[1])):
        if flag:
            update_running_stats(bn[2], bn[3], st[4], st[5])
    return out
