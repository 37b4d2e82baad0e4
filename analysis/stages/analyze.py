"""The `analyze` stage: cross-seed stability, cluster geometry with plots, and model diffing
(`RUN/analyze/analysis.json` and the embedding PNGs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activations.io import write_json
from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.evaluation.diffing import category_vector_cosines
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.harvest import store_dir
from analysis.stages.select import selection_dir
from analysis.stages.stability import Config as StabilityConfig
from analysis.stages.stability import geometry_summary, stability_summary
from analysis.stages.train import run_saes
from probes.rows import LabelledRows, load_last_token_rows

NAME = "analyze"


@dataclass
class Config(StabilityConfig):
    """The analysis (pipeline section `analyze:`): the stability command's keys, plus

    Args:
        diffing_resamples: bootstrap resamples of the base-vs-target vector cosines.
    """

    diffing_resamples: int = 500


def _by_id_without_contrast(rows: LabelledRows) -> LabelledRows:
    """Rows sorted by prompt id (so two models' harvests pair up), contrast rows left out."""
    rows = rows.subset(np.argsort(rows.ids))
    return rows.subset(rows.categories != CONTRAST)


def diffing_report(ctx: RunContext, n_resamples: int) -> dict[str, Any]:
    """Cosine (with bootstrap CI) between base-model and target-model category vectors, per layer."""
    base_dir = store_dir(ctx, "base_last")
    if not base_dir.is_dir():
        return {"note": "no base-model harvest (refusal tokens not fitted by this run)"}
    result = {}
    for layer in ctx.layers():
        a, b = (_by_id_without_contrast(load_last_token_rows(ActivationStore(d), layer, splits=("extract",)))
                for d in (base_dir, store_dir(ctx, "last")))
        if not np.array_equal(a.ids, b.ids):
            raise ValueError("base and target harvests hold different extract prompts; re-run the harvest stage")
        result[str(layer)] = category_vector_cosines(
            a.features, a.categories, b.features, b.categories,
            categories=list(REFUSAL_CATEGORIES), baseline=BENIGN, n_resamples=n_resamples, seed=ctx.cfg.seed, paired=True,
        )
    return {"base_model": ctx.cfg.model, "target_model": ctx.target_model_path, "layers": result}


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    out, saes = ctx.stage_dir(NAME), run_saes(ctx)
    report = {
        "stability": stability_summary(saes, selection_dir(ctx, "sae"), layer=ctx.layer, min_seeds=cfg.min_seeds),
        "geometry": geometry_summary(store_dir(ctx, "last"), ctx.layer, saes, out, seed=ctx.cfg.seed, split=cfg.split,
                                     methods=cfg.methods),
        "diffing": diffing_report(ctx, cfg.diffing_resamples),
    }
    write_json(out / "analysis.json", report, nonfinite="null")
    return {"matched_cosine_mean": report["stability"].get("matched_cosine_mean")}


def analysis_path(ctx: RunContext) -> Path:
    """This run's analysis.json."""
    return ctx.stage_dir(NAME) / "analysis.json"


STAGE = PipelineStage(NAME, run, section=NAME, uses=("seed",), after=("evaluate",))
