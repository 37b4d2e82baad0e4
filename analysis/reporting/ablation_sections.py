"""Report sections of the conclusions: Findings (first on the page), the paired tests of every
condition against the baseline, and the ablation experiments (category × target effect matrices
beside their controls, seed-averaged with a per-seed strip)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from activations.records import CATEGORIES
from analysis.reporting.findings import fmt_p, fmt_signed, leakage
from analysis.reporting.html import Section, esc, key_values, row_header, table

MATRIX_TARGETS = (*CATEGORIES, "over_refusal", "harmful_refusal")


def findings_section(findings: Sequence[Mapping[str, Any]] | None) -> Section | None:
    """The Findings: one sentence per headline comparison, written from the numbers (`findings.py`)."""
    if not findings:
        return None
    by_topic: dict[str, list[str]] = {}
    for f in findings:
        by_topic.setdefault(f["topic"], []).append(f["sentence"])
    body = [("<p>Each line: the change of a refusal rate against the unintervened baseline on the eval split "
            "(95% CI; exact McNemar p on the paired prompts) and, where the experiment has one, the "
            "comparison with its random control (selected − control, 95% CI over draws and prompts). "
            "A feature set or vector counts as necessary (sufficient) only when it beats its control.</p>")]
    for topic, sentences in by_topic.items():
        body.append(f"<h3>{esc(topic)}</h3><ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>")
    return Section("findings", "\n".join(body))


def paired_section(paired: Mapping[str, Mapping[str, Any]] | None) -> Section | None:
    """Condition × set: rate change against the baseline [Newcombe CI] and the exact McNemar p."""
    if not paired:
        return None
    sets = [s for s in MATRIX_TARGETS if any(s in cells for cells in paired.values())]
    rows = []
    for condition, cells in paired.items():
        row = [row_header(condition)]
        for s in sets:
            c = cells.get(s)
            row.append("<td>—</td>" if c is None else
                       f'<td class="rate">{fmt_signed(c["difference"]["estimate"])} <span class="ci">'
                       f'[{fmt_signed(c["difference"]["ci"][0])}, {fmt_signed(c["difference"]["ci"][1])}]</span>'
                       f'<span class="n">p={fmt_p(c["p_value"])}</span></td>')
        rows.append(row)
    return Section("paired", table(["condition", *sets], rows,
                                         "Refusal rate change against the baseline [95% Newcombe paired CI] and the "
                                         "exact McNemar p-value on the discordant prompts, eval split.", "matrix"))


def _cell(cell: Mapping[str, Any] | None, own: bool) -> str:
    """One matrix cell: effect [CI], vs control and verdict, per-seed strip (seed-averaged cells)."""
    if not cell:
        return "<td>—</td>"
    effect = cell["effect"]
    value = effect.get("mean", effect.get("estimate"))
    lines = [f'{fmt_signed(value)} <span class="ci">[{fmt_signed(effect["ci"][0])}, {fmt_signed(effect["ci"][1])}]</span>']
    if "p_value" in cell:
        lines.append(f'<span class="n">p={fmt_p(cell["p_value"])}</span>')
    vs = cell.get("vs_control")
    if vs is not None:
        vs_value = vs.get("mean", vs.get("estimate"))
        mark = "✓ beats control" if cell.get("beats_control") else "✗ not beyond control"
        lines.append(f'<span class="n">− control: {fmt_signed(vs_value)} [{fmt_signed(vs["ci"][0])}, '
                     f'{fmt_signed(vs["ci"][1])}] {mark}</span>')
    if "control" in cell:
        lo, hi = cell["control"]["effect_spread"]
        lines.append(f'<span class="n">control draws: {fmt_signed(lo)} … {fmt_signed(hi)}</span>')
    if "per_seed" in effect:
        lines.append('<span class="n">seeds: ' + " / ".join(fmt_signed(v) for v in effect["per_seed"])
                     + f' (max p={fmt_p(max(cell["p_values"]))})</span>')
    return f'<td class="rate{" own" if own else ""}">{"".join(lines)}</td>'


def _matrix(matrix: Mapping[str, Mapping[str, Any]], row_label: str, caption: str) -> str:
    targets = [t for t in MATRIX_TARGETS if any(t in cells for cells in matrix.values())]
    rows = [[row_header(r)] + [_cell(cells.get(t), t == r) for t in targets] for r, cells in matrix.items()]
    return table([row_label, *targets], rows, caption, "matrix")


def _leakage_line(matrix: Mapping[str, Mapping[str, Any]]) -> str:
    parts = [f"{row}: {t} {fmt_signed(v)}" for row, found in leakage(matrix).items() if found for t, v in [found]]
    return f"<p>Largest leakage (off-diagonal refusal category) per row — {esc('; '.join(parts))}.</p>" if parts else ""


def ablation_section(ablation: Mapping[str, Any] | None) -> Section | None:
    """Feature ablation (seed-averaged matrix, per-seed strip), directional ablation and sufficiency."""
    if not ablation:
        return None
    facts = [("positions", ablation.get("positions")), ("features ablated per category", ablation.get("features")),
             ("frequency-matched control draws", ablation.get("control_draws")),
             ("seeds with controls", ablation.get("control_seeds")),
             ("baseline verdicts differing from the evaluate stage", ablation.get("baseline_disagreements"))]
    body = [key_values(facts)]
    features = ablation.get("feature_ablation") or {}
    if features.get("averaged"):
        body.append("<h3>SAE feature ablation: which features are necessary (seed-averaged)</h3>")
        body.append(_matrix(features["averaged"], "ablated features of",
                            "Row c: c's selected SAE features zeroed (error term kept) at the positions above; column: "
                            "change of that set's refusal rate, mean over SAE seeds [95% CI for seed and prompt variance: "
                            "t interval, between-seed plus prompt variance]; − control: selected minus frequency-matched "
                            "random features of the same number; seeds: the per-seed changes. Diagonal = necessity."))
        body.append(_leakage_line(features["averaged"]))
    if ablation.get("directional"):
        d = ablation["directional"]
        body.append(f"<h3>Directional ablation of v_c ({esc(d['layers'])} layer(s), {d['draws']} random directions)</h3>")
        body.append(_matrix(d["matrix"], "projected out v_c of",
                            "Row c: c's residual mean-difference direction projected out; beside it random unit "
                            "directions (a projection does not depend on the norm)."))
    if ablation.get("sufficiency"):
        s = ablation["sufficiency"]
        body.append(f"<h3>Sufficiency: steering toward c (+{s['alpha']:g} · v_c, {s['draws']} random directions)</h3>")
        body.append(_matrix(s["matrix"], "steered toward",
                            "Row c: every eval prompt steered by +alpha · v_c; beside it random directions of v_c's norm. "
                            "A vector is sufficient when its increase beats the random directions'."))
    return Section("ablation", "\n".join(body))
