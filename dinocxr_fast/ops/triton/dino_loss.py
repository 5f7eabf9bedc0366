"""Fused DINO loss in Triton (math and contract: ``dinocxr_fast/ops/dino_loss.py``).

Three launches, the teacher read once and the student read once from HBM:

1. ``_teacher_kernel``, one program per block of columns, all teacher rows: per (row, column
   block) the partial max and sum of exp((t - c) / tau_t), and the complete column sums of the
   teacher for the centre EMA. Column-parallel, so the sums need no atomics and K = 65536 gives
   hundreds of programs.
2. ``_student_kernel``, one program per student row (b-major, so the crops of one image run side
   by side and share their teacher rows in L2): merges the teacher partials of the views it pairs
   with, then one online max/sum pass over the row with the target T_v = sum_{i != v} q_i rebuilt
   on the fly (never stored), the loss term, and a second pass over the same row (an L2 hit: the
   program just read it) that writes the gradient (W_v p - T_v) / (tau_s n_pairs B). Column block
   and warps are autotuned.
   With few rows (DINO-CXR's two views at a small batch) the row is split over several programs
   instead (``_student_kernel`` writes per-chunk partial states, ``_student_grad_kernel`` merges
   them and writes the gradient); the whole student then fits in L2, so the second read is cheap.
3. the loss: a deterministic torch sum of the per-row terms.

Non-finite inputs make the loss NaN: each pass adds sum(x - x) over what it read (0, or NaN when
anything is inf/NaN) to its result.

fp32/fp16/bf16 inputs are computed in fp32; fp64 in fp64 (the temperatures then travel as an fp32
hi + lo pair, since Triton passes Python floats as fp32).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import interpreting, prune_configs


@triton.jit
def _acc(x, IS_F64: tl.constexpr):
    if IS_F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _scalar(hi, lo, IS_F64: tl.constexpr):
    """A Python float passed as fp32 hi + lo: exact enough for fp64 math, hi alone for fp32."""
    if IS_F64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


# ---- 1. teacher: partial softmax statistics per column block, and the column sums ----------------
@triton.jit(do_not_specialize=["n_rows"])
def _teacher_kernel(
    teacher_ptr, center_ptr, pmax_ptr, psum_ptr, tsum_ptr,
    n_rows, K, inv_tt_hi, inv_tt_lo,
    NEED_SUM: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, IS_F64: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    inv_tt = _scalar(inv_tt_hi, inv_tt_lo, IS_F64)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    c = _acc(tl.load(center_ptr + cols, mask=cmask, other=0.0), IS_F64)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        t = tl.load(teacher_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0)
        if NEED_SUM:
            colsum += tl.sum(t.to(tl.float32), axis=0)
        z = (_acc(t, IS_F64) - c[None, :]) * inv_tt
        probe = tl.sum(tl.where(mask, z - z, 0.0), axis=1)
        z = tl.where(mask, z, float("-inf"))
        m = tl.max(z, axis=1)
        m = tl.where(rmask, m, 0.0)  # padding rows: keep exp() finite, nothing is stored for them
        s = tl.sum(tl.exp(z - m[:, None]), axis=1) + probe
        tl.store(pmax_ptr + rows * n_blocks + pid, m, mask=rmask)
        tl.store(psum_ptr + rows * n_blocks + pid, s, mask=rmask)
    if NEED_SUM:
        tl.store(tsum_ptr + cols, colsum, mask=cmask)


# ---- 2. student --------------------------------------------------------------------------------
@triton.jit
def _view_stats(pmax_ptr, psum_ptr, b, v, B, n_global, NB, NG_PAD: tl.constexpr, NB_PAD: tl.constexpr):
    """Max and 1/sum of teacher row b of every view, merged from the column-block partials, and
    the weight of each view in crop v's target (1 for every view but v itself)."""
    g = tl.arange(0, NG_PAD)
    gmask = g < n_global
    j = tl.arange(0, NB_PAD)
    mask = gmask[:, None] & (j < NB)[None, :]
    offs = (g * B + b)[:, None] * NB + j[None, :]
    pm = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
    ps = tl.load(psum_ptr + offs, mask=mask, other=0.0)
    m = tl.max(pm, axis=1)
    m = tl.where(gmask, m, 0.0)
    s = tl.sum(tl.where(mask, ps * tl.exp(pm - m[:, None]), 0.0), axis=1)
    s = tl.where(gmask, s, 1.0)
    weight = (gmask & (g != v)).to(m.dtype)
    return m, weight / s


