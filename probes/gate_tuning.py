"""Fitting gates on extract rows and tuning their thresholds / strengths on calibrate rows.

The distance-gate tuner is objective-agnostic: it receives `outcome(decisions) -> (over_refusal_rate,
harmful_refusal_rate)` computed by the caller (who may run the model under the steering the decisions
ask for). It picks, among grid points whose harmful refusal stays >= the unsteered baseline (minus
`tolerance`), the one with the lowest over-refusal (ties: higher harmful refusal, then fewer steered
rows, then grid order), and reports the grid's over-refusal / harmful-refusal frontier.
`quantile_grid` puts the thresholds at quantiles of the calibrate scores (so each one splits the rows);
`score_distribution` says, per category, where the scores lie (why a gate may do nothing).
`proxy_outcome` is a cheap stand-in that predicts refusal from the decision itself.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.stats import auc
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


def quantile_grid(gate: DistanceGate, calibrate: LabelledRows, quantiles: Sequence[float],
                  alpha_toward: Sequence[float], alpha_away: Sequence[float],
                  partial: Sequence[str | float] = (0.0,)) -> DistanceGrid:
    """A grid whose thresholds sit at `quantiles` of the gate's top score s = max_c s_c on the calibrate
    rows, so every threshold splits the rows it is tuned on (a fixed grid like 0.45 / 0.55 may lie
    outside the scores and change nothing). t_low also takes 0 (never steer away) and t_high 1 (never
    steer toward), so the grid holds the one-sided gates and the no-op gate (t_low 0, t_high 1)."""
    require_split(calibrate.splits, "calibrate", "distance gate thresholds")
    q = np.asarray(list(quantiles), dtype=np.float64)
    if q.size == 0 or np.any((q <= 0) | (q >= 1)):
        raise ValueError(f"quantiles must lie strictly between 0 and 1, got {list(quantiles)}")
    top = gate.scores(calibrate.features).max(axis=1)
    cuts = sorted({round(float(v), 6) for v in np.quantile(top, q)})
    return DistanceGrid(t_low=(0.0, *cuts), t_high=(*cuts, 1.0), alpha_toward=tuple(alpha_toward),
                        alpha_away=tuple(alpha_away), partial=tuple(partial))


def pareto_frontier(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid points no other point beats on both rates (lower over-refusal, higher harmful refusal),
    by increasing over-refusal; of equal points the first in grid order is kept."""
    kept: list[dict[str, Any]] = []
    for point in sorted(table, key=lambda p: (p["over_refusal"], -p["harmful_refusal"])):
        if not kept or point["harmful_refusal"] > kept[-1]["harmful_refusal"]:
            kept.append(point)
    return kept


def score_distribution(gate: DistanceGate, rows: LabelledRows,
                       quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, Any]:
    """Per category of `rows`: n, mean and quantiles of the gate's top score s (labels are read here, for
    the report, never by the gate); plus `auc_refusal_vs_benign`, the probability that a refusal-category
    row scores above a benign or contrast row (0.5 = the score cannot tell them apart)."""
    top = gate.scores(rows.features).max(axis=1)
    cats = np.asarray(rows.categories).astype(str)
    out: dict[str, Any] = {"per_category": {}}
    for c in [c for c in (BENIGN, *REFUSAL_CATEGORIES, CONTRAST) if np.any(cats == c)]:
        values = top[cats == c]
        out["per_category"][c] = {"n": int(values.size), "mean": float(values.mean()),
                                  "quantiles": {f"{q:g}": float(v) for q, v in zip(quantiles, np.quantile(values, quantiles))}}
    refusal, over = top[np.isin(cats, REFUSAL_CATEGORIES)], top[np.isin(cats, [BENIGN, CONTRAST])]
    out["auc_refusal_vs_benign"] = auc(refusal, over) if refusal.size and over.size else None
    return out


@dataclass
class TuningReport:
    """Baseline (unsteered) and per-grid-point outcomes on calibrate, the chosen point, and the
    over-refusal / harmful-refusal frontier of the grid (`pareto_frontier`)."""

    baseline: dict[str, float]
    chosen: dict[str, Any]
    table: list[dict[str, Any]] = field(default_factory=list)

    @property
    def frontier(self) -> list[dict[str, Any]]:
        return pareto_frontier(self.table)

    @property
    def chosen_is_noop(self) -> bool:
        """True when the chosen point steers no calibrate row (its rates equal the baseline's and it
        never crosses a threshold: t_low 0 and t_high 1, or no row beyond either)."""
        return bool(self.chosen.get("n_steered", 1) == 0)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "chosen": self.chosen, "chosen_is_noop": self.chosen_is_noop,
                "frontier": self.frontier, "table": self.table}


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
        decisions = replace(gate, **point).decisions_from_scores(scores)
        over, harm = outcome(decisions)
        feasible = harm >= base_harm - tolerance
        n_steered = sum(d.direction != NONE and d.strength > 0 for d in decisions)
        row = {**point, "over_refusal": over, "harmful_refusal": harm, "feasible": feasible, "n_steered": n_steered}
        table.append(row)
        key = (over, -harm, n_steered)  # ties: fewer steered rows (the simpler gate)
        if feasible and (best_key is None or key < best_key):
            best_key, best_point = key, {k: v for k, v in row.items() if k != "feasible"}
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
