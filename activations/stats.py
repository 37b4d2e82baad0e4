"""Rates with confidence intervals, bootstrap CIs, paired before/after tests, agreement and seed
summaries: the project's one statistics module (every package reads it from here).

Everything is computed in float64. A reported rate is always the dict
`{"rate": float | None, "ci": [lo, hi], "n": int}` (Wilson 95% unless stated).

Convention for "no data": a rate over n = 0 items is undefined; `rate()` then returns
`{"rate": None, "ci": [None, None], "n": 0}` (JSON-friendly null), and `wilson_ci(0, 0)`
returns `(nan, nan)`. Callers must check `n` before plotting or averaging.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as sps

RateDict = dict[str, Any]


def _z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile for `confidence` (0.95 -> 1.95996...)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(k: Any, n: Any, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised Wilson score interval for k successes out of n trials.

    `k` and `n` broadcast against each other (any shape); returns `(lo, hi)` float64
    arrays of the broadcast shape. Entries with n == 0 are nan.
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(n_arr < 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("wilson interval needs 0 <= k <= n for every entry")
    z = _z_value(confidence)
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k_arr / n_arr
        denom = 1.0 + z2 / n_arr
        center = (p + z2 / (2.0 * n_arr)) / denom
        half = (z / denom) * np.sqrt(p * (1.0 - p) / n_arr + z2 / (4.0 * n_arr * n_arr))
    lo = np.clip(center - half, 0.0, 1.0)
    hi = np.clip(center + half, 0.0, 1.0)
    # Exact endpoints at the boundaries (removes 1e-17 rounding noise).
    lo = np.where(k_arr == 0, 0.0, lo)
    hi = np.where(k_arr == n_arr, 1.0, hi)
    empty = n_arr == 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval `(lo, hi)` for k successes in n trials; `(nan, nan)` when n == 0.

    Example: `wilson_ci(5, 10)` -> `(0.2366, 0.7634)` (rounded).
    """
    if int(k) != k or int(n) != n:
        raise ValueError(f"wilson_ci needs integer counts, got k={k}, n={n}")
    lo, hi = wilson_interval(k, n, confidence)
    return float(lo), float(hi)


def _as_binary(outcomes: Any, name: str = "outcomes") -> np.ndarray:
    """Validate a 1-D vector of booleans (or 0/1 numbers) and return it as a bool array."""
    arr = np.asarray(outcomes)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of booleans, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold booleans or 0/1 numbers, got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must hold only 0/1 (or True/False) values")
    return arr.astype(bool)


def rate_from_counts(k: int, n: int, confidence: float = 0.95) -> RateDict:
    """`{"rate", "ci", "n"}` from counts; rate and CI are None when n == 0."""
    if n == 0:
        return {"rate": None, "ci": [None, None], "n": 0}
    lo, hi = wilson_ci(k, n, confidence)
    return {"rate": float(k) / float(n), "ci": [lo, hi], "n": int(n)}


def rate(outcomes: Any, confidence: float = 0.95) -> RateDict:
    """Fraction of True in `outcomes` (n,) with its Wilson CI: `{"rate", "ci": [lo, hi], "n"}`.

    With n == 0 the rate is undefined: `{"rate": None, "ci": [None, None], "n": 0}`.
    """
    arr = _as_binary(outcomes)
    return rate_from_counts(int(arr.sum()), int(arr.size), confidence)


