"""Assemble `summary.json` (schema in `analysis.summary`) and `report.html` from a run's stage outputs."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from analysis.pipeline_run import PipelineRun
from analysis.report import ReportExtras, write_report
from analysis.stage_runner import write_json_atomic
from analysis.summary import SCHEMA_VERSION, validate_summary


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _value_entry(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {"value": entry[key], "ci": entry["ci"], "n": entry["n"]}


def build_summary(run: PipelineRun, timings: dict[str, float], wall_seconds: float) -> dict[str, Any]:
    """summary.json contents from the stage outputs of `run`."""
    prompts = _read(run.stage_dir("prompts") / "prompts.json")
    sae_metrics = _read(run.stage_dir("sae") / "metrics.json")["seeds"]
    select = _read(run.stage_dir("select") / "sae" / "select_report.json")
    reference = f"seed_{select['reference_seed']}"
    probe_eval = select["runs"][reference]["probe_eval"]
    residual_eval = _read(run.stage_dir("select") / "residual" / "select_report.json")["runs"]["residual"]["probe_eval"]
    results = _read(run.stage_dir("evaluate") / "results.json")
    analysis = _read(run.stage_dir("analysis") / "analysis.json")
    stability = analysis["stability"]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": run.cfg.model,
        "target_model": run.target_model_path,
        "layers": run.layers(),
        "primary_layer": run.layer,
        "seeds": list(run.cfg.sae.seeds),
        "splits": {name: {"n": s["n"], "sha256": s["sha256"], "categories": s["categories"]}
                   for name, s in prompts["splits"].items()},
        "sae": {str(seed): {k: m[k] for k in ("fvu", "l0", "dead_fraction")} for seed, m in sae_metrics.items()},
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
                      "feature_jaccard": stability.get("feature_jaccard", {})},
        "geometry": {space: {k: m[k] for k in ("silhouette", "davies_bouldin", "calinski_harabasz")}
                     for space, m in analysis["geometry"]["metrics"].items()},
        "refusal": results["refusal"],
        "capability": {cond: {task: {k: e[k] for k in ("score", "ci", "n")} for task, e in tasks.items()}
                       for cond, tasks in results["capability"].items()},
        "steering": {"layer": results["layer"], "alpha": results["alpha"], "positions": results["positions"]},
        "timings_seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(wall_seconds, 1)},
    }


def _features_for_report(run: PipelineRun) -> dict[str, list[dict[str, Any]]]:
    select = _read(run.stage_dir("select") / "sae" / "features.json")
    rows: dict[str, list[dict[str, Any]]] = {}
    for category, entry in select["per_class"].items():
        freqs = entry.get("selection_frequency") or [None] * len(entry["feature_ids"])
        rows[category] = [
            {"feature": fid, "weight": w, "selection_frequency": f,
             "activation_frequency": {c: v[i] for c, v in entry["activation_frequency"].items()}}
            for i, (fid, w, f) in enumerate(zip(entry["feature_ids"], entry["weights"], freqs))
        ]
    return rows


def write_outputs(run: PipelineRun, timings: dict[str, float], wall_seconds: float,
                  curves: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
    """Write summary.json (validated) and report.html; return the summary."""
    summary = build_summary(run, timings, wall_seconds)
    eval_counts = {c: n for c, n in summary["splits"]["eval"]["categories"].items()}
    problems = validate_summary(summary, eval_counts)
    if problems:
        raise ValueError(f"summary failed validation ({len(problems)} problem(s)); first: {problems[0]}")
    write_json_atomic(run.root / "summary.json", summary)
    results = _read(run.stage_dir("evaluate") / "results.json")
    analysis = _read(run.stage_dir("analysis") / "analysis.json")
    seed_table = [{"seed": seed, **summary["sae"][seed],
                   "ablate_harmful_refusal": results["ablate_by_seed"][seed]["harmful_refusal"]["rate"],
                   "ablate_over_refusal": results["ablate_by_seed"][seed]["over_refusal"]["rate"]}
                  for seed in summary["sae"] if seed in results["ablate_by_seed"]]
    extras = ReportExtras(
        config=run.cfg.to_dict(),
        split_manifest=_read(run.stage_dir("prompts") / "prompts.json"),
        training_curves=curves or None,
        features=_features_for_report(run),
        tradeoff_points=results["sweep"],
        embedding_pngs={k: Path(v) for k, v in analysis["geometry"]["pngs"].items()},
        seed_table=seed_table,
        notes=[f"{stage}: {seconds:.1f} s" for stage, seconds in summary["timings_seconds"].items()]
        + [f"model diffing (base vs refusal-token model): {json.dumps(analysis['diffing'])[:600]}"],
        per_category_vectors={c: v["decided_category"] for c, v in results["sufficiency"].items()},
    )
    write_report(run.root, summary, extras)
    return summary
