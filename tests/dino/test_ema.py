"""The teacher's EMA against DINO's own loop (param_k.mul_(m).add_((1 - m) * param_q))."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinocxr_fast.dino.ema import ema_lerp, ema_pairs


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
        p.requires_grad_(False)
    return student, teacher


def _dino_loop(teacher, student, m):
    expected = copy.deepcopy(teacher)
    for q, k in zip(student.parameters(), expected.parameters()):
        k.data.mul_(m).add_((1 - m) * q.detach().data)
    return expected


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 1.0])
def test_matches_dino_loop(m):
    student, teacher = _pair()
    expected = _dino_loop(teacher, student, m)
    pairs = ema_pairs(teacher, student)
    ema_lerp(pairs, m)
    for got, want in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # buffers (BN running statistics) are the teacher's own
    torch.testing.assert_close(teacher[1].running_mean, torch.zeros(4))


def test_cached_pairs_follow_in_place_updates_and_ddp_wrapper():
    student, teacher = _pair()
    wrapped = nn.Module()
    wrapped.module = student  # what DDP exposes
    pairs = ema_pairs(teacher, wrapped)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # an optimiser step changes the tensors in place
    expected = _dino_loop(teacher, student, 0.9)
    ema_lerp(pairs, 0.9)
    for got, want in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)
    expected = _dino_loop(teacher, student, 0.8)
    ema_lerp(pairs, 0.8)
    for got, want in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


def test_mismatched_models_are_refused():
    student, _ = _pair()
    with pytest.raises(ValueError, match="different parameters"):
        ema_pairs(nn.Linear(5, 4), student)
