import inspect
import json

import numpy as np
import pytest

from tests.helpers.probes_synth import make_rows
from activations.records import REFUSAL_CATEGORIES
from probes.gate_tuning import DistanceGrid, fit_distance_gate, proxy_outcome, tune_distance_gate, tune_probe_gate
from probes.gates import DistanceGate, Gate, GateDecision, ProbeGate, load_gate
from probes.heads import fit_l1_head

SMALL_GRID = DistanceGrid(t_low=(0.4, 0.5), t_high=(0.5, 0.6), alpha_toward=(1.0, 2.0), alpha_away=(1.0,),
                          partial=("interpolate", 0.0))


@pytest.fixture(scope="module")
def splits():
    return {s: make_rows(s, n_per_class=15, n_contrast=15, seed=i) for i, s in enumerate(("extract", "calibrate", "eval"))}


def _baseline_refused(rows):
    """Unsteered model: refuses every refusal-category row and every contrast row (over-refusal)."""
    return np.isin(rows.categories, list(REFUSAL_CATEGORIES) + ["contrast"])


@pytest.fixture(scope="module")
def tuned_distance(splits):
    gate = fit_distance_gate(splits["extract"])
    cal = splits["calibrate"]
    return tune_distance_gate(gate, cal, proxy_outcome(cal.categories, _baseline_refused(cal)), SMALL_GRID)


def test_gates_never_take_labels():
    for cls in (DistanceGate, ProbeGate):
        assert list(inspect.signature(cls.decide).parameters) == ["self", "features"]


def test_distance_gate_fit_and_tune_use_their_splits(splits):
    with pytest.raises(ValueError, match="'extract' split, got rows from 'calibrate'"):
        fit_distance_gate(splits["calibrate"])
    gate = fit_distance_gate(splits["extract"])
    with pytest.raises(ValueError, match="'calibrate' split, got rows from 'eval'"):
        tune_distance_gate(gate, splits["eval"])
    np.testing.assert_allclose(gate.category_means["safety"],
                               splits["extract"].features[splits["extract"].categories == "safety"].astype(np.float64).mean(0),
                               rtol=1e-12)


def test_distance_tuning_lowers_over_refusal_and_keeps_harmful(tuned_distance):
    gate, report = tuned_distance
    assert report.baseline == {"over_refusal": 0.5, "harmful_refusal": 1.0}  # contrast refused, benign not
    assert report.chosen["harmful_refusal"] >= report.baseline["harmful_refusal"]
    assert report.chosen["over_refusal"] < report.baseline["over_refusal"]
    feasible = [r["over_refusal"] for r in report.table if r["feasible"]]
    assert report.chosen["over_refusal"] == min(feasible)
    assert len(report.table) == len(SMALL_GRID.points())
    assert (gate.t_low, gate.t_high) == (report.chosen["t_low"], report.chosen["t_high"])
    assert gate.meta["tuning"]["calibrate"]["n_rows"] == 105  # 6 classes x 15 + 15 contrast


def test_distance_gate_applied_to_eval_unchanged_and_respects_thresholds(tuned_distance, splits, tmp_path):
    gate, _ = tuned_distance
    before = json.dumps(gate.to_json(), sort_keys=True)
    ev = splits["eval"]
    decisions = gate.decide(ev.features)
    assert json.dumps(gate.to_json(), sort_keys=True) == before
    assert [d.row for d in decisions] == list(range(ev.n))
    for d in decisions:
        s = max(d.scores.values())
        assert d.thresholds == {"t_low": gate.t_low, "t_high": gate.t_high}
        if s >= gate.t_high:
            assert (d.direction, d.strength) == ("toward", gate.alpha_toward)
            assert d.category == max(d.scores, key=d.scores.get)
        elif s <= gate.t_low:
            assert (d.direction, d.strength) == ("away", gate.alpha_away)
        else:
            assert d.signed_strength == pytest.approx(gate.coefficient(s))
    # saved and reloaded: same parameters and decisions
    gate.save(tmp_path / "gate.json")
    loaded = load_gate(tmp_path / "gate.json")
    assert isinstance(loaded, DistanceGate) and json.dumps(loaded.to_json(), sort_keys=True) == before
    assert [d.to_dict() for d in loaded.decide(ev.features)] == [d.to_dict() for d in decisions]
    # refusal rows mostly steered toward their own category, benign/contrast rows away
    refusal = np.isin(ev.categories, list(REFUSAL_CATEGORIES))
    toward_own = [d.direction == "toward" and d.category == c for d, c in zip(decisions, ev.categories)]
    assert np.mean(np.array(toward_own)[refusal]) > 0.8
    assert np.mean([d.direction == "away" for d, r in zip(decisions, refusal) if not r]) > 0.8


def test_distance_interpolation_and_constant_partial():
    gate = DistanceGate(np.zeros(2), {"safety": np.ones(2)}, t_low=0.4, t_high=0.6, alpha_toward=2.0, alpha_away=1.0)
    assert gate.coefficient(0.5) == pytest.approx(0.5)  # -1 + 0.5 * 3
    assert gate.coefficient(0.7) == 2.0 and gate.coefficient(0.3) == -1.0
    const = DistanceGate(np.zeros(2), {"safety": np.ones(2)}, t_low=0.4, t_high=0.6, partial=0.25)
    assert const.coefficient(0.5) == 0.25
    d = gate.decide(np.array([[0.5, 0.5]]))[0]  # equidistant: s = 0.5
    assert d.scores["safety"] == pytest.approx(0.5) and d.direction == "toward" and d.strength == pytest.approx(0.5)
    with pytest.raises(ValueError, match="t_low <= t_high"):
        DistanceGate(np.zeros(2), {"safety": np.ones(2)}, t_low=0.7, t_high=0.6)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        gate.decide(np.zeros((1, 3)))


