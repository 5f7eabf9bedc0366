"""Evaluation metrics against hand-computed cases and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest

from dinocxr_fast.metrics import bootstrap_ci, classification_metrics, confusion_matrix, roc_auc, roc_auc_binary


def test_binary_hand_computed():
    # true:  0 0 0 1 1 1 1 ; positive-class probability decides the prediction at 0.5
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.7])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # predictions: 0 1 0 1 0 1 1 -> TP=3 FP=1 FN=1 TN=2
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    # AUC: pairs (pos, neg) ranked right: pos scores .8 .4 .9 .7 vs neg .1 .6 .3 -> 3+2+3+3 = 11 of 12
    assert m["roc_auc"] == pytest.approx(11 / 12)


def test_auc_ties_count_half_and_degenerate_cases():
    assert roc_auc_binary(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc_binary(np.array([0, 0, 1]), np.array([0.1, 0.9, 0.9])) == pytest.approx(0.75)
    assert np.isnan(roc_auc_binary(np.array([1, 1]), np.array([0.2, 0.3])))
    assert roc_auc_binary(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.75)


def test_multiclass_macro_and_confusion():
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .2, .7], [.3, .4, .3], [.5, .4, .1], [.6, .3, .1]])
    cm = confusion_matrix(y, probs.argmax(1), 3)
    assert cm.tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    m = classification_metrics(y, probs)
    assert m["recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["precision"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)


def test_against_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for k in (2, 4):
        y = rng.integers(0, k, 300)
        logits = rng.normal(size=(300, k)) + np.eye(k)[y] * 1.0
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(y, probs)
        pred = probs.argmax(1)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
        assert m["confusion_matrix"] == sk.confusion_matrix(y, pred).tolist()
        if k == 2:
            assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, probs[:, 1]))
            assert m["f1"] == pytest.approx(sk.f1_score(y, pred))
            assert m["precision"] == pytest.approx(sk.precision_score(y, pred))
            assert m["recall"] == pytest.approx(sk.recall_score(y, pred))
        else:
            assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
            assert m["f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
            assert roc_auc(y, probs) == pytest.approx(m["roc_auc"])


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 200), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs)
    ci = bootstrap_ci(y, probs, n_boot=300, seed=3)
    for key in ("accuracy", "roc_auc", "f1"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi and hi - lo < 0.3
    assert ci == bootstrap_ci(y, probs, n_boot=300, seed=3)


def test_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(np.array([0, 1]), np.array([0.2, 0.8]))
