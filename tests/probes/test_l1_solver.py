"""The torch L1 logistic solver (FISTA, `probes/l1_solver.py`) against the scikit-learn reference (CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.records import BENIGN, PROBE_CLASSES
from analysis.stages.select import Config
from probes.heads import resolve_solver
from probes.heads import fit_l1_heads, fit_ovr_heads, select_l1_head
from probes.l1_solver import fit_l1_logistic
from probes.selection import stability_selection
from tests.helpers.probes_synth import make_rows
from tests.helpers.sae_fixtures import one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def extract():
    return make_rows("extract", n_per_class=25, seed=0, n_contrast=10)


def test_torch_solver_reaches_the_sklearn_solution(extract) -> None:
    ref = fit_l1_heads(extract, [0.03, 0.3], tol=1e-7, max_iter=20000)
    got = fit_l1_heads(extract, [0.03, 0.3], solver="torch", tol=1e-5, max_iter=20000)
    for r, g in zip(ref, got):
        assert g.coef.shape == r.coef.shape == (6, 40) and g.coef.dtype == np.float64 and g.meta["converged"]
        np.testing.assert_allclose(g.coef, r.coef, atol=2e-3 * np.abs(r.coef).max())
        np.testing.assert_allclose(g.intercept, r.intercept, atol=5e-3 * max(1.0, np.abs(r.intercept).max()))
        assert np.array_equal(g.coef > 0, r.coef > 0)  # the same features carry positive weight
    ovr_ref = fit_ovr_heads(extract, C=0.3, categories=PROBE_CLASSES[1:3], tol=1e-7, max_iter=20000)
    ovr_got = fit_ovr_heads(extract, C=0.3, categories=PROBE_CLASSES[1:3], solver="torch", tol=1e-5)
    for category in ovr_ref:
        r, g = ovr_ref[category], ovr_got[category]
        assert g.classes == ("rest", category) and np.all(g.coef[0] == 0)
        np.testing.assert_allclose(g.coef, r.coef, atol=2e-3 * np.abs(r.coef).max())


def test_torch_solver_selects_like_sklearn(extract) -> None:
    calibrate = make_rows("calibrate", n_per_class=15, seed=1, n_contrast=5)
    ref = select_l1_head(extract, calibrate, c_grid=(0.01, 0.1, 1.0))
    got = select_l1_head(extract, calibrate, c_grid=(0.01, 0.1, 1.0), solver="torch")
    assert got.C == ref.C and [s["C"] for s in got.meta["c_scores"]] == [0.01, 0.1, 1.0]
    assert got.meta["solver"] == "torch" and ref.meta["solver"] == "sklearn"
    a = stability_selection(extract, C=0.3, n_bootstrap=3, top_k=5, seed=2, tol=1e-6, max_iter=20000)
    b = stability_selection(extract, C=0.3, n_bootstrap=3, top_k=5, seed=2, solver="torch", tol=1e-5)
    for name in PROBE_CLASSES:  # the same resamples (same draws), the same selections
        assert a.selections()[name].feature_ids.tolist() == b.selections()[name].feature_ids.tolist()


def test_solver_batches_problems_with_their_own_designs_and_checks_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=g)
    y = (x[:, :, 0] > 0).long()  # binary: feature 0 decides
    fit = fit_l1_logistic(x, y, torch.tensor([0.1, 1.0, 10.0]), 2, binary=True, tol=1e-5)
    assert fit.coef.shape == (3, 1, 8) and fit.converged.all()
    assert np.all(fit.coef[:, 0, 0] > 0) and abs(fit.coef[0, 0, 0]) < abs(fit.coef[2, 0, 0])  # weaker penalty, larger weight
    with pytest.raises(ValueError, match="unknown solver 'saga'"):
        fit_l1_heads(make_rows("extract", n_per_class=5), [1.0], solver="saga")
    with pytest.raises(ValueError, match="C must be a positive finite number"):
        fit_l1_heads(make_rows("extract", n_per_class=5), [0.0], solver="torch")
    with pytest.raises(ValueError, match="solver must be one of"):
        Config(solver="lbfgs")  # type: ignore[arg-type]
    assert Config().solver == "auto" and BENIGN == PROBE_CLASSES[0]
    assert resolve_solver("auto", "cuda:1") == "torch" and resolve_solver("auto", "cpu") == "sklearn"
    assert resolve_solver("torch", "cpu") == "torch"
