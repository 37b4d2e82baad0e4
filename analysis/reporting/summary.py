"""`summary.json`: the versioned result of one pipeline run, and its validator.

Schema version 1 (documented in the README):
    schema_version: 1
    model: str; layers: [int]; seeds: [int]
    splits: {extract|calibrate|eval: {n, sha256, categories: {cat: n}}}
    sae: {seed: {fvu, l0, dead_fraction, dense_fraction, k, n_latents, steps, fvu_content, fvu_response_start, ...,
                 ce_recovered_<site>, kl_<site>, decision_fidelity_<site>: {rate, ci, n}}}
         (held-out SAE quality, `analysis.pipeline.outputs.sae_quality_summary`; sites content, response_start;
          k, n_latents, steps: of the exported SAEs)
    probe: {accuracy: {value, ci, n}, macro_f1: {value, ci, n}}
    stability: {matched_cosine_mean, feature_jaccard: {cat: float}}
    geometry: {space: {silhouette, davies_bouldin, calinski_harabasz}}
    refusal: {condition: {set_or_category: {rate, ci: [lo, hi], n}}}
    capability: {condition: {task: {score, ci: [lo, hi], n}}}
  optional (written by the pipeline since held-out benchmarks; checked when present):
    eval_sets: {name: {specs, n, n_read, categories, sha256, n_duplicates_removed,
                       n_overlap_removed: {extract, calibrate}, n_overlap_eval,
                       refusal: {condition: {set: {rate, ci, n}}}, frontier: {...}}}
    frontier: {best_gate, goal_met, tolerance, verdict, gates: {gate: {over_refusal, harmful, meets_goal,
               p_over_refusal}}}                                    (the eval split's gating verdict)
    gates: {distance: {baseline, chosen, chosen_is_noop, frontier, scores: {calibrate, eval}, eval_decisions}}
    capability_readable: {task: {chance, score, ci, n, readable, reason}}
    benign_text: {condition: {loss: {value, ci, n}, kl: {value, ci, n}, n_tokens}}
    paired_vs_baseline: {condition: {set: {difference: {estimate, ci}, p_value, n, before_only, after_only}}}
    ablation: the ablate stage's results (positions, feature_ablation {per_seed, averaged}, directional,
              sufficiency; cells `analysis.evaluation.ablation_matrix.effect_cell` / seed-averaged)
    head_separation: {set: {auc, ci, n_positive, n_negative, method, refusal_rate, over_refusal_rate} | null}
              (baseline refusal-token log-odds, refusal categories vs benign/contrast; set = eval or a
               held-out set's name; `analysis.evaluation.separation`)
    findings: [{topic, condition, target, effect, ci, p_value, n, n_seeds, vs_control, control_ci,
                beats_control, control_kind, sentence}]   (`analysis.reporting.findings`)
    seed_averaged: the SAE-dependent conditions (conditional_probe, steer_sae, ablate) under every SAE
                   seed, eval split (`analysis.evaluation.seed_conditions.seed_averaged`):
                   {by_seed: {condition: {seed: {set: {rate, ci, n}}}},
                    refusal: {condition: {set: {mean, ci, per_seed, n_seeds, n, seeds, method}}},
                    vs_baseline: {condition: {set: {effect: {mean, ci, per_seed, n_seeds, n, method},
                                                    p_values, seeds}}},
                    gate_decisions: {conditional_probe: {seed: {direction:category: count}}}}
                   (`refusal` above holds the reference seed; each eval_sets entry has its own seed_averaged)
    steer_sae: {seed: {categories, weights, norm_own, norm_global, cosine_global, norm, norm_used} or {skipped}}
    gates.probe: {reference_seed, by_seed: {seed: {thresholds, criterion, criterion_values, sae_seed, ...}}}
"""
from __future__ import annotations

import math
from typing import Any

from activations.records import REFUSAL_CATEGORIES

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("model", "layers", "seeds", "splits", "sae", "probe", "stability", "geometry", "refusal", "capability")
REQUIRED_CONDITIONS = (
    "baseline",
    "steer_toward",
    "steer_away",
    "conditional_distance",
    "conditional_probe",
    "conditional_token",
    "ablate",
)
REQUIRED_SETS = (*REFUSAL_CATEGORIES, "benign", "contrast")
SECTION_KEYS = ("eval_sets", "frontier", "gates", "capability_readable", "benign_text", "paired_vs_baseline", "ablation",
                "head_separation", "findings", "seed_averaged", "steer_sae")