@triton.jit
def _targets(teacher_ptr, center_ptr, cols, cmask, b, B, K, n_global, inv_tt, tmax, tscale,
             NG_PAD: tl.constexpr, IS_F64: tl.constexpr):
    """T_v at ``cols``: sum over the paired teacher views of their softmax (tscale is 0 for
    views that do not pair with v)."""
    g = tl.arange(0, NG_PAD)
    mask = (g < n_global)[:, None] & cmask[None, :]
    rows = (g * B + b).to(tl.int64)
    # -inf where masked: exp() gives 0 there instead of overflowing
    t = _acc(tl.load(teacher_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=float("-inf")), IS_F64)
    c = _acc(tl.load(center_ptr + cols, mask=cmask, other=0.0), IS_F64)
    q = tl.exp((t - c[None, :]) * inv_tt - tmax[:, None]) * tscale[:, None]
    return tl.sum(tl.where(mask, q, 0.0), axis=0)


@triton.jit
def _student_stats(student_ptr, teacher_ptr, center_ptr, srow, b, lo, hi, B, K, n_global,
                   inv_ts, inv_tt, tmax, tscale,
                   NG_PAD: tl.constexpr, BLOCK_K: tl.constexpr, IS_F64: tl.constexpr):
    """Online state over columns [lo, hi) of one student row, x = s / tau_s:
    m = max x, s = sum exp(x - m), w = sum T, d = sum T (x - m), probe = sum (x - x)."""
    zero = tl.sum(tl.zeros([BLOCK_K], dtype=tmax.dtype), axis=0)  # a 0-d accumulator of the math type
    m = zero + float("-inf")
    s = zero
    w = zero
    d = zero
    probe = zero
    row = student_ptr + srow.to(tl.int64) * K
    for k0 in range(lo, hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < hi
        x = _acc(tl.load(row + cols, mask=cmask, other=0.0), IS_F64) * inv_ts
        target = _targets(teacher_ptr, center_ptr, cols, cmask, b, B, K, n_global, inv_tt, tmax, tscale,
                          NG_PAD, IS_F64)
        probe += tl.sum(tl.where(cmask, x - x, 0.0), axis=0)
        x = tl.where(cmask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # the first block has m = -inf: no rescale of the (still empty) sums
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        s = s * tl.exp(shift) + tl.sum(tl.exp(x - m_new), axis=0)
        d = d + w * shift + tl.sum(target * tl.where(cmask, x - m_new, 0.0), axis=0)
        w += tl.sum(target, axis=0)
        m = m_new
    return m, s, w, d, probe


@triton.jit
def _student_grad(student_ptr, teacher_ptr, center_ptr, grad_ptr, srow, b, lo, hi, B, K, n_global,
                  inv_ts, inv_tt, tmax, tscale, m, inv_s, w, grad_scale,
                  NG_PAD: tl.constexpr, BLOCK_K: tl.constexpr, IS_F64: tl.constexpr):
    """d loss / d s = grad_scale * (W softmax(x) - T) over columns [lo, hi)."""
    base = srow.to(tl.int64) * K
    for k0 in range(lo, hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < hi
        # -inf past the end: exp() of it is 0 (nothing is stored there anyway)
        x = _acc(tl.load(student_ptr + base + cols, mask=cmask, other=float("-inf")), IS_F64) * inv_ts
        target = _targets(teacher_ptr, center_ptr, cols, cmask, b, B, K, n_global, inv_tt, tmax, tscale,
                          NG_PAD, IS_F64)
        g = grad_scale * (w * tl.exp(x - m) * inv_s - target)
        tl.store(grad_ptr + base + cols, g.to(grad_ptr.dtype.element_ty), mask=cmask)


def _student_configs():
    """Column block x warps of the student passes (a row is streamed; a program's working set is
    its row, which the gradient pass reads again from L2)."""
    if interpreting():
        return [triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in ((4096, 8), (2048, 8), (2048, 4), (8192, 16))]


# split rows are cut into chunks that are whole blocks of every config
_MAX_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in _student_configs())


def _prune_student(configs, named_args, **kwargs):
    """No block much wider than the row; then DINOCXR_TRITON_CONFIG, as for every tuned kernel."""
    fits = [c for c in configs if c.kwargs["BLOCK_K"] <= max(2048, triton.next_power_of_2(named_args["K"]))]
    return prune_configs(fits or configs[:1], named_args, **kwargs)


# B, n_crops, n_global are not specialised on (no recompile per batch); K is, for 16-byte row loads.
@triton.autotune(configs=_student_configs(), key=["K", "B", "n_crops", "FUSED", "NEED_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_student})
@triton.jit(do_not_specialize=["B", "n_crops", "n_global"])
def _student_kernel(
    student_ptr, teacher_ptr, center_ptr, pmax_ptr, psum_ptr, grad_ptr, row_loss_ptr, part_ptr,
    B, K, n_crops, n_global, NB, chunk,
    inv_ts_hi, inv_ts_lo, inv_tt_hi, inv_tt_lo, gs_hi, gs_lo,
    FUSED: tl.constexpr, NEED_GRAD: tl.constexpr, NG_PAD: tl.constexpr, NB_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, IS_F64: tl.constexpr,
):
    """FUSED: the whole row, loss and gradient. Else: the partial state of chunk program_id(1)."""
    pid = tl.program_id(0)
    b = pid // n_crops
    v = pid % n_crops
    srow = v * B + b
    inv_ts = _scalar(inv_ts_hi, inv_ts_lo, IS_F64)
    inv_tt = _scalar(inv_tt_hi, inv_tt_lo, IS_F64)
    tmax, tscale = _view_stats(pmax_ptr, psum_ptr, b, v, B, n_global, NB, NG_PAD, NB_PAD)
    if FUSED:
        m, s, w, d, probe = _student_stats(student_ptr, teacher_ptr, center_ptr, srow, b, 0, K, B, K, n_global,
                                           inv_ts, inv_tt, tmax, tscale, NG_PAD, BLOCK_K, IS_F64)
        # sum_k -T_k log_softmax_k = W log(s) - sum_k T_k (x_k - m)
        tl.store(row_loss_ptr + srow, w * tl.log(s) - d + probe)
        if NEED_GRAD:
            grad_scale = _scalar(gs_hi, gs_lo, IS_F64)
            _student_grad(student_ptr, teacher_ptr, center_ptr, grad_ptr, srow, b, 0, K, B, K, n_global,
                          inv_ts, inv_tt, tmax, tscale, m, 1.0 / s, w, grad_scale, NG_PAD, BLOCK_K, IS_F64)
    else:
        split = tl.program_id(1)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, K)
        m, s, w, d, probe = _student_stats(student_ptr, teacher_ptr, center_ptr, srow, b, lo, hi, B, K, n_global,
                                           inv_ts, inv_tt, tmax, tscale, NG_PAD, BLOCK_K, IS_F64)
        out = part_ptr + (srow * tl.num_programs(1) + split) * 5
        tl.store(out + 0, m)
        tl.store(out + 1, s)
        tl.store(out + 2, w)
        tl.store(out + 3, d)
        tl.store(out + 4, probe)


@triton.autotune(configs=_student_configs(), key=["K", "B", "n_crops", "n_split", "NEED_GRAD"],
                 prune_configs_by={"early_config_prune": _prune_student})
@triton.jit(do_not_specialize=["B", "n_crops", "n_global", "n_split"])
def _student_grad_kernel(
    student_ptr, teacher_ptr, center_ptr, pmax_ptr, psum_ptr, grad_ptr, row_loss_ptr, part_ptr,
    B, K, n_crops, n_global, NB, chunk, n_split,
    inv_ts_hi, inv_ts_lo, inv_tt_hi, inv_tt_lo, gs_hi, gs_lo,
    NEED_GRAD: tl.constexpr, NG_PAD: tl.constexpr, NB_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, IS_F64: tl.constexpr,
):
    """Split rows: merge the chunk states of the row, write its loss (chunk 0) and the gradient of
    chunk program_id(1)."""
    pid = tl.program_id(0)
    b = pid // n_crops
    v = pid % n_crops
    srow = v * B + b
    j = tl.arange(0, SPLIT_PAD)
    jmask = j < n_split
    part = part_ptr + (srow * n_split + j) * 5
    pm = tl.load(part + 0, mask=jmask, other=float("-inf"))
    ps = tl.load(part + 1, mask=jmask, other=0.0)
    pw = tl.load(part + 2, mask=jmask, other=0.0)
    pd = tl.load(part + 3, mask=jmask, other=0.0)
    probe = tl.sum(tl.load(part + 4, mask=jmask, other=0.0), axis=0)
    m = tl.max(pm, axis=0)
    shift = tl.where(jmask, pm - m, 0.0)
    s = tl.sum(tl.where(jmask, ps * tl.exp(shift), 0.0), axis=0)
    w = tl.sum(pw, axis=0)
    d = tl.sum(tl.where(jmask, pd + pw * shift, 0.0), axis=0)
    split = tl.program_id(1)
    if split == 0:
        tl.store(row_loss_ptr + srow, w * tl.log(s) - d + probe)
    if NEED_GRAD:
        inv_ts = _scalar(inv_ts_hi, inv_ts_lo, IS_F64)
        inv_tt = _scalar(inv_tt_hi, inv_tt_lo, IS_F64)
        grad_scale = _scalar(gs_hi, gs_lo, IS_F64)
        tmax, tscale = _view_stats(pmax_ptr, psum_ptr, b, v, B, n_global, NB, NG_PAD, NB_PAD)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, K)
        _student_grad(student_ptr, teacher_ptr, center_ptr, grad_ptr, srow, b, lo, hi, B, K, n_global,
                      inv_ts, inv_tt, tmax, tscale, m, 1.0 / s, w, grad_scale, NG_PAD, BLOCK_K, IS_F64)


# ---- launch helper -----------------------------------------------------------------------------
def _hi_lo(value: float) -> tuple[float, float]:
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(value - hi)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM; the interpreter gets a small number so tests split rows too."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def _teacher_block(k: int, device: torch.device) -> int:
    """Teacher columns per program: 256 on a GPU (K = 65536 gives 256 programs over the 128 teacher
    rows of a batch of 64); 64 in the interpreter, so that small test sizes span several blocks."""
    return max(16, min(256 if device.type == "cuda" else 64, triton.next_power_of_2(k)))


def dino_loss_fwd(student, teacher, center, student_temp, teacher_temp, n_global, need_grad, need_sum,
                  *, split: int | None = None):
    """The fused forward: (loss fp32 0-d (fp64 for fp64 input; NaN on non-finite input),
    d loss / d student (student's dtype and shape, or empty), teacher column sums fp32 [K] (or empty)).

    ``student`` [n_crops*B, K], ``teacher`` [n_global*B, K], ``center`` [K], contiguous, on one device
    (the op in ``dinocxr_fast.ops.dino_loss`` checks that). ``split`` forces the number of programs
    per student row (tests); by default rows are split only when there are too few to fill the GPU.
    """
    k = student.shape[1]
    batch = teacher.shape[0] // n_global
    n_crops = student.shape[0] // batch
    n_rows_s, n_rows_t = n_crops * batch, n_global * batch
    is_f64 = student.dtype == torch.float64
    acc = torch.float64 if is_f64 else torch.float32
    device = student.device
    n_pairs = n_global * (n_crops - 1)

    tblock = _teacher_block(k, device)
    nb = triton.cdiv(k, tblock)
    pmax = torch.empty(n_rows_t, nb, device=device, dtype=acc)
    psum = torch.empty(n_rows_t, nb, device=device, dtype=acc)
    tsum = torch.empty(k if need_sum else 0, device=device, dtype=torch.float32)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    row_loss = torch.empty(n_rows_s, device=device, dtype=acc)

    inv_tt, inv_ts = 1.0 / float(teacher_temp), 1.0 / float(student_temp)
    grad_scale = inv_ts / (n_pairs * batch)
    scalars = (*_hi_lo(inv_ts), *_hi_lo(inv_tt), *_hi_lo(grad_scale))

    _teacher_kernel[(nb,)](
        teacher, center, pmax, psum, tsum if need_sum else pmax, n_rows_t, k, *_hi_lo(inv_tt),
        NEED_SUM=need_sum, ROWS=16 if device.type == "cuda" else 4, BLOCK_K=tblock, IS_F64=is_f64,
        num_warps=4,
    )

    if split is None:
        wanted = _programs_wanted(device)
        split = 1 if n_rows_s >= wanted // 2 else min(triton.cdiv(wanted, n_rows_s), triton.cdiv(k, _MAX_BLOCK_K))
    # chunks are whole column blocks; recount so that none is empty
    chunk = triton.cdiv(triton.cdiv(k, max(1, split)), _MAX_BLOCK_K) * _MAX_BLOCK_K
    split = triton.cdiv(k, chunk)
    common = dict(NEED_GRAD=need_grad, NG_PAD=triton.next_power_of_2(n_global), NB_PAD=triton.next_power_of_2(nb),
                  IS_F64=is_f64)
    grad_arg = grad if need_grad else student  # never written when need_grad is False
    if split == 1:
        _student_kernel[(n_rows_s, 1)](
            student, teacher, center, pmax, psum, grad_arg, row_loss, row_loss,
            batch, k, n_crops, n_global, nb, k, *scalars, FUSED=True, **common,
        )
    else:
        part = torch.empty(n_rows_s, split, 5, device=device, dtype=acc)
        _student_kernel[(n_rows_s, split)](
            student, teacher, center, pmax, psum, grad_arg, row_loss, part,
            batch, k, n_crops, n_global, nb, chunk, *scalars, FUSED=False, **common,
        )
        _student_grad_kernel[(n_rows_s, split if need_grad else 1)](
            student, teacher, center, pmax, psum, grad_arg, row_loss, part,
            batch, k, n_crops, n_global, nb, chunk, split, *scalars,
            SPLIT_PAD=triton.next_power_of_2(split), **common,
        )
    loss = row_loss.sum() / (n_pairs * batch)
    return loss, grad, tsum
