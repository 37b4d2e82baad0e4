"""Plots of the gating goal: the over-refusal / harmful-refusal frontier with CIs, the distance gate's
tuning grid on calibrate, and where its scores lie per category.

Built like `analysis.reporting.plots` (a bare `matplotlib.figure.Figure`, atomic PNG writes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.reporting.plots import (
    BASELINE_COLOR,
    _rate_and_err,
    color_for,
    condition_colors,
    ordered_labels,
    rate_plane,
    save_fig,
)

GATE_MARKERS = ("s", "D", "^", "v", "P", "X")


def plot_frontier(frontier: Mapping[str, Any], out_png: str | os.PathLike[str], title: str = "") -> Path:
    """Over-refusal (x) against harmful refusal (y) with 95% CI bars: unconditional steering at each
    signed strength joined in order (labelled with the strength), the baseline, and each gate as
    its own marker. The shaded box is the gating goal (less over-refusal than the baseline, harmful
    refusal within the tolerance of it). `frontier` is `analysis.evaluation.frontier.gating_frontier`'s
    result."""
    curve = frontier["unconditional"]
    if not curve:
        raise ValueError("plot_frontier got no unconditional points")
    fig = Figure(figsize=(6.8, 5.2))
    ax = fig.add_subplot(1, 1, 1)
    base = frontier["baseline"]
    bx, _, _ = _rate_and_err(base["over_refusal"], "baseline over_refusal")
    by, _, _ = _rate_and_err(base["harmful"], "baseline harmful")
    tol = float(frontier.get("tolerance", 0.0))
    ax.add_patch(Rectangle((-0.02, by - tol), bx + 0.02, 1.04 - (by - tol), color="#2ca02c", alpha=0.08, lw=0,
                           label="gating goal"))
    xs, ys, xerr, yerr = [], [], [[], []], [[], []]
    for p in curve:
        if p["over_refusal"].get("rate") is None or p["harmful"].get("rate") is None:
            continue
        x, xl, xh = _rate_and_err(p["over_refusal"], f"strength {p['signed_strength']} over_refusal")
        y, yl, yh = _rate_and_err(p["harmful"], f"strength {p['signed_strength']} harmful")
        xs.append(x), ys.append(y)
        xerr[0].append(xl), xerr[1].append(xh), yerr[0].append(yl), yerr[1].append(yh)
        ax.annotate(f"{p['signed_strength']:+g}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=7)
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, lw=1, color="#1f77b4",
                label="unconditional ±α·v_global")
    ax.plot([bx], [by], marker="*", ms=13, color=BASELINE_COLOR, ls="none", label="baseline", zorder=5)
    gates = list(frontier.get("gates", {}))
    colors = condition_colors(gates, avoid=["#1f77b4"])
    for i, name in enumerate(gates):
        g = frontier["gates"][name]
        if g["over_refusal"].get("rate") is None or g["harmful"].get("rate") is None:
            continue
        x, xl, xh = _rate_and_err(g["over_refusal"], f"{name} over_refusal")
        y, yl, yh = _rate_and_err(g["harmful"], f"{name} harmful")
        label = name + (" (meets goal)" if g.get("meets_goal") else "")
        ax.errorbar([x], [y], xerr=[[xl], [xh]], yerr=[[yl], [yh]], marker=GATE_MARKERS[i % len(GATE_MARKERS)], ms=7,
                    capsize=2, lw=1, color=colors[name], ls="none", label=label, zorder=4)
    rate_plane(ax, "over-refusal (benign + contrast prompts refused)", "harmful refusal (refusal-category prompts refused)",
               title or "Gates against unconditional steering (95% CI)", fontsize=7, loc="lower right")
    return save_fig(fig, out_png)


def plot_distance_grid(tuning: Mapping[str, Any], out_png: str | os.PathLike[str], title: str = "") -> Path:
    """The distance gate's grid on calibrate: every point (over-refusal, harmful refusal), its frontier,
    the chosen point and the unsteered baseline. `tuning` holds `table`, `frontier`, `chosen`, `baseline`."""
    table = tuning.get("table") or []
    if not table:
        raise ValueError("plot_distance_grid got no grid points")
    fig = Figure(figsize=(6.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([p["over_refusal"] for p in table], [p["harmful_refusal"] for p in table], s=14, color="#aec7e8",
               label=f"grid ({len(table)} points)")
    front = tuning.get("frontier") or []
    ax.plot([p["over_refusal"] for p in front], [p["harmful_refusal"] for p in front], "-o", ms=4, color="#1f77b4",
            label="frontier")
    base = tuning["baseline"]
    ax.plot([base["over_refusal"]], [base["harmful_refusal"]], marker="*", ms=13, color=BASELINE_COLOR, ls="none",
            label="unsteered")
    chosen = tuning["chosen"]
    ax.plot([chosen["over_refusal"]], [chosen["harmful_refusal"]], marker="s", ms=9, mfc="none", mew=2,
            color="#d62728", ls="none", label=f"chosen (t_low {chosen['t_low']:.3g}, t_high {chosen['t_high']:.3g})")
    ax.set_xlabel("over-refusal on calibrate")
    ax.set_ylabel("harmful refusal on calibrate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Distance gate: threshold grid on calibrate")
    return save_fig(fig, out_png)


def plot_score_ranges(scores: Mapping[str, Any], out_png: str | os.PathLike[str],
                      thresholds: Sequence[float] = (), title: str = "") -> Path:
    """Per category, the 5–95% range, the interquartile box and the median of the distance gate's top
    score (from `probes.gate_tuning.score_distribution`), with the chosen thresholds as lines."""
    per = scores.get("per_category") or {}
    if not per:
        raise ValueError("plot_score_ranges got no categories")
    cats = ordered_labels(list(per))
    fig = Figure(figsize=(max(5.0, 0.9 * len(cats) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(cats):
        q = per[c]["quantiles"]
        color = color_for(c, cats)
        ax.plot([i, i], [q["0.05"], q["0.95"]], color=color, lw=1)
        ax.add_patch(Rectangle((i - 0.25, q["0.25"]), 0.5, q["0.75"] - q["0.25"], color=color, alpha=0.35))
        ax.plot([i - 0.25, i + 0.25], [q["0.5"], q["0.5"]], color=color, lw=2)
    for t, style in zip(thresholds, ("--", ":")):
        ax.axhline(t, color="black", ls=style, lw=1)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([f"{c}\n(n={per[c]['n']})" for c in cats], fontsize=8)
    ax.set_ylabel("top score s = max_c d_B / (d_B + d_c)")
    auc = scores.get("auc_refusal_vs_benign")
    ax.set_title((title or "Distance-gate scores per category") + ("" if auc is None else f"\nAUC refusal vs benign {auc:.2f}"),
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_fig(fig, out_png)
