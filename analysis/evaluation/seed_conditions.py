"""The SAE-dependent conditions under every SAE seed, and their across-seed average.

Three conditions depend on an SAE, so each runs once per SAE seed (`SeedConditions`):

  conditional_probe   the seed's own L1-probe gate (its head on its latents, thresholds tuned on
                      calibrate) steers each row as `conditional_probe` does
  steer_sae           +alpha · the seed's pooled SAE-space vector on every row (`pooled_sae_vector`)
  ablate              the seed's selected refusal features zeroed on every row

`refusal_by_seed` runs them on one list of prompts (reusing the suite's reference-seed results);
`seed_averaged` turns the per-seed results into per-seed refusal tables, the across-seed rate per set
and the across-seed change against the baseline, both with `activations.stats.seed_average` (the
method of the ablation matrices: mean of the per-seed means, CI for seed and prompt variance).

    seeds = {0: SeedConditions(gate0, v0, ablate0), 1: SeedConditions(gate1, v1, ablate1)}
    by_seed = refusal_by_seed(suite, seeds, 0, records, found.inputs, found.results)
    averaged = seed_averaged(records, found.results["baseline"], by_seed)
    averaged["vs_baseline"]["steer_sae"]["harmful_refusal"]["effect"]   # {mean, ci, per_seed, ...}
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.records import PromptRecord
from activations.stats import seed_average
from analysis.evaluation.ablation_matrix import refused, seed_averaged_matrix, target_masks
from analysis.evaluation.conditions import Plan, plan_from_decisions, refusal_table, run_refusal
from analysis.evaluation.refusal import RefusalResult
from analysis.evaluation.suite import ConditionSuite, GateFn, MakeContext, RowInputs, decision_counts, gated_refusal

SEED_CONDITIONS = ("conditional_probe", "steer_sae", "ablate")
"""The SAE-dependent conditions, in report order."""


@dataclass
class SeedConditions:
    """One SAE seed's SAE-dependent conditions; None = the seed lacks it (e.g. no SAE-space vector).

    `gate`: the seed's probe gate (`RowInputs` -> decisions); `vector`: (d_model,) float32 steered
    with +alpha; `ablate`: `make_context` zeroing the seed's `n_features` selected features.
    """

    gate: GateFn | None = None
    vector: np.ndarray | None = None
    ablate: MakeContext | None = None
    n_features: int | None = None


def pooled_sae_vector(vectors: Mapping[str, Any], reference: np.ndarray | None = None,
                      norm: str = "global") -> tuple[np.ndarray, dict[str, Any]]:
    """The SAE-space counterpart of v_global from one seed's per-category SAE-space vectors.

    `vectors`: category -> SteeringVector (meta `n_rows.category`) of the categories the seed kept.
    v_global = mean(refusal rows) − mean(benign) = Σ_c (n_c / N) · v_c, so the pooled SAE vector is the
    same row-weighted sum of the SAE-space v_c. `norm`: "global" rescales it to |`reference`| (the
    residual v_global: the same alpha means the same step length, only the direction differs), "own"
    keeps its decoded norm. Returns `((d_model,) float32, info)`; info: weights, own norm, the
    reference's norm, cosine to the reference, the norm it was given.
    """
    if not vectors:
        raise ValueError("pooled_sae_vector got no SAE-space vectors")
    if norm not in ("global", "own"):
        raise ValueError(f"norm must be 'global' or 'own', got {norm!r}")
    counts = {c: float(v.meta["n_rows"]["category"]) for c, v in vectors.items()}
    total = sum(counts.values())
    pooled = sum((counts[c] / total) * v.vector.double().numpy() for c, v in vectors.items())
    own = float(np.linalg.norm(pooled))
    if own == 0.0:
        raise ValueError("the pooled SAE-space vector is zero")
    info: dict[str, Any] = {"categories": list(vectors), "weights": {c: counts[c] / total for c in counts},
                            "norm_own": own, "norm": norm}
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        info["norm_global"] = float(np.linalg.norm(ref))
        info["cosine_global"] = float(pooled @ ref / (own * info["norm_global"])) if info["norm_global"] else 0.0
    if norm == "global":
        if reference is None:
            raise ValueError("norm='global' needs the reference vector v_global")
        pooled = pooled * (info["norm_global"] / own)
    info["norm_used"] = float(np.linalg.norm(pooled))
    return pooled.astype(np.float32), info


def refusal_by_seed(suite: ConditionSuite, seeds: Mapping[int, SeedConditions], reference_seed: int,
                    records: Sequence[PromptRecord], inputs: RowInputs, done: Mapping[str, list[RefusalResult]],
                    done_decisions: Mapping[str, list] | None = None, progress: bool = True) -> tuple[dict[str, dict[int, list[RefusalResult]]], dict[str, dict[int, Any]]]:
    """Each SAE-dependent condition under every seed that has it:
    `({condition: {seed: results}}, {"conditional_probe": {seed: decision counts}})`.

    The reference seed's results are `done[condition]` (the suite's run) when present, and its probe
    decisions `done_decisions["conditional_probe"]` (the suite's gate ran on the same inputs); a seed
    without a condition (None) is left out. Gated rows the gate leaves alone keep `done["baseline"]`.
    """
    records = list(records)
    baseline = done["baseline"]
    setup = suite.setup
    out: dict[str, dict[int, list[RefusalResult]]] = {c: {} for c in SEED_CONDITIONS}
    counts: dict[str, dict[int, Any]] = {"conditional_probe": {}}
    for seed, conds in seeds.items():
        reuse = seed == reference_seed
        label = f"seed {seed}"
        if conds.gate is not None:
            decisions = ((done_decisions or {}).get("conditional_probe") if reuse else None) or conds.gate(inputs)
            counts["conditional_probe"][seed] = decision_counts(decisions)
            if reuse and "conditional_probe" in done:
                out["conditional_probe"][seed] = done["conditional_probe"]
            else:
                plan = plan_from_decisions(decisions, suite.vectors, setup.adapter.d_model)
                out["conditional_probe"][seed] = gated_refusal(setup, records, plan, baseline,
                                                               f"conditional_probe ({label})", progress)
        if conds.vector is not None:
            out["steer_sae"][seed] = done["steer_sae"] if reuse and "steer_sae" in done else run_refusal(
                setup, records, Plan.uniform(conds.vector, suite.alpha, len(records)), progress=progress,
                desc=f"condition steer_sae ({label})")
        if conds.ablate is not None:
            out["ablate"][seed] = done["ablate"] if reuse and "ablate" in done else run_refusal(
                setup, records, context=conds.ablate, progress=progress, desc=f"condition ablate ({label}, {conds.n_features} features)")
    return {c: found for c, found in out.items() if found}, counts


def seed_averaged(records: Sequence[PromptRecord], baseline: Sequence[RefusalResult],
                  by_seed: Mapping[str, Mapping[int, Sequence[RefusalResult]]]) -> dict[str, Any]:
    """Per-seed tables and across-seed averages of SAE-dependent conditions on one list of prompts.

    Returns `{"by_seed": {condition: {seed: refusal_table}}, "refusal": {condition: {set: cell}},
    "vs_baseline": {condition: {set: cell}}}`. A refusal cell is `seed_average` of the per-prompt
    verdicts (mean, ci clipped to [0, 1], per_seed, n_seeds, n, method) plus `seeds`; a vs_baseline
    cell is the seed-averaged matrix cell of (after − before) per prompt: `effect` (seed_average),
    `p_values` (exact McNemar per seed), `seeds` (`ablation_matrix.seed_averaged_matrix`).
    """
    records = list(records)
    masks = target_masks(records)
    out: dict[str, Any] = {"by_seed": {}, "refusal": {}, "vs_baseline": {}}
    for condition, per_seed in by_seed.items():
        seeds = list(per_seed)
        if not seeds:
            continue
        verdicts = np.stack([refused(per_seed[s]).astype(np.float64) for s in seeds])
        out["by_seed"][condition] = {str(s): refusal_table(per_seed[s]) for s in seeds}
        out["refusal"][condition] = {target: {**seed_average(verdicts[:, m], bounds=(0.0, 1.0)),
                                              "seeds": [str(s) for s in seeds]} for target, m in masks.items()}
        matrix = seed_averaged_matrix(records, baseline, {s: {condition: per_seed[s]} for s in seeds})
        out["vs_baseline"][condition] = matrix[condition]
    return out


def warn_missing(condition: str, missing: Mapping[int, str]) -> None:
    """Say loudly on stderr which seeds lack a condition, and why."""
    for seed, why in missing.items():
        print(f"warning: SAE seed {seed} has no {condition} condition ({why}); it is left out of the seed average",
              file=sys.stderr, flush=True)