def bootstrap_ci(
    values: Any,
    statistic: Callable[..., Any] = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    max_chunk_elements: int = 20_000_000,
) -> tuple[float, float]:
    """Percentile bootstrap CI `(lo, hi)` of `statistic` over a 1-D sample `values` (n,).

    Resamples are drawn as an index matrix `(n_resamples, n)` and the statistic is applied
    along axis 1, so `statistic` must accept `axis=` (numpy reductions do). The work is
    chunked so at most `max_chunk_elements` resampled values are in memory at once.
    Deterministic for a given `seed`.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"bootstrap_ci needs a 1-D sample, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("bootstrap_ci got an empty sample")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci got non-finite values (nan or inf)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _z_value(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, min(n_resamples, max_chunk_elements // n))
    stats_out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        stats_out[start:stop] = np.asarray(statistic(x[idx], axis=1), dtype=np.float64)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats_out, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci_rows(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI `(lo, hi)` of `statistic(index)`, where `index` (n,) resamples n rows
    with replacement: for statistics of several aligned arrays (e.g. macro-F1 of truth and
    prediction). Deterministic for a given `seed`.
    """
    if n <= 0:
        raise ValueError("bootstrap needs at least one row")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _z_value(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_resamples)], dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def auc(positive: Any, negative: Any) -> float:
    """Probability that a `positive` value exceeds a `negative` one (ties count half): the area under
    the ROC curve, Mann–Whitney form, in float64. 0.5 = the score cannot tell the two apart."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.ndim != 1 or neg.ndim != 1 or not pos.size or not neg.size:
        raise ValueError(f"auc needs two non-empty 1-D samples, got shapes {pos.shape} and {neg.shape}")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("auc got non-finite values (nan or inf)")
    ranks = sps.rankdata(np.concatenate([pos, neg]))  # average ranks: ties count half
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def auc_with_ci(positive: Any, negative: Any, n_resamples: int = 2000, seed: int = 0,
                confidence: float = 0.95) -> dict[str, Any]:
    """`auc` with a percentile bootstrap CI, each group resampled within itself (stratified).
    Returns `{"auc", "ci", "n_positive", "n_negative", "method"}`."""
    pos, neg, point = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64), auc(positive, negative)
    _z_value(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    draws = np.array([auc(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
                      for _ in range(n_resamples)], dtype=np.float64)
    lo, hi = np.quantile(draws, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return {"auc": point, "ci": [float(lo), float(hi)], "n_positive": int(pos.size), "n_negative": int(neg.size),
            "method": f"Mann-Whitney AUC; stratified percentile bootstrap, {n_resamples} resamples"}


def mcnemar_exact(before_only: int, after_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant pairs against 1/2.

    `before_only` = pairs positive before and negative after, `after_only` the reverse.
    With no discordant pairs the p-value is 1.
    """
    b, c = int(before_only), int(after_only)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), b + c, 0.5)))


