"""Report sections built from `summary.json` (plus the extras that belong next to them).

Each function returns a `Section` (or None when it has nothing to show). Row/column orders are
fixed: conditions in `analysis.reporting.summary.REQUIRED_CONDITIONS` order, categories in
`activations.records.CATEGORIES` order, anything else after them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from activations.records import REFUSAL_CATEGORIES
from analysis.reporting.plots import ordered_labels, plot_rate_bars, plot_training_curves, png_to_data_uri
from analysis.reporting.html import (
    FigureMaker, Section, esc, figure, fmt_num, key_values, rate_cell, row_header, table, value_cell, yaml_block,
)
from analysis.reporting.seed_sections import SEED_NOTE, as_rates, condition_cell
from analysis.reporting.summary import REQUIRED_CONDITIONS, REQUIRED_KEYS, SECTION_KEYS

GEOMETRY_DIRECTION = {"silhouette": "↑ higher is better", "davies_bouldin": "↓ lower is better",
                      "calinski_harabasz": "↑ higher is better"}

STABILITY_LABELS = {"matched_cosine_mean": "matched decoder cosine (mean over seed pairs)"}


def _conditions(table_by_condition: Mapping[str, Any]) -> list[str]:
    """Condition names: the required ones in their fixed order, then the others as given."""
    known = [c for c in REQUIRED_CONDITIONS if c in table_by_condition]
    return known + [c for c in table_by_condition if c not in REQUIRED_CONDITIONS]


def _seed_order(keys: Sequence[Any]) -> list[Any]:
    """Seeds sorted numerically when they look like integers (JSON turns int keys into strings)."""
    return sorted(keys, key=lambda k: (0, int(k), "") if str(k).lstrip("-").isdigit() else (1, 0, str(k)))


def _short_hash(digest: Any) -> str:
    text = str(digest or "")
    return f'<td><code title="{esc(text)}">{esc(text[:12])}</code></td>' if text else "<td>—</td>"


def splits_section(splits: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> Section:
    """Per split: n, per-category counts and the sha256 of its records; the prompt manifest if given."""
    categories = ordered_labels([c for s in splits.values() for c in s.get("categories", {})])
    rows = [[row_header(name), value_cell(s.get("n"))]
            + [value_cell(s.get("categories", {}).get(c, 0)) for c in categories] + [_short_hash(s.get("sha256"))]
            for name, s in splits.items()]
    body = [table(["split", "n", *categories, "sha256"], rows,
                  "Fit on extract, tune on calibrate, report on eval (disjoint by construction).")]
    if manifest:
        body.append(_manifest_html(splits, manifest))
    return Section("splits", "\n".join(body))


def _manifest_html(splits: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """Scalar facts of the prompt-set manifest, its sources, and a warning if its hashes disagree."""
    parts = []
    facts = [(k, v) for k, v in manifest.items() if k not in ("splits", "sources", "categories")]
    if facts:
        parts.append("<h3>Prompt-set manifest</h3>" + key_values(facts))
    sources = manifest.get("sources") or []
    if sources:
        rows = [[value_cell(s.get("spec")), value_cell(s.get("kind")), value_cell(s.get("n")),
                 _short_hash(s.get("sha256"))] for s in sources]
        parts.append(table(["source", "kind", "n kept", "sha256"], rows))
    mismatched = [name for name, s in (manifest.get("splits") or {}).items()
                  if name in splits and s.get("sha256") and s.get("sha256") != splits[name].get("sha256")]
    if mismatched:
        parts.append(f'<p class="warning">Warning: the manifest\'s sha256 differs from summary.json for '
                     f'split(s) {esc(", ".join(mismatched))}: the results may come from other prompts.</p>')
    return "\n".join(parts)


SAE_METRICS: tuple[tuple[str, str], ...] = (
    ("fvu", "FVU, all evaluation rows"),
    ("fvu_content", "FVU, user-content rows"),
    ("fvu_response_start", "FVU, response-start rows"),
    ("l0", "L0 (active latents per row)"),
    ("l0_content", "L0, user-content rows"),
    ("l0_response_start", "L0, response-start rows"),
    ("dead_fraction", "dead latents (fire on no row)"),
    ("dense_fraction", "dense latents (fire on > 10% of rows)"),
    ("ce_recovered_content", "CE loss recovered, splice at content"),
    ("ce_recovered_response_start", "CE loss recovered, splice at response start"),
    ("kl_content", "KL to clean, splice at content"),
    ("kl_response_start", "KL to clean, splice at response start"),
    ("decision_fidelity_content", "decision unchanged, splice at content"),
    ("decision_fidelity_response_start", "decision unchanged, splice at response start"),
    ("n_rows", "evaluation rows"),
    ("metrics_split", "evaluation split"),
    ("held_out", "held out from training"),
)
"""The SAE-quality rows of the report, in order (metrics a seed lacks show as —)."""


def _metric_cell(value: Any, ci: Any = None) -> str:
    if ci and isinstance(value, (int, float)) and all(isinstance(c, (int, float)) for c in ci):
        return f'<td class="num">{esc(fmt_num(float(value)))} <span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span></td>'
    return value_cell(value)


def sae_section(sae: Mapping[str, Any], curves: Mapping[int, Mapping[str, Sequence[float]]] | None,
                figs: FigureMaker, training_rows: Mapping[str, Any] | None = None) -> Section:
    """SAE quality per seed (one column per seed): held-out FVU / L0 per position kind, dead and dense
    latents, the spliced CE recovered / KL / decision fidelity; the training-row counts and curves."""
    seeds = _seed_order(list(sae))
    known = [k for k, _ in SAE_METRICS]
    extra = [k for s in seeds for k in sae[s] if k not in known and not k.endswith("_ci") and not k.startswith("n_rows_")]
    rows = []
    for key, label in [*SAE_METRICS, *((k, k) for k in dict.fromkeys(extra))]:
        if any(key in sae[s] for s in seeds):
            rows.append([row_header(label)] + [_metric_cell(sae[s].get(key), sae[s].get(f"{key}_ci")) for s in seeds])
    body = [table(["metric", *(f"seed {s}" for s in seeds)], rows,
                  "Scored on rows the SAEs were not trained on (the evaluation split, the kinds trained on, no attention "
                  "sink). Dead: fires on none of the evaluation rows; dense: fires on more than 10% of them. Spliced: "
                  "the layer's output replaced by the reconstruction; CE recovered = (CE_zero − CE_spliced) / (CE_zero "
                  "− CE_clean) with a bootstrap 95% CI over prompts; decision unchanged: first-token refusal decision, "
                  "Wilson 95% CI.")]
    if training_rows:
        removed = ", ".join(f"{esc(rule)} {esc(n)}" for rule, n in (training_rows.get("removed") or {}).items())
        body.append(f"<p>Training rows: {esc(training_rows.get('candidates'))} in the training split; removed {removed}; "
                    f"{esc(training_rows.get('kept'))} kept.</p>")
    if curves:
        uri = figs.plot(plot_training_curves, curves)  # no suptitle: it overlaps the panel titles
        body.append(figure(uri, "Training curves, one line per seed."))
    return Section("sae", "\n".join(body))


def probe_section(probe: Mapping[str, Any]) -> Section:
    """Probe accuracy and macro-F1 on eval with 95% CIs (other probe metrics after them)."""
    names = ["accuracy", "macro_f1"] + [k for k in probe if k not in ("accuracy", "macro_f1")]
    rows = [[row_header(name), value_cell(probe[name])] for name in names if name in probe]
    return Section("probe", table(["metric", "value [95% CI] n"], rows, "Multiclass probe on the eval split."))


def refusal_section(refusal: Mapping[str, Mapping[str, Any]], figs: FigureMaker,
                    seeded: Mapping[str, Mapping[str, Any]] | None = None) -> Section:
    """Condition × set/category table of refusal rates with CIs, and grouped bar charts.

    `seeded` (summary.json `seed_averaged.refusal`): the SAE-dependent conditions' across-seed cells,
    shown instead of the reference seed's rates, with a per-seed strip. The bars come in two charts
    (refusal categories; benign, contrast and any aggregate sets) so that each stays readable at page width.
    """
    conditions = _conditions(refusal)
    sets = ordered_labels([s for c in conditions for s in refusal[c]])
    rows = [[row_header(c)] + [condition_cell(refusal, seeded, c, s) for s in sets] for c in conditions]
    body = [table(["condition", *sets], rows,
                  "Refusal rate [95% Wilson CI] and n prompts, eval split. Darker cells refuse more."
                  + (SEED_NOTE if seeded else "") + _same_as_note(refusal, "steer_lowrank", "steer_toward"), "matrix")]
    refusal = {c: t for c, t in as_rates(refusal, seeded).items() if c in conditions}
    groups = [("Refusal on the refusal categories", [s for s in sets if s in REFUSAL_CATEGORIES]),
              ("Refusal on benign, contrast and aggregate sets", [s for s in sets if s not in REFUSAL_CATEGORIES])]
    for title, group in groups:
        if group:
            data = {c: {s: refusal[c][s] for s in group if s in refusal[c]} for c in conditions}
            body.append(figure(figs.plot(plot_rate_bars, data, title=title), f"{title}, by condition (95% CI)."))
    return Section("refusal", "\n".join(body))


def _same_as_note(refusal: Mapping[str, Mapping[str, Any]], a: str, b: str) -> str:
    """A caption note when condition `a` has exactly `b`'s rates on every set (the same verdicts)."""
    if a not in refusal or b not in refusal:
        return ""
    same = all(refusal[a].get(s, {}).get("rate") == refusal[b][s].get("rate") for s in refusal[b])
    return (f" Note: {a} has exactly {b}'s rates on every set: its direction is (nearly) v_global, so it is not an "
            "independent condition here." if same else "")


