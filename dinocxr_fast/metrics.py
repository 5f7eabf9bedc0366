"""Classification metrics of the DINO-CXR evaluation (NumPy only, tested against hand-computed
cases and scikit-learn): accuracy, balanced accuracy, ROC AUC (binary, and one-vs-rest macro for
more classes), F1, precision, recall (sensitivity), specificity, confusion matrix, and
percentile-bootstrap 95 % confidence intervals."""
from __future__ import annotations

from typing import Callable

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def roc_curve(y_true01: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive rates at every distinct threshold (descending), starting at (0, 0)."""
    y = np.asarray(y_true01, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = (1 + idx) - tps
    tpr = np.r_[0.0, tps / tps[-1]] if tps[-1] > 0 else np.r_[0.0, np.zeros_like(tps)]
    fpr = np.r_[0.0, fps / fps[-1]] if fps[-1] > 0 else np.r_[0.0, np.zeros_like(fps)]
    return fpr, tpr, np.r_[np.inf, s[idx]]


def roc_auc_binary(y_true01: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y = np.asarray(y_true01)
    if y.min() == y.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.trapezoid(tpr, fpr))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of the positive-class (index 1) probability. More classes: one-vs-rest macro."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.shape[1] == 2:
        return roc_auc_binary(y == 1, probs[:, 1])
    aucs = [roc_auc_binary(y == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, positive: int = 1) -> dict:
    """Every metric of the report. Binary: precision/recall/F1/specificity of ``positive``;
    more classes: their macro averages (specificity per class = TN / (TN + FP))."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be [N, C] with N={y_true.shape[0]}, got {probs.shape}")
    k = probs.shape[1]
    y_pred = probs.argmax(1)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    precision = np.array([_safe_div(tp[c], tp[c] + fp[c]) for c in range(k)])
    recall = np.array([_safe_div(tp[c], tp[c] + fn[c]) for c in range(k)])
    specificity = np.array([_safe_div(tn[c], tn[c] + fp[c]) for c in range(k)])
    f1 = np.array([_safe_div(2 * precision[c] * recall[c], precision[c] + recall[c]) for c in range(k)])
    present = cm.sum(1) > 0
    out = {
        "n": int(y_true.size),
        "accuracy": _safe_div(tp.sum(), cm.sum()),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "roc_auc": roc_auc(y_true, probs),
    }
    if k == 2:
        c = positive
        out.update(precision=float(precision[c]), recall=float(recall[c]), sensitivity=float(recall[c]),
                   specificity=float(specificity[c]), f1=float(f1[c]))
    else:
        out.update(precision=float(precision.mean()), recall=float(recall.mean()), sensitivity=float(recall.mean()),
                   specificity=float(specificity.mean()), f1=float(f1.mean()))
    out["confusion_matrix"] = cm.tolist()
    return out


SCALAR_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1", "precision", "recall", "specificity")


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 metric_fn: Callable[[np.ndarray, np.ndarray], dict] = classification_metrics) -> dict:
    """Percentile bootstrap: resample cases with replacement ``n_boot`` times; the (alpha/2,
    1-alpha/2) quantiles of each scalar metric. Resamples with one class only give NaN AUCs,
    which are left out of that metric's interval."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in SCALAR_METRICS}
    n = y_true.size
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = metric_fn(y_true[idx], probs[idx])
        for key in SCALAR_METRICS:
            if not np.isnan(m[key]):
                samples[key].append(m[key])
    out = {}
    for key, values in samples.items():
        if values:
            lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            out[key] = (float(lo), float(hi))
        else:
            out[key] = (float("nan"), float("nan"))
    return out
