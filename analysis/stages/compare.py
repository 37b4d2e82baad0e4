"""`refusal-sae compare RUN [RUN ...] --out DIR`: run-vs-run and averaged comparison tables from summary files.

Writes `compare.md` and `compare.html` (into `--out`, default the current folder) and prints the Markdown.
The run folders (or summary.json files) may lead the command line bare, or follow `--runs`.

Runs that differ only in their seeds (`seed`, `train.seeds` in each run's config.yaml) and keep their
per-prompt verdicts (`RUN/evaluate/rows.json`) are also averaged as the summary averages SAE seeds:
per refusal cell the mean over runs with a CI for run and prompt variance (`activations.stats.seed_average`
when the runs share their eval prompts, else `run_average`), in the column "seed-averaged [95% CI]".
The SAE-dependent conditions (conditional_probe, steer_sae, ablate) pool every (run, SAE seed) pair of
`RUN/evaluate/rows_by_seed.json`, and the feature-ablation matrices of the ablate stage (rows
`ablation.<c>.<target>`: selected, `ablation_vs_control.<c>.<target>`: selected − control) pool the
(run, SAE seed) pairs of `RUN/ablate/rows.json` the same way (`analysis.evaluation.matrix_average`).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activations.io import write_text_atomic
from analysis.stages.command import Command


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read `summary.json` from a run folder (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json at {path}")
    return json.loads(path.read_text())


def _fmt(entry: dict[str, Any] | None, key: str = "rate") -> str:
    if not entry or entry.get(key) is None:
        return "–"
    lo, hi = entry.get("ci", [None, None])
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
    return f"{entry[key]:.2f}{ci} (n={entry.get('n', '?')})"


def _seed_only(paths: list[Path]) -> bool:
    """Whether every run folder has a config.yaml and they differ at most in `seed` and `train.seeds`."""
    import yaml

    configs = []
    for path in paths:
        file = path / "config.yaml"
        if not file.is_file():
            return False
        cfg = yaml.safe_load(file.read_text()) or {}
        cfg.pop("seed", None)
        cfg.get("train", {}).pop("seeds", None)
        cfg.pop("out", None)
        configs.append(cfg)
    return all(c == configs[0] for c in configs[1:])


def seed_averaged_cells(paths: list[Path]) -> dict[str, str]:
    """`{"refusal.<condition>.<set>" | "ablation[_vs_control].<c>.<target>": "mean [lo, hi] (runs=R)"}` over
    runs that differ only in seeds (refusal: those that keep `evaluate/rows.json`; ablation: `ablate/rows.json`)."""
    from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
    from activations.stats import run_average, seed_average

    if len(paths) < 2 or not _seed_only(paths):
        return {}
    files = [p / "evaluate" / "rows.json" for p in paths]
    runs = [json.loads(f.read_text()) for f in files] if all(f.is_file() for f in files) else [{}]
    by_seed = _per_seed_rows(paths)
    out = {}
    for condition in [c for c in runs[0] if all(c in r for r in runs)]:
        # one list of rows per run, or per (run, SAE seed) pair for the SAE-dependent conditions
        per_run = [list(b[condition].values()) for b in by_seed] if by_seed and condition in by_seed[0] else [[r[condition]] for r in runs]
        rows = [x for per in per_run for x in per]
        sets = {c: (c,) for c in dict.fromkeys(x["category"] for x in rows[0])}
        sets.update({"over_refusal": (BENIGN, CONTRAST), "harmful_refusal": tuple(REFUSAL_CATEGORIES)})
        paired = all([x["prompt_id"] for x in r] == [x["prompt_id"] for x in rows[0]] for r in rows)
        for name, cats in sets.items():
            values = [[np.array([float(x["refused"]) for x in r if x["category"] in cats]) for r in per] for per in per_run]
            if any(v.size == 0 for per in values for v in per):
                continue
            avg = (seed_average(np.stack([v for per in values for v in per])) if paired
                   else run_average([np.mean(per, axis=0) for per in values]))
            out[f"refusal.{condition}.{name}"] = _cell(avg, len(runs), len(rows))
    out.update(_ablation_cells(paths))
    return out


def _cell(avg: dict[str, Any], n_runs: int, n_pairs: int) -> str:
    pairs = f", run×seed pairs={n_pairs}" if n_pairs != n_runs else ""
    return f"{avg['mean']:.3f} [{avg['ci'][0]:.3f}, {avg['ci'][1]:.3f}] (runs={n_runs}{pairs})"


def _per_seed_rows(paths: list[Path]) -> list[dict[str, Any]] | None:
    """Each run's `{condition: {seed: rows}}` on the eval split (`evaluate/rows_by_seed.json`), or None
    when a run lacks the file."""
    files = [p / "evaluate" / "rows_by_seed.json" for p in paths]
    if not all(f.is_file() for f in files):
        return None
    found = [json.loads(f.read_text()).get("eval", {}) for f in files]
    common = [c for c in found[0] if all(c in f for f in found)]
    return [{c: f[c] for c in common} for f in found]


def _ablation_cells(paths: list[Path]) -> dict[str, str]:
    """The feature-ablation matrices pooled over the runs' (run, SAE seed) pairs (`ablate/rows.json`)."""
    from analysis.evaluation.matrix_average import average_matrices

    files = [p / "ablate" / "rows.json" for p in paths]
    if not all(f.is_file() for f in files):
        return {}
    out = {}
    for row, cells in average_matrices([json.loads(f.read_text()) for f in files]).items():
        for target, cell in cells.items():
            for key, prefix in (("effect", "ablation"), ("vs_control", "ablation_vs_control")):
                if key in cell:
                    out[f"{prefix}.{row}.{target}"] = _cell(cell[key], len(paths), cell["n_pairs"])
    return out


