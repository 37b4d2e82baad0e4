"""Ablation experiments with controls: category × category effect matrices, frequency-matched random
features, same-norm random directions, and the across-seed average of every cell.

A *matrix* has one row per intervened category c (c's selected SAE features zeroed, c's mean-difference
direction projected out, or the model steered toward c) and one column per target set (each category
present, `over_refusal` = benign + contrast, `harmful_refusal` = the refusal categories). A cell is the
paired change of that set's refusal rate against the unintervened baseline (Newcombe CI, exact
McNemar p) and, beside it, the same change under each random control draw and the selected-minus-
control difference with a two-level bootstrap CI over draws and prompts
(`activations.stats.control_difference`). The diagonal of a feature-ablation matrix is necessity,
the rest leakage. An ablation *beats its control* when the CI of selected − control lies below 0
(it removes more refusal than the random draws); steering (sufficiency) when it lies above 0.

    conditions, controls, drawn = run_feature_ablations(run, make, selected, log_density, n_draws=5)
    matrix = effect_matrix(records, baseline, conditions, controls, expect="decrease")
    matrix["safety"]["safety"]["vs_control"]   # {"estimate", "ci", ...}

`seed_averaged_matrix` averages the per-seed matrices of an SAE-dependent experiment with
`activations.stats.seed_average` (prompt and seed variance).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import numpy as np

from activations.records import (
    BENIGN,
    CATEGORIES,
    CONTRAST,
    REFUSAL_CATEGORIES,
    PromptRecord,
)
from activations.stats import control_difference, paired_compare, seed_average
from analysis.evaluation.refusal import RefusalResult

MakeContext = Callable[[np.ndarray], AbstractContextManager]
Expect = Literal["decrease", "increase"]
DEAD_LOG_DENSITY = -9.0
"""Features whose log10 firing density is at or below this never fire (SAELens writes log10(0 + 1e-10))."""


def target_masks(records: Sequence[PromptRecord]) -> dict[str, np.ndarray]:
    """The matrix's columns: `{target: (n,) bool}` for each category present (in `CATEGORIES` order),
    `over_refusal` (benign + contrast) and `harmful_refusal` (the refusal categories), when non-empty."""
    return category_masks([r.category for r in records])


def category_masks(categories: Sequence[str]) -> dict[str, np.ndarray]:
    """`target_masks` from the prompts' categories alone."""
    cats = np.asarray(categories)
    masks = {c: cats == c for c in CATEGORIES if (cats == c).any()}
    masks["over_refusal"] = np.isin(cats, [BENIGN, CONTRAST])
    masks["harmful_refusal"] = np.isin(cats, list(REFUSAL_CATEGORIES))
    return {k: v for k, v in masks.items() if v.any()}


def refused(results: Sequence[RefusalResult]) -> np.ndarray:
    """`(n,)` bool: the primary refusal verdict of each result."""
    return np.array([bool(r.refused) for r in results], dtype=bool)


def matched_controls(selected: Sequence[int], log_density: np.ndarray, n_draws: int, exclude: Sequence[int] = (),
                     seed: int = 0, pool: int = 10) -> list[list[int]]:
    """`n_draws` random feature sets, each as large as `selected` and matched to it in firing frequency.

    For every selected feature one stand-in is drawn uniformly from the `pool` live, not excluded
    features nearest to it in log10 firing density (`log_density (d_sae,)`, e.g. the SAE's
    sparsity.safetensors); a draw never repeats a feature. `exclude` (e.g. every category's selected
    features) and selected features never appear in a draw. Deterministic for a given `seed`.
    """
    density = np.asarray(log_density, dtype=np.float64)
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    banned = np.zeros(density.size, dtype=bool)
    banned[np.asarray(list(exclude) + list(selected), dtype=np.int64)] = True
    candidates = np.flatnonzero(~banned & (density > DEAD_LOG_DENSITY))
    if candidates.size < len(selected):
        raise ValueError(f"only {candidates.size} live unselected features to draw {len(selected)} controls from")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_draws):
        free = np.ones(candidates.size, dtype=bool)
        picked = []
        for f in selected:
            open_ = np.flatnonzero(free)
            nearest = open_[np.argsort(np.abs(density[candidates[open_]] - density[int(f)]), kind="stable")[:pool]]
            choice = int(rng.choice(nearest))
            free[choice] = False
            picked.append(int(candidates[choice]))
        draws.append(sorted(picked))
    return draws


def random_directions(reference: np.ndarray, n_draws: int, seed: int = 0) -> np.ndarray:
    """`(n_draws, d)` float32 Gaussian directions with the norm of `reference (d,)` (deterministic per seed)."""
    ref = np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n_draws, ref.size))
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True) * np.linalg.norm(ref)).astype(np.float32)


def _beats(ci: Sequence[float], expect: Expect) -> bool:
    return bool(ci[1] < 0) if expect == "decrease" else bool(ci[0] > 0)


