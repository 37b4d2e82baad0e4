"""The report's Findings: structured comparisons taken from `summary.json`, and the sentences written
from them (so a test can check that every sentence quotes its numbers).

A `Finding` is one headline comparison: a condition against the unintervened baseline on one set of
prompts (the rate change with its 95% CI and the exact McNemar p), and, where the experiment has one,
the comparison with its random control (selected − control with its CI; `beats_control`). Effects
averaged over SAE seeds quote the across-seed CI and the largest per-seed p-value: the feature
ablation matrix, and the SAE-dependent conditions (conditional_probe, steer_sae, ablate) against the
baseline, whose seed-averaged change replaces the reference seed's where the summary has one.

    findings = build_findings(summary)
    [f.sentence() for f in findings]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from activations.records import REFUSAL_CATEGORIES

GATED = ("steer_toward", "steer_away", "steer_sae", "conditional_distance", "conditional_probe", "conditional_token",
         "conditional_external", "ablate")
HEADLINE_SETS = ("over_refusal", "harmful_refusal")
TARGET_WORDS = {"over_refusal": "over-refusal (benign + contrast)", "harmful_refusal": "harmful refusal (refusal categories)"}


@dataclass(frozen=True)
class Finding:
    """One comparison. `effect`/`ci`: change of the refusal rate of `target` (after − before);
    `p_value`: exact McNemar (the largest over seeds when `n_seeds` > 1); `vs_control`/`control_ci`:
    selected − control; `beats_control`: None when the experiment has no control."""

    topic: str
    condition: str
    target: str
    effect: float
    ci: tuple[float, float]
    p_value: float | None
    n: int
    n_seeds: int = 1
    vs_control: float | None = None
    control_ci: tuple[float, float] | None = None
    beats_control: bool | None = None
    control_kind: str = ""

    def sentence(self) -> str:
        """The finding in words, every number from the fields (2 decimals; p to 2 significant digits)."""
        seeds = f", mean of {self.n_seeds} SAE seeds" if self.n_seeds > 1 else ""
        p = "" if self.p_value is None else (
            f"; {'largest per-seed ' if self.n_seeds > 1 else ''}McNemar p = {fmt_p(self.p_value)}")
        text = (f"{self.condition}: {TARGET_WORDS.get(self.target, self.target + ' refusal')} changes by {fmt_signed(self.effect)} "
                f"[{fmt_signed(self.ci[0])}, {fmt_signed(self.ci[1])}] (n={self.n}{seeds}{p}).")
        if self.beats_control is None:
            return text + " No random control."
        verdict = "beats its control" if self.beats_control else "does not beat its control"
        return (text + f" Against {self.control_kind or 'random controls'}: {fmt_signed(self.vs_control)} "
                f"[{fmt_signed(self.control_ci[0])}, {fmt_signed(self.control_ci[1])}], {verdict}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sentence": self.sentence()}


def fmt_signed(value: float | None) -> str:
    """+0.12 / −0.30 (a real minus sign); "n/a" for None."""
    if value is None:
        return "n/a"
    text = f"{value:+.2f}"
    return text.replace("-", "−")


def fmt_p(p: float) -> str:
    """p-values with 2 significant digits (1e-05 style below 0.001)."""
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _paired_findings(paired: Mapping[str, Any], topic: str = "condition vs baseline",
                     averaged: Mapping[str, Any] | None = None) -> list[Finding]:
    """Each condition against the baseline on the headline sets; a condition in `averaged` (summary.json
    `seed_averaged.vs_baseline`) is quoted averaged over SAE seeds instead of its reference seed."""
    out = []
    averaged = averaged or {}
    for condition in GATED:
        for target in HEADLINE_SETS:
            seeded = (averaged.get(condition) or {}).get(target)
            cell = (paired.get(condition) or {}).get(target)
            if seeded:
                e = seeded["effect"]
                out.append(Finding(topic, condition, target, e["mean"], tuple(e["ci"]), max(seeded["p_values"]), e["n"],
                                   e["n_seeds"]))
            elif cell:
                d = cell["difference"]
                out.append(Finding(topic, condition, target, d["estimate"], tuple(d["ci"]), cell["p_value"], cell["n"]))
    return out


def _matrix_findings(topic: str, label: str, matrix: Mapping[str, Any], targets: Sequence[str] | None,
                     control_kind: str) -> list[Finding]:
    """Findings of a single-seed matrix (`effect_cell`s): row c on target c (or on `targets`)."""
    out = []
    for row, cells in matrix.items():
        for target in targets or (row,):
            cell = cells.get(target)
            if not cell:
                continue
            vs = cell.get("vs_control")
            out.append(Finding(topic, label.format(c=row), target, cell["effect"]["estimate"], tuple(cell["effect"]["ci"]),
                               cell["p_value"], cell["n"], 1, None if vs is None else vs["estimate"],
                               None if vs is None else tuple(vs["ci"]), cell.get("beats_control"), control_kind))
    return out


def _averaged_findings(averaged: Mapping[str, Any], control_kind: str, where: str = "") -> list[Finding]:
    """Findings of the seed-averaged feature-ablation matrix: the diagonal (necessity)."""
    out = []
    for row, cells in averaged.items():
        cell = cells.get(row)
        if not cell:
            continue
        effect, vs = cell["effect"], cell.get("vs_control")
        out.append(Finding("feature ablation", f"ablate the {row} features{where}", row, effect["mean"], tuple(effect["ci"]),
                           max(cell["p_values"]), effect["n"], effect["n_seeds"],
                           None if vs is None else vs["mean"], None if vs is None else tuple(vs["ci"]),
                           cell.get("beats_control"), control_kind))
    return out


def build_findings(summary: Mapping[str, Any]) -> list[Finding]:
    """Every headline comparison of a summary, in report order: feature ablation (seed-averaged
    diagonal), directional ablation, sufficiency, then each condition vs baseline on the eval split and
    on each held-out set."""
    out: list[Finding] = []
    ablation = summary.get("ablation") or {}
    features = ablation.get("feature_ablation") or {}
    where = f" at {ablation['positions']} positions" if ablation.get("positions") else ""
    if features.get("averaged"):
        out += _averaged_findings(features["averaged"], f"{ablation.get('control_draws')} frequency-matched random feature sets",
                                  where)
    if ablation.get("directional"):
        out += _matrix_findings("directional ablation", "project out v_{c}" + where, ablation["directional"]["matrix"], None,
                                "random directions")
    if ablation.get("sufficiency"):
        out += _matrix_findings("sufficiency", "steer toward {c}" + where, ablation["sufficiency"]["matrix"], ("over_refusal",),
                                "random directions of the same norm")
    out += _paired_findings(summary.get("paired_vs_baseline") or {}, "condition vs baseline (eval split)",
                            (summary.get("seed_averaged") or {}).get("vs_baseline"))
    for name, entry in (summary.get("eval_sets") or {}).items():
        out += _paired_findings(entry.get("paired_vs_baseline") or {}, f"condition vs baseline (held-out: {name})",
                                (entry.get("seed_averaged") or {}).get("vs_baseline"))
    return out


def paired_summary(paired: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """summary.json's `paired_vs_baseline` from `compare_conditions` results (`{condition: {group: {key:
    cell}}}`): `{condition: {set: {difference, p_value, n, before_only, after_only}}}`, sets = each
    category, `over_refusal` and `harmful_refusal`."""
    out: dict[str, dict[str, Any]] = {}
    for condition, groups in paired.items():
        cells = dict(groups.get("category", {}))
        for group in HEADLINE_SETS:
            if "all" in groups.get(group, {}):
                cells[group] = groups[group]["all"]
        out[condition] = {k: {key: c[key] for key in ("difference", "p_value", "n", "before_only", "after_only")}
                          for k, c in cells.items()}
    return out


def leakage(matrix: Mapping[str, Mapping[str, Any]], key: str = "effect") -> dict[str, tuple[str, float] | None]:
    """Per row of a matrix, the refusal category other than the row's with the largest |effect|
    (`(target, effect)`), for the report's leakage line."""
    out: dict[str, tuple[str, float] | None] = {}
    for row, cells in matrix.items():
        values = [(t, cells[t][key]["mean"] if "mean" in cells[t][key] else cells[t][key]["estimate"])
                  for t in REFUSAL_CATEGORIES if t != row and t in cells]
        out[row] = max(values, key=lambda tv: abs(tv[1])) if values else None
    return out
