"""Assemble `summary.json` (schema in `analysis.reporting.summary`) and `report.html` from a run's stage outputs."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from activations.io import read_json, write_json
from analysis.evaluation.separation import head_separation
from analysis.reporting.findings import build_findings, paired_summary
from analysis.reporting.report import ReportExtras, write_report
from analysis.reporting.summary import SCHEMA_VERSION, validate_summary
from analysis.stages.ablate import results_path as ablation_path
from analysis.stages.analyze import analysis_path
from analysis.stages.context import RunContext
from analysis.stages.evaluate import results_path
from analysis.stages.features import cards_path, read_cards
from analysis.stages.gates import NAME as GATES
from analysis.stages.prompts import manifest_path
from analysis.stages.select import REPORT_NAME as SELECT_REPORT
from analysis.stages.select import selection_dir
from analysis.stages.train import NAME as TRAIN
from probes.selection import read_features


def _read(path: Path) -> dict[str, Any]:
    return read_json(path, path.name)


def _value_entry(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {"value": entry[key], "ci": entry["ci"], "n": entry["n"]}


SPLICE_KEYS = ("ce_recovered", "kl", "decision_fidelity")
SAE_KEYS = ("fvu", "l0", "dead_fraction", "dense_fraction", "n_rows", "metrics_split", "held_out",
            "k", "n_latents", "steps")
"""Per-seed keys of summary.json's `sae` block, read from the exported run's metrics.json."""


def sae_quality_summary(m: dict[str, Any]) -> dict[str, Any]:
    """One seed's entry of summary.json `sae`: shape (k, n_latents, steps), held-out fvu / l0 (all rows
    and per position kind), dead and dense fractions, and the spliced scores per site (flat keys)."""
    out = {k: m.get(k) for k in SAE_KEYS if k in m}
    for kind, scores in (m.get("by_kind") or {}).items():
        out[f"fvu_{kind}"], out[f"l0_{kind}"], out[f"n_rows_{kind}"] = scores["fvu"], scores["l0"], scores["n_rows"]
    for site, scores in (m.get("splice") or {}).items():
        if isinstance(scores, dict):
            out.update({f"{key}_{site}": scores.get(key) for key in SPLICE_KEYS})
            out[f"ce_recovered_{site}_ci"] = scores.get("ce_recovered_ci")
    return out


def sae_block(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """summary.json's `sae` block: the metrics and shape of the SAEs the train stage exported."""
    seeds = _read(ctx.stage_dir(TRAIN) / "metrics.json")["seeds"]
    return {str(seed): sae_quality_summary(m) for seed, m in seeds.items()}


