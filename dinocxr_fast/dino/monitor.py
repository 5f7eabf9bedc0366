"""Collapse monitor of DINO training: is the student learning, or have the outputs gone uniform
(loss at log K) or collapsed onto one prototype / one feature direction?

``collapse_stats`` measures one step; ``CollapseWatch`` keeps the recent ones and says, once,
what has gone wrong and which settings usually cause it.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_stats(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float, loss: float,
                   features: torch.Tensor | None) -> dict[str, float]:
    """- teacher_entropy: mean entropy of the centred, sharpened teacher targets (log K: uniform
      targets, 0: one-hot);
    - teacher_batch_entropy: entropy of their batch mean (near 0: every image has the same
      target, i.e. collapse onto one prototype);
    - student_teacher_kl: the loss minus the teacher entropy, i.e. the mean KL(teacher || student)
      over the view pairs (the loss averages the cross-entropy over the same pairs);
    - feature_std: per-dimension std across the batch of the L2-normalised backbone features,
      times sqrt(D) (about 1 when spread out, 0 when every image maps to one point).
    """
    probs = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
    mean = probs.mean(0)
    batch_entropy = float(-(mean * mean.clamp_min(1e-12).log()).sum())
    stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
             "student_teacher_kl": float(loss) - entropy}
    if features is not None and features.shape[0] > 1:
        f = F.normalize(features.float().flatten(1), dim=1)
        stats["feature_std"] = float(f.std(0).mean() * math.sqrt(f.shape[1]))
    return stats


UNIFORM_ADVICE = ("the student's outputs are near uniform (loss ~ log K): usually a teacher too slow for the "
                  "run's length (dino.momentum_teacher, e.g. 0.99 for a few hundred steps), a head without "
                  "normalisation at small scale (model.use_bn_in_head=true), too large a head "
                  "(model.out_dim) for the data, or a learning rate too low or too high (optim.lr)")
COLLAPSE_ADVICE = ("the teacher gives every image the same target or the features have collapsed to one "
                   "point: usually too sharp a teacher with too weak a centring (dino.teacher_temp, "
                   "dino.center_momentum) or too high a learning rate (optim.lr)")


class CollapseWatch:
    """Flags a run whose last ``window`` logged steps (after ``after_step``) all sit at log K or
    all look collapsed. ``check`` returns a warning the first time each condition holds."""

    def __init__(self, out_dim: int, after_step: int, window: int = 3):
        self.log_k = math.log(out_dim)
        self.after_step = after_step
        self.recent: deque[dict] = deque(maxlen=window)
        self.warnings: list[str] = []

    def _uniform(self, s: dict) -> bool:
        return s["loss"] > 0.97 * self.log_k

    def _collapsed(self, s: dict) -> bool:
        return s["teacher_batch_entropy"] < 0.05 * self.log_k or s.get("feature_std", 1.0) < 0.05

    def check(self, step: int, stats: dict) -> str | None:
        if step < self.after_step:
            return None
        self.recent.append(stats)
        if len(self.recent) < self.recent.maxlen:
            return None
        for name, test, advice in (("uniform", self._uniform, UNIFORM_ADVICE),
                                   ("collapse", self._collapsed, COLLAPSE_ADVICE)):
            if all(test(s) for s in self.recent) and not any(w.startswith(name) for w in self.warnings):
                last = self.recent[-1]
                message = (f"{name} at step {step}: loss {last['loss']:.3f} of log K {self.log_k:.3f}, teacher "
                           f"entropy {last['teacher_entropy']:.3f}, batch entropy {last['teacher_batch_entropy']:.3f}"
                           + (f", feature std {last['feature_std']:.3f}" if "feature_std" in last else "")
                           + f"; {advice}")
                self.warnings.append(message)
                return message
        return None


def knn_noise_margin(acc_start: float, acc_end: float, n_val: int) -> float:
    """How far a kNN accuracy on ``n_val`` images must rise before the rise counts: two standard
    errors of the difference of two binomial proportions (at least one image's worth, 1 / n_val).

    On the default run's 256 held-out subtle phantoms this is 0.07-0.09; the accuracy of randomly
    initialised tiny_cpu networks on them spread 0.52-0.64 (mean 0.59, sd 0.036) over five seeds on two
    held-out sets: the margin is about two of those standard deviations.
    """
    var = acc_start * (1.0 - acc_start) / n_val + acc_end * (1.0 - acc_end) / n_val
    return max(2.0 * math.sqrt(var), 1.0 / n_val)


def learning_verdict(loss_start: float, loss_end: float, log_k: float, warnings: list[str],
                     knn: tuple[float, float, int] | None = None) -> tuple[bool, list[str]]:
    """Did the run learn? (verdict, the reasons it did not). Yes needs all of: the loss ended below
    its start and below 0.97 log K (not at uniform outputs), no collapse-monitor warning and, with
    a kNN monitor (``knn`` = (start accuracy, end accuracy, images scored)), an end accuracy above
    the start by more than ``knn_noise_margin``."""
    reasons = []
    if not loss_end < loss_start:
        reasons.append(f"the loss did not fall ({loss_start:.3f} -> {loss_end:.3f})")
    if not loss_end < 0.97 * log_k:
        reasons.append(f"the loss ended near log K ({loss_end:.3f}, uniform outputs: {log_k:.3f})")
    if warnings:
        reasons.append("the collapse monitor warned")
    if knn is not None:
        a0, a1, n = knn
        margin = knn_noise_margin(a0, a1, n)
        if not a1 - a0 > margin:
            reasons.append(f"the kNN accuracy changed by {a1 - a0:+.3f}, not more than its noise margin {margin:.3f}")
    return not reasons, reasons
