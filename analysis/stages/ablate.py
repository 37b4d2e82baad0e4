"""The `ablate` stage: which features and directions are necessary, and which vectors sufficient, for
each refusal category, each beside its random control (`RUN/ablate/results.json`; the feature
ablations' per-prompt verdicts in `RUN/ablate/rows.json`, which `refusal-sae compare` averages across runs).

On the eval split, in the evaluate stage's batch order (its baseline is re-run once here to record
the blocks below the primary layer, and checked against the evaluate stage's verdicts):

  feature ablation   per SAE seed and refusal category c: c's features zeroed (error term kept) at
                     `positions`, and `control_draws` frequency-matched random feature sets of the
                     same size (seeds in `control_seeds`); a category × target matrix per seed and
                     the across-seed average (`analysis.evaluation.ablation_matrix`)
  directional        c's residual mean-difference vector v_c projected out (at the primary layer, or
                     at every layer), beside `direction_draws` random directions
  sufficiency        every row steered by +alpha · v_c (evaluate.alpha) at `positions`, beside
                     `sufficiency_draws` random directions of v_c's norm

Every condition at the primary layer reuses the baseline's blocks below it (`EvalSetup.block_cache`);
with `positions: response_start` every condition edits the last prompt column only, so each runs just
that column on the baseline's cached prefix (`EvalSetup.prefix_cache`): about a forward per 60 conditions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from activations.io import read_json, write_json
from activations.positions import position_kinds
from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.stats import rate
from analysis.evaluation.ablation_matrix import (
    effect_matrix,
    random_directions,
    refused,
    run_feature_ablations,
    seed_averaged_matrix,
)
from analysis.evaluation.conditions import EvalSetup, refusal_table, run_refusal
from analysis.evaluation.matrix_average import ablation_rows
from analysis.evaluation.splice_forward import content_mask
from analysis.interventions.ablation import ablate_direction, ablate_features
from analysis.interventions.steering import steer
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.gates import eval_setup, residual_vectors, split_rows
from analysis.stages.select import read_consensus, selection_dir
from analysis.stages.train import NAME as TRAIN
from analysis.stages.train import run_saes
from probes.selection import read_features

NAME = "ablate"
POSITION_MODES = ("all", "content", "response_start")


@dataclass
class Config:
    """Ablation experiments (pipeline section `ablate:`).

    Args:
        features: the features ablated for category c: "selected" (c's L1-selected features of the
            seed) or "consensus" (those of them matched in other seeds, `RUN/select/sae/consensus.json`).
        positions: where features and directions are ablated: every position ("all"), the user-content
            tokens ("content") or the response-start token only ("response_start").
        control_draws: frequency-matched random feature sets per category (>= 2; the issue asks for >= 5).
        control_seeds: the SAE seeds whose feature ablations get controls: "all" or "reference" (the first).
        control_pool: a control feature is drawn from this many unselected live features nearest in
            firing frequency.
        directional: run directional ablation of each category's mean-difference vector.
        direction_layers: "one" (the primary layer) or "all" (the embeddings and every block, as Arditi
            et al.; these runs cannot reuse the cached blocks and cost a full forward each).
        direction_draws: random directions per category beside directional ablation (0 = none).
        sufficiency: steer every row toward each category (+evaluate.alpha · v_c).
        sufficiency_draws: random directions of v_c's norm per category beside sufficiency (0 = none).
        n_resamples: bootstrap resamples of each selected-minus-control CI.
        batch_size: prompts per forward here (None = evaluate.batch_size). With response_start a
            condition is one column per batch, whose cost is mostly reading the weights once, so
            larger batches are much cheaper per condition (the cached prefixes cost the same memory).
    """

    features: Literal["selected", "consensus"] = "selected"
    positions: Literal["all", "content", "response_start"] = "all"
    control_draws: int = 5
    control_seeds: Literal["all", "reference"] = "all"
    control_pool: int = 10
    directional: bool = True
    direction_layers: Literal["one", "all"] = "one"
    direction_draws: int = 3
    sufficiency: bool = True
    sufficiency_draws: int = 3
    n_resamples: int = 1000
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"ablate.positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.control_draws < 2:
            raise ValueError(f"ablate.control_draws must be >= 2 (a CI over draws), got {self.control_draws}")
        for name in ("direction_draws", "sufficiency_draws"):
            if getattr(self, name) < 0:
                raise ValueError(f"ablate.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"ablate.batch_size must be >= 1, got {self.batch_size}")
        if self.control_pool < 1 or self.n_resamples < 100:
            raise ValueError("ablate.control_pool must be >= 1 and ablate.n_resamples >= 100")


def _position_fn(cfg: Config, setup: EvalSetup, records: list, chat_template: bool) -> Any:
    """`rows -> positions argument` of the interventions for the configured position mode."""
    if cfg.positions == "all":
        return lambda _rows: "all"
    if cfg.positions == "response_start":  # one forward without a KV cache: its last column
        return lambda _rows: "generated"
    kinds = position_kinds(setup.tokenizer, [r.text for r in records], chat_template, setup.max_length)
    device = setup.adapter.device
    return lambda rows: (lambda shape: content_mask([kinds[i] for i in rows], shape, device))


def _category_features(ctx: RunContext, seed: int, which: str) -> tuple[dict[str, list[int]], list[int]]:
    """`({refusal category: feature ids}, every selected id of any class)` of one SAE seed."""
    features = read_features(selection_dir(ctx, "sae") / f"seed_{seed}", layer=ctx.layer, sae_seed=seed)
    every = sorted({int(i) for entry in features["per_class"].values() for i in entry.get("feature_ids", [])})
    selected = {c: [int(i) for i in features["per_class"].get(c, {}).get("feature_ids", [])] for c in REFUSAL_CATEGORIES}
    if which == "consensus":
        consensus = read_consensus(selection_dir(ctx, "sae"))
        if consensus is None:
            raise ValueError("ablate.features is 'consensus' but the select stage wrote no consensus.json")
        selected = {c: consensus.get(seed, {}).get(c, []) for c in REFUSAL_CATEGORIES}
    return selected, every


def _log_density(ctx: RunContext, seed: int) -> np.ndarray:
    """log10 firing density `(d_sae,)` of a seed's SAE on held-out rows (the train stage's sparsity file)."""
    from safetensors.numpy import load_file

    from sae.export import SPARSITY_NAME

    path = ctx.stage_dir(TRAIN) / f"seed_{seed}" / SPARSITY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: frequency-matched controls need the SAE's firing frequency")
    return load_file(str(path))["sparsity"].astype(np.float64)


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    out = ctx.stage_dir(NAME)
    setup = eval_setup(ctx)
    if cfg.batch_size is not None:
        setup = replace(setup, batch_size=cfg.batch_size)
    _, records = split_rows(ctx, "eval")
    last = cfg.positions == "response_start"  # every condition edits the last column only: run just that column
    baseline = run_refusal(setup, records, progress=True, desc="ablation baseline", last_column=last)  # fills the caches
    position = _position_fn(cfg, setup, records, ctx.cfg.chat_template)
    adapter, layer = setup.adapter, ctx.layer

    def run_fn(context: Any, desc: str, at_layer: bool = True) -> list:
        return run_refusal(setup, records, context=context, progress=True, desc=desc, at_layer=at_layer,
                           last_column=last)

    saes = run_saes(ctx)
    reference = next(iter(saes))
    per_seed, conditions, controls = {}, {}, {}
    for seed, sae in saes.items():
        selected, every = _category_features(ctx, seed, cfg.features)
        with_controls = cfg.control_seeds == "all" or seed == reference

        def make(ids: list[int], sae: Any = sae) -> Any:
            return lambda rows: ablate_features(adapter, layer, sae, ids, positions=position(rows))

        conditions[seed], controls[seed], drawn = run_feature_ablations(
            run_fn, make, selected, _log_density(ctx, seed) if with_controls else None,
            cfg.control_draws if with_controls else 0, every, seed=ctx.cfg.seed * 1000 + seed, label=f" (seed {seed})")
        per_seed[str(seed)] = {
            "matrix": effect_matrix(records, baseline, conditions[seed], controls[seed], "decrease", cfg.n_resamples,
                                    ctx.cfg.seed),
            "features": selected, "control_features": drawn, "controls": bool(with_controls)}
    payload: dict[str, Any] = {
        "layer": layer, "positions": cfg.positions, "features": cfg.features, "control_draws": cfg.control_draws,
        "control_seeds": cfg.control_seeds, "reference_seed": reference, "n_eval": len(records),
        "baseline": refusal_table(baseline), "baseline_disagreements": _disagreements(ctx, baseline),
        "feature_ablation": {"per_seed": per_seed,
                             "averaged": seed_averaged_matrix(records, baseline, conditions, controls, "decrease")},
    }
    vectors = residual_vectors(ctx)
    if cfg.directional:
        payload["directional"] = _directional(cfg, ctx, records, baseline, vectors, position, run_fn, adapter)
    if cfg.sufficiency:
        payload["sufficiency"] = _sufficiency(cfg, ctx, records, baseline, vectors, position, run_fn, adapter)
    write_json(out / "results.json", payload)
    write_json(out / "rows.json", ablation_rows(records, baseline, conditions, controls))  # for `compare`
    averaged = payload["feature_ablation"]["averaged"]
    return {"n_eval": len(records), "necessary": sorted(c for c in averaged if averaged[c].get(c, {}).get("beats_control"))}


def _disagreements(ctx: RunContext, baseline: list) -> int | None:
    """Eval rows whose baseline verdict differs from the evaluate stage's (0 expected; None: no file)."""
    path = ctx.stage_dir("evaluate") / "rows.json"
    if not path.is_file():
        return None
    theirs = {r["prompt_id"]: bool(r["refused"]) for r in read_json(path, "evaluate rows")["baseline"]}
    return int(sum(theirs.get(r.prompt_id, r.refused) != r.refused for r in baseline))


