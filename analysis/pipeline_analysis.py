"""The `analysis` stage: cross-seed stability, cluster geometry with plots, and model diffing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.diffing import category_vector_cosines
from analysis.pipeline_run import PipelineRun
from analysis.pipeline_stages import saes
from analysis.stability_report import geometry_summary, stability_summary
from analysis.stage_runner import write_json_atomic
from probes.protocol import LabelledRows
from probes.stage_data import load_last_token_rows


def stability_report(run: PipelineRun) -> dict[str, Any]:
    """Hungarian matching of decoder rows across seeds, feature-set Jaccard, stable features."""
    return stability_summary(saes(run), run.stage_dir("select") / "sae", layer=run.layer)


def geometry_report(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Cluster metrics of the categories on eval rows, residual and SAE space; PCA/t-SNE/UMAP plots."""
    return geometry_summary(run.stage_dir("harvest") / "last", run.layer, saes(run), out, seed=run.cfg.seed)


def _by_id_without_contrast(rows: LabelledRows) -> LabelledRows:
    """Rows sorted by prompt id (so two models' harvests pair up), contrast rows left out."""
    rows = rows.subset(np.argsort(rows.ids))
    return rows.subset(rows.categories != CONTRAST)


def diffing_report(run: PipelineRun) -> dict[str, Any]:
    """Cosine (with bootstrap CI) between base-model and target-model category vectors, per layer."""
    base_dir = run.stage_dir("harvest") / "base_last"
    if not base_dir.is_dir():
        return {"note": "no base-model harvest (refusal tokens not fitted by this run)"}
    result = {}
    for layer in run.layers():
        a, b = (_by_id_without_contrast(load_last_token_rows(ActivationStore(d), layer, splits=("extract",)))
                for d in (base_dir, run.stage_dir("harvest") / "last"))
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
