"""The `evaluate` stage: every condition side by side on the eval split, plus sweeps and capability
(`RUN/evaluate/results.json`, `rows.json`, `gate_decisions.json`).

Conditions (all at the primary layer, steering on every position unless configured otherwise):
  baseline               no intervention
  steer_toward / _away   ±alpha · v_global (pooled refusal mean − benign mean) on every row
  steer_lowrank          +alpha · the low-rank combined vector
  conditional_distance   per-row plan from the distance gate (tuned on calibrate)
  conditional_probe      per-row plan from the L1-probe gate on SAE latents (tuned on calibrate)
  conditional_token      the model's own first-token category selects v_c (+alpha)
  conditional_external   an external classifier's refuse score selects +alpha·v_global (only with
                         `gates.external_classifier`)
  ablate                 zero the L1-selected SAE features of every refusal category (reference seed;
                         every seed is also run and reported in `ablate_by_seed`)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from activations.io import write_json
from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from activations.stats import rate
from analysis.evaluation.builtin_capability import builtin_capability_tasks
from analysis.evaluation.capability import evaluate_capability
from analysis.evaluation.capability_data import load_gsm8k, load_mmlu, load_truthfulqa_mc
from analysis.evaluation.conditions import Plan, plan_from_decisions, refusal_table, run_refusal
from analysis.evaluation.refusal import build_results, compare_conditions
from analysis.interventions.ablation import ablate_features
from analysis.interventions.steering import steer
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.gates import eval_setup, external_gate, gate_path, residual_vectors, split_rows
from analysis.stages.select import selection_dir
from analysis.stages.train import run_saes
from analysis.stages.vectors import vector_set
from probes.gates import load_gate
from probes.latents import encode_latents
from probes.model_gates import TokenGate
from probes.refusal_tokens import first_token_decisions, first_token_logits, refusal_log_odds
from probes.selection import read_features, refusal_feature_ids

NAME = "evaluate"


@dataclass
class Config:
    """The evaluation (pipeline section `evaluate:`).

    Args:
        alphas: steering strengths of the sweep, in multiples of the vector.
        alpha: the strength of the side-by-side condition table (and of the gates).
        positions: steer every position, or only the last prompt / generated positions.
        batch_size: prompts per forward.
        capability: capability tasks: builtin | mmlu:DIR | truthfulqa:CSV | gsm8k:JSONL.
        capability_limit: items per capability task.
    """

    alphas: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    alpha: float = 4.0
    positions: Literal["all", "generated"] = "all"
    batch_size: int = 32
    capability: list[str] = field(default_factory=lambda: ["builtin"])
    capability_limit: int = 40

    def __post_init__(self) -> None:
        if not all(np.isfinite(a) for a in [*self.alphas, self.alpha]):
            raise ValueError(f"steering strengths must be finite, got alphas={self.alphas}, alpha={self.alpha}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for spec in self.capability:
            if spec.partition(":")[0] not in ("builtin", "mmlu", "truthfulqa", "gsm8k"):
                raise ValueError(f"unknown capability task {spec!r}; expected builtin, mmlu:DIR, truthfulqa:CSV or gsm8k:JSONL")


def capability_tasks(specs: list[str], limit: int) -> dict[str, list]:
    """`builtin` or `mmlu:DIR`, `truthfulqa:CSV`, `gsm8k:JSONL` (local files) → task items."""
    tasks: dict[str, list] = {}
    for spec in specs:
        kind, _, location = spec.partition(":")
        if kind == "builtin":
            tasks.update({name: items[:limit] for name, items in builtin_capability_tasks().items()})
        elif kind == "mmlu":
            tasks["mmlu"] = load_mmlu(location, limit=limit)
        elif kind == "truthfulqa":
            tasks["truthfulqa_mc"] = load_truthfulqa_mc(location, limit=limit)
        elif kind == "gsm8k":
            tasks["gsm8k"] = load_gsm8k(location, limit=limit)
        else:
            raise ValueError(f"unknown capability task {spec!r}; expected builtin, mmlu:DIR, truthfulqa:CSV or gsm8k:JSONL")
    return tasks


def selected_union(ctx: RunContext, seed: int) -> list[int]:
    """The features selected for any refusal category on SAE seed `seed` (the ablation set)."""
    return refusal_feature_ids(read_features(selection_dir(ctx, "sae") / f"seed_{seed}", layer=ctx.layer, sae_seed=seed))


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    out = ctx.stage_dir(NAME)
    setup = eval_setup(ctx)
    adapter, d_model = setup.adapter, setup.adapter.d_model
    rows, records = split_rows(ctx, "eval")
    n = len(records)
    vectors = residual_vectors(ctx)
    lowrank = vector_set(ctx, "lowrank")["lowrank"].vector.numpy()
    models = run_saes(ctx)
    reference_seed = next(iter(models))

    logits = first_token_logits(setup.model, setup.tokenizer, [r.text for r in records], setup.spec,
                                batch_size=setup.batch_size, max_length=setup.max_length, progress=True,
                                cache=setup.block_cache, desc="condition baseline")
    results = {"baseline": build_results(records, first_token_decisions(logits), refusal_log_odds(logits))}
    gate_log: dict[str, Any] = {}

    def run_plan(name: str, plan: Plan) -> None:
        results[name] = run_refusal(setup, records, plan, progress=True, desc=f"condition {name}")

    run_plan("steer_toward", Plan.uniform(vectors["global"], cfg.alpha, n))
    run_plan("steer_away", Plan.uniform(vectors["global"], -cfg.alpha, n))
    run_plan("steer_lowrank", Plan.uniform(lowrank, cfg.alpha, n))
    gates = {
        "conditional_distance": load_gate(gate_path(ctx, "distance")).decide(rows.features),
        "conditional_probe": load_gate(gate_path(ctx, "probe")).decide(
            encode_latents(models[reference_seed], rows.features)),
        "conditional_token": TokenGate(setup.spec, alpha_toward=cfg.alpha).decide_logits(logits),
    }
    external = external_gate(ctx.cfg.gates, cfg.alpha, ctx.device, cfg.batch_size, ctx.cfg.max_length)
    if external is not None:  # reads the prompt text only, never the label
        gates["conditional_external"] = external.decide_texts([r.text for r in records])
    for name, decisions in gates.items():
        gate_log[name] = [d.to_dict() for d in decisions]
        run_plan(name, plan_from_decisions(decisions, vectors, d_model))

    ablate_by_seed = {}
    ablated = {seed: selected_union(ctx, seed) for seed in models}
    for seed, sae in models.items():
        ids = ablated[seed]
        context = lambda rows_, sae=sae, ids=ids: ablate_features(adapter, ctx.layer, sae, ids)  # noqa: E731
        ablate_by_seed[seed] = run_refusal(setup, records, context=context, progress=True,
                                           desc=f"condition ablate (seed {seed}, {len(ids)} features)")
    results["ablate"] = ablate_by_seed[reference_seed]

    sweep = []
    for alpha in cfg.alphas:
        for sign, name in ((1, "steer_toward"), (-1, "steer_away")):
            found = results[name] if alpha == cfg.alpha else run_refusal(
                setup, records, Plan.uniform(vectors["global"], sign * alpha, n), progress=True,
                desc=f"sweep {name} {alpha:g}")
            table = refusal_table(found)
            sweep.append({"condition": name, "strength": alpha, "over_refusal": table["over_refusal"],
                          "harmful": table["harmful_refusal"]})

    benign_rows = [i for i, r in enumerate(records) if r.category in (BENIGN, CONTRAST)]
    sufficiency = {}
    for category in REFUSAL_CATEGORIES:
        subset = [records[i] for i in benign_rows]
        steered = run_refusal(setup, subset, Plan.uniform(vectors[category], cfg.alpha, len(subset)), progress=True,
                              desc=f"sufficiency {category}")
        chosen = np.array([r.decision == category for r in steered])
        sufficiency[category] = {"refusal": refusal_table(steered)["over_refusal"],
                                 "decided_category": _rate(chosen)}

    capability = evaluate_capabilities(ctx, cfg, setup, vectors["global"])
    tables = {name: refusal_table(found) for name, found in results.items()}
    payload = {
        "layer": ctx.layer, "alpha": cfg.alpha, "positions": cfg.positions, "n_eval": n,
        "refusal": tables,
        "paired_vs_baseline": {name: compare_conditions(results["baseline"], found)
                               for name, found in results.items() if name != "baseline"},
        "ablate_by_seed": {str(s): refusal_table(found) for s, found in ablate_by_seed.items()},
        "ablated_features": {str(s): ids for s, ids in ablated.items()},
        "sweep": sweep, "sufficiency": sufficiency, "capability": capability,
        "gate_decisions": {name: _decision_counts(log) for name, log in gate_log.items()},
    }
    write_json(out / "results.json", payload)
    write_json(out / "gate_decisions.json", gate_log)
    write_json(out / "rows.json", {name: [r.to_dict() for r in found] for name, found in results.items()})
    return {"n_eval": n, "conditions": sorted(tables)}


def _rate(flags: np.ndarray) -> dict[str, Any]:
    return rate(flags)


def _decision_counts(log: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in log:
        key = f"{d['direction']}:{d['category']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def evaluate_capabilities(ctx: RunContext, cfg: Config, setup: Any, global_vector: np.ndarray) -> dict[str, Any]:
    """Capability tasks under baseline and ±alpha·v_global, steering every scored position."""
    tasks = capability_tasks(cfg.capability, cfg.capability_limit)
    adapter = setup.adapter
    vector = torch.as_tensor(global_vector, device=adapter.device, dtype=adapter.dtype)
    out = {}
    for name, alpha in (("baseline", 0.0), ("steer_toward", cfg.alpha), ("steer_away", -cfg.alpha)):
        def make_context(rows: np.ndarray, alpha: float = alpha):
            if alpha == 0.0:
                return contextlib.nullcontext()
            return steer(adapter, ctx.layer, vector, alpha, positions="all")

        out[name] = evaluate_capability(setup.model, setup.tokenizer, tasks, make_context=make_context,
                                        batch_size=setup.batch_size, max_new_tokens=48, progress=True,
                                        desc=f"capability {name}")
    return out


def results_path(ctx: RunContext, name: str = "results") -> Path:
    """This run's evaluation outputs: "results", "rows" or "gate_decisions" (JSON)."""
    return ctx.stage_dir(NAME) / f"{name}.json"


STAGE = PipelineStage(NAME, run, section=NAME, uses=("max_length", "chat_template", "gates.external_classifier",
                                                   "gates.external_kind", "gates.external_threshold"),
                      after=("gates",))
