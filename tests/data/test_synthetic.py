"""Chest phantoms: deterministic, cached once as PNG, and learnable by a linear probe."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinocxr_fast.data import EvalConfig, SyntheticSource, build_labelled_loader, render_phantom
from dinocxr_fast.data.synthetic import CLASSES, render_uri


def test_phantoms_are_deterministic_and_look_like_chests():
    a = render_phantom(0, 3, 0, 128)
    assert a.dtype == np.uint8 and a.shape == (128, 128)
    np.testing.assert_array_equal(a, render_phantom(0, 3, 0, 128))
    assert not np.array_equal(a, render_phantom(0, 4, 0, 128))
    assert not np.array_equal(a, render_phantom(1, 3, 0, 128))
    # Dark air at the corners, dark lung fields, a bright spine between them.
    assert a[:8, :8].mean() < 40
    lungs = (a[50:70, 28:44].mean() + a[50:70, 84:100].mean()) / 2
    spine = a[50:70, 60:68].mean()
    assert spine > lungs + 30


def test_pneumonia_adds_density_in_the_lungs_only():
    for i in range(8):  # the two labels of one (seed, index) share the anatomy
        normal = render_phantom(0, i, 0, 96).astype(int)
        sick = render_phantom(0, i, 1, 96).astype(int)
        diff = sick - normal
        assert diff.min() >= -2  # rounding and clipping only
        assert diff[25:75].max() > 25 and diff[25:75].mean() > 1.5
        assert np.abs(diff[:, :6]).max() == 0 and np.abs(diff[88:]).max() <= 2  # outside the lungs


def test_png_cache_is_written_once_and_matches_memory(tmp_path):
    src = SyntheticSource(n=6, size=48, seed=2, cache_dir=tmp_path)
    assert src.classes == CLASSES and src.class_counts() == {"normal": 3, "pneumonia": 3}
    stamps = [os.stat(s.path).st_mtime_ns for s in src.samples]
    again = SyntheticSource(n=6, size=48, seed=2, cache_dir=tmp_path)
    assert [os.stat(s.path).st_mtime_ns for s in again.samples] == stamps  # not rendered again
    mem = SyntheticSource(n=6, size=48, seed=2, in_memory=True)
    for disk, m in zip(src.samples, mem.samples):
        assert disk.label == m.label and disk.patient_id == m.patient_id
        np.testing.assert_array_equal(np.asarray(Image.open(disk.path)), render_phantom(2, int(disk.path[-10:-4]), disk.label, 48))
    assert not list(tmp_path.glob("*.tmp*"))  # no half-written folders left behind


def _features(source, backend):
    """Eval images pooled to 8 x 8: the input of a linear probe."""
    xs, ys = [], []
    for x, y in build_labelled_loader(source, EvalConfig(resize=64, crop=64), 32, backend=backend):
        xs.append(F.adaptive_avg_pool2d(x, 8).flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def test_a_linear_probe_learns_the_two_classes():
    train = SyntheticSource(n=128, size=64, seed=0, in_memory=True)
    test = SyntheticSource(n=64, size=64, seed=1, in_memory=True)  # other phantoms
    xtr, ytr = _features(train, "dali")
    xte, yte = _features(test, "dali")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    # A ridge-regression linear classifier (closed form) on targets -1 / +1.
    a = torch.cat([xtr, torch.ones(len(xtr), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (2.0 * ytr - 1).double())
    pred = (torch.cat([xte, torch.ones(len(xte), 1)], 1).double() @ w > 0).long()
    accuracy = (pred == yte).float().mean().item()
    assert accuracy >= 0.9, accuracy


def _best_threshold_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """The best accuracy any single threshold on ``values`` reaches (in sample: optimistic)."""
    return max(max(((values > t) == labels).mean(), ((values <= t) == labels).mean()) for t in np.unique(values))


def test_subtle_variant_hides_the_brightness_shortcut_but_keeps_the_lesion():
    """The kNN monitor's phantoms: the label is not readable from the image's overall brightness
    (it is from the standard phantoms), yet label 1 still adds density inside the lungs."""
    n = 300
    labels = np.arange(n) % 2
    standard = np.array([render_phantom(7, i, i % 2, 64).mean() for i in range(n)])
    subtle = np.array([render_phantom(7, i, i % 2, 64, "subtle").mean() for i in range(n)])
    assert _best_threshold_accuracy(standard, labels) > 0.66  # measured 0.71 (400 images, 128 px)
    assert _best_threshold_accuracy(subtle, labels) < 0.62  # measured 0.54
    for i in range(8):  # the two labels of one (seed, index) share everything but the opacities
        normal = render_phantom(0, i, 0, 96, "subtle").astype(int)
        sick = render_phantom(0, i, 1, 96, "subtle").astype(int)
        big = render_phantom(0, i, 1, 96).astype(int) - render_phantom(0, i, 0, 96).astype(int)
        diff = sick - normal
        assert diff.min() >= -2 and diff[25:75].max() > 15  # a visible opacity ...
        assert diff.sum() < big.sum()  # ... fainter and smaller than the standard phantoms' ones
        assert np.abs(diff[:, :6]).max() == 0 and np.abs(diff[88:]).max() <= 2  # in the lungs only


def test_subtle_variant_is_deterministic_and_shares_the_anatomy():
    a = render_phantom(3, 5, 1, 64, "subtle")
    np.testing.assert_array_equal(a, render_phantom(3, 5, 1, 64, "subtle"))
    assert not np.array_equal(a, render_phantom(3, 6, 1, 64, "subtle"))
    # label 0: the standard image under another exposure (gain and offset), the same anatomy and noise
    x = render_phantom(3, 5, 0, 64).astype(float)
    y = render_phantom(3, 5, 0, 64, "subtle").astype(float)
    keep = (x > 5) & (x < 250) & (y > 5) & (y < 250)  # away from clipping
    assert np.corrcoef(x[keep], y[keep])[0, 1] > 0.99
    with pytest.raises(ValueError, match="unknown phantom variant"):
        render_phantom(0, 0, 0, 32, "nope")


def test_subtle_source_on_disk_and_in_memory(tmp_path):
    disk = SyntheticSource(n=4, size=32, seed=1, cache_dir=tmp_path, variant="subtle")
    standard = SyntheticSource(n=4, size=32, seed=1, cache_dir=tmp_path)
    assert disk.root != standard.root and "subtle" in str(disk.root)
    mem = SyntheticSource(n=4, size=32, seed=1, in_memory=True, variant="subtle")
    for d, m in zip(disk.samples, mem.samples):
        want = render_phantom(1, int(d.path[-10:-4]), d.label, 32, "subtle")
        np.testing.assert_array_equal(np.asarray(Image.open(d.path)), want)
        np.testing.assert_array_equal(render_uri(m.path), want)
    with pytest.raises(ValueError, match="unknown phantom variant"):
        SyntheticSource(n=4, size=32, in_memory=True, variant="nope")
