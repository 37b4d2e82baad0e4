"""The report's view of the SAE-dependent conditions (conditional_probe, steer_sae, ablate): condition
table cells that show the across-seed rate with its CI and a per-seed strip, and the section that
says what SAE-space steering is next to steer_toward (norm, cosine) and what each seed did.

`seed_averaged` is summary.json's block (`analysis.evaluation.seed_conditions.seed_averaged`):
`{by_seed: {condition: {seed: table}}, refusal: {condition: {set: cell}}, vs_baseline: ...}`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from analysis.reporting.findings import fmt_p, fmt_signed
from analysis.reporting.html import Section, esc, fmt_num, fmt_rate, rate_cell, row_header, table, value_cell

SEED_NOTE = (" SAE-dependent conditions (cells marked ⌀) show the mean over SAE seeds [95% CI for seed and prompt "
             "variance: t interval, between-seed plus prompt variance] and the per-seed rates below it.")


def seeded_cell(cell: Mapping[str, Any]) -> str:
    """`<td>` of a seed-averaged rate: mean [CI] n, then "seeds: a / b / c"."""
    lo, hi = cell["ci"]
    style = f' style="background: rgba(214, 39, 40, {0.04 + 0.36 * float(cell["mean"]):.3f})"'
    strip = " / ".join(fmt_rate(v) for v in cell["per_seed"])
    return (f'<td class="rate"{style}>{fmt_rate(cell["mean"])} <span class="ci">[{fmt_rate(lo)}, {fmt_rate(hi)}]</span> '
            f'<span class="n">n={esc(cell["n"])}, ⌀ {esc(cell["n_seeds"])} seeds</span>'
            f'<span class="n">seeds: {esc(strip)}</span></td>')


def condition_cell(refusal: Mapping[str, Mapping[str, Any]], seeded: Mapping[str, Mapping[str, Any]] | None,
                   condition: str, name: str) -> str:
    """The condition table's cell: seed-averaged when the condition has one for this set, else the rate."""
    cell = ((seeded or {}).get(condition) or {}).get(name)
    if cell is not None:
        return seeded_cell(cell)
    entry = refusal.get(condition, {}).get(name)
    return "<td>—</td>" if entry is None else rate_cell(entry)


def as_rates(refusal: Mapping[str, Mapping[str, Any]], seeded: Mapping[str, Mapping[str, Any]] | None
             ) -> dict[str, dict[str, Any]]:
    """The refusal tables with each seed-averaged cell as a `{rate, ci, n}` dict (for the bar charts)."""
    out = {c: dict(t) for c, t in refusal.items()}
    for condition, cells in (seeded or {}).items():
        out.setdefault(condition, {}).update({s: {"rate": c["mean"], "ci": c["ci"], "n": c["n"]} for s, c in cells.items()})
    return out


def seed_section(seed_averaged: Mapping[str, Any] | None, steer_sae: Mapping[str, Any] | None,
                 probe_gates: Mapping[str, Any] | None = None) -> Section | None:
    """Per-seed rates of every SAE-dependent condition with the change against the baseline averaged
    over seeds, the per-seed probe-gate thresholds, and steer_sae's vector against v_global."""
    if not seed_averaged or not seed_averaged.get("by_seed"):
        return None
    body = [_per_seed_table(seed_averaged)]
    if probe_gates:
        cats = list(dict.fromkeys(c for g in probe_gates.values() for c in g.get("thresholds", {})))
        rows = [[row_header(f"seed {s}")] + [value_cell(g.get("thresholds", {}).get(c)) for c in cats]
                for s, g in probe_gates.items()]
        body.append("<h3>Probe gate per SAE seed</h3>" + table(
            ["gate", *cats], rows, "Each seed's gate: its own L1 head on its own latents, the probability threshold "
            "per category tuned on calibrate (max F1); it steers +alpha · v_c when a category passes. No gate reads a label."))
    if steer_sae:
        body.append(_steer_sae_table(steer_sae))
    return Section("seeded", "\n".join(body))


def _per_seed_table(seed_averaged: Mapping[str, Any]) -> str:
    rows = []
    vs = seed_averaged.get("vs_baseline") or {}
    for condition, per_seed in seed_averaged["by_seed"].items():
        for seed, table_ in per_seed.items():
            rows.append([row_header(f"{condition}, seed {seed}")]
                        + [rate_cell(table_[s], shade=False) if s in table_ else "<td>—</td>"
                           for s in ("over_refusal", "harmful_refusal")] + ["<td></td>"] * 2)
        change = [_change(vs.get(condition, {}).get(s)) for s in ("over_refusal", "harmful_refusal")]
        rows.append([row_header(f"{condition} ⌀ (mean of seeds)")]
                    + [seeded_cell(seed_averaged["refusal"][condition][s]) if s in seed_averaged["refusal"][condition]
                       else "<td>—</td>" for s in ("over_refusal", "harmful_refusal")] + change)
    return table(["condition / SAE seed", "over_refusal", "harmful_refusal", "Δ over_refusal vs baseline ⌀",
                  "Δ harmful_refusal vs baseline ⌀"], rows,
                 "Eval split. Per seed: Wilson 95% CI. ⌀: mean over seeds with a 95% CI for seed and prompt variance; "
                 "Δ: paired change against the unintervened baseline, averaged over seeds the same way, with the "
                 "largest per-seed exact McNemar p.", "matrix")


def _change(cell: Mapping[str, Any] | None) -> str:
    if not cell:
        return "<td>—</td>"
    e = cell["effect"]
    return (f'<td class="rate">{fmt_signed(e["mean"])} <span class="ci">[{fmt_signed(e["ci"][0])}, '
            f'{fmt_signed(e["ci"][1])}]</span><span class="n">max p={fmt_p(max(cell["p_values"]))}</span></td>')


def _steer_sae_table(steer_sae: Mapping[str, Any]) -> str:
    """Per seed: which SAE-space category vectors were pooled, their norm and cosine to v_global."""
    rows = []
    for seed, info in steer_sae.items():
        if "skipped" in info:
            rows.append([row_header(f"seed {seed}"), f'<td colspan="5">skipped: {esc(info["skipped"])}</td>'])
            continue
        rows.append([row_header(f"seed {seed}"), f"<td>{esc(', '.join(info['categories']))}</td>",
                     value_cell(info.get("norm_own")), value_cell(info.get("norm_global")),
                     value_cell(info.get("cosine_global")), f"<td>{esc(fmt_num(info.get('norm_used')))} ({esc(info['norm'])})</td>"])
    return ("<h3>steer_sae against steer_toward</h3>"
            + table(["SAE seed", "categories pooled", "|v_sae| decoded", "|v_global|", "cos(v_sae, v_global)",
                     "norm steered"], rows,
                    "steer_sae steers +alpha · v_sae, the row-weighted sum of the seed's SAE-space category vectors "
                    "(decoded filtered latent mean differences: the SAE-space counterpart of v_global = pooled refusal "
                    "mean − benign mean); steer_toward steers +alpha · v_global. With norm 'global' v_sae is rescaled "
                    "to |v_global|, so the two differ only in direction (the cosine)."))