def capability_section(capability: Mapping[str, Mapping[str, Any]],
                       readable: Mapping[str, Mapping[str, Any]] | None = None) -> Section | None:
    """Condition × task table of capability scores with CIs; a task whose baseline CI reaches chance is
    marked unreadable in its header (it cannot show harm)."""
    if not capability:
        return None
    readable = readable or {}
    conditions = _conditions(capability)
    tasks = list(dict.fromkeys(t for c in conditions for t in capability[c]))
    headers = [f"{t} (UNREADABLE: at chance)" if readable.get(t, {}).get("readable") is False else t for t in tasks]
    rows = [[row_header(c)] + [rate_cell(capability[c][t], shade=False) if t in capability[c] else "<td>—</td>"
                               for t in tasks] for c in conditions]
    wide = "matrix" if len(tasks) > 4 else ""  # wide tables put n on a second line
    unreadable = [t for t in tasks if readable.get(t, {}).get("readable") is False]
    note = (f" Unreadable: {', '.join(unreadable)} — the baseline's 95% CI reaches chance, so no change can be read "
            "from these scores." if unreadable else "")
    return Section("capability", table(["condition", *headers], rows, "Score [95% CI] and n items per task." + note, wide))


def stability_section(stability: Mapping[str, Any]) -> Section | None:
    """Matched decoder cosine across seeds and per-category Jaccard overlap of the selected features."""
    if not stability:
        return None
    scalars = [(STABILITY_LABELS.get(k, k), v) for k, v in stability.items() if not isinstance(v, Mapping)]
    body = [key_values(scalars)] if scalars else []
    jaccard = stability.get("feature_jaccard") or {}
    if jaccard:
        cats = ordered_labels(list(jaccard))
        body.append(table(["category", "feature Jaccard"], [[row_header(c), value_cell(jaccard[c])] for c in cats],
                          "Mean Jaccard overlap of the selected features between seed pairs (— : undefined)."))
    for key, value in stability.items():
        if isinstance(value, Mapping) and key != "feature_jaccard":
            body.append(f"<h3>{esc(key)}</h3>" + yaml_block(value))
    return Section("stability", "\n".join(body))


