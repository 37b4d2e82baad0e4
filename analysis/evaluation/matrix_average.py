"""Feature-ablation matrices averaged across runs that differ only in their seeds (`refusal-sae compare`).

A run's ablate stage keeps its per-prompt verdicts (`ablation_rows`: the baseline, and per SAE seed and
category the selected ablation and each control draw). `average_matrices` pools the (run, SAE seed)
pairs of several runs, per cell of the category × target matrix:

  effect       after − before per prompt (the run's own baseline)
  vs_control   selected − mean over the control draws per prompt (pairs with controls only)

When the runs share their eval prompts (same ids, same order) every (run, SAE seed) pair is one row
of `activations.stats.seed_average`, exactly as one run averages its SAE seeds; otherwise each run's
per-prompt values are first averaged over its SAE seeds and the runs are pooled with `run_average`.

    rows = ablation_rows(records, baseline, conditions, controls)     # one run, JSON-ready
    cells = average_matrices([rows_a, rows_b, rows_c])
    cells["safety"]["safety"]["effect"]    # {mean, ci, per_seed | per_run, ...}
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from activations.stats import run_average, seed_average
from analysis.evaluation.ablation_matrix import category_masks, refused


def ablation_rows(records: Sequence[Any], baseline: Sequence[Any], conditions: Mapping[Any, Mapping[str, Sequence[Any]]],
                  controls: Mapping[Any, Mapping[str, Sequence[Sequence[Any]]]] | None = None) -> dict[str, Any]:
    """One run's per-prompt feature-ablation verdicts: `{prompt_ids, categories, baseline: [0/1],
    per_seed: {seed: {row: {selected: [0/1], controls: [[0/1] per draw]}}}}`."""
    def bits(results: Sequence[Any]) -> list[int]:
        return [int(v) for v in refused(results)]

    per_seed: dict[str, dict[str, Any]] = {}
    for seed, rows in conditions.items():
        ctl = (controls or {}).get(seed, {})
        per_seed[str(seed)] = {row: {"selected": bits(found), "controls": [bits(d) for d in ctl.get(row, [])]}
                               for row, found in rows.items()}
    return {"prompt_ids": [r.id for r in records], "categories": [r.category for r in records],
            "baseline": bits(baseline), "per_seed": per_seed}


def _pairs(run: Mapping[str, Any], row: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(effect, vs_control or None) per-prompt arrays of each SAE seed of a run that ablated `row`."""
    base = np.asarray(run["baseline"], dtype=np.float64)
    out = []
    for per_row in run["per_seed"].values():
        if row not in per_row:
            continue
        sel = np.asarray(per_row[row]["selected"], dtype=np.float64)
        ctl = per_row[row].get("controls") or []
        out.append((sel - base, sel - np.asarray(ctl, dtype=np.float64).mean(axis=0) if ctl else None))
    return out


def average_matrices(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{row: {target: {"effect": avg, "vs_control": avg (when every pair has controls), "n_pairs"}}}` over
    the (run, SAE seed) pairs of `runs` (`ablation_rows` dicts), see the module docstring. Rows ablated
    in every run only; a run without any ablated row contributes nothing."""
    if len(runs) < 1:
        raise ValueError("average_matrices needs at least one run")
    paired = all(r["prompt_ids"] == runs[0]["prompt_ids"] for r in runs)
    rows = [row for row in dict.fromkeys(k for per in runs[0]["per_seed"].values() for k in per)
            if all(_pairs(r, row) for r in runs)]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        pairs = [_pairs(r, row) for r in runs]
        with_controls = all(v is not None for per in pairs for _, v in per)
        out[row] = {}
        every = [category_masks(r["categories"]) for r in runs]
        for target in [t for t in every[0] if all(t in m for m in every)]:
            masks = [m[target] for m in every]
            cell: dict[str, Any] = {"n_pairs": sum(len(p) for p in pairs)}
            for key, index in (("effect", 0), ("vs_control", 1)):
                if key == "vs_control" and not with_controls:
                    continue
                if paired:
                    values = np.stack([pair[index][masks[0]] for per in pairs for pair in per])
                    cell[key] = seed_average(values, bounds=(-1.0, 1.0))
                else:
                    cell[key] = run_average([np.mean([pair[index][m] for pair in per], axis=0)
                                             for per, m in zip(pairs, masks)])
            out[row][target] = cell
    return out
