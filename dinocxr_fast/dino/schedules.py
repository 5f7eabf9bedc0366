"""Per-step schedules, as facebookresearch/dino's ``cosine_scheduler``: a linear warm-up, then a
cosine from ``base`` to ``final`` over the remaining steps."""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_steps) if warmup_steps > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != epochs * steps_per_epoch:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) longer than the run ({epochs} epochs)")
    return schedule


def constant_schedule(base: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0) -> np.ndarray:
    warmup_steps = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if warmup_steps > total:
        raise ValueError(f"warm-up ({warmup_epochs} epochs) longer than the run ({epochs} epochs)")
    return np.concatenate((np.linspace(0.0, base, warmup_steps), np.full(total - warmup_steps, base)))