def _directional(cfg: Config, ctx: RunContext, records: list, baseline: list, vectors: dict[str, np.ndarray],
                 position: Any, run_fn: Any, adapter: Any) -> dict[str, Any]:
    """Each v_c projected out (primary layer or all layers) beside random directions."""
    layers: Any = [ctx.layer] if cfg.direction_layers == "one" else "all"
    at_layer = cfg.direction_layers == "one"

    def make(direction: np.ndarray) -> Any:
        vec = torch.as_tensor(direction, dtype=torch.float32)
        return lambda rows: ablate_direction(adapter, vec, layers=layers, positions=position(rows))

    conditions, controls = {}, {}
    for i, c in enumerate(REFUSAL_CATEGORIES):
        conditions[c] = run_fn(make(vectors[c]), f"ablate direction v_{c}", at_layer)
        if cfg.direction_draws:
            controls[c] = [run_fn(make(d), f"random direction {j + 1}/{cfg.direction_draws} for {c}", at_layer)
                           for j, d in enumerate(random_directions(vectors[c], cfg.direction_draws, ctx.cfg.seed + 7 * i))]
    return {"layers": cfg.direction_layers, "positions": cfg.positions, "draws": cfg.direction_draws,
            "matrix": effect_matrix(records, baseline, conditions, controls or None, "decrease", cfg.n_resamples,
                                    ctx.cfg.seed)}


