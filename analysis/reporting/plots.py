"""Shared plotting helpers: fixed category colours, atomic PNG writes, and the report plots.

Figures are built with `matplotlib.figure.Figure` directly (the Agg canvas, no pyplot, no
global backend switch), so plotting works headless and leaves no open figures behind.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from activations.io import atomic_write
from activations.records import CATEGORIES

CATEGORY_COLORS: dict[str, str] = {
    "benign": "#7f7f7f",
    "humanizing": "#9467bd",
    "incomplete": "#ff7f0e",
    "indeterminate": "#17becf",
    "safety": "#d62728",
    "unsupported": "#1f77b4",
    "contrast": "#2ca02c",
}
"""One fixed colour per category in activations.records.CATEGORIES, used by every plot."""

_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39", "#7b4173")

BASELINE_COLOR = "#4d4d4d"
"""Dark grey: the `baseline` condition in every bar chart, so interventions stand out against it."""

CONDITION_PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#9edae5", "#f7b6d2", "#dbdb8d", "#c49c94",
)
"""Qualitative colours for conditions (tab10 without grey, then the light tab20 tones): distinct hues first."""

MAX_BAR_FIGURE_WIDTH = 11.0
"""Widest a bar chart gets (inches), however many conditions and categories it holds."""


def condition_colors(conditions: Sequence[str], avoid: Sequence[str] = ()) -> dict[str, str]:
    """A distinct colour per condition, in order: `baseline` dark grey, the others from CONDITION_PALETTE
    without the colours in `avoid` (cycling only when the palette runs out)."""
    palette = [c for c in CONDITION_PALETTE if c not in set(avoid)] or list(CONDITION_PALETTE)
    colors: dict[str, str] = {}
    others = [c for c in dict.fromkeys(conditions) if c != "baseline"]
    if "baseline" in conditions:
        colors["baseline"] = BASELINE_COLOR
    for i, cond in enumerate(others):
        colors[cond] = palette[i % len(palette)]
    return colors


def color_for(label: str, extra_labels: Sequence[str] = ()) -> str:
    """Colour of a category; labels outside CATEGORIES get a colour by their rank in `extra_labels`."""
    if label in CATEGORY_COLORS:
        return CATEGORY_COLORS[label]
    extras = sorted(set(extra_labels) - set(CATEGORY_COLORS))
    rank = extras.index(label) if label in extras else 0
    return _EXTRA_COLORS[rank % len(_EXTRA_COLORS)]


def ordered_labels(labels: Sequence[str]) -> list[str]:
    """Unique labels, known categories first in CATEGORIES order, then the rest sorted."""
    present = set(labels)
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


def save_fig(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write `fig` atomically to `path` (format from the suffix, e.g. .png); returns the path."""
    out = Path(path)
    fmt = out.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(f"output path {out} has no suffix to pick the image format from")
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))


def png_to_data_uri(path: str | os.PathLike[str]) -> str:
    """`data:image/png;base64,...` string of a PNG file, for inlining into HTML."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"PNG file not found: {p}")
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def rate_plane(ax: Any, xlabel: str, ylabel: str, plot_title: str, **legend: Any) -> None:
    """Finish an over-refusal × harmful-refusal plot: labels, both axes on [0, 1], grid, legend, title."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    ax.set_title(plot_title)


def _rate_and_err(entry: Mapping[str, Any], what: str) -> tuple[float, float, float]:
    """(rate, lower error, upper error) from a rate dict; raises if the rate is missing."""
    if not isinstance(entry, Mapping) or entry.get("rate") is None:
        raise ValueError(f"{what} has no rate (missing or n = 0)")
    value = float(entry["rate"])
    lo, hi = entry.get("ci", [value, value])
    lo = value if lo is None else float(lo)
    hi = value if hi is None else float(hi)
    return value, max(0.0, value - lo), max(0.0, hi - value)


