"""Report sections for held-out benchmarks, the gating goal, the distance gate's tuning, and what
steering costs on benign text. Each returns a `Section`, or None when there is nothing to show.
"""
from __future__ import annotations

from typing import Any, Mapping

from analysis.reporting.frontier_plots import (
    plot_distance_grid,
    plot_frontier,
    plot_score_ranges,
)
from analysis.reporting.html import (
    FigureMaker,
    Section,
    esc,
    figure,
    key_values,
    rate_cell,
    row_header,
    table,
    value_cell,
)
from analysis.reporting.plots import ordered_labels
from analysis.reporting.seed_sections import SEED_NOTE, condition_cell


def _refusal_matrix(refusal: Mapping[str, Mapping[str, Any]], caption: str,
                    seeded: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    conditions = list(refusal)
    sets = ["over_refusal", "harmful_refusal", *ordered_labels([s for c in conditions for s in refusal[c]
                                                                 if s not in ("over_refusal", "harmful_refusal")])]
    rows = [[row_header(c)] + [condition_cell(refusal, seeded, c, s) for s in sets] for c in conditions]
    return table(["condition", *sets], rows, caption + (SEED_NOTE if seeded else ""), "matrix")


def _verdict(frontier: Mapping[str, Any]) -> str:
    css = "" if frontier.get("goal_met") else ' class="warning"'
    return f"<p{css}><strong>Gating goal:</strong> {esc(frontier.get('verdict', ''))}</p>"


def _gate_rows(frontier: Mapping[str, Any]) -> str:
    rows = []
    for name, g in frontier.get("gates", {}).items():
        rows.append([row_header(name), rate_cell(g["over_refusal"], shade=False), rate_cell(g["harmful"], shade=False),
                     value_cell(g.get("frontier_harmful")), value_cell(g.get("p_over_refusal")),
                     value_cell(g.get("meets_goal"))])
    return table(["gate", "over-refusal", "harmful refusal", "unconditional harmful at that over-refusal",
                  "McNemar p (over-refusal)", "meets goal"], rows,
                 f"Goal: over-refusal below baseline, harmful refusal within {frontier.get('tolerance', 0):g} of "
                 "baseline, above the unconditional frontier (point estimates; read the CIs).")


def gating_section(frontiers: Mapping[str, Mapping[str, Any]] | None, figs: FigureMaker) -> Section | None:
    """Per evaluation set (eval split, then each held-out set): the frontier plot, the verdict, the gates."""
    if not frontiers:
        return None
    body = []
    for name, frontier in frontiers.items():
        base = frontier["baseline"]
        if base["over_refusal"].get("rate") is None or base["harmful"].get("rate") is None:
            body.append(f"<h3>{esc(name)}</h3><p>No frontier: the set lacks benign/contrast or refusal-category "
                        "prompts, so one of the two rates is undefined.</p>")
            continue
        uri = figs.plot(plot_frontier, frontier, title=f"{name}: gates vs unconditional steering (95% CI)")
        body.append(f"<h3>{esc(name)}</h3>" + _verdict(frontier)
                    + figure(uri, "Over-refusal against harmful refusal; the blue line is unconditional steering at "
                                  "each signed strength, the shaded box the gating goal.")
                    + _gate_rows(frontier))
    return Section("gating", "\n".join(body))


def heldout_section(eval_sets: Mapping[str, Mapping[str, Any]] | None) -> Section | None:
    """Each held-out set: where it came from, what overlap was removed, and refusal under every condition."""
    if not eval_sets:
        return None
    body = ["<p>Held-out sets are never split, fitted or tuned on: every prompt is evaluated under every "
            "condition, after removing prompts whose normalised text matches an extract or calibrate prompt.</p>"]
    for name, entry in eval_sets.items():
        removed = entry.get("n_overlap_removed", {})
        facts = [("sources", ", ".join(entry.get("specs", []))), ("prompts read", entry.get("n_read")),
                 ("evaluated", entry.get("n")),
                 ("removed: same text as an extract prompt", removed.get("extract")),
                 ("removed: same text as a calibrate prompt", removed.get("calibrate")),
                 ("kept: same text as an eval prompt", entry.get("n_overlap_eval")),
                 ("removed: duplicates inside the set", entry.get("n_duplicates_removed")),
                 ("categories", entry.get("categories"))]
        body.append(f"<h3>{esc(name)}</h3>" + key_values(facts)
                    + _refusal_matrix(entry["refusal"], f"{name}: refusal rate [95% CI] and n per condition.",
                                      (entry.get("seed_averaged") or {}).get("refusal")))
    return Section("heldout", "\n".join(body))


def separation_section(separation: Mapping[str, Any] | None) -> Section | None:
    """Per prompt set: how well the unsteered refusal-token log-odds separate the prompts to refuse from
    those to answer (AUC with CI), beside the two refusal rates."""
    if not separation:
        return None
    rows = []
    for name, entry in separation.items():
        if entry is None:
            rows.append([row_header(name), "<td colspan=4>no refusal-token log-odds or an empty group</td>"])
            continue
        lo, hi = entry["ci"]
        rows.append([row_header(name), f"<td>{entry['auc']:.3f} [{lo:.3f}, {hi:.3f}]</td>",
                     f"<td>{entry['n_positive']} / {entry['n_negative']}</td>",
                     rate_cell(entry["refusal_rate"]), rate_cell(entry["over_refusal_rate"])])
    body = table(["prompt set", "AUC [95% CI]", "n refuse / answer", "refused: to refuse", "refused: to answer"], rows,
                 "Baseline log p(refusal token) − log p(respond): AUC of refusal-category prompts against benign and "
                 "contrast prompts (0.5 = the head cannot tell them apart); on XSTest, unsafe against safe.")
    return Section("separation", body)


def distance_gate_section(distance: Mapping[str, Any] | None, tuning: Mapping[str, Any] | None,
                          figs: FigureMaker) -> Section | None:
    """The distance gate: chosen thresholds, its grid and frontier on calibrate, its scores per
    category, and, when it steers nothing, why."""
    if not distance:
        return None
    chosen, base = distance["chosen"], distance["baseline"]
    facts = [("chosen t_low / t_high", f"{chosen['t_low']:.4g} / {chosen['t_high']:.4g}"),
             ("calibrate over-refusal (unsteered → gated)", f"{base['over_refusal']:.3f} → {chosen['over_refusal']:.3f}"),
             ("calibrate harmful refusal (unsteered → gated)",
              f"{base['harmful_refusal']:.3f} → {chosen['harmful_refusal']:.3f}"),
             ("calibrate rows steered by the chosen gate", chosen.get("n_steered")),
             ("eval decisions", distance.get("eval_decisions"))]
    body = [key_values(facts)]
    eval_scores = distance["scores"]["eval"]
    steered_eval = sum(n for k, n in (distance.get("eval_decisions") or {}).items() if not k.startswith("none"))
    if distance.get("chosen_is_noop") or steered_eval == 0:
        auc = eval_scores.get("auc_refusal_vs_benign")
        body.append(f'<p class="warning">The distance gate steers no {"calibrate" if distance.get("chosen_is_noop") else "eval"} '
                    "row: no threshold pair lowered over-refusal on calibrate without losing more harmful refusal than "
                    f"allowed, so the tuner kept the gate that does nothing. Its score separates refusal from benign "
                    f"prompts with AUC {'—' if auc is None else f'{auc:.2f}'} on eval (0.5 = not at all); the ranges "
                    "below show how far the categories' scores overlap.</p>")
    if tuning and tuning.get("table"):
        body.append(figure(figs.plot(plot_distance_grid, tuning), "Every grid point on calibrate, its frontier and "
                                                                   "the chosen point."))
    for split, scores in distance["scores"].items():
        uri = figs.plot(plot_score_ranges, scores, thresholds=(chosen["t_low"], chosen["t_high"]),
                        title=f"Distance-gate top score per category, {split}")
        body.append(figure(uri, f"{split}: 5–95% range, interquartile box and median per category; dashed: t_low, "
                                "dotted: t_high."))
    return Section("distance_gate", "\n".join(body))


def cost_section(benign: Mapping[str, Any] | None, readable: Mapping[str, Any] | None) -> Section | None:
    """Next-token loss and KL to the unsteered model on benign text per condition, and which capability
    tasks can be read (their baseline is above chance)."""
    if not benign and not readable:
        return None
    body = []
    if benign:
        rows = [[row_header(c), value_cell(e["loss"]), value_cell(e["kl"]), value_cell(e["n_tokens"])]
                for c, e in benign.items()]
        body.append(table(["condition", "loss (nats/token)", "KL to unsteered (nats/token)", "tokens"], rows,
                          "Benign responses scored under each condition; 95% bootstrap CI over texts, n = texts."))
    if readable:
        rows = [[row_header(t), value_cell(e["score"]), value_cell(e["chance"]), value_cell(e["readable"]),
                 f"<td>{esc(e['reason'])}</td>"] for t, e in readable.items()]
        body.append(table(["task", "baseline score", "chance", "readable", "why"], rows,
                          "A task whose baseline CI reaches chance cannot show harm from steering."))
    return Section("cost", "\n".join(body))

