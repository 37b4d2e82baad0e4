import json

import numpy as np
import pytest

from tests.helpers.probes_synth import informative, make_rows
from activations.records import PROBE_CLASSES
from probes.heads import evaluate_head, fit_l1_head
from probes.rows import LabelledRows
from probes.selection import activation_frequency, stability_selection, top_k_features, write_features_json


def test_stability_frequencies_in_unit_interval_and_planted_feature_stable():
    rows = make_rows("extract", n_per_class=20, seed=0)
    result = stability_selection(rows, C=1.0, n_bootstrap=4, threshold=0.75, seed=1)
    assert result.frequency.shape == (6, 40) and result.n_fits == 4
    assert np.all((result.frequency >= 0) & (result.frequency <= 1))
    selected = result.selections()
    for k, name in enumerate(PROBE_CLASSES):
        block = result.frequency[k, sorted(informative(k))]
        # L1 may drop some of 5 redundant planted features in a resample, but most are always kept
        assert (block == 1.0).sum() >= 3 and block.min() >= 0.5
        ids = selected[name].feature_ids.tolist()
        assert set(ids) <= informative(k) and len(ids) >= 3
        assert np.all(selected[name].frequency >= 0.75)
        assert np.all(np.diff(selected[name].frequency) <= 0)  # best first
    assert result.frequency[:, 30:].max() < 0.5  # noise features rarely selected


def test_stability_over_several_matrices_and_split_check():
    a = make_rows("extract", n_per_class=15, seed=0)
    b = make_rows("extract", n_per_class=15, seed=5)
    result = stability_selection([a, b], C=0.1, n_bootstrap=2, top_k=5, seed=0)
    assert result.n_fits == 4 and result.meta["n_matrices"] == 2
    assert np.all(result.frequency.sum(axis=1) <= 5 + 1e-12)  # at most top_k per fit
    with pytest.raises(ValueError, match="'extract' split"):
        stability_selection(make_rows("eval", n_per_class=5), C=0.1, n_bootstrap=1)
    with pytest.raises(ValueError, match="columns"):
        stability_selection([a, a.with_features(a.features[:, :30])], C=0.1, n_bootstrap=1)


def test_activation_frequency_handmade():
    x = np.array([[1.0, 0.0], [0.2, 0.0], [0.0, 2.0], [0.0, 0.0]])
    rows = LabelledRows(x, np.array(["benign", "benign", "safety", "safety"]), np.array(["extract"] * 4),
                        np.array(list("abcd")))
    freq = activation_frequency(rows, tau=0.5)
    np.testing.assert_array_equal(freq["benign"], [0.5, 0.0])
    np.testing.assert_array_equal(freq["safety"], [0.0, 0.5])
    assert set(freq) == {"benign", "safety"}


def test_write_features_json(tmp_path):
    rows = make_rows("extract", n_per_class=20, seed=0)
    head = fit_l1_head(rows, C=0.1)
    summary = evaluate_head(head, make_rows("eval", n_per_class=10, seed=9), n_boot=50)
    path = tmp_path / "sel" / "features.json"
    write_features_json(str(path), top_k_features(head, 3), activation_frequency(rows, tau=1.0), summary,
                        {"layer": 3, "space": "residual", "tau": 1.0, "splits": head.meta["splits"]})
    data = json.loads(path.read_text())
    assert data["classes"] == list(PROBE_CLASSES)
    safety = data["per_class"]["safety"]
    assert len(safety["feature_ids"]) == 3 and set(safety["feature_ids"]) <= informative(4)
    assert safety["selection_frequency"] is None
    assert len(safety["activation_frequency"]["safety"]) == 3
    assert np.mean(safety["activation_frequency"]["safety"]) > np.mean(safety["activation_frequency"]["benign"])
    acc = data["probe_eval"]["accuracy"]
    assert acc["n"] == 60 and acc["ci"][0] <= acc["rate"] <= acc["ci"][1]
    assert not list(path.parent.glob(".*tmp"))  # no temp files left
    assert data["meta"]["splits"]["extract"]["n_rows"] == 120
    with pytest.raises(ValueError, match="'splits'"):
        write_features_json(str(path), top_k_features(head, 3), {}, None, {"layer": 3})


def test_dense_features_are_flagged_not_presented_as_category_features(tmp_path):
    import json

    from probes.selection import ClassSelection, dense_everywhere, split_dense, write_features_json

    freq = {"benign": np.array([1.0, 0.0, 0.3, 0.05]), "safety": np.array([1.0, 0.9, 0.2, 0.5])}
    dense = dense_everywhere(freq, 0.1)
    np.testing.assert_array_equal(dense, [True, False, True, False])  # > 10% of every category's rows
    selections = {"safety": ClassSelection(np.array([0, 1, 2]), np.array([0.9, 0.5, 0.1]), np.array([1.0, 0.8, 0.6]))}
    kept, flagged = split_dense(selections, dense)
    np.testing.assert_array_equal(kept["safety"].feature_ids, [1])
    np.testing.assert_array_equal(flagged["safety"].feature_ids, [0, 2])
    write_features_json(str(tmp_path / "features.json"), kept, freq, None, {"splits": {}}, flagged)
    data = json.loads((tmp_path / "features.json").read_text())
    assert data["per_class"]["safety"]["feature_ids"] == [1]
    assert data["per_class"]["safety"]["dense_features"]["feature_ids"] == [0, 2]
    assert data["per_class"]["safety"]["dense_features"]["activation_frequency"]["benign"] == [1.0, 0.3]
