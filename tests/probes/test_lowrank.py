import numpy as np
import pytest

from activations.records import PROBE_CLASSES, REFUSAL_CATEGORIES
from probes.directions import mean_difference
from probes.lowrank import fit_lowrank_combination, fit_whitener
from probes.rows import LabelledRows

D = 8


@pytest.fixture(scope="module")
def rows():
    """Anisotropic activations: correlated noise (non-identity covariance) plus per-class means."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(D, D)) * np.linspace(0.2, 3.0, D)[:, None]
    class_means = rng.normal(scale=2.0, size=(len(PROBE_CLASSES), D))
    x, cats = [], []
    for k, name in enumerate(PROBE_CLASSES):
        x.append(rng.normal(size=(80, D)) @ mix + class_means[k])
        cats += [name] * 80
    n = len(cats)
    return LabelledRows(np.vstack(x), np.array(cats), np.array(["extract"] * n), np.array([str(i) for i in range(n)]))


@pytest.fixture(scope="module")
def directions(rows):
    return {c: mean_difference(rows, c) for c in REFUSAL_CATEGORIES}


def _span_residual(v, V):
    """Norm of the part of v outside the row span of V, relative to |v|."""
    coef, *_ = np.linalg.lstsq(V.T, v, rcond=None)
    return np.linalg.norm(v - V.T @ coef) / np.linalg.norm(v)


def test_whitener_whitens_and_round_trips(rows):
    w = fit_whitener(rows, eps=1e-9)
    z = w.whiten(rows.features)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(D), atol=1e-6)
    cov = np.cov(rows.features, rowvar=False)
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.5  # really non-identity / correlated
    v = np.random.default_rng(1).normal(size=(3, D))
    np.testing.assert_allclose(w.unwhiten_direction(w.whiten_direction(v)), v, atol=1e-10)
    # unwhiten = Σ^{1/2}: applying it twice gives Σ (+ ridge); readout is the dual of whitening
    np.testing.assert_allclose(w.unwhiten_direction(w.unwhiten_direction(np.eye(D))), cov, rtol=1e-6, atol=1e-8)
    u = v[0]
    np.testing.assert_allclose(z @ u, (rows.features - w.mean) @ w.readout_direction(u), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="size 8"):
        w.whiten_direction(np.ones(7))


def test_lowrank_maps_back_with_sigma_half(rows, directions):
    res = fit_lowrank_combination(rows, directions)
    V = np.stack([directions[c] for c in REFUSAL_CATEGORIES])
    w = fit_whitener(rows)
    assert res.rank == 5 and res.basis_whitened.shape == (D, 5)
    np.testing.assert_allclose(res.basis_whitened.T @ res.basis_whitened, np.eye(5), atol=1e-10)
    # the steering vector lies in the span of the raw category directions, and equals sum_c beta_c v_c
    assert _span_residual(res.steering, V) < 1e-9
    beta = np.array([res.category_weights[c] for c in REFUSAL_CATEGORIES])
    np.testing.assert_allclose(beta @ V, res.steering, rtol=1e-8, atol=1e-8)
    # the wrong back-maps (none, or W instead of W^-1) leave that span
    assert _span_residual(res.combined_whitened, V) > 1e-3
    assert _span_residual(w.whiten_direction(res.combined_whitened), V) > 1e-3
    # adding the steering vector to raw activations moves whitened activations by exactly s * u_hat
    x = rows.features[:4]
    np.testing.assert_allclose(w.whiten(x + res.steering) - w.whiten(x), np.tile(res.combined_whitened, (4, 1)), atol=1e-9)
    # full rank: category directions projected on the subspace come back unchanged
    for c in REFUSAL_CATEGORIES:
        np.testing.assert_allclose(res.per_category_lowrank[c], directions[c], rtol=1e-8, atol=1e-8)
    # the readout separates refusal from benign, and the steering points toward refusal
    refusal = rows.category_mask(list(REFUSAL_CATEGORIES))
    proj = (rows.features - w.mean) @ res.readout
    assert proj[refusal].mean() > proj[~refusal].mean()
    assert res.meta["whitened_shift"] > 0


def test_lda_mixing_at_full_rank_is_pooled_mean_difference(rows, directions):
    res = fit_lowrank_combination(rows, directions, mixing="lda", eps=0.0)
    pooled = mean_difference(rows, list(REFUSAL_CATEGORIES))
    np.testing.assert_allclose(res.steering, pooled, rtol=1e-6, atol=1e-8)
    logistic = fit_lowrank_combination(rows, directions)
    cos = logistic.steering @ pooled / np.linalg.norm(logistic.steering) / np.linalg.norm(pooled)
    assert 0.5 < cos < 1 - 1e-6  # learned mixing: related to, but not the same as, pooled CAA


def test_lowrank_rank_and_errors(rows, directions):
    res = fit_lowrank_combination(rows, directions, rank=1)
    V = np.stack(list(directions.values()))
    assert res.rank == 1 and _span_residual(res.steering, V) < 1e-9
    sv = res.to_steering_vector(layer=3, model="tiny")
    assert sv.layer == 3 and sv.meta["rank"] == 1 and sv.d_model == D
    with pytest.raises(ValueError, match="rank must be in"):
        fit_lowrank_combination(rows, directions, rank=6)
    with pytest.raises(ValueError, match="'extract' split"):
        fit_lowrank_combination(LabelledRows(rows.features, rows.categories, np.array(["eval"] * rows.n), rows.ids),
                                directions)
    with pytest.raises(ValueError, match="size 7"):
        fit_lowrank_combination(rows, {"safety": np.ones(7)})


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def unbalanced():
    """Planted: 'safety' has 10x the rows of 'humanizing'; their mean shifts are orthogonal (e0, e1)."""
    rng = np.random.default_rng(0)
    mix = np.eye(D) + 0.3 * rng.normal(size=(D, D))
    x, cats = [], []
    for name, n, mean in (("benign", 200, np.zeros(D)), ("safety", 400, 3 * np.eye(D)[0]),
                          ("humanizing", 40, 3 * np.eye(D)[1])):
        x.append(rng.normal(size=(n, D)) @ mix + mean)
        cats += [name] * n
    n = len(cats)
    rows = LabelledRows(np.vstack(x), np.array(cats), np.array(["extract"] * n), np.array([str(i) for i in range(n)]))
    dirs = {c: mean_difference(rows, c) for c in ("safety", "humanizing")}
    return rows, dirs


def test_learned_mixing_differs_from_pooled_mean_on_unbalanced_categories(unbalanced):
    rows, dirs = unbalanced
    cats = ("safety", "humanizing")
    pooled = mean_difference(rows, list(cats))  # CAA "global": pulled toward the big category
    balanced = (dirs["safety"] + dirs["humanizing"]) / 2
    assert _cos(pooled, balanced) < 0.8  # the planted imbalance matters
    # closed form: category-balanced LDA at full rank is the mean of the category shifts, not the pooled one
    lda = fit_lowrank_combination(rows, dirs, mixing="lda", eps=0.0, refusal_categories=cats)
    np.testing.assert_allclose(lda.steering, balanced, rtol=1e-6, atol=1e-8)
    assert _cos(lda.steering, pooled) < 0.8
    lda_pooled = fit_lowrank_combination(rows, dirs, mixing="lda", eps=0.0, refusal_categories=cats, balance="pooled")
    np.testing.assert_allclose(lda_pooled.steering, pooled, rtol=1e-6, atol=1e-8)
    # the default (logistic, category-balanced) gives the small category far more than its share of rows
    learned = fit_lowrank_combination(rows, dirs, refusal_categories=cats)
    by_rows = fit_lowrank_combination(rows, dirs, refusal_categories=cats, balance="pooled")
    share = learned.category_weights["humanizing"] / sum(learned.category_weights.values())
    assert share > 1.5 * 40 / 440
    assert _cos(learned.steering, pooled) < _cos(by_rows.steering, pooled) < 1.0
    assert _cos(learned.steering, balanced) > _cos(pooled, balanced)
    assert learned.meta["balance"] == "category"
    with pytest.raises(ValueError, match="balance must be"):
        fit_lowrank_combination(rows, dirs, refusal_categories=cats, balance="rows")