def build_summary(ctx: RunContext, timings: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    """summary.json contents from the stage outputs of the run."""
    prompts = _read(manifest_path(ctx))
    train_metrics = _read(ctx.stage_dir(TRAIN) / "metrics.json")
    select = _read(selection_dir(ctx, "sae") / SELECT_REPORT)
    reference = f"seed_{select['reference_seed']}"
    probe_eval = select["runs"][reference]["probe_eval"]
    residual_eval = _read(selection_dir(ctx, "residual") / SELECT_REPORT)["runs"]["residual"]["probe_eval"]
    results = _read(results_path(ctx))
    analysis = _read(analysis_path(ctx))
    stability = analysis["stability"]
    tuning = _read(ctx.stage_dir(GATES) / "tuning.json")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ctx.cfg.model,
        "target_model": ctx.target_model_path,
        "layers": ctx.layers(),
        "primary_layer": ctx.layer,
        "seeds": list(ctx.cfg.train.seeds),
        "splits": {name: {"n": s["n"], "sha256": s["sha256"], "categories": s["categories"]}
                   for name, s in prompts["splits"].items()},
        "sae": sae_block(ctx),
        "sae_training_rows": train_metrics.get("training_rows"),
        "probe": {
            "space": f"sae latents, {reference}",
            "accuracy": {"value": probe_eval["accuracy"]["rate"], "ci": probe_eval["accuracy"]["ci"],
                         "n": probe_eval["accuracy"]["n"]},
            "macro_f1": {k: probe_eval["macro_f1"][k] for k in ("value", "ci", "n")},
            "residual_accuracy": {"value": residual_eval["accuracy"]["rate"], "ci": residual_eval["accuracy"]["ci"],
                                  "n": residual_eval["accuracy"]["n"]},
            "residual_macro_f1": {k: residual_eval["macro_f1"][k] for k in ("value", "ci", "n")},
        },
        "stability": {"matched_cosine_mean": stability.get("matched_cosine_mean"),
                      "feature_jaccard": stability.get("feature_jaccard", {}),
                      "consensus_features": select.get("consensus")},
        "geometry": {space: {k: m[k] for k in ("silhouette", "davies_bouldin", "calinski_harabasz")}
                     for space, m in analysis["geometry"]["metrics"].items()},
        "refusal": results["refusal"],
        "capability": {cond: {task: {k: e[k] for k in ("score", "ci", "n")} for task, e in tasks.items()}
                       for cond, tasks in results["capability"].items()},
        "capability_readable": results.get("capability_readable", {}),
        "benign_text": results.get("benign_text", {}),
        "frontier": _frontier_summary(results["frontier"]),
        "eval_sets": {name: _eval_set_summary(entry) for name, entry in results.get("eval_sets", {}).items()},
        "head_separation": _head_separation(ctx),
        "gates": {"distance": {**{k: tuning["distance"][k] for k in ("baseline", "chosen", "chosen_is_noop", "frontier")},
                               "scores": {"calibrate": tuning["distance_scores"]["calibrate"],
                                          "eval": results["distance_scores"]},
                               "eval_decisions": results["gate_decisions"].get("conditional_distance", {})},
                  "probe": {"reference_seed": tuning.get("probe_sae_seed"), "by_seed": tuning.get("probe_by_seed", {})}},
        "seed_averaged": results.get("seed_averaged", {}),
        "steer_sae": results.get("steer_sae", {}),
        "steering": {"layer": results["layer"], "alpha": results["alpha"], "positions": results["positions"]},
        "timings_seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(wall_seconds, 1)},
        "paired_vs_baseline": paired_summary(results["paired_vs_baseline"]),
    }
    if ablation_path(ctx).is_file():
        summary["ablation"] = _read(ablation_path(ctx))
    summary["findings"] = [f.to_dict() for f in build_findings(summary)]
    return summary


def _frontier_summary(frontier: dict[str, Any]) -> dict[str, Any]:
    """The gating verdict without the long point lists (those stay in RUN/evaluate/results.json)."""
    return {"best_gate": frontier["best_gate"], "goal_met": frontier["goal_met"], "tolerance": frontier["tolerance"],
            "verdict": frontier["verdict"],
            "gates": {name: {k: g[k] for k in ("over_refusal", "harmful", "meets_goal", "p_over_refusal")}
                      for name, g in frontier["gates"].items()}}


def _head_separation(ctx: RunContext) -> dict[str, Any]:
    """Per prompt set (the eval split, each held-out set): how well the baseline refusal-token log-odds
    separate refusal-category from benign/contrast prompts (`analysis.evaluation.separation`)."""
    folder = results_path(ctx).parent
    out = {"eval": head_separation(_read(folder / "rows.json")["baseline"])}
    if (folder / "eval_sets.json").is_file():
        out.update({name: head_separation(entry["rows"]["baseline"])
                    for name, entry in _read(folder / "eval_sets.json").items()})
    return out


