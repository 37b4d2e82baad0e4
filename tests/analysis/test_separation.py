"""Head separation: the AUC of the baseline refusal log-odds, refusal categories against benign/contrast."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from activations.stats import auc, auc_with_ci
from analysis.evaluation.separation import head_separation


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    pos, neg = np.round(rng.normal(1.0, 1.0, 60), 1), np.round(rng.normal(0.0, 1.0, 80), 1)  # rounded: ties
    expected = roc_auc_score(np.r_[np.ones(60), np.zeros(80)], np.r_[pos, neg])
    assert auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert auc([1.0, 2.0], [0.0]) == 1.0 and auc([0.0], [1.0, 2.0]) == 0.0 and auc([1.0], [1.0]) == 0.5
    found = auc_with_ci(pos, neg)
    assert found["ci"][0] < found["auc"] < found["ci"][1] and found["ci"][1] - found["ci"][0] < 0.3
    with pytest.raises(ValueError, match="non-empty"):
        auc([], [1.0])


def test_head_separation_reads_refusal_categories_against_benign_and_contrast():
    rows = ([{"category": "safety", "log_odds": 3.0, "refused": True}] * 5
            + [{"category": "unsupported", "log_odds": 1.0, "refused": True}] * 5
            + [{"category": "benign", "log_odds": -2.0, "refused": False}] * 5
            + [{"category": "contrast", "log_odds": 1.0, "refused": True}] * 5)
    found = head_separation(rows)
    # pairs: safety beats all 10; unsupported beats 5 benign, ties 5 contrast -> (50 + 25 + 12.5) / 100
    assert found["auc"] == pytest.approx(0.875)
    assert (found["n_positive"], found["n_negative"]) == (10, 10)
    assert found["refusal_rate"]["rate"] == 1.0 and found["over_refusal_rate"]["rate"] == 0.5
    assert head_separation([{**r, "log_odds": None} for r in rows]) is None  # no refusal tokens
    assert head_separation(rows[:10]) is None  # no prompts to answer
