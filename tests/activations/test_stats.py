"""Tests for activations.stats: Wilson / bootstrap CIs, paired McNemar + Newcombe, kappa, seed summaries."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest
from sklearn.metrics import cohen_kappa_score

from activations.stats import (
    bootstrap_ci,
    cohen_kappa,
    mcnemar_exact,
    paired_compare,
    rate,
    seed_summary,
    wilson_ci,
    wilson_interval,
)


def test_wilson_known_values():
    lo, hi = wilson_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4)
    assert hi == pytest.approx(0.7634, abs=1e-4)
    lo0, hi0 = wilson_ci(0, 10)
    assert lo0 == 0.0 and hi0 == pytest.approx(0.2775, abs=1e-4)
    lo1, hi1 = wilson_ci(10, 10)
    assert hi1 == 1.0 and lo1 == pytest.approx(1 - 0.2775, abs=1e-4)
    # wider at 99%
    lo99, hi99 = wilson_ci(5, 10, confidence=0.99)
    assert lo99 < lo and hi99 > hi


def test_wilson_empty_and_bad_counts():
    lo, hi = wilson_ci(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_ci(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_ci(1, 10, confidence=1.5)


def test_rate_dict_and_empty():
    r = rate([True, False, True, True])
    assert r["n"] == 4 and r["rate"] == 0.75
    assert r["ci"] == pytest.approx(list(wilson_ci(3, 4)))
    assert rate(np.array([1, 0, 0, 0]))["rate"] == 0.25
    empty = rate([])
    assert empty == {"rate": None, "ci": [None, None], "n": 0}
    with pytest.raises(ValueError, match="0/1"):
        rate([0, 2, 1])


def test_wilson_coverage_simulated():
    rng = np.random.default_rng(1)
    k = (rng.random((4000, 100)) < 0.3).sum(axis=1)
    lo, hi = wilson_interval(k, 100)
    coverage = np.mean((lo <= 0.3) & (0.3 <= hi))
    assert 0.92 <= coverage <= 0.975
    # exact coverage from the binomial pmf agrees with the simulation
    ks = np.arange(101)
    lo_all, hi_all = wilson_interval(ks, 100)
    exact = float(np.sum(binom.pmf(ks, 100, 0.3) * ((lo_all <= 0.3) & (0.3 <= hi_all))))
    assert abs(exact - coverage) < 0.015


def test_bootstrap_ci_coverage_bernoulli():
    rng = np.random.default_rng(2)
    datasets = (rng.random((400, 100)) < 0.3).astype(float)
    covered = []
    for i, data in enumerate(datasets):
        lo, hi = bootstrap_ci(data, n_resamples=1000, seed=i)
        covered.append(lo <= 0.3 <= hi)
    assert 0.92 <= np.mean(covered) <= 0.975


def test_bootstrap_ci_deterministic_and_other_statistic():
    x = np.random.default_rng(3).normal(5.0, 1.0, size=200)
    a = bootstrap_ci(x, seed=7)
    assert a == bootstrap_ci(x, seed=7)
    assert a[0] < x.mean() < a[1]
    # chunking does not change the result
    assert bootstrap_ci(x, seed=7, max_chunk_elements=1000) == pytest.approx(a)
    lo, hi = bootstrap_ci(x, statistic=np.median)
    assert lo < np.median(x) < hi
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])


def test_mcnemar_exact_known_case():
    # 1 vs 9 discordant pairs: p = 2 * (1 + 10) / 2**10
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(6, 16) == pytest.approx(binomtest(6, 22, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0


def _paired_vectors(both: int, before_only: int, after_only: int, neither: int):
    before = [True] * both + [True] * before_only + [False] * after_only + [False] * neither
    after = [True] * both + [False] * before_only + [True] * after_only + [False] * neither
    return np.array(before), np.array(after)


def test_paired_compare_matches_published_newcombe_interval():
    # Paired 2x2 table (59, 6 / 16, 80) from Fagerland et al., "Statistical Analysis of
    # Contingency Tables", ch. 8: p1 - p2 = -0.0621, CI -0.1186 to -0.0046.
    before, after = _paired_vectors(59, 6, 16, 80)
    out = paired_compare(before, after)
    assert out["n"] == 161
    assert (out["both"], out["before_only"], out["after_only"], out["neither"]) == (59, 6, 16, 80)
    assert out["difference"]["estimate"] == pytest.approx(0.0621, abs=1e-4)
    assert out["difference"]["ci"] == pytest.approx([0.0046, 0.1186], abs=1e-4)
    assert out["p_value"] == pytest.approx(binomtest(6, 22, 0.5).pvalue)
    assert out["after"]["rate"] - out["before"]["rate"] == pytest.approx(out["difference"]["estimate"])


def test_paired_compare_edge_cases():
    same = np.array([True, False, True, True])
    out = paired_compare(same, same)
    assert out["p_value"] == 1.0 and out["difference"]["estimate"] == 0.0
    lo, hi = out["difference"]["ci"]
    assert lo <= 0.0 <= hi and -1.0 <= lo and hi <= 1.0
    all_flip = paired_compare(np.zeros(20, bool), np.ones(20, bool))
    assert all_flip["difference"]["estimate"] == 1.0
    assert all_flip["difference"]["ci"][1] == 1.0 and all_flip["difference"]["ci"][0] > 0.5
    with pytest.raises(ValueError, match="same length"):
        paired_compare([True, False], [True])
    with pytest.raises(ValueError, match="empty"):
        paired_compare([], [])


def test_paired_ci_coverage_simulated():
    rng = np.random.default_rng(4)
    covered = []
    for _ in range(300):
        before = rng.random(80) < 0.4
        after = np.where(rng.random(80) < 0.7, before, rng.random(80) < 0.5)
        lo, hi = paired_compare(before, after)["difference"]["ci"]
        covered.append(lo <= 0.03 <= hi)  # true difference: 0.7*0.4 + 0.3*0.5 - 0.4
    assert 0.92 <= np.mean(covered) <= 0.985


def test_cohen_kappa_matches_sklearn():
    rng = np.random.default_rng(5)
    cats = np.array(["safety", "benign", "incomplete", "humanizing"])
    a = cats[rng.integers(0, 4, size=200)]
    b = np.where(rng.random(200) < 0.6, a, cats[rng.integers(0, 4, size=200)])
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa(list("aabbc"), list("abbbc")) == pytest.approx(0.6875)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)


def test_cohen_kappa_degenerate():
    assert math.isnan(cohen_kappa(["x"] * 5, ["x"] * 5))
    # one rater constant, the other not: p_e < 1, kappa defined (0: no agreement beyond chance)
    assert cohen_kappa(["x"] * 4, ["x", "y", "x", "y"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="equal lengths"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        cohen_kappa([], [])


def test_seed_summary():
    out = seed_summary([0.2, {"rate": 0.4, "ci": [0.1, 0.7], "n": 10}, 0.6])
    assert out["mean"] == pytest.approx(0.4)
    assert out["std"] == pytest.approx(0.2)
    assert (out["min"], out["max"], out["n_seeds"]) == (0.2, 0.6, 3)
    assert seed_summary([0.5])["std"] is None
    with pytest.raises(ValueError, match="entry 1 has no rate"):
        seed_summary([0.5, {"rate": None, "ci": [None, None], "n": 0}])
    with pytest.raises(ValueError, match="no per-seed"):
        seed_summary([])
