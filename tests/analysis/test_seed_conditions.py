"""The SAE-dependent conditions under every SAE seed: per-seed probe gates, the pooled SAE-space vector,
one run per seed and condition, and the seed-averaged cells (activations.stats.seed_average)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from activations.records import PromptRecord
from activations.stats import seed_average
from analysis.evaluation import seed_conditions
from analysis.evaluation.ablation_matrix import seed_averaged_matrix
from analysis.evaluation.conditions import refusal_table
from analysis.evaluation.refusal import RefusalResult
from analysis.evaluation.seed_conditions import SeedConditions, pooled_sae_vector, refusal_by_seed, seed_averaged
from probes.gate_tuning import tune_probe_gate
from probes.gates import GateDecision
from probes.heads import fit_l1_head
from probes.latents import encode_latents
from probes.vectors import SteeringVector
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from tests.helpers.probes_synth import make_rows

CATS = ["benign"] * 12 + ["contrast"] * 4 + ["safety"] * 8 + ["humanizing"] * 8
RECORDS = [PromptRecord(f"p{i}", "t", c) for i, c in enumerate(CATS)]


def _results(flags) -> list[RefusalResult]:
    return [RefusalResult(r.id, r.category, "", bool(f), "token") for r, f in zip(RECORDS, flags)]


def test_per_seed_probe_gates_are_tuned_on_each_seeds_own_head_and_latents(tmp_path, monkeypatch):
    from analysis.stages import gates

    extract, calibrate = make_rows("extract", 20, seed=0), make_rows("calibrate", 20, seed=1)
    saes = {s: SparseAutoencoder(SAEConfig(d_in=extract.d, d_sae=48, k=12), seed=s).eval() for s in (3, 7)}
    heads = {}
    for s, sae in saes.items():
        heads[s] = fit_l1_head(extract.with_features(encode_latents(sae, extract.features)), C=0.3)
        heads[s].save(str(tmp_path / "sae" / f"seed_{s}" / "head"))
    monkeypatch.setattr(gates, "run_saes", lambda ctx: saes)
    monkeypatch.setattr(gates, "selection_dir", lambda ctx, space: tmp_path / space)
    found = gates.tune_probe_gates(None, calibrate, alpha=2.0)
    assert list(found) == [3, 7]
    for s, gate in found.items():
        expected = tune_probe_gate(heads[s], calibrate.with_features(encode_latents(saes[s], calibrate.features)),
                                   alpha_toward=2.0)
        assert gate.meta["sae_seed"] == s and gate.alpha_toward == 2.0
        assert gate.thresholds == expected.thresholds
        np.testing.assert_array_equal(gate.head.coef, heads[s].coef)  # its own head, not the reference seed's
    assert not np.array_equal(found[3].head.coef, found[7].head.coef)
    assert found[3].thresholds != found[7].thresholds


def test_gate_path_is_per_seed_for_the_probe_only(tmp_path):
    from analysis.stages import gates

    ctx = SimpleNamespace(stage_dir=lambda name: tmp_path / name)
    assert gates.gate_path(ctx, "probe").name == "probe.json"
    assert gates.gate_path(ctx, "probe", 2).name == "probe_seed_2.json"
    with pytest.raises(ValueError, match="only the probe gate"):
        gates.gate_path(ctx, "distance", 2)


def _vector(values, n_rows: int) -> SteeringVector:
    return SteeringVector(torch.tensor(values, dtype=torch.float64), 3, {"n_rows": {"category": n_rows}})


def test_pooled_sae_vector_weights_categories_by_rows_and_matches_the_global_norm():
    vectors = {"safety": _vector([1.0, 0.0, 0.0], 30), "humanizing": _vector([0.0, 1.0, 0.0], 10)}
    v_global = np.array([0.0, 0.0, 10.0])
    own, info = pooled_sae_vector(vectors, v_global, norm="own")
    np.testing.assert_allclose(own, [0.75, 0.25, 0.0], rtol=1e-6)
    assert info["weights"] == {"safety": 0.75, "humanizing": 0.25}
    assert info["cosine_global"] == 0.0 and info["norm_global"] == 10.0
    assert info["norm_own"] == pytest.approx(np.hypot(0.75, 0.25))
    scaled, info = pooled_sae_vector(vectors, np.array([3.0, 4.0, 0.0]), norm="global")
    assert np.linalg.norm(scaled) == pytest.approx(5.0) and info["norm_used"] == pytest.approx(5.0)
    assert info["cosine_global"] == pytest.approx((0.75 * 3 + 0.25 * 4) / (5 * np.hypot(0.75, 0.25)))
    with pytest.raises(ValueError, match="no SAE-space vectors"):
        pooled_sae_vector({}, v_global)


def test_each_condition_runs_once_per_seed_and_reuses_the_reference_seed(monkeypatch):
    calls: list[str] = []
    rng = np.random.default_rng(0)

    def fake_run(setup, records, plan=None, context=None, progress=False, desc=""):
        calls.append(desc)
        return _results(rng.random(len(records)) < 0.5)

    def fake_gated(setup, records, plan, baseline, name, progress=True):
        calls.append(name)
        return _results(rng.random(len(records)) < 0.5)

    monkeypatch.setattr(seed_conditions, "run_refusal", fake_run)
    monkeypatch.setattr(seed_conditions, "gated_refusal", fake_gated)
    adapter = SimpleNamespace(d_model=3)
    suite = SimpleNamespace(setup=SimpleNamespace(adapter=adapter), alpha=1.0,
                            vectors={"global": np.ones(3, np.float32), "safety": np.ones(3, np.float32)})

    def gate(inputs):
        return [GateDecision(i, "safety", "toward", 1.0, {}, {}) for i in range(len(RECORDS))]

    def reference_gate(inputs):
        raise AssertionError("the reference seed's probe decisions come from the suite's run")

    seeds = {0: SeedConditions(reference_gate, np.ones(3, np.float32), lambda rows: None, 5),
             1: SeedConditions(gate, np.ones(3, np.float32), lambda rows: None, 6),
             2: SeedConditions(gate, None, lambda rows: None, 4)}  # seed 2: no SAE-space vector
    done = {name: _results(rng.random(len(RECORDS)) < 0.5)
            for name in ("baseline", "conditional_probe", "steer_sae", "ablate")}
    reference_decisions = [GateDecision(i, "unsupported", "toward", 1.0, {}, {}) for i in range(len(RECORDS))]
    by_seed, counts = refusal_by_seed(suite, seeds, 0, RECORDS, None, done, {"conditional_probe": reference_decisions})
    assert sorted(calls) == sorted(["conditional_probe (seed 1)", "conditional_probe (seed 2)",
                                    "condition steer_sae (seed 1)", "condition ablate (seed 1, 6 features)",
                                    "condition ablate (seed 2, 4 features)"])
    assert all(by_seed[c][0] is done[c] for c in ("conditional_probe", "steer_sae", "ablate"))
    assert sorted(by_seed["steer_sae"]) == [0, 1] and sorted(by_seed["ablate"]) == [0, 1, 2]
    assert counts["conditional_probe"][2] == {"toward:safety": len(RECORDS)}
    assert counts["conditional_probe"][0] == {"toward:unsupported": len(RECORDS)}


def test_seed_averaged_cells_are_seed_average_of_the_per_seed_verdicts():
    rng = np.random.default_rng(1)
    base = np.array([c in ("safety", "humanizing") for c in CATS]) | (rng.random(len(CATS)) < 0.1)
    per_seed = {s: _results(base & (rng.random(len(CATS)) < 0.4 + 0.2 * s)) for s in (0, 1, 2)}
    found = seed_averaged(RECORDS, _results(base), {"ablate": per_seed})
    for s in (0, 1, 2):
        assert found["by_seed"]["ablate"][str(s)] == refusal_table(per_seed[s])
    harmful = np.array([c in ("safety", "humanizing") for c in CATS])
    verdicts = np.stack([[r.refused for r in per_seed[s]] for s in (0, 1, 2)]).astype(float)
    cell = found["refusal"]["ablate"]["harmful_refusal"]
    expected = seed_average(verdicts[:, harmful], bounds=(0.0, 1.0))
    assert cell["mean"] == expected["mean"] and cell["ci"] == expected["ci"] and cell["seeds"] == ["0", "1", "2"]
    assert cell["per_seed"] == pytest.approx([found["by_seed"]["ablate"][str(s)]["harmful_refusal"]["rate"] for s in (0, 1, 2)])
    assert cell["ci"][0] <= cell["mean"] <= cell["ci"][1]
    assert found["vs_baseline"]["ablate"] == seed_averaged_matrix(RECORDS, _results(base), {s: {"ablate": per_seed[s]}
                                                                                            for s in per_seed})["ablate"]
    effect = found["vs_baseline"]["ablate"]["harmful_refusal"]["effect"]
    assert effect["mean"] == pytest.approx(np.mean(verdicts[:, harmful] - base[harmful]))
