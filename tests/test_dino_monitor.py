"""The collapse monitor (dino/monitor.py) and schedules fitted to a budget (dino/build.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinocxr_fast.dino.build import fit_schedules, nominal_step_index
from dinocxr_fast.dino.monitor import CollapseWatch, collapse_stats
from dinocxr_fast.dino.schedules import cosine_schedule

K = 64


def test_collapse_stats_tell_uniform_one_hot_and_spread_apart():
    torch.manual_seed(0)
    center = torch.zeros(1, K)
    uniform = collapse_stats(torch.zeros(16, K), center, 0.04, loss=math.log(K), features=torch.randn(16, 8))
    assert uniform["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert uniform["student_teacher_kl"] == pytest.approx(0.0, abs=1e-5)
    same_target = torch.zeros(16, K)
    same_target[:, 3] = 10.0  # every image -> prototype 3
    collapsed = collapse_stats(same_target, center, 0.04, loss=0.5, features=torch.ones(16, 8))
    assert collapsed["teacher_batch_entropy"] < 0.01 and collapsed["feature_std"] < 1e-5
    spread = torch.eye(K)[:16] * 10.0  # every image its own prototype
    healthy = collapse_stats(spread, center, 0.04, loss=2.0, features=torch.randn(16, 8))
    assert healthy["teacher_entropy"] < 0.01 and healthy["teacher_batch_entropy"] == pytest.approx(math.log(16), rel=1e-3)
    assert 0.5 < healthy["feature_std"] < 1.5


def test_collapse_stats_use_the_centre():
    out = torch.zeros(4, K)
    out[:, 0] = 5.0
    center = out.mean(0, keepdim=True)  # centring removes the common peak
    assert collapse_stats(out, center, 0.04, 1.0, None)["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)


def test_watch_warns_once_after_the_warmup_and_names_settings():
    watch = CollapseWatch(K, after_step=10, window=3)
    at_log_k = {"loss": math.log(K), "teacher_entropy": 4.0, "teacher_batch_entropy": 4.0, "feature_std": 0.8}
    assert all(watch.check(step, at_log_k) is None for step in range(0, 10))  # warm-up: no judgement
    assert watch.check(10, at_log_k) is None and watch.check(11, at_log_k) is None
    message = watch.check(12, at_log_k)
    assert message.startswith("uniform at step 12") and "dino.momentum_teacher" in message
    assert watch.check(13, at_log_k) is None and len(watch.warnings) == 1
    learning = {**at_log_k, "loss": 2.0}
    fresh = CollapseWatch(K, after_step=0, window=2)
    assert fresh.check(0, at_log_k) is None and fresh.check(1, learning) is None and not fresh.warnings
    collapsed = {**learning, "teacher_batch_entropy": 0.01}
    fresh.check(2, collapsed)
    assert fresh.check(3, collapsed).startswith("collapse at step 3") and "dino.teacher_temp" in fresh.warnings[0]


def test_fitted_schedules_keep_their_shape_and_end_at_the_final_value():
    nominal = {"lr": cosine_schedule(1.0, 0.01, epochs=10, steps_per_epoch=10, warmup_epochs=2),
               "momentum": cosine_schedule(0.99, 1.0, epochs=10, steps_per_epoch=10)}
    fitted = fit_schedules(nominal, 25)
    assert all(len(v) == 25 for v in fitted.values())
    assert fitted["lr"][0] == nominal["lr"][0] and fitted["lr"][-1] == nominal["lr"][-1]
    assert fitted["momentum"][-1] == nominal["momentum"][-1] == pytest.approx(1.0, abs=1e-5)
    peak = int(np.argmax(fitted["lr"]))  # the warm-up is 20 % of the run, fitted or not
    assert peak == pytest.approx(0.2 * 25, abs=1)
    assert fit_schedules(nominal, 100) is nominal and fit_schedules(nominal, 500) is nominal
    assert nominal_step_index(24, 100, 25) == 99 and nominal_step_index(0, 100, 25) == 0