def newcombe_paired_ci(
    both: int, before_only: int, after_only: int, neither: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe (1998) square-and-add CI for p_after - p_before on paired binary data.

    Combines the Wilson intervals of the two marginal rates with the phi correlation of the
    2x2 table (phi continuity-adjusted as in Altman et al., "Statistics with Confidence").
    """
    a, b, c, d = (int(v) for v in (both, before_only, after_only, neither))
    n = a + b + c + d
    if n == 0:
        return float("nan"), float("nan")
    p_after, p_before = (a + c) / n, (a + b) / n
    l_after, u_after = wilson_ci(a + c, n, confidence)
    l_before, u_before = wilson_ci(a + b, n, confidence)
    margins = (a + c) * (b + d) * (a + b) * (c + d)
    phi = 0.0
    if margins > 0:
        cross = a * d - b * c
        adjusted = cross - n / 2.0 if cross > n / 2.0 else (cross if cross < 0 else 0.0)
        phi = adjusted / np.sqrt(float(margins))
    diff = p_after - p_before
    down_after, up_before = p_after - l_after, u_before - p_before
    up_after, down_before = u_after - p_after, p_before - l_before
    lower = diff - np.sqrt(max(0.0, down_after**2 - 2 * phi * down_after * up_before + up_before**2))
    upper = diff + np.sqrt(max(0.0, up_after**2 - 2 * phi * up_after * down_before + down_before**2))
    return float(max(-1.0, lower)), float(min(1.0, upper))


def paired_compare(before: Any, after: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Compare binary outcomes of the same prompts before and after an intervention.

    `before`, `after`: (n,) booleans, row i is the same prompt in both. Returns
    `{"n", "before": rate, "after": rate, "difference": {"estimate", "ci"}, "both",
    "before_only", "after_only", "neither", "p_value", "test"}` where the difference is
    p_after - p_before with a Newcombe paired CI and the p-value is the exact McNemar test.
    """
    x = _as_binary(before, "before")
    y = _as_binary(after, "after")
    if x.shape != y.shape:
        raise ValueError(f"before and after must have the same length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_compare got empty outcome vectors")
    both = int(np.sum(x & y))
    before_only = int(np.sum(x & ~y))
    after_only = int(np.sum(~x & y))
    neither = int(np.sum(~x & ~y))
    lo, hi = newcombe_paired_ci(both, before_only, after_only, neither, confidence)
    return {
        "n": int(x.size),
        "before": rate(x, confidence),
        "after": rate(y, confidence),
        "difference": {"estimate": (after_only - before_only) / x.size, "ci": [lo, hi]},
        "both": both,
        "before_only": before_only,
        "after_only": after_only,
        "neither": neither,
        "p_value": mcnemar_exact(before_only, after_only),
        "test": "exact McNemar (two-sided binomial on discordant pairs); CI: Newcombe paired",
    }


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa between two categorical label vectors of equal length (n,).

    kappa = (p_o - p_e) / (1 - p_e). Degenerate case: when both vectors use one and the
    same single label, p_e = 1 and kappa is undefined; we return nan (as scikit-learn).
    """
    x, y = np.asarray(a), np.asarray(b)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"cohen_kappa needs 1-D label vectors, got shapes {x.shape} and {y.shape}")
    if x.size != y.size:
        raise ValueError(f"cohen_kappa needs equal lengths, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("cohen_kappa got empty label vectors")
    labels, codes = np.unique(np.concatenate([x.astype(str), y.astype(str)]), return_inverse=True)
    cx, cy = codes[: x.size], codes[x.size :]
    observed = float(np.mean(cx == cy))
    freq_x = np.bincount(cx, minlength=labels.size).astype(np.float64) / x.size
    freq_y = np.bincount(cy, minlength=labels.size).astype(np.float64) / y.size
    expected = float(np.dot(freq_x, freq_y))
    if np.isclose(expected, 1.0):
        return float("nan")
    return (observed - expected) / (1.0 - expected)


def seed_summary(rates: Sequence[Any]) -> dict[str, Any]:
    """Mean, sample std (ddof=1), min and max over per-seed rates.

    `rates`: floats or rate dicts (`{"rate": ...}`). `std` is None with a single seed.
    A seed whose rate is None (n = 0) is an error: every seed must have data.
    """
    values = []
    for i, r in enumerate(rates):
        value = r.get("rate") if isinstance(r, dict) else r
        if value is None or not np.isfinite(float(value)):
            raise ValueError(f"seed_summary: entry {i} has no rate (n = 0 or nan)")
        values.append(float(value))
    if not values:
        raise ValueError("seed_summary got no per-seed rates")
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n_seeds": int(arr.size),
        "values": values,
    }


def _t_value(df: int, confidence: float) -> float:
    """Two-sided Student-t quantile with `df` degrees of freedom (normal when df is 0)."""
    _z_value(confidence)
    return float(sps.t.ppf(0.5 + confidence / 2.0, df)) if df > 0 else _z_value(confidence)


def seed_average(values: Any, confidence: float = 0.95, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Across-seed mean of a per-prompt quantity with a CI for seed and prompt variance.

    `values`: `(n_seeds, n_prompts)` float64, row s = the per-prompt values under SAE seed s, the
    same prompts in the same columns (e.g. after − before refusal, in {-1, 0, 1}). The estimate is
    the mean of the per-seed means. Its variance is estimated as the sum of two parts:
    the between-seed variance of the per-seed means / n_seeds (SAE-seed variance) plus the
    variance over prompts of the seed-averaged per-prompt values / n_prompts (the prompt sample,
    shared by every seed). The half-width is sqrt(t² · seed part + z² · prompt part), t with
    n_seeds − 1 degrees of freedom (4.30 for 3 seeds: honest about how little three seeds say), z
    normal; with one seed only the prompt part. `bounds` (e.g. (-1, 1) for a change of a rate) clips
    the interval to the values the mean can take. Returns `{"mean", "ci", "per_seed", "n_seeds", "n",
    "method"}`.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"seed_average needs a (n_seeds, n_prompts) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("seed_average got non-finite values")
    n_seeds, n = x.shape
    per_seed = x.mean(axis=1)
    mean = float(per_seed.mean())
    between = float(per_seed.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    prompts = float(x.mean(axis=0).var(ddof=1)) / n if n > 1 else 0.0
    half = float(np.sqrt(_t_value(n_seeds - 1, confidence) ** 2 * between + _z_value(confidence) ** 2 * prompts))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "ci": [lo, hi], "per_seed": [float(v) for v in per_seed],
            "n_seeds": int(n_seeds), "n": int(n),
            "method": "mean of per-seed means; half-width sqrt(t(seeds-1)^2 between-seed var / seeds + "
                      "z^2 prompt var / prompts)"}


def control_difference(selected: Any, controls: Any, n_resamples: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Any]:
    """Selected minus control, with a two-level bootstrap CI over control draws and prompts.

    `selected`: `(n,)` per-prompt outcomes under the selected intervention; `controls`: `(n_draws, n)`
    the same prompts under each random control draw. Estimate: mean(selected) − mean over draws of
    mean(control). Each resample draws the control draws with replacement and, independently, the
    prompts with replacement (the same prompts for selected and controls: the comparison is
    paired). Returns `{"estimate", "ci", "control_mean", "control_draws": [per-draw means],
    "n", "n_draws", "method"}`.
    """
    sel = np.asarray(selected, dtype=np.float64)
    ctl = np.asarray(controls, dtype=np.float64)
    if sel.ndim != 1 or ctl.ndim != 2 or ctl.shape[1] != sel.size or sel.size == 0 or ctl.shape[0] == 0:
        raise ValueError(f"control_difference needs selected (n,) and controls (n_draws, n), got {sel.shape} "
                         f"and {ctl.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _z_value(confidence)
    n_draws, n = ctl.shape
    rng = np.random.default_rng(seed)
    stats_out = np.empty(n_resamples, dtype=np.float64)
    for i in range(n_resamples):
        rows = rng.integers(0, n, size=n)
        draws = rng.integers(0, n_draws, size=n_draws)
        stats_out[i] = sel[rows].mean() - ctl[np.ix_(draws, rows)].mean()
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats_out, [alpha / 2.0, 1.0 - alpha / 2.0])
    per_draw = ctl.mean(axis=1)
    return {"estimate": float(sel.mean() - per_draw.mean()), "ci": [float(lo), float(hi)],
            "control_mean": float(per_draw.mean()), "control_draws": [float(v) for v in per_draw],
            "n": int(n), "n_draws": int(n_draws),
            "method": "two-level percentile bootstrap: control draws and prompts resampled (paired prompts)"}


def run_average(values: Sequence[Any], confidence: float = 0.95) -> dict[str, Any]:
    """Across-run mean when the runs were measured on different prompts (e.g. runs with different split
    seeds): `values` is one 1-D per-prompt array per run. Estimate: the mean of the run means; variance:
    between-run variance of the run means / n_runs (times t(n_runs − 1)²) + mean over runs of
    (within-run variance / n_r) / n_runs (times z²) under one square root. Returns `{"mean", "ci",
    "per_run", "n_runs", "n", "method"}` (`n`: prompts over all runs)."""
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("run_average needs one non-empty 1-D array per run")
    means = np.array([a.mean() for a in arrays])
    r = means.size
    between = float(means.var(ddof=1)) / r if r > 1 else 0.0
    within = float(np.mean([a.var(ddof=1) / a.size if a.size > 1 else 0.0 for a in arrays])) / r
    mean = float(means.mean())
    half = float(np.sqrt(_t_value(r - 1, confidence) ** 2 * between + _z_value(confidence) ** 2 * within))
    return {"mean": mean, "ci": [mean - half, mean + half], "per_run": [float(m) for m in means], "n_runs": int(r),
            "n": int(sum(a.size for a in arrays)),
            "method": "mean of run means; half-width sqrt(t(runs-1)^2 between-run var / runs + z^2 within-run "
                      "var of the mean / runs)"}
