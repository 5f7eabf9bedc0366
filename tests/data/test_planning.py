"""Epoch order, sharding, augmentation plans and the view configuration."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dinocxr_fast.data import EvalConfig, ViewsConfig, ViewSpec
from dinocxr_fast.data.planning import (
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    SIGMA,
    SOLARIZE,
    WINDOW,
    X0,
    X1,
    Y0,
    Y1,
    epoch_order,
    eval_roi,
    plan_views,
    random_resized_crop_box,
    sample_rng,
    shard_batches,
)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, seed=1, epoch=0)
    assert sorted(a) == list(range(100))
    np.testing.assert_array_equal(a, epoch_order(100, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=2, epoch=0))
    np.testing.assert_array_equal(epoch_order(5, 0, 3, shuffle=False), np.arange(5))


@pytest.mark.parametrize("n, shards, batch", [(100, 3, 8), (10, 4, 3), (64, 2, 32)])
def test_shards_partition_the_epoch(n, shards, batch):
    order = epoch_order(n, 0, 0)
    full = [np.concatenate(shard_batches(order, k, shards, batch, drop_last=False) or [np.array([], int)]) for k in range(shards)]
    assert sorted(np.concatenate(full)) == list(range(n))  # every sample once, over all shards
    dropped = [shard_batches(order, k, shards, batch, drop_last=True) for k in range(shards)]
    assert len({len(b) for b in dropped}) == 1  # same number of steps on every rank
    assert all(len(x) == batch for b in dropped for x in b)
    used = np.concatenate([x for b in dropped for x in b]) if dropped[0] else np.array([])
    assert len(set(used)) == len(used)
    with pytest.raises(ValueError):
        shard_batches(order, shards, shards, batch, False)


def test_random_resized_crop_matches_torchvision_rules():
    rng = sample_rng(0, 0, 0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(rng, 300, 500, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 500
        assert 0.2 * 150000 * 0.97 <= h * w <= 150000
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # Impossible aspect ratios fall back to torchvision's centre crop.
    assert random_resized_crop_box(rng, 100, 1000, (0.99, 1.0), (1.0, 1.0)) == (0, 450, 100, 100)


def test_plans_follow_the_view_probabilities():
    cfg = ViewsConfig.dino_cxr()
    rows = np.stack([plan_views(0, 0, i, 400, 500, cfg.views) for i in range(2000)])
    v1, v2 = rows[:, 0], rows[:, 1]
    assert (v1[:, WINDOW] > 1).all()  # blur p = 1.0 on view 1
    assert abs((v2[:, WINDOW] > 1).mean() - 0.1) < 0.03  # 0.1 on view 2
    assert v1[:, SOLARIZE].sum() == 0 and abs(v2[:, SOLARIZE].mean() - 0.2) < 0.03
    assert abs(v1[:, FLIP].mean() - 0.5) < 0.05
    jittered = v1[:, BRIGHTNESS] != 1.0
    assert abs(jittered.mean() - 0.8) < 0.04
    assert v1[jittered, BRIGHTNESS].min() >= 0.6 and v1[jittered, CONTRAST].max() <= 1.4
    blurred = v1[:, SIGMA]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0
    np.testing.assert_array_equal(v1[:, WINDOW], [2 * math.ceil(3 * s) + 1 for s in blurred])
    assert ((v1[:, Y1] - v1[:, Y0]) * (v1[:, X1] - v1[:, X0]) >= 0.4 * 200000 * 0.97).all()


def test_a_samples_views_depend_only_on_seed_epoch_and_index():
    views = ViewsConfig.dino_cxr().views
    a = plan_views(7, 3, 42, 300, 400, views)
    np.testing.assert_array_equal(a, plan_views(7, 3, 42, 300, 400, views))
    for other in [(8, 3, 42), (7, 4, 42), (7, 3, 43)]:
        assert not np.array_equal(a, plan_views(*other, 300, 400, views))


def test_eval_roi_is_resize_then_centre_crop():
    cfg = EvalConfig()  # 256 -> 224
    # 400 x 512 (h x w): shorter side 400 -> 256, width int(256 * 512 / 400) = 327.
    y0, x0, y1, x1 = eval_roi(400, 512, cfg)
    s = 400 / 256
    np.testing.assert_allclose([y0, x0, y1, x1], [16 * s, 52 * (512 / 327), 240 * s, 276 * (512 / 327)], rtol=1e-6)
    assert EvalConfig.for_size(96).resize == 110


def test_views_config_presets_and_validation():
    cxr = ViewsConfig()
    assert cxr.n_views == 2 and {v.size for v in cxr.views} == {224}
    assert [v.blur_p for v in cxr.views] == [1.0, 0.1] and [v.solarize_p for v in cxr.views] == [0.0, 0.2]
    assert ViewsConfig.dino_cxr(n_views=4).views[3].blur_p == 0.5
    mc = ViewsConfig.dino_multicrop(n_local=6)
    assert [v.size for v in mc.views] == [224, 224] + [96] * 6
    assert mc.views[2].scale == (0.05, 0.4) and mc.views[0].scale == (0.4, 1.0)
    assert ViewsConfig.from_dict({"preset": "dino_multicrop", "n_local": 2, "local_size": 64}).views[-1].size == 64
    assert ViewsConfig.from_dict(cxr.to_dict()) == cxr
    assert ViewsConfig.from_dict({"preset": "dino_cxr", "scale": [0.3, 1.0]}).views[0].scale == (0.3, 1.0)
    for bad in [dict(scale=(0.0, 1.0)), dict(scale=(0.5, 0.4)), dict(flip_p=1.5), dict(brightness=1.0), dict(size=0)]:
        with pytest.raises(ValueError):
            ViewSpec(**bad)
    with pytest.raises(ValueError):
        ViewsConfig(dtype="int8")
    with pytest.raises(ValueError):
        EvalConfig(resize=100, crop=224)
