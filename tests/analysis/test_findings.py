"""Findings: sentences written from structured comparisons quote exactly their numbers, and the report
shows them first, beside the ablation matrices, the McNemar p-values and the fixed tables."""
from __future__ import annotations

import re

import numpy as np
import pytest

from activations.records import PromptRecord
from activations.stats import paired_compare
from analysis.evaluation.ablation_matrix import effect_matrix, seed_averaged_matrix
from analysis.evaluation.refusal import RefusalResult
from analysis.reporting.findings import (
    Finding,
    build_findings,
    fmt_p,
    fmt_signed,
    paired_summary,
)
from analysis.reporting.report import ReportExtras, render_report
from tests.helpers.report_fixtures import synthetic_summary

CATS = ["benign"] * 20 + ["safety"] * 20 + ["humanizing"] * 20
NUMBER = r"[+−]\d\.\d\d"


def _results(refused: np.ndarray) -> list[RefusalResult]:
    return [RefusalResult(f"p{i}", c, "", bool(f), "token") for i, (c, f) in enumerate(zip(CATS, refused))]


def _ablation() -> tuple[dict, list[PromptRecord]]:
    """A two-seed feature-ablation experiment with controls, from made-up verdicts."""
    rng = np.random.default_rng(0)
    records = [PromptRecord(f"p{i}", "t", c) for i, c in enumerate(CATS)]
    base = np.array([c != "benign" for c in CATS])
    conds, ctls = {}, {}
    for seed in (0, 1):
        ablated = base & (rng.random(60) < 0.4 + 0.2 * seed)  # removes most safety/humanizing refusal
        conds[seed] = {"safety": _results(ablated), "humanizing": _results(base & (rng.random(60) < 0.9))}
        ctls[seed] = {row: [_results(base & (rng.random(60) < 0.95)) for _ in range(5)] for row in conds[seed]}
    baseline = _results(base)
    averaged = seed_averaged_matrix(records, baseline, conds, ctls)
    per_seed = {str(s): {"matrix": effect_matrix(records, baseline, conds[s], ctls[s])} for s in conds}
    return {"positions": "response_start", "features": "selected", "control_draws": 5, "control_seeds": "all",
            "feature_ablation": {"per_seed": per_seed, "averaged": averaged}}, records


def _numbers(sentence: str) -> list[float]:
    return [float(x.replace("−", "-")) for x in re.findall(NUMBER, sentence)]


def test_sentences_quote_the_numbers_of_their_finding():
    ablation, _ = _ablation()
    before = np.array([True] * 10 + [False] * 30)
    after = np.array([True] * 3 + [False] * 37)
    paired = {"steer_away": {"over_refusal": {"all": paired_compare(before, after)}, "category": {}}}
    summary = {"ablation": ablation, "paired_vs_baseline": paired_summary(paired),
               "eval_sets": {"xstest": {"paired_vs_baseline": paired_summary(paired)}}}
    findings = build_findings(summary)
    assert [f.topic for f in findings] == ["feature ablation", "feature ablation", "condition vs baseline (eval split)",
                                           "condition vs baseline (held-out: xstest)"]
    for f in findings:
        text = f.sentence()
        quoted = _numbers(text)
        expected = [f.effect, *f.ci] + ([] if f.vs_control is None else [f.vs_control, *f.control_ci])
        assert quoted == pytest.approx([round(v, 2) for v in expected], abs=1e-9), text
        assert f"{'largest per-seed ' if f.n_seeds > 1 else ''}McNemar p = {fmt_p(f.p_value)}" in text
        assert f"n={f.n}" in text
        if f.beats_control is None:
            assert text.endswith("No random control.")
        else:
            assert ("does not beat its control" in text) == (not f.beats_control)
    # the structured values are the experiment's: seed-averaged diagonal cell and McNemar of the paired test
    cell = ablation["feature_ablation"]["averaged"]["safety"]["safety"]
    safety = next(f for f in findings if f.condition == "ablate the safety features at response_start positions")
    assert (safety.effect, safety.ci, safety.n_seeds) == (cell["effect"]["mean"], tuple(cell["effect"]["ci"]), 2)
    assert safety.p_value == max(cell["p_values"]) and safety.beats_control == cell["beats_control"]
    steer = findings[-2]
    assert steer.effect == pytest.approx(-7 / 40) and steer.p_value == paired["steer_away"]["over_refusal"]["all"]["p_value"]


