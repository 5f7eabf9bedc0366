"""Sinkhorn-Knopp centring of the teacher (DINOv2), expressed as a per-batch centre.

DINOv2's ``sinkhorn_knopp_teacher`` alternately normalises ``exp(t / tau)`` over the batch (per
prototype) and over the prototypes (per row), ending with the row normalisation. Its result is
therefore ``softmax_k(t[b, k] / tau + log c_k)`` for one column scaling ``c``: the same form as
DINO's centred softmax with ``center_k = -tau * log c_k``. Computing that centre (in log space,
for fp32 safety at tau = 0.02) lets the fused loss, with every backend, consume Sinkhorn targets.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sinkhorn_knopp_reference(teacher_out: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher targets, single process, in float64 (the specification): rows sum to 1."""
    q = torch.exp((teacher_out.double() - teacher_out.double().max()) / teacher_temp).t()  # K x B
    n_rows, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    q *= n_rows
    return q.t()


def _logsumexp_over_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0, over the rows of every rank when torch.distributed is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.logsumexp(x, dim=0)
    peak = x.max(dim=0).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = torch.exp(x - peak).sum(dim=0)
    dist.all_reduce(total)
    return peak + torch.log(total)


@torch.no_grad()
def sinkhorn_center(teacher_out: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The centre ``c`` (shape ``[1, K]``) with ``softmax((t - c) / tau) == sinkhorn_knopp_reference(t)``."""
    if n_iterations < 1:
        raise ValueError(f"the Sinkhorn-Knopp centring needs n_iterations >= 1, got {n_iterations}")
    logits = teacher_out.float() / teacher_temp
    log_c = torch.zeros(logits.shape[1], device=logits.device)
    for _ in range(n_iterations):
        # per prototype over the batch (all ranks), then per row over the prototypes
        col = _logsumexp_over_rows(logits + log_c)
        log_c = log_c - col
        row = torch.logsumexp(logits + log_c, dim=1, keepdim=True)
        logits = logits - row  # a per-row constant: the softmax over k does not see it
    log_c = log_c - log_c.max()  # any constant: keep the centre near zero
    return (-teacher_temp * log_c).reshape(1, -1)
