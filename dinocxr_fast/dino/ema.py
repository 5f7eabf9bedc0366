"""The teacher follows the student by an exponential moving average of the weights."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, as one fused multi-tensor op per dtype group.

    Pairs parameters by name (the student may be wrapped in DDP; its ``module`` is used).
    Buffers (BatchNorm running statistics of the PCM) are the teacher's own: it runs in train
    mode like DINO's teacher, so its forward passes keep them current.
    """
    student = student.module if hasattr(student, "module") else student
    s_params = dict(student.named_parameters())
    pairs = [(t, s_params[name]) for name, t in teacher.named_parameters()]
    if len(pairs) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    t_list = [t for t, _ in pairs]
    s_list = [s.detach() for _, s in pairs]
    torch._foreach_lerp_(t_list, s_list, 1.0 - float(momentum))
