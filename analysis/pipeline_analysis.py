"""The `analysis` stage: cross-seed stability, cluster geometry with plots, and model diffing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.diffing import category_vector_cosines
from analysis.geometry import cluster_metrics, plot_embeddings
from analysis.pipeline_run import PipelineRun
from analysis.pipeline_stages import saes
from analysis.stability import cross_seed_feature_stability, match_decoders, matched_cosine_summary, stable_features
from analysis.stage_runner import write_json_atomic
from probes.stage_data import encode_latents, load_last_token_rows


def _selected(run: PipelineRun, seed: int) -> dict[str, list[int]]:
    features = json.loads((run.stage_dir("select") / "sae" / f"seed_{seed}" / "features.json").read_text())
    return {c: [int(i) for i in e["feature_ids"]] for c, e in features["per_class"].items() if c in REFUSAL_CATEGORIES}


def stability_report(run: PipelineRun) -> dict[str, Any]:
    """Hungarian matching of decoder rows across seeds, feature-set Jaccard, stable features."""
    models = saes(run)
    seeds = sorted(models)
    if len(seeds) < 2:
        return {"note": "one SAE seed: no cross-seed stability", "matched_cosine_mean": None, "feature_jaccard": {}}
    decoders = {s: models[s].W_dec.detach().cpu() for s in seeds}
    pairs = {(s, t): match_decoders(decoders[s], decoders[t]) for i, s in enumerate(seeds) for t in seeds[i + 1:]}
    cosine = {f"{s}-{t}": matched_cosine_summary(m) for (s, t), m in pairs.items()}
    selected = {s: _selected(run, s) for s in seeds}
    jaccard = cross_seed_feature_stability(selected, pairs)
    reference = seeds[0]
    to_reference = {t: pairs[(reference, t)].inverse() for t in seeds[1:]}
    stable = stable_features(selected, to_reference, reference, min_seeds=max(2, (len(seeds) + 1) // 2))
    return {
        "matched_cosine_mean": float(np.mean([c["mean"] for c in cosine.values()])),
        "matched_cosine": cosine,
        "feature_jaccard": {c: v["mean"] for c, v in jaccard["per_category"].items()},
        "feature_jaccard_pairs": jaccard["pairs"],
        "stable_features": stable,
        "reference_seed": reference,
    }


def geometry_report(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Cluster metrics of the categories on eval rows, residual and SAE space; PCA/t-SNE/UMAP plots."""
    store = ActivationStore(run.stage_dir("harvest") / "last")
    rows = load_last_token_rows(store, run.layer, splits=("eval",))
    reference_seed, sae = next(iter(saes(run).items()))
    spaces = {"residual": rows.features, f"sae_seed{reference_seed}": encode_latents(sae, rows.features)}
    metrics, pngs = {}, {}
    for name, X in spaces.items():
        metrics[name] = cluster_metrics(X, rows.categories, seed=run.cfg.seed)
        pngs[name] = str(plot_embeddings(X, rows.categories, out / f"embeddings_{name}.png",
                                         title=f"{name}, layer {run.layer}, eval split", seed=run.cfg.seed))
    return {"metrics": metrics, "pngs": pngs}


def diffing_report(run: PipelineRun) -> dict[str, Any]:
    """Cosine (with bootstrap CI) between base-model and target-model category vectors, per layer."""
    base_dir = run.stage_dir("harvest") / "base_last"
    if not base_dir.is_dir():
        return {"note": "no base-model harvest (refusal tokens not fitted by this run)"}
    result = {}
    for layer in run.layers():
        a = load_last_token_rows(ActivationStore(base_dir), layer, splits=("extract",))
        b = load_last_token_rows(ActivationStore(run.stage_dir("harvest") / "last"), layer, splits=("extract",))
        a = a.subset(np.argsort(a.ids)[a.categories[np.argsort(a.ids)] != CONTRAST])  # same prompts, same order
        b = b.subset(np.argsort(b.ids)[b.categories[np.argsort(b.ids)] != CONTRAST])
        if not np.array_equal(a.ids, b.ids):
            raise ValueError("base and target harvests hold different extract prompts; re-run the harvest stage")
        result[str(layer)] = category_vector_cosines(
            a.features, a.categories, b.features, b.categories,
            categories=list(REFUSAL_CATEGORIES), baseline=BENIGN, n_resamples=500, seed=run.cfg.seed, paired=True,
        )
    return {"base_model": run.cfg.model, "target_model": run.target_model_path, "layers": result}


def stage_analysis(run: PipelineRun, out: Path) -> dict[str, Any]:
    report = {"stability": stability_report(run), "geometry": geometry_report(run, out), "diffing": diffing_report(run)}
    write_json_atomic(out / "analysis.json", report)
    return {"matched_cosine_mean": report["stability"].get("matched_cosine_mean")}