def effect_cell(base: np.ndarray, cond: np.ndarray, controls: np.ndarray | None = None, expect: Expect = "decrease",
                n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One cell: `base`, `cond` `(n,)` bool refusals of the same prompts, `controls` `(n_draws, n)` or None.

    Keys: n, baseline / condition (rates), effect {estimate, ci} (Newcombe paired), p_value (exact
    McNemar); with controls also control {effect_mean, effect_draws, effect_spread [min, max]},
    vs_control {estimate, ci} (selected − control, two-level bootstrap) and beats_control.
    """
    paired = paired_compare(base, cond)
    cell: dict[str, Any] = {"n": paired["n"], "baseline": paired["before"], "condition": paired["after"],
                            "effect": paired["difference"], "p_value": paired["p_value"]}
    if controls is not None:
        ctl = np.asarray(controls, dtype=bool)
        draw_effects = ctl.mean(axis=1, dtype=np.float64) - base.mean(dtype=np.float64)
        diff = control_difference(cond, ctl, n_resamples=n_resamples, seed=seed)
        cell["control"] = {"effect_mean": float(draw_effects.mean()), "effect_draws": [float(v) for v in draw_effects],
                           "effect_spread": [float(draw_effects.min()), float(draw_effects.max())],
                           "p_values": [paired_compare(base, row)["p_value"] for row in ctl]}
        cell["vs_control"] = {"estimate": diff["estimate"], "ci": diff["ci"], "method": diff["method"]}
        cell["beats_control"] = _beats(diff["ci"], expect)
    return cell


def effect_matrix(records: Sequence[PromptRecord], baseline: Sequence[RefusalResult],
                  conditions: Mapping[str, Sequence[RefusalResult]],
                  controls: Mapping[str, Sequence[Sequence[RefusalResult]]] | None = None,
                  expect: Expect = "decrease", n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """`{row: {target: effect_cell}}` for every intervened row of `conditions` (see the module docstring)."""
    masks = target_masks(records)
    base = refused(baseline)
    out: dict[str, dict[str, Any]] = {}
    for row, results in conditions.items():
        cond = refused(results)
        ctl = None if not controls or row not in controls else np.stack([refused(r) for r in controls[row]])
        out[row] = {target: effect_cell(base[m], cond[m], None if ctl is None else ctl[:, m], expect, n_resamples, seed)
                    for target, m in masks.items()}
    return out


def seed_averaged_matrix(records: Sequence[PromptRecord], baseline: Sequence[RefusalResult],
                         conditions: Mapping[Any, Mapping[str, Sequence[RefusalResult]]],
                         controls: Mapping[Any, Mapping[str, Sequence[Sequence[RefusalResult]]]] | None = None,
                         expect: Expect = "decrease") -> dict[str, dict[str, Any]]:
    """Per cell, the across-seed mean of an SAE-dependent matrix: `conditions[seed][row]` are the results
    under that seed. Cell keys: effect and (when every seed has controls for the row) vs_control, each
    `seed_average` over the per-prompt values (after − before; selected − mean control), beats_control
    (from the averaged vs_control CI), p_values (the per-seed McNemar p), seeds."""
    masks = target_masks(records)
    base = refused(baseline).astype(np.float64)
    seeds = list(conditions)
    rows = [r for r in conditions[seeds[0]] if all(r in conditions[s] for s in seeds)]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[row] = {}
        conds = {s: refused(conditions[s][row]).astype(np.float64) for s in seeds}
        ctl_seeds = [s for s in seeds if controls and row in controls.get(s, {})]
        for target, m in masks.items():
            effect = np.stack([conds[s][m] - base[m] for s in seeds])
            cell: dict[str, Any] = {"effect": seed_average(effect, bounds=(-1.0, 1.0)), "seeds": [str(s) for s in seeds],
                                    "p_values": [paired_compare(base[m] > 0, conds[s][m] > 0)["p_value"] for s in seeds]}
            if ctl_seeds:
                vs = np.stack([conds[s][m] - np.stack([refused(r)[m] for r in controls[s][row]]).mean(axis=0)
                               for s in ctl_seeds])
                cell["vs_control"] = seed_average(vs, bounds=(-1.0, 1.0))
                cell["vs_control"]["seeds"] = [str(s) for s in ctl_seeds]
                cell["beats_control"] = _beats(cell["vs_control"]["ci"], expect)
            out[row][target] = cell
    return out


def run_feature_ablations(run: Callable[[MakeContext, str], list[RefusalResult]], make: Callable[[list[int]], MakeContext],
                          selected: Mapping[str, Sequence[int]], log_density: np.ndarray | None, n_draws: int,
                          exclude: Sequence[int] = (), seed: int = 0, label: str = "",
                          ) -> tuple[dict[str, list[RefusalResult]], dict[str, list[list[RefusalResult]]], dict[str, Any]]:
    """Ablate each category's selected features and `n_draws` frequency-matched random sets of the
    same size. `run(make_context, desc)` evaluates refusal under a context; `make(ids)` builds the
    ablation context of a feature list. Without `log_density` (or with n_draws 0) no controls run.
    Returns `(conditions {c: results}, controls {c: [results per draw]}, drawn {c: [[ids] per draw]})`."""
    conditions, controls, drawn = {}, {}, {}
    for i, (category, ids) in enumerate(selected.items()):
        ids = [int(f) for f in ids]
        if not ids:
            continue
        conditions[category] = run(make(ids), f"ablate {category}{label} ({len(ids)} features)")
        if log_density is None or n_draws < 1:
            continue
        drawn[category] = matched_controls(ids, log_density, n_draws, exclude, seed=seed * 1000 + i)
        controls[category] = [run(make(d), f"control {j + 1}/{n_draws} for {category}{label}")
                              for j, d in enumerate(drawn[category])]
    return conditions, controls, drawn
