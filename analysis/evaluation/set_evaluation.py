"""One set of prompts under every condition: refusal tables, paired tests, the strength sweep, the
gating frontier and what the gates decided. The evaluate stage runs it on the eval split and on each
held-out benchmark set; `refusal-sae steer --run` runs it on new prompts against a finished run.

    found = evaluate_set(suite, records, alphas=[2, 4, 8], tolerance=0.02)
    found.payload["refusal"]["conditional_probe"]["over_refusal"]    # {rate, ci, n}
    found.payload["frontier"]["verdict"]                             # the gating goal, in words
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.records import CATEGORIES, PromptRecord
from analysis.evaluation.conditions import refusal_table
from analysis.evaluation.frontier import gating_frontier
from analysis.evaluation.refusal import RefusalResult, compare_conditions
from analysis.evaluation.suite import (
    ConditionSuite,
    RowInputs,
    decision_counts,
    refusal_under_conditions,
    strength_sweep,
)
from probes.gate_tuning import score_distribution
from probes.gates import DistanceGate
from probes.rows import LabelledRows


@dataclass
class SetEvaluation:
    """`results` (condition -> per-row results), `decisions` (gate -> per-row decisions), `inputs`
    (the gate inputs) and `payload` (the JSON-ready summary, see `evaluate_set`)."""

    results: dict[str, list[RefusalResult]]
    decisions: dict[str, list]
    inputs: RowInputs
    payload: dict[str, Any]


def evaluate_set(suite: ConditionSuite, records: Sequence[PromptRecord], alphas: Sequence[float],
                 tolerance: float = 0.02, features: np.ndarray | None = None,
                 distance_gate: DistanceGate | None = None) -> SetEvaluation:
    """Every condition on `records` (in the given order), plus the sweep over `alphas` and the frontier.

    `features` are the rows' last-token residuals when already at hand (the harvest store), else
    they are computed. With `distance_gate`, the payload adds where its scores lie per category.
    Payload keys: n, categories, refusal {condition: table}, paired_vs_baseline, sweep, frontier,
    gate_decisions {gate: counts}, [distance_scores].
    """
    records = list(records)
    inputs = suite.row_inputs([r.text for r in records], features=features)
    results, decisions = refusal_under_conditions(suite, records, inputs)
    sweep = strength_sweep(suite, records, alphas, results)
    tables = {name: refusal_table(found) for name, found in results.items()}
    paired = {name: compare_conditions(results["baseline"], found) for name, found in results.items() if name != "baseline"}
    counts = Counter(r.category for r in records)
    payload: dict[str, Any] = {
        "n": len(records), "categories": {c: counts[c] for c in CATEGORIES if counts[c]},
        "refusal": tables, "paired_vs_baseline": paired, "sweep": sweep,
        "frontier": gating_frontier(tables, sweep, list(suite.gates), tolerance, paired),
        "gate_decisions": {name: decision_counts(found) for name, found in decisions.items()},
    }
    if distance_gate is not None:
        rows = LabelledRows(inputs.features, np.array([r.category for r in records]),
                            np.array(["eval"] * len(records)), np.array([r.id for r in records]))
        payload["distance_scores"] = score_distribution(distance_gate, rows)
    return SetEvaluation(results, decisions, inputs, payload)
