"""Fitting gates on extract rows and tuning their thresholds / strengths on calibrate rows.

The distance-gate tuner is objective-agnostic: it receives `outcome(decisions) -> (over_refusal_rate,
harmful_refusal_rate)` computed by the caller (who may run the model under the steering the decisions
ask for). It picks, among grid points whose harmful refusal stays >= the unsteered baseline (minus
`tolerance`), the one with the lowest over-refusal (ties: higher harmful refusal, then grid order).
`proxy_outcome` is a cheap stand-in that predicts refusal from the decision itself.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from probes.gates import NONE, DistanceGate, GateDecision, ProbeGate
from probes.heads import HeadResult
from probes.metrics import best_threshold
from probes.rows import LabelledRows, category_mean, require_split

Outcome = Callable[[list[GateDecision]], tuple[float, float]]
"""decisions for the calibrate rows -> (over-refusal rate on benign+contrast, refusal rate on refusal rows)."""


def fit_distance_gate(rows: LabelledRows, categories: Sequence[str] = REFUSAL_CATEGORIES, **params: Any) -> DistanceGate:
    """Distance gate with benign and per-category means (float64) from extract rows."""
    require_split(rows.splits, "extract", "distance gate means")
    means = {c: category_mean(rows, c) for c in categories}
    meta = {"splits": rows.provenance(), **params.pop("meta", {})}
    return DistanceGate(category_mean(rows, BENIGN), means, meta=meta, **params)


def proxy_outcome(categories: np.ndarray, baseline_refused: np.ndarray | None = None,
                  min_strength: float = 0.0) -> Outcome:
    """Cheap outcome for tests and dry runs: a row is refused when the gate says "toward" with strength
    > min_strength, not refused when it says "away" with strength > min_strength, and otherwise keeps
    `baseline_refused[row]` (default: nobody refuses unsteered).

    `categories` (n,) are the calibrate labels; they are read here, by the objective, never by the gate.
    """
    cats = np.asarray(categories).astype(str)
    base = np.zeros(cats.shape[0], dtype=bool) if baseline_refused is None else np.asarray(baseline_refused, dtype=bool)
    if base.shape != cats.shape:
        raise ValueError(f"baseline_refused has shape {base.shape}, categories {cats.shape}")
    over_mask = np.isin(cats, [BENIGN, CONTRAST])
    harm_mask = np.isin(cats, list(REFUSAL_CATEGORIES))
    if not over_mask.any() or not harm_mask.any():
        raise ValueError("proxy outcome needs both benign/contrast rows and refusal-category rows")

    def outcome(decisions: list[GateDecision]) -> tuple[float, float]:
        if len(decisions) != cats.shape[0]:
            raise ValueError(f"outcome got {len(decisions)} decisions for {cats.shape[0]} rows")
        refused = base.copy()
        for d in decisions:
            if d.strength > min_strength and d.direction != NONE:
                refused[d.row] = d.direction == "toward"
        return float(refused[over_mask].mean()), float(refused[harm_mask].mean())

    return outcome


@dataclass(frozen=True)
class DistanceGrid:
    """Grid of distance-gate settings; t_low > t_high pairs are skipped."""

    t_low: Sequence[float] = (0.35, 0.4, 0.45, 0.5)
    t_high: Sequence[float] = (0.5, 0.55, 0.6, 0.65)
    alpha_toward: Sequence[float] = (0.5, 1.0, 2.0)
    alpha_away: Sequence[float] = (0.5, 1.0, 2.0)
    partial: Sequence[str | float] = ("interpolate", 0.0)

    def points(self) -> list[dict[str, Any]]:
        combos = itertools.product(self.t_low, self.t_high, self.alpha_toward, self.alpha_away, self.partial)
        return [dict(t_low=a, t_high=b, alpha_toward=c, alpha_away=d, partial=e)
                for a, b, c, d, e in combos if a <= b]


@dataclass
class TuningReport:
    """Baseline (unsteered) and per-grid-point outcomes on calibrate, and the chosen point."""

    baseline: dict[str, float]
    chosen: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "chosen": self.chosen, "table": self.table}


def _no_op_decisions(gate: DistanceGate, scores: np.ndarray) -> list[GateDecision]:
    return [GateDecision(i, NONE, NONE, 0.0, {c: float(v) for c, v in zip(gate.categories, row)}, {})
            for i, row in enumerate(scores)]


def tune_distance_gate(
    gate: DistanceGate,
    calibrate: LabelledRows,
    outcome: Outcome | None = None,
    grid: DistanceGrid = DistanceGrid(),
    tolerance: float = 0.0,
) -> tuple[DistanceGate, TuningReport]:
    """Grid-search thresholds and strengths of a fitted gate on calibrate rows (means unchanged).

    `outcome` defaults to `proxy_outcome(calibrate.categories)`. Returns a new gate and the report.
    """
    require_split(calibrate.splits, "calibrate", "distance gate thresholds")
    outcome = outcome or proxy_outcome(calibrate.categories)
    scores = gate.scores(calibrate.features)  # thresholds do not change scores: compute once
    base_over, base_harm = outcome(_no_op_decisions(gate, scores))
    best_key, best_point, table = None, None, []
    for point in grid.points():
        over, harm = outcome(replace(gate, **point).decisions_from_scores(scores))
        feasible = harm >= base_harm - tolerance
        table.append({**point, "over_refusal": over, "harmful_refusal": harm, "feasible": feasible})
        key = (over, -harm)
        if feasible and (best_key is None or key < best_key):
            best_key, best_point = key, {**point, "over_refusal": over, "harmful_refusal": harm}
    if best_point is None:
        raise ValueError(f"no grid point keeps harmful refusal >= baseline {base_harm:.3f} - {tolerance}; widen the grid")
    settings = {k: best_point[k] for k in ("t_low", "t_high", "alpha_toward", "alpha_away", "partial")}
    report = TuningReport({"over_refusal": base_over, "harmful_refusal": base_harm}, best_point, table)
    meta = {**gate.meta, "tuning": {"calibrate": calibrate.provenance().get("calibrate", {}),
                                    "baseline": report.baseline, "chosen": best_point,
                                    "grid_size": len(table), "tolerance": tolerance}}
    return replace(gate, **settings, meta=meta), report


def tune_probe_gate(
    head: HeadResult,
    calibrate: LabelledRows,
    criterion: str = "f1",
    categories: Sequence[str] = REFUSAL_CATEGORIES,
    alpha_toward: float = 1.0,
    alpha_away: float = 0.0,
) -> ProbeGate:
    """Per-category thresholds on head probabilities chosen on calibrate rows (max F1 or Youden's J)."""
    require_split(calibrate.splits, "calibrate", "probe gate thresholds")
    missing = [c for c in categories if c not in head.classes]
    if missing:
        raise ValueError(f"head has no class for categories {missing}")
    probs = head.predict_proba(calibrate.features)
    thresholds, values = {}, {}
    for c in categories:
        truth = calibrate.categories == c
        if not truth.any():
            raise ValueError(f"category {c!r} has no calibrate rows to tune its threshold")
        thresholds[c], values[c] = best_threshold(probs[:, head.classes.index(c)], truth, criterion)
    meta = {"criterion": criterion, "criterion_values": values,
            "calibrate": calibrate.provenance().get("calibrate", {}), "head_meta": head.meta.get("splits", {})}
    return ProbeGate(head, thresholds, alpha_toward, alpha_away, meta)
