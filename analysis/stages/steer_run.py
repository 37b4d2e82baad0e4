"""`refusal-sae steer --run RUN`: a finished pipeline run's conditions on new prompts, nothing refitted.

The run folder supplies its resolved config (`RUN/config.yaml`), target model, steering vectors,
tuned gates and SAEs; `analysis.stages.suite.build_suite` assembles them exactly as the evaluate
stage does, and `analysis.evaluation.set_evaluation.evaluate_set` runs every condition. Prompts the
run fitted or tuned on (same normalised text as an extract or calibrate prompt) are removed first
and counted.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from activations.io import write_json
from activations.model_loading import ModelOptions

RUN_MARKERS = ("config.yaml", "prompts/prompts.json", "vectors/lowrank", "gates/distance.json", "gates/probe.json")
"""Paths a finished run folder holds (relative to it)."""

FROM_RUN = ("model", "tokens", "vectors", "vector", "layer", "ablate_sae", "features")
"""Inputs that --run supplies itself; giving one too is refused."""


def load_run(run: Path, device: str) -> Any:
    """The `RunContext` of a finished run, its config read from `RUN/config.yaml` (device replaced)."""
    from analysis.pipeline.main import load_config
    from analysis.stages.context import RunContext

    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    absent = [m for m in RUN_MARKERS if not (run / m).exists()]
    if absent:
        raise ValueError(f"{run} is not a finished pipeline run (no {absent[0]}); run `refusal-sae pipeline` first")
    cfg = load_config(run / "config.yaml")
    return RunContext(replace(cfg, device=device), run)


def evaluate_run(cfg: Any, inputs: Any) -> dict[str, Any]:
    """Every condition of the run on `inputs.prompts` (held-out: overlap with its fitting data removed)."""
    from activations.prompts import load_prompt_set
    from activations.prompts.heldout import heldout_from_records
    from analysis.evaluation.conditions import length_order
    from analysis.evaluation.separation import head_separation
    from analysis.evaluation.set_evaluation import evaluate_set
    from analysis.stages.suite import build_suite

    given = [f"--{name}" for name in FROM_RUN if getattr(inputs, name) is not None]
    if given:
        raise ValueError(f"--run takes the model, tokens, layer, vectors, gates and SAE from the run; drop {given[0]}")
    defaults = ModelOptions()
    changed = [f"--{name}" for name in ("model_dtype", "max_length", "chat_template")
               if getattr(inputs, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(f"--run runs the model as the run did (its model_dtype, max_length, chat_template); drop {changed[0]}")
    ctx = load_run(Path(inputs.run), inputs.device)
    run_eval = ctx.cfg.evaluate
    ctx.cfg.evaluate = replace(run_eval, positions=cfg.positions or run_eval.positions,
                               batch_size=cfg.batch_size or run_eval.batch_size)
    alphas = list(cfg.alphas) if cfg.alphas is not None else list(run_eval.alphas)
    prompt_set = load_prompt_set(list(inputs.prompts), seed=inputs.seed)
    records = list(prompt_set.records) if inputs.split == "all" else prompt_set.split(inputs.split)
    if not records:
        raise ValueError(f"the prompt set {' '.join(inputs.prompts)} has no prompts in the {inputs.split!r} split")
    held = heldout_from_records("prompts", records, ctx.prompts, inputs.prompts)
    built = build_suite(ctx)
    ordered = [held.records[i] for i in length_order(held.records, built.suite.setup.tokenizer, ctx.cfg.chat_template)]
    found = evaluate_set(built.suite, ordered, alphas, run_eval.frontier_tolerance, distance_gate=built.distance)
    payload = {
        "schema_version": 1, "command": "steer", "run": str(inputs.run), "model": ctx.target_model_path,
        "layer": ctx.layer, "alpha": run_eval.alpha, "alphas": alphas, "positions": ctx.cfg.evaluate.positions,
        "prompts": list(inputs.prompts), "split": inputs.split, "seed": inputs.seed,
        "held_out": held.manifest(), **found.payload,
        "head_separation": head_separation([r.to_dict() for r in found.results["baseline"]]),
        "rows": {name: [{k: v for k, v in r.to_dict().items() if k not in ("text", "votes", "method")} for r in rs]
                 for name, rs in found.results.items()},
    }
    write_json(inputs.out, payload, nonfinite="null")
    return payload


def show_run(inputs: Any, payload: dict[str, Any], table: str) -> None:
    """The condition table, what was removed as overlap, and the gating verdict."""
    held = payload["held_out"]
    removed = held["n_overlap_removed"]
    print(f"run {payload['run']}: layer {payload['layer']}, alpha {payload['alpha']:g}, {payload['n']} prompts "
          f"({held['n_read']} read; removed as fitted/tuned on: extract {removed['extract']}, calibrate "
          f"{removed['calibrate']}; duplicates {held['n_duplicates_removed']})")
    print(table)
    print(f"gating goal: {payload['frontier']['verdict']}")
    print(f"wrote {inputs.out}")
