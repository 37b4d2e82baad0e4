"""`report.html`: one self-contained page with every result of a pipeline run.

The page inlines its images as base64 data URIs and its CSS in a `<style>` block; it loads
nothing from the network and needs no JavaScript, so it can be mailed to a colleague as is.

    from analysis.reporting.report import ReportExtras, write_report
    write_report(Path("runs/x"), summary, ReportExtras(config=cfg, notes=["harvest: 41 s"]))

`summary` must be a valid `summary.json` (see `analysis.reporting.summary`); every `ReportExtras` field
is optional and its section is simply left out when it is None or empty.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from activations.io import write_text_atomic
from analysis.reporting import ablation_sections, benchmark_sections, seed_sections
from analysis.reporting import artifact_sections as report_extra_sections
from analysis.reporting import sections as report_sections
from analysis.reporting.feature_pages import CARD_STYLE
from analysis.reporting.html import FigureMaker, Section, esc, key_values
from analysis.reporting.summary import validate_summary

REPORT_NAME = "report.html"


@dataclass
class ReportExtras:
    """Optional material shown next to `summary.json`; None/empty fields leave their section out.

    config: the pipeline configuration (shown as YAML).
    split_manifest: `PromptSet.manifest()` (per split n, per-category counts, sha256; sources).
    training_curves: seed → metric → values, e.g. {"step": [...], "fvu": [...], "l0": [...]}.
    features: category → rows `{feature, weight, selection_frequency, activation_frequency: {cat: float}}`.
    feature_cards: one dict per selected feature (`probes.feature_cards.build_feature_cards`): its page.
    sae_training_rows: how many rows each SAE training-row rule removed (`sae.rows.RowSelection.to_dict`).
    tradeoff_points: `{condition, strength, over_refusal: {rate, ci, n}, harmful: {rate, ci, n}}` dicts.
    embedding_pngs: space name → PNG from `analysis.evaluation.geometry.plot_embeddings` (inlined).
    seed_table: one dict per seed (metrics and per-seed refusal rates).
    notes: free-text lines, e.g. wall time per stage.
    per_category_vectors: category → {column: {rate, ci, n} or number}: what steering every eval prompt
        toward category c with its own vector v_c does to the benign + contrast prompts (share refused,
        share choosing c, beside random directions).
    frontiers: set name (eval split, then each held-out set) → `gating_frontier` result (with the
        unconditional points), plotted in the gating section.
    distance_tuning: the distance gate's tuning report (`TuningReport.to_dict()`: grid table, frontier).
    """

    config: dict[str, Any] | None = None
    split_manifest: dict[str, Any] | None = None
    training_curves: dict[int, dict[str, list[float]]] | None = None
    features: dict[str, list[dict[str, Any]]] | None = None
    feature_cards: list[dict[str, Any]] | None = None
    sae_training_rows: dict[str, Any] | None = None
    tradeoff_points: list[dict[str, Any]] | None = None
    embedding_pngs: dict[str, Path] | None = None
    seed_table: list[dict[str, Any]] | None = None
    notes: list[str] | None = None
    per_category_vectors: dict[str, Any] | None = None
    frontiers: dict[str, dict[str, Any]] | None = None
    distance_tuning: dict[str, Any] | None = None


STYLE = """
:root { --ink: #1d2330; --muted: #5f6b7a; --line: #dde2ea; --bg-soft: #f6f8fb; --accent: #2b5fab; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; font: 15px/1.5 -apple-system, "Segoe UI", Roboto,
       "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
h3 small { color: var(--muted); font-weight: normal; }
a { color: var(--accent); text-decoration: none; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 10px 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px;
          margin: 18px 0; }
nav.toc ol { margin: 4px 0; padding-left: 20px; columns: 3; column-gap: 32px; }
.table-wrap { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
p.caption { color: var(--muted); font-size: 12px; margin: -8px 0 14px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; vertical-align: top; }
thead th { background: var(--bg-soft); font-weight: 600; white-space: nowrap; }
thead th.group { text-align: center; }
tbody th { font-weight: 600; white-space: nowrap; background: #fbfcfd; }
td.num { text-align: right; }
td.rate { white-space: nowrap; }
table.matrix td.rate .n { display: block; }
td.own { font-weight: 700; background: #fff6d6; }
.ci, .n { color: var(--muted); font-size: 11.5px; }
td.empty { color: var(--muted); }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
pre.yaml { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
           font-size: 12.5px; overflow-x: auto; white-space: pre; }
code { font-size: 12px; }
.warning { background: #fdecea; border-left: 4px solid #d62728; padding: 6px 10px; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""


def _sections(summary: dict[str, Any], extras: ReportExtras, figs: FigureMaker) -> list[Section]:
    """Every section with something to show, in page order."""
    candidates = [
        ablation_sections.findings_section(summary.get("findings")),
        report_sections.splits_section(summary["splits"], extras.split_manifest),
        report_sections.sae_section(summary["sae"], extras.training_curves, figs, extras.sae_training_rows),
        report_sections.probe_section(summary["probe"]),
        report_extra_sections.features_section(extras.features, extras.feature_cards),
        report_sections.refusal_section(summary["refusal"], figs, (summary.get("seed_averaged") or {}).get("refusal")),
        seed_sections.seed_section(summary.get("seed_averaged"), summary.get("steer_sae"),
                                   ((summary.get("gates") or {}).get("probe") or {}).get("by_seed")),
        ablation_sections.paired_section(summary.get("paired_vs_baseline")),
        ablation_sections.ablation_section(summary.get("ablation")),
        benchmark_sections.gating_section(extras.frontiers, figs),
        benchmark_sections.distance_gate_section((summary.get("gates") or {}).get("distance"), extras.distance_tuning, figs),
        benchmark_sections.heldout_section(summary.get("eval_sets")),
        benchmark_sections.separation_section(summary.get("head_separation")),
        report_extra_sections.tradeoff_section(extras.tradeoff_points, figs),
        report_extra_sections.vectors_section(extras.per_category_vectors),
        report_extra_sections.seeds_section(extras.seed_table),
        report_sections.capability_section(summary["capability"], summary.get("capability_readable")),
        benchmark_sections.cost_section(summary.get("benign_text"), summary.get("capability_readable")),
        report_sections.stability_section(summary["stability"]),
        report_sections.geometry_section(summary["geometry"], extras.embedding_pngs),
        report_extra_sections.notes_section(extras.notes),
        report_extra_sections.config_section(extras.config),
        report_sections.other_section(summary),
    ]
    return [s for s in candidates if s is not None]


def render_report(summary: dict[str, Any], extras: ReportExtras | None = None) -> str:
    """The report as one HTML string (see the module docstring). Raises ValueError on an invalid summary."""
    problems = validate_summary(summary)
    if problems:
        raise ValueError(f"summary is not valid ({len(problems)} problem(s)); first: {problems[0]}")
    extras = extras or ReportExtras()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with FigureMaker() as figs:
        sections = _sections(summary, extras, figs)
    toc = "".join(f'<li><a href="#{s.anchor}">{esc(s.title)}</a></li>' for s in sections)
    title = f"Refusal-SAE report — {summary['model']}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{STYLE}{CARD_STYLE}</style></head>",
        "<body><main>",
        f"<header><h1>{esc(title)}</h1>{key_values(report_sections.header_facts(summary, generated))}</header>",
        f'<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>',
        *(s.html() for s in sections),
        "<footer>Rates are shown as rate [95% CI] n=count (Wilson intervals unless stated). "
        "Generated by refusal-sae; this page is self-contained.</footer>",
        "</main></body></html>",
    ])


def write_report(out_dir: Path, summary: dict[str, Any], extras: ReportExtras | None = None) -> Path:
    """Write `out_dir/report.html` atomically (temp file in the same folder, then os.replace); return its path."""
    page = render_report(summary, extras)
    return write_text_atomic(Path(out_dir) / REPORT_NAME, page, mode=0o644)