def geometry_section(geometry: Mapping[str, Mapping[str, Any]], embedding_pngs: Mapping[str, Path] | None) -> Section | None:
    """Cluster-quality scores per activation space, and the inlined embedding panels."""
    if not geometry and not embedding_pngs:
        return None
    body = []
    if geometry:
        metrics = list(dict.fromkeys(["silhouette", "davies_bouldin", "calinski_harabasz",
                                      *(m for scores in geometry.values() for m in scores)]))
        headers = ["space"] + [f"{m} ({GEOMETRY_DIRECTION[m]})" if m in GEOMETRY_DIRECTION else m for m in metrics]
        rows = [[row_header(space)] + [value_cell(scores.get(m)) for m in metrics] for space, scores in geometry.items()]
        body.append(table(headers, rows, "How well the categories separate in each space (eval rows)."))
    for space, path in (embedding_pngs or {}).items():
        body.append(figure(png_to_data_uri(path), f"{space}: 2-D embeddings coloured by category."))
    return Section("geometry", "\n".join(body))


def other_section(summary: Mapping[str, Any]) -> Section | None:
    """Summary fields the sections above do not show (structured ones only; scalars go in the header)."""
    rest = {k: v for k, v in summary.items()
            if k not in (*REQUIRED_KEYS, *SECTION_KEYS) and k != "schema_version" and isinstance(v, (Mapping, list))}
    if not rest:
        return None
    return Section("other", yaml_block(rest))


def header_facts(summary: Mapping[str, Any], generated: str) -> list[tuple[str, Any]]:
    """Label/value pairs for the page header: model, layers, seeds, schema, dates, other scalars."""
    facts: list[tuple[str, Any]] = [("model", summary.get("model")), ("layers", summary.get("layers")),
                                    ("seeds", summary.get("seeds")), ("schema version", summary.get("schema_version"))]
    for key, value in summary.items():
        if key not in REQUIRED_KEYS and key != "schema_version" and not isinstance(value, (Mapping, list)):
            facts.append((key.replace("_", " "), value))
    facts.append(("report generated", generated))
    return facts

