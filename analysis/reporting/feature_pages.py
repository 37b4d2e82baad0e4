"""HTML of the feature pages: one card per selected feature, from the plain dicts of
`probes.feature_cards.build_feature_cards` (the report's "Selected features" section, and the page
`refusal-sae features` writes).

A card shows the top-activating prompts with every token shaded by its activation (the peak token
outlined, its value printed), prompts of other categories where the feature fires, a bar chart of the
firing frequency and mean activation per category (pure CSS, no image), the logit lens of the decoder
direction, its cosine with the category's mean-difference vector, and its stability across seeds.
All text from data is escaped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from activations.io import write_text_atomic
from activations.records import CATEGORIES
from analysis.reporting.html import esc, fmt_num
from analysis.reporting.plots import CATEGORY_COLORS

CARD_STYLE = """
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.card h4 { margin: 0 0 6px; font-size: 15px; }
.card .facts { color: var(--muted); font-size: 12.5px; margin-bottom: 6px; }
.card .flag { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 11.5px; margin-left: 6px; }
.flag.ok { background: #e3f3e3; color: #1f6b1f; } .flag.no { background: #f3e3e3; color: #8b1f1f; }
.card .cols { display: grid; grid-template-columns: minmax(0, 3fr) minmax(260px, 1.3fr); gap: 18px; }
.ex { font: 12.5px/1.9 ui-monospace, Menlo, Consolas, monospace; margin: 2px 0; white-space: normal; }
.ex .tag { display: inline-block; min-width: 112px; color: var(--muted); font-family: sans-serif; font-size: 11.5px; }
.tok { padding: 1px 1px; border-radius: 2px; white-space: pre; }
.tok.peak { outline: 2px solid #b8860b; font-weight: 700; }
.val { color: #8a5a00; font-size: 11px; margin-left: 3px; font-family: sans-serif; }
.bars { font-size: 12px; } .bars .row { display: grid; grid-template-columns: 96px 1fr 44px; gap: 6px; align-items: center; }
.bars .track { background: var(--bg-soft); height: 11px; border-radius: 2px; }
.bars .fill { display: block; height: 11px; border-radius: 2px; }
.lens { font: 12px ui-monospace, Menlo, Consolas, monospace; }
.lens code { background: var(--bg-soft); padding: 0 3px; margin: 0 2px; border-radius: 2px; }
h5 { margin: 8px 0 3px; font-size: 12.5px; color: var(--muted); }
"""


def _token(text: str, value: float, peak_value: float, peak: bool) -> str:
    """One token, shaded by its activation relative to the prompt's peak."""
    shown = text.replace("\n", "⏎").replace("\t", "⇥") or "·"
    alpha = 0.0 if peak_value <= 0 else max(0.0, min(1.0, value / peak_value)) * 0.75
    style = f' style="background: rgba(255, 153, 0, {alpha:.2f})"' if alpha > 0.01 else ""
    title = f' title="{value:.3g}"'
    cls = "tok peak" if peak else "tok"
    return f'<span class="{cls}"{style}{title}>{esc(shown)}</span>'


def _example(ex: Mapping[str, Any]) -> str:
    """A prompt line: category tag, tokens shaded, the peak token outlined with its value after it."""
    peak_value = float(ex["value"])
    parts = []
    for i, (tok, val) in enumerate(zip(ex["tokens"], ex["values"])):
        parts.append(_token(tok, float(val), peak_value, i == ex["argmax"]))
        if i == ex["argmax"]:
            parts.append(f'<span class="val">{peak_value:.3g}</span>')
    lead = "… " if ex.get("truncated_left") else ""
    tag = f'<span class="tag">{esc(ex["category"])} · {esc(ex["split"])}</span>'
    return f'<div class="ex">{tag}{lead}{"".join(parts)}</div>'


def _bars(per_category: Mapping[str, Mapping[str, Any]], key: str, own: str) -> str:
    """Horizontal bars of `key` per category (frequency in [0, 1]; means scaled to the largest)."""
    cats = [c for c in CATEGORIES if c in per_category] + [c for c in per_category if c not in CATEGORIES]
    top = max([float(per_category[c][key]) for c in cats] + [1e-12]) if key != "frequency" else 1.0
    rows = []
    for c in cats:
        value = float(per_category[c][key])
        width = 100.0 * max(0.0, value) / top
        color = CATEGORY_COLORS.get(c, "#888")
        label = f"<b>{esc(c)}</b>" if c == own else esc(c)
        rows.append(f'<div class="row"><span>{label}</span><span class="track"><span class="fill" '
                    f'style="width: {width:.1f}%; background: {color}"></span></span><span>{esc(fmt_num(value, 2))}</span></div>')
    return f'<div class="bars">{"".join(rows)}</div>'


def _lens(lens: Mapping[str, Any] | None) -> str:
    if not lens:
        return "<p class=\"facts\">no logit lens (no model given)</p>"
    fmt = lambda items: " ".join(f"<code>{esc(str(t).replace(chr(10), '⏎'))}</code>" for t, _ in items)  # noqa: E731
    return f'<div class="lens">↑ {fmt(lens["top"])}<br>↓ {fmt(lens["bottom"])}</div>'


def _stability(stability: Mapping[str, Any] | None) -> str:
    if not stability:
        return "one seed: no stability"
    pairs = ", ".join(f"seed {esc(s)} → {esc(m['latent'])} (cos {m['cosine']:.2f})" for s, m in stability["seeds"].items())
    return (f"matched (cos ≥ {stability['match_cosine']:.2f}) in {stability['n_matched']} of "
            f"{stability['n_other_seeds']} other seeds: {pairs}")


def _facts(card: Mapping[str, Any]) -> str:
    facts = []
    for key, label in (("weight", "head weight"), ("selection_frequency", "selection freq."),
                       ("firing_frequency", "fires on (held-out tokens)")):
        if card.get(key) is not None:
            facts.append(f"{label} {esc(fmt_num(float(card[key]), 3))}")
    if card.get("cosine_mean_difference") is not None:
        facts.append(f"cos(decoder, mean-difference vector of {esc(card['category'])}) {card['cosine_mean_difference']:.3f}")
    return " · ".join(facts)


def feature_card(card: Mapping[str, Any]) -> str:
    """The HTML of one feature card."""
    flags = ""
    if "consensus" in card:
        ok = bool(card["consensus"])
        flags += f'<span class="flag {"ok" if ok else "no"}">{"consensus" if ok else "not in consensus"}</span>'
    if card.get("dense"):
        flags += '<span class="flag no">dense: fires everywhere</span>'
    examples = "".join(_example(ex) for ex in card["top_examples"]) or "<p class=\"facts\">never fires on these rows</p>"
    others = "".join(_example(ex) for ex in card["other_examples"]) or "<p class=\"facts\">fires on no other category</p>"
    per_cat = card.get("per_category") or {}
    right = (f"<h5>firing frequency at response start</h5>{_bars(per_cat, 'frequency', card['category'])}"
             f"<h5>mean activation at response start</h5>{_bars(per_cat, 'mean', card['category'])}"
             f"<h5>logit lens of the decoder direction</h5>{_lens(card.get('logit_lens'))}")
    return (f'<div class="card" id="feature-{esc(card["category"])}-{esc(card["feature"])}">'
            f'<h4>{esc(card["category"])} · feature {esc(card["feature"])}{flags}</h4>'
            f'<div class="facts">{_facts(card)}</div><div class="facts">stability: {_stability(card.get("stability"))}</div>'
            f'<div class="cols"><div><h5>top-activating prompts (extract / calibrate)</h5>{examples}'
            f"<h5>other categories where it fires</h5>{others}</div><div>{right}</div></div></div>")


def feature_cards_html(cards: Sequence[Mapping[str, Any]]) -> str:
    """Every card, grouped by category in `CATEGORIES` order (categories without cards say so)."""
    by_category: dict[str, list[Mapping[str, Any]]] = {}
    for card in cards:
        by_category.setdefault(str(card["category"]), []).append(card)
    order = [c for c in CATEGORIES if c in by_category] + [c for c in by_category if c not in CATEGORIES]
    return "\n".join(f"<h3>{esc(c)} <small>({len(by_category[c])} features)</small></h3>"
                     + "".join(feature_card(card) for card in by_category[c]) for c in order)


def write_feature_page(path: Any, cards: Sequence[Mapping[str, Any]], title: str, facts: Sequence[tuple[str, Any]] = (),
                       style: str = "") -> Any:
    """A standalone page of feature cards (`style`, e.g. the report's CSS, plus the cards'), written atomically."""
    from analysis.reporting.html import key_values

    body = feature_cards_html(cards) if cards else "<p>No features selected.</p>"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{style}{CARD_STYLE}</style></head><body><main><h1>{esc(title)}</h1>{key_values(list(facts))}"
            f"{body}</main></body></html>")
    return write_text_atomic(path, page, mode=0o644)