def _eval_set_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One held-out set: its manifest (counts, overlap removed), refusal per condition, gating verdict."""
    manifest = entry["manifest"]
    return {**{k: manifest[k] for k in ("specs", "n", "n_read", "categories", "sha256", "n_duplicates_removed",
                                        "n_overlap_removed", "n_overlap_eval")},
            "refusal": entry["refusal"], "frontier": _frontier_summary(entry["frontier"]),
            "seed_averaged": entry.get("seed_averaged", {}),
            "paired_vs_baseline": paired_summary(entry.get("paired_vs_baseline", {}))}


def _features_for_report(ctx: RunContext) -> dict[str, list[dict[str, Any]]]:
    select = read_features(selection_dir(ctx, "sae"), layer=ctx.layer)
    rows: dict[str, list[dict[str, Any]]] = {}
    for category, entry in select["per_class"].items():
        freqs = entry.get("selection_frequency") or [None] * len(entry["feature_ids"])
        rows[category] = [
            {"feature": fid, "weight": w, "selection_frequency": f,
             "activation_frequency": {c: v[i] for c, v in entry["activation_frequency"].items()}}
            for i, (fid, w, f) in enumerate(zip(entry["feature_ids"], entry["weights"], freqs))
        ]
        dense = entry.get("dense_features") or {}
        rows[category] += [
            {"feature": fid, "weight": w, "selection_frequency": None, "dense": True,
             "activation_frequency": {c: v[i] for c, v in dense["activation_frequency"].items()}}
            for i, (fid, w) in enumerate(zip(dense.get("feature_ids", []), dense.get("weights", [])))
        ]
    return rows


def _sufficiency_table(ablation: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """Per category c: of the benign + contrast eval prompts steered toward c, the share refused and the
    share whose first token chose c (and the same under the random directions, first draw)."""
    suff = (ablation or {}).get("sufficiency")
    if not suff:
        return None
    out = {}
    for c, decided in suff["decided_category"].items():
        row = {"refused (benign + contrast)": suff["over_refusal_refused"][c], "chose c (benign + contrast)": decided["selected"]}
        cell = suff["matrix"][c].get("over_refusal", {})
        if "control" in cell:
            row["random direction: refusal change (mean of draws)"] = cell["control"]["effect_mean"]
            row["v_c minus random: refusal change"] = cell["vs_control"]["estimate"]
        out[c] = row
    return out


def write_outputs(ctx: RunContext, timings: dict[str, float], wall_seconds: float,
                  curves: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
    """Write summary.json (validated) and report.html; return the summary."""
    summary = build_summary(ctx, timings, wall_seconds)
    eval_counts = {c: n for c, n in summary["splits"]["eval"]["categories"].items()}
    problems = validate_summary(summary, eval_counts)
    if problems:
        raise ValueError(f"summary failed validation ({len(problems)} problem(s)); first: {problems[0]}")
    write_json(ctx.root / "summary.json", summary)
    results = _read(results_path(ctx))
    analysis = _read(analysis_path(ctx))
    seed_table = [{"seed": seed, **{k: summary["sae"][seed][k] for k in ("fvu", "l0", "dead_fraction")},
                   "ablate_harmful_refusal": results["ablate_by_seed"][seed]["harmful_refusal"]["rate"],
                   "ablate_over_refusal": results["ablate_by_seed"][seed]["over_refusal"]["rate"]}
                  for seed in summary["sae"] if seed in results["ablate_by_seed"]]
    extras = ReportExtras(
        config=ctx.cfg.to_dict(),
        split_manifest=_read(manifest_path(ctx)),
        training_curves=curves or None,
        features=_features_for_report(ctx),
        feature_cards=read_cards(cards_path(ctx)) if cards_path(ctx).is_file() else None,
        sae_training_rows=summary.get("sae_training_rows"),
        tradeoff_points=results["sweep"],
        embedding_pngs={k: Path(v) for k, v in analysis["geometry"]["pngs"].items()},
        seed_table=seed_table,
        notes=[f"{stage}: {seconds:.1f} s" for stage, seconds in summary["timings_seconds"].items()]
        + [f"model diffing (base vs refusal-token model): {json.dumps(analysis['diffing'])[:600]}"],
        per_category_vectors=_sufficiency_table(summary.get("ablation")),
        frontiers={"eval split": results["frontier"],
                   **{f"held-out: {name}": e["frontier"] for name, e in results.get("eval_sets", {}).items()}},
        distance_tuning=_read(ctx.stage_dir(GATES) / "tuning.json")["distance"],
    )
    write_report(ctx.root, summary, extras)
    return summary
