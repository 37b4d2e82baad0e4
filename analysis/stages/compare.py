"""`refusal-sae compare RUN [RUN ...] --out DIR`: run-vs-run and averaged comparison tables from summary files.

Writes `compare.md` and `compare.html` (into `--out`, default the current folder) and prints the Markdown.
The run folders (or summary.json files) may lead the command line bare, or follow `--runs`.
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


def comparison_rows(names: list[str], summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (section, condition, set), one column per run, then mean ± sd."""
    header = ["metric", *names, "mean ± sd"]
    rows: list[list[str]] = []

    def add(label: str, entries: list[dict[str, Any] | None], key: str) -> None:
        values = [e[key] for e in entries if e and e.get(key) is not None]
        spread = f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}" if values else "–"
        rows.append([label, *[_fmt(e, key) for e in entries], spread])

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
    header, rows = comparison_rows(names, summaries)
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
