"""``DINOLoss``: owns the centre buffer and the teacher-temperature schedule, calls the fused ops.

Same behaviour as facebookresearch/dino's DINOLoss: the teacher temperature warms up linearly
from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs and
then stays; the centre follows the (all-reduced) mean teacher output with ``center_momentum``.
The centre is updated from the column sums the fused loss computed in its own teacher pass.
``centering="sinkhorn"`` replaces the EMA centre by DINOv2's Sinkhorn-Knopp targets, computed
per batch as an equivalent centre (see ``centering.py``), so the same fused loss serves both.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dinocxr_fast import ops
from dinocxr_fast.dino.centering import sinkhorn_center

CENTERINGS = ("ema", "sinkhorn")


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (DINO's schedule)."""
    if warmup_epochs < 0 or epochs < 1:
        raise ValueError(f"need warmup_epochs >= 0 and epochs >= 1, got {warmup_epochs} and {epochs}")
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    rest = np.ones(max(epochs - warmup_epochs, 0)) * teacher_temp
    return np.concatenate((warmup, rest))[: max(epochs, 1)]


class DINOLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        *,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        epochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_global: int = 2,
        backend: str = "auto",
        check_finite: bool = True,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"unknown centering {centering!r} ({', '.join(CENTERINGS)})")
        if n_crops < max(2, n_global):
            raise ValueError(f"n_crops must be at least max(2, n_global={n_global}), got {n_crops}")
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.backend = backend
        self.check_finite = check_finite
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.temp_schedule[min(max(epoch, 0), len(self.temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Cross-entropy between the teacher's centred, sharpened softmax and the student's.

        Updates the centre as a side effect (after the loss used the current centre), as DINO does.
        """
        teacher_output = teacher_output.detach()
        temp = self.teacher_temp(epoch)
        if self.centering == "sinkhorn":
            # this batch's Sinkhorn-Knopp centre, kept in the buffer for the monitor and checkpoints
            self.center.copy_(sinkhorn_center(teacher_output, temp, self.sinkhorn_iterations))
        loss, teacher_sum = ops.dino_loss_and_teacher_sum(
            student_output,
            teacher_output,
            self.center,
            student_temp=self.student_temp,
            teacher_temp=temp,
            n_global=self.n_global,
            backend=self.backend,
            check_finite=self.check_finite,
        )
        if self.centering == "ema":
            ops.update_center(self.center, teacher_output, self.center_momentum, teacher_sum=teacher_sum)
        return loss