def _sufficiency(cfg: Config, ctx: RunContext, records: list, baseline: list, vectors: dict[str, np.ndarray],
                 position: Any, run_fn: Any, adapter: Any) -> dict[str, Any]:
    """Every row steered toward each category with +alpha · v_c at the primary layer and `positions`,
    beside random directions of v_c's norm; `decided_category`: the share of benign + contrast rows
    whose first token chose c."""
    alpha = ctx.cfg.evaluate.alpha
    over = np.array([r.category in (BENIGN, CONTRAST) for r in records])

    def make(vector: np.ndarray) -> Any:
        vec = torch.as_tensor(vector, dtype=torch.float32)
        return lambda rows: steer(adapter, ctx.layer, vec, alphas=alpha, positions=position(rows))

    conditions, controls, decided = {}, {}, {}
    for i, c in enumerate(REFUSAL_CATEGORIES):
        conditions[c] = run_fn(make(vectors[c]), f"sufficiency {c}")
        chose = np.array([r.decision == c for r in conditions[c]])[over]
        decided[c] = {"selected": rate(chose)}
        if cfg.sufficiency_draws:
            draws = random_directions(vectors[c], cfg.sufficiency_draws, ctx.cfg.seed + 11 * i)
            controls[c] = [run_fn(make(d), f"random direction {j + 1}/{cfg.sufficiency_draws} toward {c}")
                           for j, d in enumerate(draws)]
            decided[c]["controls"] = [rate(np.array([r.decision == c for r in found])[over]) for found in controls[c]]
    return {"alpha": alpha, "positions": cfg.positions, "draws": cfg.sufficiency_draws,
            "matrix": effect_matrix(records, baseline, conditions, controls or None, "increase", cfg.n_resamples,
                                    ctx.cfg.seed),
            "decided_category": decided,
            "over_refusal_refused": {c: rate(refused(found)[over]) for c, found in conditions.items()}}


def results_path(ctx: RunContext) -> Path:
    """This run's ablation results (JSON)."""
    return ctx.stage_dir(NAME) / "results.json"


STAGE = PipelineStage(NAME, run, section=NAME, uses=("max_length", "chat_template", "seed", "evaluate.alpha",
                                                   "evaluate.positions", "evaluate.batch_size"),
                      after=("evaluate",))
