"""The teacher follows the student by an exponential moving average of the weights."""
from __future__ import annotations

import torch
from torch import nn


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher parameters, student parameters) paired by name, for ``ema_lerp``.

    The student may be wrapped in DDP (its ``module`` is used). Computed once per run: the
    parameters are the same tensors for the whole run, so the step does not walk the modules.
    """
    student = student.module if hasattr(student, "module") else student
    s_params = dict(student.named_parameters())
    pairs = [(t, s_params.get(name)) for name, t in teacher.named_parameters()]
    if len(pairs) != len(s_params) or any(s is None for _, s in pairs):
        raise ValueError("teacher and student have different parameters")
    return [t for t, _ in pairs], [s.detach() for _, s in pairs]


@torch.no_grad()
def ema_lerp(pairs: tuple[list[torch.Tensor], list[torch.Tensor]], momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, as one fused multi-tensor op per dtype group.

    Parameters only: the teacher's buffers (BatchNorm running statistics of the PCM) are its own;
    it runs in train mode like DINO's teacher, so its forward passes keep them current.
    """
    torch._foreach_lerp_(pairs[0], pairs[1], 1.0 - float(momentum))
