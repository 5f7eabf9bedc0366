"""DINOLoss module: the centre EMA and the teacher-temperature schedule, against DINO's own recipe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocxr_fast.dino import DINOLoss, teacher_temp_schedule


class ReferenceDINOLoss:
    """facebookresearch/dino's DINOLoss, restated (single process)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.center = torch.zeros(1, out_dim)
        self.schedule = np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
                                        np.ones(nepochs - warmup_epochs) * teacher_temp))

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.schedule[epoch], dim=-1).detach().chunk(2)
        total, n = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n += 1
        total /= n
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


@pytest.mark.parametrize("n_crops", [2, 6])
def test_three_steps_match_dino(n_crops):
    torch.manual_seed(0)
    k, batch, epochs = 64, 4, 5
    ours = DINOLoss(k, n_crops, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, epochs=epochs)
    ref = ReferenceDINOLoss(k, n_crops, 0.04, 0.07, 3, epochs)
    for epoch in range(3):
        student = torch.randn(n_crops * batch, k, requires_grad=True)
        teacher = torch.randn(2 * batch, k)
        s_ref = student.detach().clone().requires_grad_()
        loss, loss_ref = ours(student, teacher, epoch), ref(s_ref, teacher, epoch)
        loss.backward(), loss_ref.backward()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(student.grad, s_ref.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.center, ref.center, rtol=1e-5, atol=1e-6)


def test_schedule_warms_up_then_holds():
    sched = teacher_temp_schedule(0.04, 0.07, 3, 6)
    np.testing.assert_allclose(sched, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    loss = DINOLoss(8, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3, epochs=6)
    assert loss.teacher_temp(100) == pytest.approx(0.07)  # past the end: the last value


def test_bad_construction():
    with pytest.raises(ValueError, match="n_crops"):
        DINOLoss(8, 1)