def plot_tradeoff(points: Sequence[Mapping[str, Any]], out_png: str | os.PathLike[str], title: str = "") -> Path:
    """Over-refusal rate (x) against harmful refusal rate (y), one series per condition.

    `points`: dicts `{condition, strength, over_refusal: {rate, ci}, harmful: {rate, ci}}`.
    Each point has 95% CI error bars and is labelled with its strength; points of one
    condition are joined in order of strength.
    """
    if not points:
        raise ValueError("plot_tradeoff got no points")
    for i, p in enumerate(points):
        for key in ("condition", "strength", "over_refusal", "harmful"):
            if key not in p:
                raise ValueError(f"trade-off point {i} lacks the key {key!r}")
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot(1, 1, 1)
    conditions = list(dict.fromkeys(str(p["condition"]) for p in points))
    named = [c for c in conditions if c in CATEGORY_COLORS]  # a condition named like a category keeps its colour
    palette = condition_colors([c for c in conditions if c not in named], avoid=[CATEGORY_COLORS[c] for c in named])
    for cond in conditions:
        series = sorted((p for p in points if str(p["condition"]) == cond), key=lambda p: float(p["strength"]))
        xs, ys, xerr, yerr = [], [], [[], []], [[], []]
        for p in series:
            what = f"point (condition={cond}, strength={p['strength']})"
            x, xl, xh = _rate_and_err(p["over_refusal"], f"{what} over_refusal")
            y, yl, yh = _rate_and_err(p["harmful"], f"{what} harmful")
            xs.append(x), ys.append(y)
            xerr[0].append(xl), xerr[1].append(xh), yerr[0].append(yl), yerr[1].append(yh)
            ax.annotate(f"{p['strength']:g}" if isinstance(p["strength"], (int, float)) else str(p["strength"]),
                        (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        color = CATEGORY_COLORS[cond] if cond in named else palette[cond]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, color=color, label=cond)
    rate_plane(ax, "over-refusal rate (benign prompts refused)", "harmful refusal rate",
               title or "Refusal trade-off (95% CI)", fontsize=8, title="condition")
    return save_fig(fig, out_png)


def plot_training_curves(
    metrics_by_seed: Mapping[int, Mapping[str, Sequence[float]]], out_png: str | os.PathLike[str], title: str = ""
) -> Path:
    """One panel per metric, one line per seed. A metric named "step" is used as the x axis."""
    if not metrics_by_seed:
        raise ValueError("plot_training_curves got no seeds")
    names = sorted({k for m in metrics_by_seed.values() for k in m if k != "step"})
    if not names:
        raise ValueError("plot_training_curves got no metrics besides 'step'")
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    # constrained layout leaves room for the suptitle above the panel titles
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + (0.4 if title else 0.0)), layout="constrained")
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        for seed in sorted(metrics_by_seed):
            metrics = metrics_by_seed[seed]
            if name not in metrics:
                continue
            y = np.asarray(metrics[name], dtype=np.float64)
            x = np.asarray(metrics["step"], dtype=np.float64) if "step" in metrics else np.arange(y.size)
            if x.size != y.size:
                raise ValueError(f"seed {seed}: metric {name!r} has {y.size} values but 'step' has {x.size}")
            ax.plot(x, y, lw=1, label=f"seed {seed}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_fig(fig, out_png)


def _n_label(table: Mapping[str, Mapping[str, Mapping[str, Any]]], conditions: Sequence[str], category: str) -> str:
    """`n=60` when every condition has the same n for `category`, else the range `n=58–60`."""
    ns = [table[c][category].get("n") for c in conditions if category in table[c]]
    known = sorted({int(n) for n in ns if n is not None})
    if not known:
        return "n=?"
    return f"n={known[0]}" if len(known) == 1 else f"n={known[0]}–{known[-1]}"


def plot_rate_bars(table: Mapping[str, Mapping[str, Mapping[str, Any]]], out_png: str | os.PathLike[str],
                   title: str = "", ylabel: str = "refusal rate") -> Path:
    """Grouped bars: categories on x, one bar per condition, 95% CI error bars, n under each group.

    `table`: condition -> category -> `{rate, ci, n}`. Cells with n = 0 get no bar and "n=0".
    The figure is at most MAX_BAR_FIGURE_WIDTH wide (labels rotate and shrink when crowded), the
    legend sits outside the axes on the right, each condition has its own colour
    (`condition_colors`), and a group's n is shown once when every condition shares it.
    """
    if not table:
        raise ValueError("plot_rate_bars got an empty table")
    conditions = list(table)
    categories = ordered_labels([c for cond in conditions for c in table[cond]])
    colors = condition_colors(conditions)
    width = 0.8 / len(conditions)
    wanted = 1.3 * len(categories) * max(1, len(conditions)) ** 0.5
    fig = Figure(figsize=(min(MAX_BAR_FIGURE_WIDTH, max(6.0, wanted)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(categories), dtype=np.float64)
    for ci, cond in enumerate(conditions):
        offset = (ci - (len(conditions) - 1) / 2) * width
        legend_label: str | None = cond
        for xi, cat in zip(x, categories):
            cell = table[cond].get(cat)
            if cell is None:
                continue
            if cell.get("rate") is None:
                ax.text(xi + offset, 0.01, "n=0", ha="center", fontsize=6, rotation=90)
                continue
            value, el, eh = _rate_and_err(cell, f"cell ({cond}, {cat})")
            ax.bar(xi + offset, value, width, yerr=[[el], [eh]], capsize=min(2.0, 12.0 * width),
                   color=colors[cond], edgecolor="black", lw=0.4, label=legend_label)
            legend_label = None  # one legend entry per condition
    crowded = wanted > MAX_BAR_FIGURE_WIDTH or len(categories) > 6
    ax.set_xticks(x)
    ax.set_xticklabels([f"{cat}\n({_n_label(table, conditions, cat)})" for cat in categories],
                       fontsize=7 if crowded else 8, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                       rotation_mode="anchor")
    for tick, cat in zip(ax.get_xticklabels(), categories):
        tick.set_color(color_for(cat, categories))
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7 if len(conditions) > 8 else 8, title="condition", loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    ax.set_title(title or "Rates by condition and category (95% CI)")
    return save_fig(fig, out_png)