"""Optional keys the report shows in sections of their own."""


def _check_interval(where: str, value: float | None, ci: Any, n: Any, problems: list[str]) -> None:
    if not isinstance(n, int) or n < 0:
        problems.append(f"{where}: n must be a non-negative integer, got {n!r}")
        return
    if n == 0:
        return
    if value is None or not (0.0 <= value <= 1.0) or math.isnan(value):
        problems.append(f"{where}: rate {value!r} outside [0, 1]")
        return
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        problems.append(f"{where}: ci must be [lo, hi], got {ci!r}")
        return
    lo, hi = ci
    if not (0.0 <= lo <= value + 1e-12 and value - 1e-12 <= hi <= 1.0):
        problems.append(f"{where}: ci [{lo}, {hi}] does not contain the rate {value}")


def validate_summary(summary: dict[str, Any], eval_counts: dict[str, int] | None = None) -> list[str]:
    """Return a list of problems (empty when the summary is well formed and internally consistent).

    `eval_counts` (category → number of eval prompts) additionally checks that each refusal rate's n
    equals the eval split's size for that category.
    """
    problems: list[str] = []
    if summary.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {summary.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for key in REQUIRED_KEYS:
        if key not in summary:
            problems.append(f"missing key '{key}'")
    refusal = summary.get("refusal", {})
    for condition in REQUIRED_CONDITIONS:
        if condition not in refusal:
            problems.append(f"refusal: missing condition '{condition}'")
            continue
        for name in REQUIRED_SETS:
            entry = refusal[condition].get(name)
            if entry is None:
                problems.append(f"refusal.{condition}: missing set '{name}'")
                continue
            _check_interval(f"refusal.{condition}.{name}", entry.get("rate"), entry.get("ci"), entry.get("n"), problems)
            if eval_counts is not None and name in eval_counts and entry.get("n") != eval_counts[name]:
                problems.append(
                    f"refusal.{condition}.{name}: n={entry.get('n')} but the eval split has {eval_counts[name]} prompts"
                )
    for condition, tasks in summary.get("capability", {}).items():
        for task, entry in tasks.items():
            _check_interval(f"capability.{condition}.{task}", entry.get("score"), entry.get("ci"), entry.get("n"), problems)
    for metric in ("accuracy", "macro_f1"):
        entry = summary.get("probe", {}).get(metric)
        if entry is None:
            problems.append(f"probe: missing '{metric}'")
        else:
            _check_interval(f"probe.{metric}", entry.get("value"), entry.get("ci"), entry.get("n"), problems)
    _check_eval_sets(summary.get("eval_sets", {}), problems)
    _check_seed_averaged("seed_averaged", summary.get("seed_averaged") or {}, problems)
    for name, entry in summary.get("eval_sets", {}).items():
        _check_seed_averaged(f"eval_sets.{name}.seed_averaged", entry.get("seed_averaged") or {}, problems)
    _check_benign_text(summary.get("benign_text", {}), problems)
    _check_findings(summary.get("findings", []), problems)
    for task, entry in summary.get("capability_readable", {}).items():
        if task not in summary.get("capability", {}).get("baseline", {}):
            problems.append(f"capability_readable.{task}: no baseline capability score for this task")
        elif not isinstance(entry.get("readable"), bool):
            problems.append(f"capability_readable.{task}: 'readable' must be true or false")
    for seed, metrics in summary.get("sae", {}).items():
        for key in ("fvu", "l0", "dead_fraction"):
            if key not in metrics:
                problems.append(f"sae.{seed}: missing '{key}'")
        for key, entry in metrics.items():
            if key.startswith("decision_fidelity") and isinstance(entry, dict):
                _check_interval(f"sae.{seed}.{key}", entry.get("rate"), entry.get("ci"), entry.get("n"), problems)
    return problems


def _check_eval_sets(eval_sets: dict[str, Any], problems: list[str]) -> None:
    """Each held-out set: counts add up, every rate is valid, n per category equals the set's counts."""
    for name, entry in eval_sets.items():
        where = f"eval_sets.{name}"
        counts = entry.get("categories", {})
        if entry.get("n") != sum(counts.values()):
            problems.append(f"{where}: n={entry.get('n')} but its categories sum to {sum(counts.values())}")
        removed = entry.get("n_overlap_removed", {})
        if set(removed) != {"extract", "calibrate"}:
            problems.append(f"{where}: n_overlap_removed must count 'extract' and 'calibrate', got {sorted(removed)}")
        elif entry.get("n_read", 0) < entry.get("n", 0) + sum(removed.values()) + entry.get("n_duplicates_removed", 0):
            problems.append(f"{where}: n_read={entry.get('n_read')} is less than kept + removed prompts")
        if "baseline" not in entry.get("refusal", {}):
            problems.append(f"{where}: refusal has no baseline condition")
        for condition, table in entry.get("refusal", {}).items():
            for key, cell in table.items():
                _check_interval(f"{where}.refusal.{condition}.{key}", cell.get("rate"), cell.get("ci"), cell.get("n"),
                                problems)
                if key in counts and cell.get("n") != counts[key]:
                    problems.append(f"{where}.refusal.{condition}.{key}: n={cell.get('n')} but the set has {counts[key]}")


def _check_seed_averaged(where: str, block: dict[str, Any], problems: list[str]) -> None:
    """Per-seed tables are valid rates; each averaged cell has one mean per seed, lies in its CI, and its
    mean is the mean of its per-seed means; a vs_baseline cell has one McNemar p per seed."""
    for condition, per_seed in block.get("by_seed", {}).items():
        for seed, table in per_seed.items():
            for key, cell in table.items():
                _check_interval(f"{where}.by_seed.{condition}.{seed}.{key}", cell.get("rate"), cell.get("ci"),
                                cell.get("n"), problems)
    cells = [(f"{where}.refusal.{c}.{k}", cell, (0.0, 1.0)) for c, t in block.get("refusal", {}).items()
             for k, cell in t.items()]
    cells += [(f"{where}.vs_baseline.{c}.{k}", cell.get("effect", {}), (-1.0, 1.0)) for c, t in block.get("vs_baseline", {}).items()
              for k, cell in t.items()]
    for label, cell, (lo_bound, hi_bound) in cells:
        mean, ci, per_seed = cell.get("mean"), cell.get("ci"), cell.get("per_seed") or []
        if not isinstance(mean, (int, float)) or not lo_bound <= mean <= hi_bound:
            problems.append(f"{label}: mean {mean!r} outside [{lo_bound:g}, {hi_bound:g}]")
            continue
        if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] - 1e-12 <= mean <= ci[1] + 1e-12):
            problems.append(f"{label}: ci {ci!r} does not contain the mean {mean}")
        if len(per_seed) != cell.get("n_seeds") or not per_seed or abs(sum(per_seed) / len(per_seed) - mean) > 1e-9:
            problems.append(f"{label}: {cell.get('n_seeds')!r} seeds but per-seed means {per_seed} (mean {mean})")
    for condition, table in block.get("vs_baseline", {}).items():
        for key, cell in table.items():
            if len(cell.get("p_values", [])) != cell.get("effect", {}).get("n_seeds"):
                problems.append(f"{where}.vs_baseline.{condition}.{key}: one McNemar p per seed expected")