def comparison_rows(names: list[str], summaries: list[dict[str, Any]],
                    averaged: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (section, condition, set), one column per run, then mean ± sd (and,
    with `averaged`, the seed-averaged mean [95% CI] of `seed_averaged_cells`)."""
    header = ["metric", *names, "mean ± sd"] + (["seed-averaged [95% CI]"] if averaged else [])
    rows: list[list[str]] = []

    def add(label: str, entries: list[dict[str, Any] | None], key: str) -> None:
        values = [e[key] for e in entries if e and e.get(key) is not None]
        spread = f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}" if values else "–"
        rows.append([label, *[_fmt(e, key) for e in entries], spread] + ([averaged.get(label, "–")] if averaged else []))

    for section, key in (("refusal", "rate"), ("capability", "score")):
        conditions: list[str] = []
        for s in summaries:
            conditions += [c for c in s.get(section, {}) if c not in conditions]
        for condition in conditions:
            sets: list[str] = []
            for s in summaries:
                sets += [t for t in s.get(section, {}).get(condition, {}) if t not in sets]
            for name in sets:
                add(f"{section}.{condition}.{name}", [s.get(section, {}).get(condition, {}).get(name) for s in summaries], key)
    matrices = [((s.get("ablation") or {}).get("feature_ablation") or {}).get("averaged") or {} for s in summaries]
    for row in dict.fromkeys(r for m in matrices for r in m):
        for target in dict.fromkeys(t for m in matrices for t in m.get(row, {})):
            cells = [m.get(row, {}).get(target) or {} for m in matrices]
            add(f"ablation.{row}.{target}", [c.get("effect") for c in cells], "mean")
            add(f"ablation_vs_control.{row}.{target}", [c.get("vs_control") for c in cells], "mean")
    shown = {r[0] for r in rows}  # averaged cells the summaries lack (e.g. an ablation row of a seed)
    rows += [[label, *["–"] * len(names), "–", cell] for label, cell in (averaged or {}).items() if label not in shown]
    for metric in ("accuracy", "macro_f1"):
        add(f"probe.{metric}", [s.get("probe", {}).get(metric) for s in summaries], "value")
    for metric in ("fvu", "l0", "dead_fraction"):
        entries = []
        for s in summaries:
            per_seed = [m[metric] for m in s.get("sae", {}).values() if metric in m]
            entries.append({"value": float(np.mean(per_seed)), "n": len(per_seed), "ci": [min(per_seed), max(per_seed)]} if per_seed else None)
        add(f"sae.{metric} (seed mean, [min, max])", entries, "value")
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_html(header: list[str], rows: list[list[str]], title: str = "refusal-sae run comparison") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    style = "table{border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;padding:3px 6px}"
    return f"<!doctype html><meta charset=utf-8><title>{title}</title><style>{style}</style><h1>{title}</h1><table><tr>{head}</tr>{body}</table>"


@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae compare`.

    Args:
        runs: run folders (or summary.json files).
        out: folder for compare.md and compare.html.
    """

    runs: list[str]
    out: Path = Path(".")


def write_comparison(_cfg: None, inputs: Inputs) -> str:
    """Read the runs' summaries, write compare.md and compare.html into `inputs.out`; return the Markdown."""
    if not inputs.runs:
        raise ValueError("compare needs at least one run folder")
    summaries = [load_summary(r) for r in inputs.runs]
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in inputs.runs]
    folders = [Path(r) if Path(r).is_dir() else Path(r).parent for r in inputs.runs]
    header, rows = comparison_rows(names, summaries, seed_averaged_cells(folders))
    out = Path(inputs.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(header, rows)
    write_text_atomic(out / "compare.md", markdown)
    write_text_atomic(out / "compare.html", to_html(header, rows))
    return markdown


def show(_inputs: Inputs, markdown: str) -> None:
    print(markdown)


COMMAND = Command(
    name="compare", help="compare summary.json files of several runs", inputs=Inputs, run=write_comparison, show=show,
    positional="runs",
)
