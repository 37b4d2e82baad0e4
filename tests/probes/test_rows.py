import numpy as np
import pytest

from activations.stats import bootstrap_ci_rows, wilson_ci
from probes.metrics import best_threshold, macro_f1
from probes.rows import LabelledRows, probe_targets, require_split, split_hash


def test_require_split_refuses_wrong_rows():
    require_split(np.array(["extract", "extract"]), "extract", "L1 head")
    with pytest.raises(ValueError, match=r"L1 head must be fitted on the 'extract' split, got rows from 'eval'"):
        require_split(np.array(["extract", "eval"]), "extract", "L1 head")
    with pytest.raises(ValueError, match="got no rows"):
        require_split(np.array([], dtype=str), "extract", "L1 head")
    with pytest.raises(ValueError, match="unknown split"):
        require_split(np.array(["extract"]), "train", "L1 head")


def test_split_hash_is_order_independent_and_content_sensitive():
    assert split_hash(["b", "a", "c"]) == split_hash(["c", "b", "a"])
    assert split_hash(["a", "b"]) != split_hash(["a", "b", "c"])
    assert len(split_hash(["a"])) == 64


def test_labelled_rows_validation():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown categories"):
        LabelledRows(x, np.array(["benign", "evil"]), np.array(["extract"] * 2), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="shape"):
        LabelledRows(x, np.array(["benign"]), np.array(["extract"] * 2), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="NaN"):
        LabelledRows(np.array([[np.nan, 0, 0], [0, 0, 0]]), np.array(["benign"] * 2),
                     np.array(["extract"] * 2), np.array(["a", "b"]))
    rows = LabelledRows(x, np.array(["benign", "safety"]), np.array(["extract", "eval"]), np.array(["a", "b"]))
    assert rows.only("eval").ids.tolist() == ["b"]
    assert set(rows.provenance()) == {"extract", "eval"}


def test_probe_targets_contrast_modes():
    cats = np.array(["benign", "contrast", "safety"])
    y, keep = probe_targets(cats)
    assert y.tolist() == [0, 0, 4] and keep.all()
    y, keep = probe_targets(cats, contrast_as="drop")
    assert y.tolist() == [0, 4] and keep.tolist() == [True, False, True]


def test_metrics_small_cases():
    lo, hi = wilson_ci(5, 10)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 1, 1]), 3) == 1.0  # absent class 2 ignored
    lo, hi = bootstrap_ci_rows(lambda idx: float(np.mean(np.arange(10)[idx])), 10, n_resamples=200)
    assert lo <= 4.5 <= hi
    t, f1 = best_threshold(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, True, False, False]))
    assert t == 0.8 and f1 == 1.0
    t, j = best_threshold(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False]), "youden")
    assert j == pytest.approx(0.5)
