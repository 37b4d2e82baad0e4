"""`summary.json`: the versioned result of one pipeline run, and its validator.

Schema version 1 (documented in the README):
    schema_version: 1
    model: str; layers: [int]; seeds: [int]
    splits: {extract|calibrate|eval: {n, sha256, categories: {cat: n}}}
    sae: {seed: {fvu, l0, dead_fraction, k, n_latents, steps}}  (k, n_latents, steps: of the exported SAEs)
    probe: {accuracy: {value, ci, n}, macro_f1: {value, ci, n}}
    stability: {matched_cosine_mean, feature_jaccard: {cat: float}}
    geometry: {space: {silhouette, davies_bouldin, calinski_harabasz}}
    refusal: {condition: {set_or_category: {rate, ci: [lo, hi], n}}}
    capability: {condition: {task: {score, ci: [lo, hi], n}}}
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
    for seed, metrics in summary.get("sae", {}).items():
        for key in ("fvu", "l0", "dead_fraction"):
            if key not in metrics:
                problems.append(f"sae.{seed}: missing '{key}'")
    return problems
