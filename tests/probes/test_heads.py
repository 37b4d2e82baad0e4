import numpy as np
import pytest

from tests.helpers.probes_synth import informative, make_rows
from activations.records import PROBE_CLASSES
from probes.heads import HeadResult, evaluate_head, fit_l1_head, fit_ovr_heads, select_l1_head
from probes.selection import top_k_features


@pytest.fixture(scope="module")
def extract():
    return make_rows("extract", seed=0)


@pytest.fixture(scope="module")
def head(extract):
    return fit_l1_head(extract, C=0.1)


def test_l1_head_recovers_planted_features(head):
    assert head.classes == PROBE_CLASSES
    assert head.coef.shape == (6, 40) and head.coef.dtype == np.float64
    tops = top_k_features(head, 5)
    for k, name in enumerate(PROBE_CLASSES):
        assert set(tops[name].feature_ids.tolist()) == informative(k)
        assert np.all(tops[name].weights > 0)
    noise = np.abs(head.coef[:, 30:])
    assert noise.max() < 0.05 * np.abs(head.coef).max()


def test_predict_proba_and_accuracy(head):
    cal = make_rows("calibrate", seed=1)
    p = head.predict_proba(cal.features)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    truth = np.array([PROBE_CLASSES.index(c) for c in cal.categories])
    assert np.mean(head.predict(cal.features) == truth) > 0.9


def test_head_refuses_wrong_split_and_bad_shapes(head):
    with pytest.raises(ValueError, match="must be fitted on the 'extract' split, got rows from 'eval'"):
        fit_l1_head(make_rows("eval", seed=2), C=0.1)
    with pytest.raises(ValueError, match=r"shape \(batch, 40\)"):
        head.predict_proba(np.zeros((2, 39)))


def test_head_save_load_round_trip(head, tmp_path):
    head.save(str(tmp_path / "head"))
    loaded = HeadResult.load(str(tmp_path / "head"))
    np.testing.assert_array_equal(loaded.coef, head.coef)
    np.testing.assert_array_equal(loaded.scaler_scale, head.scaler_scale)
    assert loaded.classes == head.classes and loaded.C == head.C
    assert loaded.meta["splits"]["extract"]["split_hash"] == head.meta["splits"]["extract"]["split_hash"]
    with pytest.raises(FileNotFoundError, match="head metadata"):
        HeadResult.load(str(tmp_path / "missing"))


def test_select_l1_head_uses_calibrate_and_records_scores(extract):
    cal = make_rows("calibrate", seed=1)
    best = select_l1_head(extract, cal, c_grid=(0.001, 0.1))
    assert [s["C"] for s in best.meta["c_scores"]] == [0.001, 0.1]
    assert best.C == 0.1  # C=0.001 zeroes every weight
    assert set(best.meta["splits"]) == {"extract", "calibrate"}
    with pytest.raises(ValueError, match="'calibrate' split, got rows from 'extract'"):
        select_l1_head(extract, extract, c_grid=(0.1,))
    summary = evaluate_head(best, make_rows("eval", seed=3), n_boot=100)
    assert summary["accuracy"]["n"] == 180 and summary["accuracy"]["rate"] > 0.9
    lo, hi = summary["macro_f1"]["ci"]
    assert lo <= summary["macro_f1"]["value"] <= hi


def test_contrast_option_and_ovr_heads():
    rows = make_rows("extract", n_per_class=20, n_contrast=10, seed=4)
    kept = fit_l1_head(rows, C=0.1)
    dropped = fit_l1_head(rows, C=0.1, contrast_as="drop")
    assert kept.meta["class_counts"][0] == 30 and dropped.meta["class_counts"][0] == 20
    heads = fit_ovr_heads(rows, C=0.1, categories=("safety",))
    h = heads["safety"]
    assert h.classes == ("rest", "safety") and np.all(h.coef[0] == 0)
    assert set(np.argsort(-h.coef[1])[:5].tolist()) == informative(PROBE_CLASSES.index("safety"))
