"""The DINO centre EMA: ``center = m * center + (1 - m) * mean over teacher rows``.

The mean runs over every teacher row of every rank, as in facebookresearch/dino (the batch sum is
all-reduced when torch.distributed is initialised). The fused loss can hand over the teacher
column sums it computed in its own pass (``teacher_sum``), so the teacher is not read again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dinocxr_fast.ops._checks import check_same_device, check_tensor


def update_center_reference(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """Single-process reference (the specification); returns a new tensor."""
    batch_center = teacher_out.float().sum(dim=0) / teacher_out.shape[0]
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


@torch.no_grad()
def update_center(
    center: torch.Tensor,
    teacher_out: torch.Tensor,
    momentum: float,
    *,
    teacher_sum: torch.Tensor | None = None,
    all_reduce: bool = True,
) -> torch.Tensor:
    """Update ``center`` in place and return it."""
    check_tensor("center", center, ndim=(1, 2))
    check_tensor("teacher_out", teacher_out, ndim=2)
    check_same_device(center=center, teacher_out=teacher_out)
    k = teacher_out.shape[1]
    if center.numel() != k:
        raise ValueError(f"center has {center.numel()} entries but teacher_out has K={k} columns")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if teacher_sum is None:
        teacher_sum = teacher_out.float().sum(dim=0)
    else:
        check_tensor("teacher_sum", teacher_sum, ndim=1)
        if teacher_sum.numel() != k:
            raise ValueError(f"teacher_sum has {teacher_sum.numel()} entries, expected K={k}")
        teacher_sum = teacher_sum.float().clone()
    n_rows = teacher_out.shape[0]
    if all_reduce and dist.is_available() and dist.is_initialized():
        dist.all_reduce(teacher_sum)
        n_rows *= dist.get_world_size()
    batch_center = (teacher_sum / n_rows).reshape(center.shape).to(center.dtype)
    center.mul_(momentum).add_(batch_center, alpha=1.0 - float(momentum))
    return center
