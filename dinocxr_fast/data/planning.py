"""Everything random about the data, drawn in Python from (seed, epoch, sample index).

The sample order of an epoch and the augmentation parameters of every view are pure functions of
the seed, the epoch and the sample's index in the source. So:
  * both backends (DALI and torch) execute the very same crops, flips, jitters, blurs;
  * a run resumed at (epoch, step) sees exactly the batches it would have seen;
  * a sample's views do not depend on the batch size, the number of shards or the shard id.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple, Sequence

import numpy as np

from .views import EvalConfig, ViewSpec

# Columns of the per-view parameter rows handed to the pipelines (float32).
Y0, X0, Y1, X1, FLIP, BRIGHTNESS, CONTRAST, SIGMA, WINDOW, SOLARIZE = range(10)
N_PARAMS = 10


class BatchSpec(NamedTuple):
    epoch: int
    step: int
    indices: np.ndarray  # sample indices into the source, in batch order


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of all n samples in this epoch (the same on every shard)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x0D1E]).permutation(n).astype(np.int64)


def shard_batches(
    order: np.ndarray, shard_id: int, num_shards: int, batch_size: int, drop_last: bool
) -> list[np.ndarray]:
    """Cut this shard's part of the epoch order into batches.

    Shard k takes positions k, k + S, k + 2S, ...: shards are disjoint and together cover every
    sample once. With ``drop_last`` each shard keeps the same number of samples (n // S, the few
    left over are different ones each epoch) and only full batches, so every rank of a DDP job runs
    the same number of steps with the same batch shape.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = order[shard_id::num_shards]
    if drop_last:
        mine = mine[: len(order) // num_shards]
        n_batches = len(mine) // batch_size
    else:
        n_batches = -(-len(mine) // batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A per-sample generator. Python's Random, seeded from a string (SHA-512 of it, stable across
    platforms and versions), costs ~10 us per sample where numpy's Generator costs ~100."""
    return random.Random(f"{seed}:{epoch}:{int(index)}")


def random_resized_crop_box(
    rng: random.Random, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), 10 tries then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randrange(0, height - h + 1)
            left = rng.randrange(0, width - w + 1)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def blur_window(sigma: float, size: int) -> int:
    """Kernel width 2*ceil(3 sigma)+1 (DALI's default), capped so the reflect padding fits."""
    radius = min(int(math.ceil(3.0 * sigma)), max(size - 1, 0))
    return 2 * radius + 1


def plan_view(rng: random.Random, height: int, width: int, spec: ViewSpec) -> list[float]:
    """One view's parameter row (see the column constants above)."""
    top, left, h, w = random_resized_crop_box(rng, height, width, spec.scale, spec.ratio)
    flip = float(rng.random() < spec.flip_p)
    if rng.random() < spec.jitter_p:
        brightness = rng.uniform(1.0 - spec.brightness, 1.0 + spec.brightness)
        contrast = rng.uniform(1.0 - spec.contrast, 1.0 + spec.contrast)
    else:
        brightness = contrast = 1.0
    if rng.random() < spec.blur_p:
        sigma = rng.uniform(spec.blur_sigma[0], spec.blur_sigma[1])
        window = blur_window(sigma, spec.size)
    else:
        sigma, window = 1.0, 1  # a 1-tap kernel: identity
    solarize = float(rng.random() < spec.solarize_p)
    return [top, left, top + h, left + w, flip, brightness, contrast, sigma, window, solarize]


def plan_views(
    seed: int, epoch: int, index: int, height: int, width: int, views: Sequence[ViewSpec]
) -> np.ndarray:
    """All views of one sample: float32 [n_views, N_PARAMS]."""
    rng = sample_rng(seed, epoch, index)
    return np.array([plan_view(rng, height, width, v) for v in views], np.float32)


def eval_roi(height: int, width: int, cfg: EvalConfig) -> np.ndarray:
    """Resize(shorter side -> cfg.resize) + CenterCrop(cfg.crop), as one source-space box.

    Returns float32 (y0, x0, y1, x1): resampling that box to crop x crop uses the same scale and
    sample positions as torchvision's resize-then-crop.
    """
    if width <= height:
        new_w, new_h = cfg.resize, int(cfg.resize * height / width)
    else:
        new_h, new_w = cfg.resize, int(cfg.resize * width / height)
    top = int(round((new_h - cfg.crop) / 2.0))
    left = int(round((new_w - cfg.crop) / 2.0))
    sy, sx = height / new_h, width / new_w
    return np.array([top * sy, left * sx, (top + cfg.crop) * sy, (left + cfg.crop) * sx], np.float32)
