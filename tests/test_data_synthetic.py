"""Chest phantoms: deterministic, cached once as PNG, and learnable by a linear probe."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinocxr_fast.data import EvalConfig, SyntheticSource, build_eval_loader, render_phantom
from dinocxr_fast.data.synthetic import CLASSES


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
    for x, y in build_eval_loader(source, EvalConfig(resize=64, crop=64), 32, backend=backend):
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
