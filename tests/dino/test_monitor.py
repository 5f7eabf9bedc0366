"""The collapse monitor (dino/monitor.py) and schedules fitted to a budget (optim.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinocxr_fast.optim import fit_schedules, nominal_step_index
from dinocxr_fast.dino.monitor import CollapseWatch, collapse_stats, knn_noise_margin, learning_verdict
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


def test_knn_noise_margin_is_two_standard_errors_of_the_difference():
    assert knn_noise_margin(0.6, 0.75, 256) == pytest.approx(2 * math.sqrt((0.24 + 0.1875) / 256))
    assert 0.07 < knn_noise_margin(0.6, 0.75, 256) < 0.09
    assert knn_noise_margin(0.6, 0.75, 1024) == pytest.approx(knn_noise_margin(0.6, 0.75, 256) / 2)
    assert knn_noise_margin(1.0, 1.0, 64) == pytest.approx(1 / 64)  # never zero


def test_learning_verdict_needs_every_condition():
    log_k = math.log(1024)
    good = dict(loss_start=7.1, loss_end=5.0, log_k=log_k, warnings=[])
    assert learning_verdict(**good) == (True, [])
    assert learning_verdict(**good, knn=(0.6, 0.75, 256)) == (True, [])
    ok, why = learning_verdict(**good, knn=(0.6, 0.65, 256))  # a rise within the noise
    assert not ok and "noise margin" in why[0] and "+0.050" in why[0]
    ok, why = learning_verdict(**good, knn=(0.9, 0.8, 256))
    assert not ok and "-0.100" in why[0]
    ok, why = learning_verdict(**{**good, "loss_end": 7.2})
    assert not ok and any("did not fall" in w for w in why)
    ok, why = learning_verdict(**{**good, "loss_start": 7.2, "loss_end": 6.8})  # fell, but stays near log K
    assert not ok and why == [f"the loss ended near log K (6.800, uniform outputs: {log_k:.3f})"]
    ok, why = learning_verdict(**{**good, "warnings": ["collapse at step 90: ..."]}, knn=(0.6, 0.8, 256))
    assert not ok and why == ["the collapse monitor warned"]
