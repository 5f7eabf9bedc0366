"""``KernelEmulation``: the CUDA conv3x3 kernels' semantics (kernels/cuda/conv3x3.cuh,
conv_batchnorm.cu) in float64 PyTorch, behind the interface of ``conv_bn_act_cuda._CudaKernels``.

Swapped in for the extension, it runs the cuda backend's orchestration on the CPU
(test_cuda_conv3x3_planning.py); it is also the oracle the kernels are compared with, on a GPU
(test_cuda_conv3x3_kernels.py) and emulated on the CPU (test_cuda_emulated_kernels.py).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

cuda_mod = importlib.import_module("dinocxr_fast.ops.conv_bn_act_cuda")

ACTS = {None: lambda z: z, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def act_grad(z: torch.Tensor, act) -> torch.Tensor:
    if act is None:
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    cdf = 0.5 * (1 + torch.erf(z / 2 ** 0.5))
    return cdf + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5


class KernelEmulation:
    """kernels/cuda/conv3x3.cuh in float64 PyTorch (values stored in the tensors' own dtype)."""

    def __init__(self, fused: bool = True):
        self.fused = fused
        self.calls: list[str] = []

    def tap_conv(self, x, w, out, plan, *, pro=None, kind=0, act=None, scale=None, shift=None, ref=None, aux=None,
                 z=None, xh=None):
        self.calls.append(f"tap_conv:{kind}:{'pro' if pro else '-'}")
        b, in_h, in_w, in_c, out_h, out_w, out_c, gh, gw, s_in, s_out, oy0, ox0, groups = plan.geom
        assert tuple(x.shape) == (b, in_h, in_w, in_c) and tuple(out.shape) == (b, out_h, out_w, out_c)
        cin_g, cout_g = in_c // groups, out_c // groups
        assert tuple(w.shape) == (out_c, len(plan.tap_dy), cin_g) and w.is_contiguous()
        assert (gh - 1) * s_out + oy0 < out_h and (gw - 1) * s_out + ox0 < out_w
        a = x.double()
        if pro is not None:  # the prologue, then the zero padding
            a = F.silu(a * pro[0].double() + pro[1].double()).to(x.dtype).double()
        pad = 2
        ap = F.pad(a, (0, 0, pad, pad, pad, pad))
        acc = torch.zeros(b, gh, gw, out_c, dtype=torch.float64, device=x.device)
        for t, (dy, dx) in enumerate(zip(plan.tap_dy, plan.tap_dx)):
            rows = torch.arange(gh, device=x.device) * s_in + dy + pad
            cols = torch.arange(gw, device=x.device) * s_in + dx + pad
            patch = ap[:, rows][:, :, cols].reshape(b, gh, gw, groups, cin_g)
            wt = w[:, t, :].double().reshape(groups, cout_g, cin_g)
            acc += torch.einsum("bhwgc,goc->bhwgo", patch, wt).reshape(b, gh, gw, out_c)
        sc = 1.0 if scale is None else scale.double()
        sh = 0.0 if shift is None else shift.double()
        target = out[:, oy0::s_out, ox0::s_out][:, :gh, :gw]
        partials = torch.empty(0, device=x.device)
        if kind == 2:  # SiLU backward through BatchNorm
            y = aux[:, oy0::s_out, ox0::s_out][:, :gh, :gw].double()
            zz = y * z[0].double() + z[1].double()
            v = acc * act_grad(zz, "silu")
            d = v.to(out.dtype).double()
            xhat = y * xh[0].double() + xh[1].double()
            partials = torch.stack([d.sum((0, 1, 2)), (d * xhat).sum((0, 1, 2))], -1)[None]
        else:
            v = acc * sc + sh
            if kind == 1:
                r = v.to(out.dtype).double() - (0.0 if ref is None else ref.double())
                partials = torch.stack([r.sum((0, 1, 2)), (r * r).sum((0, 1, 2))], -1)[None]
            else:
                v = ACTS[act](v)
        target.copy_(v.to(out.dtype))
        return partials

    def wgrad(self, x, dy, pro, groups, stride, need_bias):
        self.calls.append(f"wgrad:{'pro' if pro else '-'}")
        a = x.double()
        if pro is not None:
            a = F.silu(a * pro[0].double() + pro[1].double()).to(x.dtype).double()
        w_shape = (dy.shape[-1], x.shape[-1] // groups, 3, 3)
        dw = torch.nn.grad.conv2d_weight(a.permute(0, 3, 1, 2), w_shape, dy.double().permute(0, 3, 1, 2), stride=stride,
                                         padding=1, groups=groups)
        db = dy.double().sum((0, 1, 2)) if need_bias else torch.empty(0, device=dy.device)
        return dw.float(), db.float()  # the kernels return fp32

    def bn_forward_finalize(self, partials, count, ref, gamma, beta, eps, momentum, running_mean, running_var):
        s1, s2 = partials[..., 0].double().sum(0), partials[..., 1].double().sum(0)
        d = s1 / count
        var = (s2 / count - d * d).clamp_min(0)
        mean = ref.double() + d
        invstd = 1 / torch.sqrt(var + eps)
        scale = gamma.double() * invstd
        unbiased = var * count / (count - 1)
        return torch.stack([mean, invstd, scale, beta.double() - mean * scale,
                            (1 - momentum) * running_mean.double() + momentum * mean,
                            (1 - momentum) * running_var.double() + momentum * unbiased]).float()

    def bn_backward_finalize(self, partials, count, gamma, mean, invstd, training):
        sz, sxz = partials[..., 0].double().sum(0), partials[..., 1].double().sum(0)
        a = gamma.double() * invstd.double()
        b = -a * invstd.double() * sxz / count if training else torch.zeros_like(a)
        c = -a * sz / count - b * mean.double() if training else torch.zeros_like(a)
        return torch.stack([sxz, sz, a, b, c]).float()

    def affine_act(self, y, scale, shift, act):
        sc = 1.0 if scale is None else scale.double()
        sh = 0.0 if shift is None else shift.double()
        return ACTS[act](y.double() * sc + sh).to(y.dtype)

    def act_backward_stats(self, g, y, z, act, xh):
        yy = y.double()
        dz = (g.double() * act_grad(yy * z[0].double() + z[1].double(), act)).to(y.dtype).double()
        xhat = yy * xh[0].double() + xh[1].double()
        dims = tuple(range(y.dim() - 1))
        return torch.stack([dz.sum(dims), (dz * xhat).sum(dims)], -1)[None]

    def bn_backward_apply(self, g, y, z, act, a, b, c, inplace):
        yy = y.double()
        dz = g.double()
        if act is not None:
            zs = 1.0 if z is None else z[0].double()
            zb = 0.0 if z is None else z[1].double()
            dz = (dz * act_grad(yy * zs + zb, act)).to(y.dtype).double()
        dy = a.double() * dz + (0.0 if b is None else b.double()) * yy + (0.0 if c is None else c.double())
        if inplace:
            return g.copy_(dy.to(g.dtype))
        return dy.to(g.dtype)

    def pcm_fused_supported(self, shape, dtype, device):
        return self.fused

    def pcm_fused(self, x, w1, w2, w3, s1, t1, s2, t2, s3, t3, groups, stride1):
        self.calls.append("pcm_fused")
        a = x
        for w, s, t, stride, act in ((w1, s1, t1, stride1, "silu"), (w2, s2, t2, 1, "silu"), (w3, s3, t3, 1, None)):
            b, h, wd, c_in = a.shape
            plan = cuda_mod._forward_plan(b, h, wd, c_in, w.shape[0], groups, stride)
            nxt = a.new_empty((b, plan.geom[4], plan.geom[5], w.shape[0]))
            self.tap_conv(a, w, nxt, plan, act=act, scale=s, shift=t)
            a = nxt
        return a
