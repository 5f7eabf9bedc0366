"""Full multi-head self-attention in Triton (flash attention), forward and backward.

Contract (``dinocxr_fast/ops/attention.py``): ``qkv`` is B x N x 3C with the last dimension
``[q | k | v]``, each heads x head_dim (tokens flattened from the B x H x W grid the model keeps);
the output is B x N x C. The kernels read q, k and v of one head straight out of that packed
tensor by strides and write the output in place of the head's columns: no split-heads or
transpose copies.

Forward: one program per (block of BLOCK_M queries, batch x head), a loop over key blocks with an
online softmax (running max and sum, base 2), fp32 accumulation; it stores the output and the
log-sum-exp per query (fp32, base 2) for the backward. N need not be a multiple of any block.

Backward (FlashAttention-2): ``delta = rowsum(dO * O)``; one kernel per key block accumulating
dK and dV over the query blocks, one per query block accumulating dQ over the key blocks; P is
rebuilt from Q, K and the saved log-sum-exp. No N x N matrix is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, dot_precision, head_dim_block, interpreting, prune_configs

MAX_HEAD_DIM = 128


def _configs(pairs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples on a GPU; one small tile in the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# H100 tiles: the forward keeps a BLOCK_M x HD accumulator and streams K/V blocks (N = 49 fits one
# 64-key block, N = 196 four); the backward kernels hold two fp32 accumulators of their own block,
# so they take smaller tiles. Few configs: each is compiled on the first call.
_FWD_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 2)])
_BWD_KV_CONFIGS = _configs([(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2)])
_BWD_Q_CONFIGS = _configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)])


def _prune_for_length(configs, named_args, **kwargs):
    """No tile much longer than the sequence (N = 49 keeps the 64-row tiles only): fewer configs
    to compile and time on the first call. Then DINOCXR_TRITON_CONFIG, as for every tuned kernel."""
    n = triton.next_power_of_2(named_args["N"])
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, n) and c.kwargs["BLOCK_N"] <= max(64, n)]
    return prune_configs(fits or configs[:1], named_args, **kwargs)


def _autotune(configs):
    # tuned per sequence length and head dim; N itself is not specialised on (no recompile per N)
    return triton.autotune(configs=configs, key=["N", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": _prune_for_length})


_NOT_SPECIALISED = ["N", "heads"]


@triton.jit
def _tile_ptrs(base, rows, col, s_n):
    return base + rows.to(tl.int64)[:, None] * s_n + col[None, :]


@triton.jit
def _head_of(bh, heads, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr):
    """(batch index, the head's columns in a C-wide row, their mask) of program axis 1."""
    d = tl.arange(0, HD_PAD)
    return bh // heads, (bh % heads) * HEAD_DIM + d, d < HEAD_DIM


@triton.jit
def _load_kv(base, keys, N, C, col, dmask, s_qn):
    """K and V of a block of keys (zero past N) and the keys' mask."""
    kmask = keys < N
    kv_mask = kmask[:, None] & dmask[None, :]
    k = tl.load(_tile_ptrs(base, keys, C + col, s_qn), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(base, keys, 2 * C + col, s_qn), mask=kv_mask, other=0.0)
    return k, v, kmask


@triton.jit
def _bwd_head(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, N, heads, s_qb, s_db, HEAD_DIM: tl.constexpr,
              HD_PAD: tl.constexpr):
    """A backward program's batch x head (program axis 1): its batch index, columns and their mask,
    and where its Q/K/V, dO, log-sum-exp and delta start."""
    bh = tl.program_id(1)
    b, col, dmask = _head_of(bh, heads, HEAD_DIM, HD_PAD)
    stats = bh.to(tl.int64) * N
    return (b, col, dmask, qkv_ptr + b.to(tl.int64) * s_qb, dout_ptr + b.to(tl.int64) * s_db, lse_ptr + stats,
            delta_ptr + stats)


@triton.jit
def _load_query_block(base, dbase, lse_ptr, delta_ptr, rows, N, col, dmask, s_qn, s_dn):
    """What the backward needs of a block of queries: Q, dO, the saved log-sum-exp and delta
    (``lse_ptr``/``delta_ptr`` already at this batch x head), and the rows' masks."""
    rmask = rows < N
    q_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(_tile_ptrs(base, rows, col, s_qn), mask=q_mask, other=0.0)
    do = tl.load(_tile_ptrs(dbase, rows, col, s_dn), mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rmask, other=0.0)
    return q, do, lse, delta, rmask, q_mask


@_autotune(_FWD_CONFIGS)
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _attn_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr,
    s_qb, s_qn, s_ob, s_on,
    N, C, heads, qk_scale,
    HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, col, dmask = _head_of(bh, heads, HEAD_DIM, HD_PAD)
    dtype = qkv_ptr.dtype.element_ty
    base = qkv_ptr + b.to(tl.int64) * s_qb

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    q = tl.load(_tile_ptrs(base, rows, col, s_qn), mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        k, v, kmask = _load_kv(base, start_n + tl.arange(0, BLOCK_N), N, C, col, dmask, s_qn)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key block holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    out = out_ptr + b.to(tl.int64) * s_ob
    tl.store(_tile_ptrs(out, rows, col, s_on), acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + rows, m_i + tl.log2(l_i), mask=rmask)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, s_ob, s_on, s_db, s_dn, N, heads,
    HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) per query and head (fp32)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, col, dmask = _head_of(bh, heads, HEAD_DIM, HD_PAD)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    mask = rmask[:, None] & dmask[None, :]
    o = tl.load(_tile_ptrs(out_ptr + b.to(tl.int64) * s_ob, rows, col, s_on), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(dout_ptr + b.to(tl.int64) * s_db, rows, col, s_dn), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + rows, delta, mask=rmask)


@_autotune(_BWD_KV_CONFIGS)
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _attn_bwd_dkdv_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, s_qb, s_qn, s_db, s_dn, N, C, heads,
                          qk_scale, scale, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one block of BLOCK_N keys, looping over all query blocks (BLOCK_M)."""
    b, col, dmask, base, dbase, lse_ptr, delta_ptr = _bwd_head(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, N, heads,
                                                               s_qb, s_db, HEAD_DIM, HD_PAD)
    dtype = qkv_ptr.dtype.element_ty
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, kmask = _load_kv(base, keys, N, C, col, dmask, s_qn)
    kv_mask = kmask[:, None] & dmask[None, :]
    dk = tl.zeros([BLOCK_N, HD_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HD_PAD], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        q, do, lse, delta, rmask, _ = _load_query_block(base, dbase, lse_ptr, delta_ptr, start_m + tl.arange(0, BLOCK_M),
                                                        N, col, dmask, s_qn, s_dn)
        # transposed tiles (keys x queries), so that dK and dV accumulate along the keys
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.where(rmask[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(dtype), q, input_precision=DOT_PREC)
    out_ty = dqkv_ptr.dtype.element_ty
    dbase_qkv = dqkv_ptr + b.to(tl.int64) * s_qb
    tl.store(_tile_ptrs(dbase_qkv, keys, C + col, s_qn), (dk * scale).to(out_ty), mask=kv_mask)
    tl.store(_tile_ptrs(dbase_qkv, keys, 2 * C + col, s_qn), dv.to(out_ty), mask=kv_mask)


@_autotune(_BWD_Q_CONFIGS)
@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def _attn_bwd_dq_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr, s_qb, s_qn, s_db, s_dn, N, C, heads,
                        qk_scale, scale, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one block of BLOCK_M queries, looping over all key blocks (BLOCK_N)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, col, dmask, base, dbase, lse_ptr, delta_ptr = _bwd_head(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, N, heads,
                                                               s_qb, s_db, HEAD_DIM, HD_PAD)
    dtype = qkv_ptr.dtype.element_ty
    q, do, lse, delta, _, q_mask = _load_query_block(base, dbase, lse_ptr, delta_ptr, rows, N, col, dmask, s_qn, s_dn)
    dq = tl.zeros([BLOCK_M, HD_PAD], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        k, v, kmask = _load_kv(base, start_n + tl.arange(0, BLOCK_N), N, C, col, dmask, s_qn)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.where(kmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dtype), k, input_precision=DOT_PREC)
    tl.store(_tile_ptrs(dqkv_ptr + b.to(tl.int64) * s_qb, rows, col, s_qn),
             (dq * scale).to(dqkv_ptr.dtype.element_ty), mask=q_mask)


# ---- launch helpers --------------------------------------------------------------------------------
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y


def supports(qkv: torch.Tensor, num_heads: int) -> str | None:
    """None when these kernels handle the problem, else why not."""
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"qkv has dtype {qkv.dtype}; the Triton kernels take fp16, bf16 and fp32"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"qkv: head_dim {head_dim} (3C / 3 / num_heads) is over the Triton kernels' limit of {MAX_HEAD_DIM}"
    if qkv.shape[0] * num_heads > MAX_GRID_Y:  # the launch grid's second axis is batch x heads
        return (f"qkv: batch x heads = {qkv.shape[0]} x {num_heads} is over the {MAX_GRID_Y} programs a launch "
                f"grid's second axis holds")
    return None


def _meta(qkv: torch.Tensor, num_heads: int) -> dict:
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return dict(HEAD_DIM=head_dim, HD_PAD=head_dim_block(head_dim), DOT_PREC=dot_precision(qkv.dtype))


def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B x N x 3C -> (B x N x C output, fp32 [B * heads, N] base-2 log-sum-exp)."""
    qkv = qkv.contiguous()
    batch, n, c3 = qkv.shape
    c = c3 // 3
    out = qkv.new_empty(batch, n, c)
    lse = torch.empty(batch * num_heads, n, device=qkv.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), batch * num_heads)

    _attn_fwd_kernel[grid](
        qkv, out, lse, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        n, c, num_heads, float(scale) * LOG2E, **_meta(qkv, num_heads),
    )
    return out, lse


def attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  num_heads: int, scale: float) -> torch.Tensor:
    """d qkv (B x N x 3C, qkv's dtype) from d out (B x N x C) and the forward's out and lse."""
    qkv = qkv.contiguous()  # dqkv is allocated contiguous and shares these strides
    grad_out = grad_out.to(qkv.dtype)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()  # any other strides are fine
    batch, n, c3 = qkv.shape
    c = c3 // 3
    meta = _meta(qkv, num_heads)
    delta = torch.empty_like(lse)
    block = 64 if not interpreting() else 32
    _attn_bwd_delta_kernel[(triton.cdiv(n, block), batch * num_heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), n, num_heads,
        HEAD_DIM=meta["HEAD_DIM"], HD_PAD=meta["HD_PAD"], BLOCK_M=block,
    )
    dqkv = torch.empty_like(qkv)
    args = (qkv, grad_out, lse, delta, dqkv, qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1),
            n, c, num_heads, float(scale) * LOG2E, float(scale))
    _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(n, m["BLOCK_N"]), batch * num_heads)](*args, **meta)
    _attn_bwd_dq_kernel[lambda m: (triton.cdiv(n, m["BLOCK_M"]), batch * num_heads)](*args, **meta)
    return dqkv
