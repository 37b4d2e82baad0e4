"""Report sections built from `ReportExtras` (things that are not in `summary.json`).

Each function returns a `Section`, or None when its input is missing or empty.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from analysis.reporting.feature_pages import feature_cards_html
from analysis.reporting.plots import ordered_labels, plot_tradeoff
from analysis.reporting.html import (
    FigureMaker, Section, esc, figure, is_rate, rate_cell, records_table, row_header, table, value_cell, yaml_block,
)

FEATURE_KEYS = ("feature", "weight", "selection_frequency", "activation_frequency")
TOP_FEATURES = 10


def _check_feature_row(category: str, index: int, row: Mapping[str, Any]) -> None:
    missing = [k for k in FEATURE_KEYS if k not in row]
    if missing:
        raise ValueError(f"features[{category!r}][{index}] lacks the key(s) {missing}; expected {list(FEATURE_KEYS)}")


def _highlight(cell: str) -> str:
    """Add the CSS class "own" to a `<td>` cell."""
    if cell.startswith('<td class="'):
        return cell.replace('class="', 'class="own ', 1)
    return cell.replace("<td", '<td class="own"', 1)


def _feature_header(act_cats: Sequence[str]) -> str:
    """Two header rows: the fixed columns span both, "activation frequency" spans the categories."""
    fixed = "".join(f'<th rowspan="2">{esc(h)}</th>' for h in ("#", "feature", "weight", "selection freq."))
    top = f'<tr>{fixed}<th colspan="{len(act_cats)}" class="group">activation frequency</th></tr>'
    return top + "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in act_cats) + "</tr>"


def features_section(features: Mapping[str, Sequence[Mapping[str, Any]]] | None,
                     cards: Sequence[Mapping[str, Any]] | None = None) -> Section | None:
    """Per category, its selected features by selection frequency then |weight|, with activation
    frequencies; features flagged dense (fire on every category) are listed apart; then one card per
    selected feature (`analysis.reporting.feature_pages`) when `cards` are given.

    Each row: `{feature: int, weight: float, selection_frequency: float | None, activation_frequency:
    {cat: float}}`, optionally `dense: true`. The activation-frequency column of the feature's own
    category is highlighted.
    """
    if not features and not cards:
        return None
    body = []
    for category in ordered_labels(list(features or {})):
        rows = list(features[category])  # type: ignore[index]
        for i, row in enumerate(rows):
            _check_feature_row(category, i, row)
        dense = [r for r in rows if r.get("dense")]
        rows = [r for r in rows if not r.get("dense")]
        ranked = sorted(rows, key=lambda r: (-float(r["selection_frequency"] or 0.0), -abs(float(r["weight"]))))[:TOP_FEATURES]
        act_cats = ordered_labels([c for r in ranked for c in r["activation_frequency"]])
        cells = []
        for rank, row in enumerate(ranked, start=1):
            freq = row["activation_frequency"]
            act = [_highlight(value_cell(freq.get(c))) if c == category else value_cell(freq.get(c)) for c in act_cats]
            cells.append([value_cell(rank), value_cell(row["feature"]), value_cell(float(row["weight"])),
                          value_cell(row["selection_frequency"]), *act])
        shown = f"top {len(ranked)} of {len(rows)}" if rows else "no features selected"
        text = (f"<h3>{esc(category)} <small>({esc(shown)})</small></h3>"
                + (table([], cells, header_html=_feature_header(act_cats)) if ranked else ""))
        if dense:
            listed = ", ".join(f"{int(r['feature'])} (fires on ≥ {min(r['activation_frequency'].values()):.0%} of every category)"
                               for r in dense)
            text += f'<p class="caption">Dense, not presented as {esc(category)} features: {esc(listed)}.</p>'
        body.append(text)
    note = ("<p>Selection frequency: share of bootstrap fits that kept the feature. Activation frequency: share of "
            "extract rows (last prompt token) of each category on which the feature fires (own category highlighted). "
            "A feature that fires on more than 10% of the rows of every category is a dense latent: it is listed "
            "apart, not as a category feature.</p>")
    if cards:
        body.append("<h3>Feature pages</h3><p>One card per selected feature of the reference seed: the prompts "
                    "(extract / calibrate only) where it fires most, each token shaded by its activation and the peak "
                    "outlined with its value; what it does per category; the logit lens of its decoder row; its "
                    "decoder cosine with the category's mean-difference vector; its Hungarian match in the other "
                    "seeds.</p>" + feature_cards_html(cards))
    return Section("features", note + "\n".join(body))


def tradeoff_section(points: Sequence[Mapping[str, Any]] | None, figs: FigureMaker) -> Section | None:
    """Over-refusal against harmful refusal per condition and strength: a plot and the numbers."""
    if not points:
        return None
    uri = figs.plot(plot_tradeoff, list(points))
    rows = [[row_header(p["condition"]), _strength_cell(p["strength"]), rate_cell(p["over_refusal"]), rate_cell(p["harmful"])]
            for p in sorted(points, key=lambda p: str(p["condition"]))]  # stable: strengths keep their order
    body = [figure(uri, "Over-refusal (benign prompts refused) against harmful refusal rate, 95% CIs; labels are strengths."),
            table(["condition", "strength", "over-refusal", "harmful refusal"], rows)]
    return Section("tradeoff", "\n".join(body))


def _strength_cell(strength: Any) -> str:
    """Steering strengths as written (2.0 → "2"), right-aligned."""
    text = f"{strength:g}" if isinstance(strength, (int, float)) and not isinstance(strength, bool) else str(strength)
    return f'<td class="num">{esc(text)}</td>'


def vectors_section(per_category: Mapping[str, Any] | None) -> Section | None:
    """Sufficiency of each category's vector v_c: what steering toward c does to benign + contrast prompts.

    Accepts `{category: {rate, ci, n}}` (one column) or `{category: {column: {rate, ci, n} or number}}`.
    """
    if not per_category:
        return None
    categories = ordered_labels(list(per_category))
    caption = ("Every eval prompt steered toward category c with its own vector v_c (ablate stage, at its positions: "
               "see the ablation section); columns are "
               "shares of the benign + contrast prompts: refused, and whose first token chose c (not the same thing: "
               "a refused prompt may choose another category).")
    if all(is_rate(v) or not isinstance(v, Mapping) for v in per_category.values()):
        rows = [[row_header(c), value_cell(per_category[c]) if not is_rate(per_category[c]) else rate_cell(per_category[c])]
                for c in categories]
        return Section("vectors", table(["steered toward", "share of benign + contrast"], rows, caption))
    columns = ordered_labels([s for v in per_category.values() if isinstance(v, Mapping) for s in v])
    rows = []
    for c in categories:
        entry = per_category[c] if isinstance(per_category[c], Mapping) else {}
        rows.append([row_header(c)] + [(rate_cell(entry[s]) if is_rate(entry[s]) else value_cell(entry[s]))
                                       if s in entry else "<td>—</td>" for s in columns])
    return Section("vectors", table(["steered toward", *columns], rows, caption, "matrix"))


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted columns; rate dicts stay whole (one cell each)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not is_rate(value):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def seeds_section(seed_table: Sequence[Mapping[str, Any]] | None) -> Section | None:
    """One row per seed: its SAE metrics and per-seed refusal rates (nested keys become dotted columns)."""
    if not seed_table:
        return None
    return Section("seeds", records_table([_flatten(r) for r in seed_table]))


def notes_section(notes: Sequence[str] | None) -> Section | None:
    """Free-text lines (e.g. wall time per stage) as a list."""
    if not notes:
        return None
    return Section("notes", "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in notes) + "</ul>")


def config_section(config: Mapping[str, Any] | None) -> Section | None:
    """The pipeline configuration, as YAML."""
    if not config:
        return None
    return Section("config", yaml_block(config))