def _check_findings(findings: list[dict[str, Any]], problems: list[str]) -> None:
    """Each finding: a sentence, and effect / vs_control inside their CIs."""
    for i, f in enumerate(findings):
        where = f"findings[{i}] ({f.get('condition')}, {f.get('target')})"
        if not f.get("sentence"):
            problems.append(f"{where}: no sentence")
        for value, ci in ((f.get("effect"), f.get("ci")), (f.get("vs_control"), f.get("control_ci"))):
            if value is not None and not (ci and ci[0] - 1e-9 <= value <= ci[1] + 1e-9):
                problems.append(f"{where}: {value} outside its CI {ci}")


def _check_benign_text(benign: dict[str, Any], problems: list[str]) -> None:
    """Loss and KL per condition: finite, CI around the value, KL >= 0 and exactly 0 for the baseline."""
    for condition, entry in benign.items():
        for key in ("loss", "kl"):
            cell = entry.get(key) or {}
            value, ci = cell.get("value"), cell.get("ci")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"benign_text.{condition}.{key}: value {value!r} must be a finite number >= 0")
            elif not (isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] - 1e-12 <= value <= ci[1] + 1e-12):
                problems.append(f"benign_text.{condition}.{key}: ci {ci!r} does not contain {value}")
    if "baseline" in benign and benign["baseline"].get("kl", {}).get("value") not in (0, 0.0):
        problems.append("benign_text.baseline.kl: the unsteered model's KL to itself must be 0")
