"""`refusal-sae compare RUN [RUN ...] --out DIR`: run-vs-run and averaged comparison tables from summary files.

Writes `compare.md` and `compare.html` (into `--out`, default the current folder) and prints the Markdown.
The run folders (or summary.json files) may lead the command line bare, or follow `--runs`.

Runs that differ only in their seeds (`seed`, `train.seeds` in each run's config.yaml) and keep their
per-prompt verdicts (`RUN/evaluate/rows.json`) are also averaged as the summary averages SAE seeds:
per refusal cell the mean over runs with a CI for run and prompt variance (`activations.stats.seed_average`
when the runs share their eval prompts, else `run_average`), in the column "seed-averaged [95% CI]".
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
    """`{"refusal.<condition>.<set>": "mean [lo, hi] (runs=R)"}` over runs that differ only in seeds and
    keep `evaluate/rows.json`; empty when they do not."""
    from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
    from activations.stats import run_average, seed_average

    files = [p / "evaluate" / "rows.json" for p in paths]
    if len(paths) < 2 or not all(f.is_file() for f in files) or not _seed_only(paths):
        return {}
    runs = [json.loads(f.read_text()) for f in files]
    out = {}
    for condition in [c for c in runs[0] if all(c in r for r in runs)]:
        rows = [r[condition] for r in runs]
        sets = {c: (c,) for c in dict.fromkeys(x["category"] for x in rows[0])}
        sets.update({"over_refusal": (BENIGN, CONTRAST), "harmful_refusal": tuple(REFUSAL_CATEGORIES)})
        paired = all([x["prompt_id"] for x in r] == [x["prompt_id"] for x in rows[0]] for r in rows)
        for name, cats in sets.items():
            values = [np.array([float(x["refused"]) for x in r if x["category"] in cats]) for r in rows]
            if any(v.size == 0 for v in values):
                continue
            avg = seed_average(np.stack(values)) if paired else run_average(values)
            out[f"refusal.{condition}.{name}"] = f"{avg['mean']:.3f} [{avg['ci'][0]:.3f}, {avg['ci'][1]:.3f}] (runs={len(rows)})"
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
