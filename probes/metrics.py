"""Small float64 classification metrics with 95% intervals (rates and bootstraps: `activations.stats`).

- `macro_f1`: mean F1 over the classes present in the truth.
- `classification_summary`: accuracy (Wilson) and macro-F1 (bootstrap) with 95% CIs.
- `best_threshold`: the score threshold that maximises F1 or Youden's J for one binary target.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from activations.stats import bootstrap_ci_rows, rate_from_counts


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """F1 of every class index 0..n_classes-1 (float64, 0.0 where precision and recall are 0)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    f1 = np.zeros(n_classes, dtype=np.float64)
    for c in range(n_classes):
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        fp = float(np.sum((y_true != c) & (y_pred == c)))
        fn = float(np.sum((y_true == c) & (y_pred != c)))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    return f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes that occur in `y_true` (absent classes would add arbitrary zeros)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if y_true.size == 0:
        raise ValueError("macro-F1 of zero rows is undefined")
    present = np.unique(y_true)
    return float(np.mean(f1_per_class(y_true, y_pred, n_classes)[present]))


def classification_summary(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Accuracy (Wilson 95%) and macro-F1 (percentile bootstrap 95% over rows), plus per-class F1."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = int(y_true.size)
    k = len(classes)
    accuracy = rate_from_counts(int(np.sum(y_true == y_pred)), n)
    value = macro_f1(y_true, y_pred, k)
    ci = bootstrap_ci_rows(lambda idx: macro_f1(y_true[idx], y_pred[idx], k), n, n_boot, seed)
    per_class = f1_per_class(y_true, y_pred, k)
    support = np.bincount(y_true, minlength=k)
    return {
        "accuracy": accuracy,
        "macro_f1": {"value": value, "ci": list(ci), "n": n, "n_boot": int(n_boot), "method": "percentile bootstrap"},
        "per_class_f1": {c: {"f1": float(per_class[i]), "n": int(support[i])} for i, c in enumerate(classes)},
    }


def best_threshold(scores: np.ndarray, truth: np.ndarray, criterion: str = "f1") -> tuple[float, float]:
    """Threshold t maximising F1 or Youden's J of the rule `score >= t` for binary `truth` (n,) bool.

    Candidates are the distinct observed scores; ties go to the highest threshold (fewest positives).
    Returns `(threshold, criterion_value)`.
    """
    if criterion not in ("f1", "youden"):
        raise ValueError(f"criterion must be 'f1' or 'youden', got {criterion!r}")
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores and truth must be equal-length 1-D arrays, got {scores.shape}, {truth.shape}")
    n_pos = int(truth.sum())
    n_neg = int(truth.size - n_pos)
    if n_pos == 0:
        raise ValueError("cannot choose a threshold: no positive rows")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(truth[order]).astype(np.float64)
    fp = np.cumsum(~truth[order]).astype(np.float64)
    # keep the last position of each run of equal scores: `score >= t` includes all of them
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp, fp, thresholds = tp[last], fp[last], sorted_scores[last]
    if criterion == "f1":
        values = 2 * tp / (tp + fp + n_pos)
    else:
        values = tp / n_pos - (fp / n_neg if n_neg else 0.0)
    best = int(np.flatnonzero(values == values.max())[0])  # first = highest threshold
    return float(thresholds[best]), float(values[best])
