"""Model diffing: do two models (e.g. base vs fine-tuned) encode a refusal category alike?

For each model the category vector is the difference of means
`v = mean(X[category]) - mean(X[baseline])` over its activations `X (n, d_model)` (float64),
and we compare the two models by the cosine of their category vectors.

Why not just the plug-in cosine: each estimated vector is `v + noise`, with
E||noise||^2 = tr(S_cat)/n_cat + tr(S_base)/n_base (S = row covariance). In d_model
dimensions with ~100 rows per category that noise is large and drags the plug-in cosine
towards 0 (a 95% bootstrap percentile interval of it covered the true cosine 6% of the
time in our simulations). We therefore report

- `cosine`: the noise-corrected cosine
  `(v_a·v_b - c_ab) / sqrt((||v_a||^2 - e_a)(||v_b||^2 - e_b))`, where e_a, e_b are the
  estimated noise energies above and c_ab the noise cross term (0 for independent
  samples; estimated from the row cross-covariance when `paired=True`). It is undefined
  (None) when a category vector is not larger than its own noise; values are clipped to
  [-1, 1].
- `ci`: a basic (reverse-percentile) bootstrap interval for it. Rows are resampled with
  replacement within each (model, category) group — with `paired=True` (same prompts, same
  row order in both models) the same rows for both models. On a resample the corrected
  estimator targets the plug-in cosine of the original data, so the bootstrap errors are
  `T* - cosine_plugin`, and the interval is `[T - q_hi, T - q_lo]` of those errors.
- `cosine_plugin`: the plain cosine of the two mean-difference vectors, for reference.

Resampled means use multinomial counts: a resample of a group of m rows is a count vector
c (m,) summing to m, so all resamples are one product `(n_resamples, m) @ (m, d)`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _as_float64(X: Any, name: str) -> np.ndarray:
    """Validated float64 copy of an activation matrix (n, d)."""
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().float().numpy()
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (n, d_model) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains nan or inf")
    return arr


def _check_groups(lab: np.ndarray, n: int, needed: Sequence[str], name: str, min_rows: int = 1) -> None:
    if lab.shape != (n,):
        raise ValueError(f"labels for {name} must have shape ({n},), got {lab.shape}")
    for cat in needed:
        count = int(np.sum(lab == cat))
        if count < min_rows:
            raise ValueError(f"{name} has {count} rows of category {cat!r}; need at least {min_rows}")


def category_vector(X: Any, labels: Sequence[str], category: str, baseline: str = "benign") -> np.ndarray:
    """Mean-difference vector `(d,)` float64: mean of `category` rows minus mean of `baseline` rows."""
    arr = _as_float64(X, "X")
    lab = np.asarray(labels).astype(str)
    _check_groups(lab, arr.shape[0], [category, baseline], "X")
    return arr[lab == category].mean(axis=0) - arr[lab == baseline].mean(axis=0)


def _rowdot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", u, v)


def _weighted_moments(G_a: np.ndarray, G_b: np.ndarray, counts: np.ndarray, paired: bool):
    """Means and noise terms of one group under row weights `counts (R, m)` (rows sum to m).

    Returns mean_a (R, d), mean_b (R, d), noise_a (R,), noise_b (R,), cross (R,) where
    noise = tr(row covariance) / m, the expected squared error of the mean, and cross is
    the same for the cross-covariance of paired rows (zeros when not paired).
    With `paired=False`, G_a and G_b may differ in length; `counts` is then a pair.
    """
    ca, cb = (counts, counts) if paired else counts
    out = []
    for G, c in ((G_a, ca), (G_b, cb)):
        m = G.shape[0]
        mean = c @ G / m
        second = c @ _rowdot(G, G) / m
        out.append((mean, (second - _rowdot(mean, mean)) / (m - 1)))
    (mean_a, noise_a), (mean_b, noise_b) = out
    if paired:
        m = G_a.shape[0]
        cross = (ca @ _rowdot(G_a, G_b) / m - _rowdot(mean_a, mean_b)) / (m - 1)
    else:
        cross = np.zeros(mean_a.shape[0])
    return mean_a, mean_b, noise_a, noise_b, cross


def _cosines(moments_cat, moments_base) -> tuple[np.ndarray, np.ndarray]:
    """(plug-in cosine, noise-corrected cosine), each (R,), from category and baseline moments."""
    vec_a = moments_cat[0] - moments_base[0]
    vec_b = moments_cat[1] - moments_base[1]
    noise_a, noise_b, cross = (moments_cat[k] + moments_base[k] for k in (2, 3, 4))
    dot, sq_a, sq_b = _rowdot(vec_a, vec_b), _rowdot(vec_a, vec_a), _rowdot(vec_b, vec_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        plugin = np.where((sq_a > 0) & (sq_b > 0), dot / np.sqrt(sq_a * sq_b), np.nan)
        signal_a, signal_b = sq_a - noise_a, sq_b - noise_b
        ok = (signal_a > 0) & (signal_b > 0)
        corrected = np.where(ok, (dot - cross) / np.sqrt(np.where(ok, signal_a * signal_b, 1.0)), np.nan)
    return plugin, corrected


def category_vector_cosines(
    X_a: Any,
    labels_a: Sequence[str],
    X_b: Any,
    labels_b: Sequence[str],
    categories: Sequence[str] | None = None,
    baseline: str = "benign",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    paired: bool = False,
) -> dict[str, dict[str, Any]]:
    """Cosine between model A's and model B's category vectors, per category, with a bootstrap CI.

    `X_a (n_a, d)`, `X_b (n_b, d)`: activations of the two models at comparable layers (same
    d); `labels_*`: category of each row. `categories` defaults to every category present in
    both models except `baseline`; each group needs >= 2 rows. With `paired=True` both
    models must have identical label vectors (same prompts in the same order).
    Returns `{category: {"cosine", "ci": [lo, hi], "cosine_plugin", "n_a", "n_b",
    "n_resamples", "undefined_resamples"}}` (see the module docstring for the estimator).
    """
    A, B = _as_float64(X_a, "X_a"), _as_float64(X_b, "X_b")
    lab_a, lab_b = np.asarray(labels_a).astype(str), np.asarray(labels_b).astype(str)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"d_model mismatch: X_a has {A.shape[1]} columns, X_b has {B.shape[1]}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if categories is None:
        categories = sorted((set(lab_a) & set(lab_b)) - {baseline})
    if not categories:
        raise ValueError("no category to compare: the two models share no category besides the baseline")
    _check_groups(lab_a, A.shape[0], [*categories, baseline], "X_a", min_rows=2)
    _check_groups(lab_b, B.shape[0], [*categories, baseline], "X_b", min_rows=2)
    if paired and not np.array_equal(lab_a, lab_b):
        raise ValueError("paired=True needs identical label vectors (same prompts, same order) for both models")

    rng = np.random.default_rng(seed)
    alpha = 1.0 - confidence

    def moments(cat: str, bootstrap: bool):
        G_a, G_b = A[lab_a == cat], B[lab_b == cat]

        def counts(m: int) -> np.ndarray:
            if not bootstrap:
                return np.ones((1, m))
            return rng.multinomial(m, np.full(m, 1.0 / m), size=n_resamples).astype(np.float64)

        weights = counts(G_a.shape[0]) if paired else (counts(G_a.shape[0]), counts(G_b.shape[0]))
        return _weighted_moments(G_a, G_b, weights, paired)

    base_point, base_boot = moments(baseline, False), moments(baseline, True)
    result: dict[str, dict[str, Any]] = {}
    for cat in categories:
        plugin, corrected = (float(v[0]) for v in _cosines(moments(cat, False), base_point))
        _, boot = _cosines(moments(cat, True), base_boot)
        errors = boot[np.isfinite(boot)] - plugin
        if np.isnan(corrected) or errors.size == 0:
            cosine, ci = None, [None, None]
        else:
            q_lo, q_hi = np.quantile(errors, [alpha / 2, 1 - alpha / 2])
            cosine = float(np.clip(corrected, -1.0, 1.0))
            ci = [float(np.clip(corrected - q_hi, -1.0, 1.0)), float(np.clip(corrected - q_lo, -1.0, 1.0))]
        result[cat] = {
            "cosine": cosine,
            "ci": ci,
            "cosine_plugin": None if np.isnan(plugin) else plugin,
            "n_a": int(np.sum(lab_a == cat)),
            "n_b": int(np.sum(lab_b == cat)),
            "n_resamples": int(n_resamples),
            "undefined_resamples": int(np.sum(~np.isfinite(boot))),
        }
    return result