def test_tuner_uses_the_pluggable_outcome(splits):
    gate = fit_distance_gate(splits["extract"])
    calls = []

    def outcome(decisions: list[GateDecision]):
        calls.append(decisions)
        toward = np.mean([d.direction == "toward" for d in decisions])
        return 1.0 - toward, 0.5  # pretend: more "toward" = less over-refusal, harm constant
    tuned, report = tune_distance_gate(gate, splits["calibrate"], outcome, SMALL_GRID)
    assert len(calls) == len(SMALL_GRID.points()) + 1  # + the unsteered baseline
    assert all(d.direction == "none" for d in calls[0])
    assert report.chosen["over_refusal"] == min(r["over_refusal"] for r in report.table)
    with pytest.raises(ValueError, match="no grid point"):
        tune_distance_gate(gate, splits["calibrate"], lambda ds: (0.0, 1.0 if ds[0].direction == "none" else 0.0),
                           SMALL_GRID)


def test_probe_gate_tuned_on_calibrate_applied_to_eval(splits, tmp_path):
    head = fit_l1_head(splits["extract"], C=0.1)
    with pytest.raises(ValueError, match="'calibrate' split, got rows from 'extract'"):
        tune_probe_gate(head, splits["extract"])
    gate = tune_probe_gate(head, splits["calibrate"], criterion="f1")
    assert set(gate.thresholds) == set(REFUSAL_CATEGORIES)
    assert all(0.0 <= t <= 1.0 for t in gate.thresholds.values())
    before = json.dumps(gate.to_json(), sort_keys=True)
    ev = splits["eval"]
    decisions = gate.decide(ev.features)
    assert json.dumps(gate.to_json(), sort_keys=True) == before
    for d in decisions:
        margins = {c: d.scores[c] - d.thresholds[c] for c in d.scores}
        if d.category == "none":
            assert d.direction == "none" and d.strength == 0.0 and all(m < 0 for m in margins.values())
        else:
            assert d.direction == "toward" and margins[d.category] >= 0
            assert margins[d.category] == max(margins.values())
    hits = [d.category == c for d, c in zip(decisions, ev.categories) if c in REFUSAL_CATEGORIES]
    assert np.mean(hits) > 0.8
    gate.save(tmp_path / "probe_gate.json")
    loaded = load_gate(tmp_path / "probe_gate.json")
    assert isinstance(loaded, ProbeGate)
    assert [d.to_dict() for d in loaded.decide(ev.features)] == [d.to_dict() for d in decisions]
    youden = tune_probe_gate(head, splits["calibrate"], criterion="youden", alpha_away=0.5)
    assert {d.direction for d in youden.decide(ev.features)} <= {"toward", "away"}


def test_unknown_gate_kind():
    with pytest.raises(ValueError, match="unknown gate kind 'magic'"):
        Gate.from_json({"kind": "magic"})


def test_quantile_grid_thresholds_split_the_calibrate_scores(splits):
    from probes.gate_tuning import pareto_frontier, quantile_grid, score_distribution

    gate = fit_distance_gate(splits["extract"])
    cal = splits["calibrate"]
    top = gate.scores(cal.features).max(axis=1)
    grid = quantile_grid(gate, cal, (0.25, 0.5, 0.75), alpha_toward=(1.0,), alpha_away=(1.0,))
    cuts = grid.t_low[1:]
    assert grid.t_low[0] == 0.0 and grid.t_high[-1] == 1.0 and grid.t_high[:-1] == cuts
    assert all(top.min() < t < top.max() for t in cuts)  # inside the scores: each one moves rows
    steered = {len([d for d in replace_gate(gate, p).decide(cal.features) if d.direction != "none"])
               for p in grid.points()}
    assert 0 in steered and len(steered) >= 4  # the no-op point, and points that steer different rows
    baseline = _baseline_refused(cal)
    tuned, report = tune_distance_gate(gate, cal, proxy_outcome(cal.categories, baseline), grid, tolerance=0.02)
    assert report.chosen["over_refusal"] < report.baseline["over_refusal"] and not report.chosen_is_noop
    front = report.frontier
    assert front == pareto_frontier(report.table) and front
    assert all(a["over_refusal"] < b["over_refusal"] and a["harmful_refusal"] < b["harmful_refusal"]
               for a, b in zip(front, front[1:]))
    for p in report.table:  # every grid point is matched or beaten by a frontier point
        assert any(f["over_refusal"] <= p["over_refusal"] and f["harmful_refusal"] >= p["harmful_refusal"] for f in front)
    # when steering only ever hurts, the tuner keeps the gate that does nothing, and says so
    hurt = lambda ds: (0.5 + 0.1 * any(d.direction != "none" for d in ds), 1.0)  # noqa: E731
    _, noop = tune_distance_gate(gate, cal, hurt, grid)
    assert noop.chosen_is_noop and (noop.chosen["t_low"], noop.chosen["t_high"]) == (0.0, 1.0)
    dist = score_distribution(gate, cal)
    assert dist["auc_refusal_vs_benign"] > 0.8  # the synthetic categories separate
    assert set(dist["per_category"]) == set(np.unique(cal.categories))
    q = dist["per_category"]["safety"]["quantiles"]
    assert q["0.05"] <= q["0.5"] <= q["0.95"]
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        quantile_grid(gate, cal, (0.0, 0.5), (1.0,), (1.0,))


def replace_gate(gate, point):
    from dataclasses import replace

    return replace(gate, **point)