def test_sentence_formats():
    f = Finding("t", "steer_toward", "over_refusal", 0.123, (-0.01, 0.25), 0.0004, 105, 1, -0.2, (-0.3, -0.1), True, "x")
    text = f.sentence()
    assert "+0.12 [−0.01, +0.25]" in text and "p = 4.0e-04" in text and "−0.20 [−0.30, −0.10], beats its control" in text
    assert fmt_signed(None) == "n/a" and fmt_p(0.25) == "0.25"
    assert f.to_dict()["sentence"] == text


def test_report_shows_findings_first_matrices_pvalues_and_fixed_tables():
    ablation, _ = _ablation()
    summary = synthetic_summary()
    summary["refusal"]["steer_lowrank"] = dict(summary["refusal"]["steer_toward"])
    before = np.array([True] * 10 + [False] * 30)
    summary["paired_vs_baseline"] = paired_summary(
        {"steer_toward": {"over_refusal": {"all": paired_compare(before, ~before)}, "category": {}}})
    summary["ablation"] = ablation
    summary["findings"] = [f.to_dict() for f in build_findings(summary)]
    summary["capability_readable"] = {t: {"readable": False, "chance": 0.25, "score": 0.3, "ci": [0.1, 0.5], "n": 20,
                                        "reason": "baseline CI reaches chance"} for t in summary["capability"]["baseline"]}
    extras = ReportExtras(per_category_vectors={"safety": {"refused (benign + contrast)": {"rate": 0.4, "ci": [0.3, 0.5], "n": 105},
                                                           "chose c (benign + contrast)": {"rate": 0.2, "ci": [0.1, 0.3], "n": 105}}})
    page = render_report(summary, extras)
    assert page.index('id="findings"') < page.index('id="splits"')  # Findings first
    for f in summary["findings"]:
        assert f["sentence"].replace("'", "&#x27;") in page
    assert 'id="paired"' in page and "p=" in page and 'id="ablation"' in page
    assert "seeds: " in page and ("beats control" in page or "not beyond control" in page)
    assert "exactly steer_toward&#x27;s rates" in page  # steer_lowrank identical to steer_toward: said so
    assert "UNREADABLE" in page
    assert "refusal rate on benign" not in page and "chose c (benign + contrast)" in page


def test_sae_dependent_conditions_are_quoted_averaged_over_seeds():
    """A condition with a seed-averaged change against the baseline is quoted from it (mean, across-seed CI,
    largest per-seed p, n_seeds), not from its reference seed's paired test; the sentence reads its numbers."""
    from analysis.evaluation.seed_conditions import seed_averaged

    rng = np.random.default_rng(4)
    records = [PromptRecord(f"p{i}", "t", c) for i, c in enumerate(CATS)]
    base = np.array([c != "benign" for c in CATS]) | (rng.random(60) < 0.2)
    per_seed = {s: _results(base & (rng.random(60) < 0.5 + 0.1 * s)) for s in (0, 1, 2)}
    seeded = seed_averaged(records, _results(base), {"conditional_probe": per_seed})
    reference = {"conditional_probe": {"over_refusal": {"all": paired_compare(base[:20], base[:20] & (rng.random(20) < 0.3))},
                                       "category": {}}}
    findings = build_findings({"paired_vs_baseline": paired_summary(reference), "seed_averaged": seeded,
                               "eval_sets": {"xstest": {"paired_vs_baseline": paired_summary(reference)}}})
    eval_split = [f for f in findings if f.topic == "condition vs baseline (eval split)"]
    assert [(f.condition, f.target) for f in eval_split] == [("conditional_probe", "over_refusal"),
                                                             ("conditional_probe", "harmful_refusal")]
    for f in eval_split:
        cell = seeded["vs_baseline"]["conditional_probe"][f.target]
        assert (f.effect, f.ci, f.n_seeds, f.n) == (cell["effect"]["mean"], tuple(cell["effect"]["ci"]), 3, cell["effect"]["n"])
        assert f.p_value == max(cell["p_values"])
        text = f.sentence()
        assert _numbers(text) == pytest.approx([round(v, 2) for v in (f.effect, *f.ci)], abs=1e-9), text
        assert "mean of 3 SAE seeds" in text and f"largest per-seed McNemar p = {fmt_p(f.p_value)}" in text
    held = [f for f in findings if f.topic.endswith("(held-out: xstest)")]  # no seed average there: the reference seed
    assert len(held) == 1 and held[0].n_seeds == 1
    assert held[0].effect == reference["conditional_probe"]["over_refusal"]["all"]["difference"]["estimate"]
