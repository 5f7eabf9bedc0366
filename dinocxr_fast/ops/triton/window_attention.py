"""Window multi-head self-attention in Triton, forward and backward, on channels-last tokens.

Contract (``dinocxr_fast/ops/attention.py``): ``qkv`` is B x H x W x 3C, the last dimension
``[q | k | v]`` each heads x head_dim; the grid is padded to a multiple of the window as ViTAEv2
does it (symmetric, odd token at the bottom / right) with tokens whose k and v equal
``pad_value`` (or zero); the output is B x H x W x C.

One program takes WPP windows of one head in turn. A window (7 x 7 = 49 tokens) fits one tile of
BLOCK_T = 64 rows, so the whole softmax is computed in registers: S = Q K^T (64 x 64, fp32), its
row max and sum, O = P V; nothing but Q, K, V and O touches memory. The window partition, the
padding and the scatter back are index arithmetic on the B x H x W x 3C tensor (token
(r, c) of window (wy, wx) is grid cell (wy * ws + r - top, wx * ws + c - left)); padded tokens
are not loaded, their k / v are ``pad_value``, padded queries are never stored.

The backward recomputes P from Q and K (no state is saved but the inputs), then
dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = dS K * scale, dK = dS^T Q * scale.
The gradient of ``pad_value`` is the sum of dK and dV over the padded tokens: each program writes
its partial sum, the launch helper adds them up (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot_precision, head_dim_block, interpreting, prune_configs

# BLOCK_T holds one window; 11 x 11 = 121 tokens is the largest window that fits 128 rows.
MAX_WINDOW_TOKENS = 128
MAX_HEAD_DIM = 128


def _configs():
    """Windows per program x warps (x pipeline stages, which prefetch the next window's tiles).
    Head dim 128 needs 8 warps in the backward to stay out of local memory (tests/kernels/sm90_compile.py)."""
    if interpreting():
        return [triton.Config({"WPP": 2}, num_warps=4, num_stages=1)]
    return [triton.Config({"WPP": wpp}, num_warps=warps, num_stages=stages)
            for wpp, warps, stages in ((1, 4, 1), (2, 4, 2), (4, 4, 2), (1, 8, 1), (2, 8, 2), (4, 8, 2))]


# Tuned per head dim and problem size; the grid geometry is not specialised on (every batch size
# or grid would otherwise compile its own kernels), the strides are (16-element alignment).
_AUTOTUNE = dict(configs=_configs(), key=["n_windows", "HEAD_DIM", "C"],
                 prune_configs_by={"early_config_prune": prune_configs})
_GEOMETRY = ["n_windows", "n_wh", "n_ww", "H", "W", "top", "left"]


@triton.jit
def _window_rows(pid, i, n_windows, n_wh, n_ww, H, W, top, left, s_b, s_h, s_w,
                 WPP: tl.constexpr, WS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Window i of this program: per tile row, the token's offset in a B x H x W x * tensor with
    strides (s_b, s_h, s_w), whether the row is a token of the window (valid) and whether that
    token lies in the real grid (inside; the others are padding)."""
    win = pid * WPP + i
    # a window past the last one (the tail of the last program) has no valid token
    n_tokens = tl.where(win < n_windows, WS * WS, 0)
    per_image = n_wh * n_ww
    b = win // per_image
    r = win % per_image
    wy = r // n_ww
    wx = r % n_ww
    t = tl.arange(0, BLOCK_T)
    y = wy * WS + t // WS - top
    x = wx * WS + t % WS - left
    valid = t < n_tokens
    inside = valid & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    offs = b.to(tl.int64) * s_b + y * s_h + x * s_w
    return offs, valid, inside


@triton.jit
def _load_window(qkv_ptr, offs, valid, inside, col, dmask, pad_k, pad_v, C,
                 HAS_PAD_VALUE: tl.constexpr):
    mask = inside[:, None] & dmask[None, :]
    ptrs = qkv_ptr + offs[:, None] + col[None, :]
    q = tl.load(ptrs, mask=mask, other=0.0)
    k = tl.load(ptrs + C, mask=mask, other=0.0)
    v = tl.load(ptrs + 2 * C, mask=mask, other=0.0)
    if HAS_PAD_VALUE:
        pad = (valid & ~inside)[:, None]
        k = tl.where(pad, pad_k[None, :], k)
        v = tl.where(pad, pad_v[None, :], v)
    return q, k, v


@triton.jit
def _head_columns(qkv_ptr, pad_ptr, C, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, HAS_PAD_VALUE: tl.constexpr):
    """The columns of this program's head (program axis 1) in a C-wide row, their mask, and the
    head's K and V of a padded token (zeros unless the model pads with a learnt value)."""
    d = tl.arange(0, HD_PAD)
    dmask = d < HEAD_DIM
    col = tl.program_id(1) * HEAD_DIM + d
    dtype = qkv_ptr.dtype.element_ty
    pad_k = tl.zeros([HD_PAD], dtype=dtype)
    pad_v = tl.zeros([HD_PAD], dtype=dtype)
    if HAS_PAD_VALUE:
        pad_k = tl.load(pad_ptr + C + col, mask=dmask, other=0.0).to(dtype)
        pad_v = tl.load(pad_ptr + 2 * C + col, mask=dmask, other=0.0).to(dtype)
    return col, dmask, pad_k, pad_v


@triton.jit
def _window_probs(q, k, valid, qk_scale, DOT_PREC: tl.constexpr):
    """Row-normalised softmax(q k^T * scale) over the window's tokens, fp32, BLOCK_T x BLOCK_T."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # base-2 logits
    s = tl.where(valid[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    # a window past the last one (the tail of the grid of programs) has no valid token: keep it finite
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, axis=1)
    return p / tl.where(l == 0.0, 1.0, l)[:, None]


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=_GEOMETRY)
def _window_fwd_kernel(
    qkv_ptr, pad_ptr, out_ptr,
    s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
    n_windows, n_wh, n_ww, H, W, top, left, C, qk_scale,
    HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, WS: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_PAD_VALUE: tl.constexpr, DOT_PREC: tl.constexpr, WPP: tl.constexpr,
):
    pid = tl.program_id(0)
    col, dmask, pad_k, pad_v = _head_columns(qkv_ptr, pad_ptr, C, HEAD_DIM, HD_PAD, HAS_PAD_VALUE)
    dtype = qkv_ptr.dtype.element_ty
    for i in range(WPP):
        offs, valid, inside = _window_rows(pid, i, n_windows, n_wh, n_ww, H, W, top, left, s_qb, s_qh, s_qw,
                                           WPP, WS, BLOCK_T)
        q, k, v = _load_window(qkv_ptr, offs, valid, inside, col, dmask, pad_k, pad_v, C, HAS_PAD_VALUE)
        p = _window_probs(q, k, valid, qk_scale, DOT_PREC)
        o = tl.dot(p.to(dtype), v, input_precision=DOT_PREC)
        out_offs, _, _ = _window_rows(pid, i, n_windows, n_wh, n_ww, H, W, top, left, s_ob, s_oh, s_ow,
                                      WPP, WS, BLOCK_T)
        tl.store(out_ptr + out_offs[:, None] + col[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=inside[:, None] & dmask[None, :])


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=_GEOMETRY)
def _window_bwd_kernel(
    qkv_ptr, pad_ptr, dout_ptr, dqkv_ptr, dpad_ptr,
    s_qb, s_qh, s_qw, s_ob, s_oh, s_ow,
    n_windows, n_wh, n_ww, H, W, top, left, C, qk_scale, scale,
    HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, WS: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_PAD_VALUE: tl.constexpr, DOT_PREC: tl.constexpr, WPP: tl.constexpr,
):
    pid = tl.program_id(0)
    col, dmask, pad_k, pad_v = _head_columns(qkv_ptr, pad_ptr, C, HEAD_DIM, HD_PAD, HAS_PAD_VALUE)
    dtype = qkv_ptr.dtype.element_ty
    dpad_k = tl.zeros([HD_PAD], dtype=tl.float32)
    dpad_v = tl.zeros([HD_PAD], dtype=tl.float32)
    for i in range(WPP):
        offs, valid, inside = _window_rows(pid, i, n_windows, n_wh, n_ww, H, W, top, left, s_qb, s_qh, s_qw,
                                           WPP, WS, BLOCK_T)
        q, k, v = _load_window(qkv_ptr, offs, valid, inside, col, dmask, pad_k, pad_v, C, HAS_PAD_VALUE)
        out_offs, _, _ = _window_rows(pid, i, n_windows, n_wh, n_ww, H, W, top, left, s_ob, s_oh, s_ow,
                                      WPP, WS, BLOCK_T)
        mask = inside[:, None] & dmask[None, :]
        # padded queries have no output, so no gradient flows from them: dO = 0 there
        do = tl.load(dout_ptr + out_offs[:, None] + col[None, :], mask=mask, other=0.0)
        p = _window_probs(q, k, valid, qk_scale, DOT_PREC)
        dv = tl.dot(tl.trans(p.to(dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq = tl.dot(ds.to(dtype), k, input_precision=DOT_PREC) * scale
        dk = tl.dot(tl.trans(ds.to(dtype)), q, input_precision=DOT_PREC) * scale
        ptrs = dqkv_ptr + offs[:, None] + col[None, :]
        out_ty = dqkv_ptr.dtype.element_ty
        tl.store(ptrs, dq.to(out_ty), mask=mask)
        tl.store(ptrs + C, dk.to(out_ty), mask=mask)
        tl.store(ptrs + 2 * C, dv.to(out_ty), mask=mask)
        if HAS_PAD_VALUE:
            pad = (valid & ~inside)[:, None]
            dpad_k += tl.sum(tl.where(pad, dk, 0.0), axis=0)
            dpad_v += tl.sum(tl.where(pad, dv, 0.0), axis=0)
    if HAS_PAD_VALUE:
        # dpad is [programs, 2, C]: the k part, then the v part
        base = dpad_ptr + pid * 2 * C + col
        tl.store(base, dpad_k, mask=dmask)
        tl.store(base + C, dpad_v, mask=dmask)


# ---- launch helpers --------------------------------------------------------------------------------
def window_padding(size: int, window_size: int) -> tuple[int, int]:
    """(before, after) padding of one side to a multiple of window_size (as the op's reference)."""
    total = (window_size - size % window_size) % window_size
    return total // 2, total - total // 2


def supports(qkv: torch.Tensor, num_heads: int, window_size: int) -> str | None:
    """None when these kernels handle the problem, else why not."""
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"qkv has dtype {qkv.dtype}; the Triton kernels take fp16, bf16 and fp32"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"qkv: head_dim {head_dim} (3C / 3 / num_heads) is over the Triton kernels' limit of {MAX_HEAD_DIM}"
    if window_size * window_size > MAX_WINDOW_TOKENS:
        return f"window_size {window_size}: more than {MAX_WINDOW_TOKENS} tokens per window"
    return None


class _Problem:
    def __init__(self, qkv: torch.Tensor, num_heads: int, window_size: int):
        self.batch, self.h, self.w, c3 = qkv.shape
        self.c = c3 // 3
        self.heads = num_heads
        self.head_dim = self.c // num_heads
        self.ws = window_size
        self.top, bottom = window_padding(self.h, window_size)
        self.left, right = window_padding(self.w, window_size)
        self.n_wh = (self.h + self.top + bottom) // window_size
        self.n_ww = (self.w + self.left + right) // window_size
        self.n_windows = self.batch * self.n_wh * self.n_ww
        self.has_pad = (self.top + bottom + self.left + right) > 0

    def meta(self, dtype: torch.dtype) -> dict:
        return dict(HEAD_DIM=self.head_dim, HD_PAD=head_dim_block(self.head_dim), WS=self.ws,
                    BLOCK_T=max(16, triton.next_power_of_2(self.ws * self.ws)), DOT_PREC=dot_precision(dtype))

    def geometry(self) -> tuple:
        return (self.n_windows, self.n_wh, self.n_ww, self.h, self.w, self.top, self.left, self.c)

    def grid(self, meta) -> tuple[int, int]:
        return (triton.cdiv(self.n_windows, meta["WPP"]), self.heads)


def window_attention_fwd(qkv: torch.Tensor, pad_value: torch.Tensor | None, num_heads: int, window_size: int,
                         scale: float) -> torch.Tensor:
    """B x H x W x 3C -> B x H x W x C, same dtype."""
    qkv = qkv.contiguous()
    p = _Problem(qkv, num_heads, window_size)
    out = qkv.new_empty(p.batch, p.h, p.w, p.c)
    use_pad = pad_value is not None and p.has_pad
    _window_fwd_kernel[p.grid](
        qkv, pad_value.contiguous() if use_pad else qkv, out,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *p.geometry(), float(scale) * LOG2E,
        HAS_PAD_VALUE=use_pad, **p.meta(qkv.dtype),
    )
    return out


def window_attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, pad_value: torch.Tensor | None,
                         num_heads: int, window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d qkv like qkv, d pad_value [3C] in pad_value's dtype, or an empty tensor without one)."""
    qkv = qkv.contiguous()  # dqkv is allocated contiguous and shares these strides
    grad_out = grad_out.to(qkv.dtype)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()  # any other strides are fine
    p = _Problem(qkv, num_heads, window_size)
    dqkv = torch.empty_like(qkv)
    use_pad = pad_value is not None and p.has_pad
    # one partial per program, each written in full: room for the most programs a config launches (WPP = 1)
    dpad_partial = qkv.new_empty((p.n_windows, 2, p.c) if use_pad else (0,), dtype=torch.float32)
    grid_used = {}

    def grid(meta):
        grid_used["programs"] = triton.cdiv(p.n_windows, meta["WPP"])
        return p.grid(meta)

    _window_bwd_kernel[grid](
        qkv, pad_value.contiguous() if use_pad else qkv, grad_out, dqkv, dpad_partial,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        *p.geometry(), float(scale) * LOG2E, float(scale),
        HAS_PAD_VALUE=use_pad, **p.meta(qkv.dtype),
    )
    if pad_value is None:
        return dqkv, qkv.new_empty(0)
    dpad = torch.zeros(3 * p.c, device=qkv.device, dtype=torch.float32)
    if use_pad:
        dpad[p.c:] = dpad_partial[:grid_used["programs"]].sum(0).reshape(-1)
    return dqkv, dpad.to(pad_value.dtype)
