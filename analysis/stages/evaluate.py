"""The `evaluate` stage: every condition side by side on the eval split and on each held-out benchmark
set, with the strength sweep, the gating frontier, and capability under every condition
(`RUN/evaluate/results.json`, `rows.json`, `gate_decisions.json`, `eval_sets.json`).

Conditions (all at the primary layer, steering on every position unless configured otherwise;
`analysis.evaluation.suite`):
  baseline               no intervention
  steer_toward / _away   ±alpha · v_global (pooled refusal mean − benign mean) on every row
  steer_lowrank          +alpha · the low-rank combined vector
  steer_sae              +alpha · the pooled SAE-space vector (row-weighted sum of the seed's SAE-space
                         category vectors, at |v_global| by default: `sae_vector_norm`)
  conditional_distance   per-row plan from the distance gate (tuned on calibrate)
  conditional_probe      per-row plan from the L1-probe gate on SAE latents (tuned on calibrate per seed)
  conditional_token      the model's own first-token category selects v_c (+alpha)
  conditional_external   an external classifier's refuse score selects +alpha·v_global (only with
                         `gates.external_classifier`)
  ablate                 zero the L1-selected SAE features of every refusal category

The SAE-dependent conditions (conditional_probe, steer_sae, ablate) run under every SAE seed on the
eval split and on every held-out set (`analysis.evaluation.seed_conditions`): the condition tables
hold the reference (first) seed, `seed_averaged` the per-seed tables (`by_seed`), the across-seed
rates (`refusal`) and changes against the baseline (`vs_baseline`), each averaged with
`activations.stats.seed_average` as the ablation matrices are. `rows_by_seed.json` keeps the per-seed
verdicts; `ablate_by_seed` (the eval split's per-seed ablate tables) stays for older readers.

Per-category ablation matrices with controls, directional ablation and sufficiency (steering toward
each category) are the `ablate` stage's (`analysis/stages/ablate.py`).

Held-out sets (`eval_sets`) are read in full, never split, fitted or tuned on; prompts whose text
matches an extract or calibrate prompt are removed and counted (`activations.prompts.heldout`).
Their gate inputs (last-token residuals) are computed here from the target model; they never enter
the activation store the SAEs and heads are trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from activations.io import write_json
from activations.prompts.heldout import check_set_names, load_heldout_sets
from analysis.evaluation.benign_text import complete_responses, load_benign_texts
from analysis.evaluation.capability_conditions import (
    benign_under_conditions,
    capability_under_conditions,
    readability,
)
from analysis.evaluation.capability_tasks import (
    load_capability_tasks,
    parse_capability_spec,
)
from analysis.evaluation.conditions import length_order
from analysis.evaluation.seed_conditions import refusal_by_seed, seed_averaged
from analysis.evaluation.set_evaluation import SetEvaluation, evaluate_set
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.gates import split_rows
from analysis.stages.suite import RunSuite, build_suite, seed_conditions, selected_union

NAME = "evaluate"


@dataclass
class Config:
    """The evaluation (pipeline section `evaluate:`).

    Args:
        alphas: steering strengths of the sweep (the unconditional frontier), in multiples of the vector.
        alpha: the strength of the side-by-side condition table (and of the gates).
        positions: steer every position, or only the last prompt / generated positions.
        batch_size: prompts per forward.
        eval_sets: held-out benchmark sets, name -> prompt-source specs (any spec `--prompts` takes:
            xstest:PATH, orbench:PATH, coconot-contrast:PATH, jsonl:PATH?..., builtin:heldout). Each
            is evaluated in full under every condition and never split, fitted or tuned on.
        frontier_tolerance: the gating goal allows harmful refusal this far below the baseline (a rate).
        capability: capability tasks: builtin | builtin_mc | builtin_arith | mmlu:DIR | truthfulqa:CSV |
            gsm8k:JSONL, each optionally ending in ?limit=N.
        capability_limit: items per capability task (unless the spec says ?limit=N).
        capability_conditions: conditions the capability tasks run under (None = every condition).
        max_new_tokens: generation length of generative capability tasks (GSM8K style).
        benign_text: benign (request, response) sources for the next-token loss and KL under every
            condition: builtin | alpaca:PATH | ultrachat:PATH | jsonl:PATH (empty = skip).
        benign_limit: texts per benign source.
        benign_response_tokens: response tokens scored per text (and generated when a source has none).
        benign_batch_size: texts per forward of the benign-text measure (it keeps full vocabularies).
        sae_vector_norm: the length of steer_sae's pooled SAE-space vector: "global" = |v_global| (the
            same alpha is the same step as steer_toward; only the direction differs) or "own" (as decoded).
    """

    alphas: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    alpha: float = 4.0
    positions: Literal["all", "generated"] = "all"
    batch_size: int = 32
    eval_sets: dict[str, list[str]] = field(default_factory=dict)
    frontier_tolerance: float = 0.02
    capability: list[str] = field(default_factory=lambda: ["builtin"])
    capability_limit: int = 40
    capability_conditions: list[str] | None = None
    max_new_tokens: int = 48
    benign_text: list[str] = field(default_factory=lambda: ["builtin"])
    benign_limit: int = 12
    benign_response_tokens: int = 48
    benign_batch_size: int = 8
    sae_vector_norm: Literal["global", "own"] = "global"

    def __post_init__(self) -> None:
        if not all(np.isfinite(a) for a in [*self.alphas, self.alpha]):
            raise ValueError(f"steering strengths must be finite, got alphas={self.alphas}, alpha={self.alpha}")
        for name in ("batch_size", "capability_limit", "max_new_tokens", "benign_limit", "benign_response_tokens",
                     "benign_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.frontier_tolerance <= 1.0:
            raise ValueError(f"frontier_tolerance must lie in [0, 1], got {self.frontier_tolerance}")
        for spec in self.capability:
            parse_capability_spec(spec)
        for spec in self.benign_text:
            if spec.partition(":")[0] not in ("builtin", "alpaca", "ultrachat", "jsonl"):
                raise ValueError(f"unknown benign-text source {spec!r}; expected builtin, alpaca:PATH, ultrachat:PATH or jsonl:PATH")
        check_set_names(self.eval_sets)


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    out = ctx.stage_dir(NAME)
    built = build_suite(ctx)
    suite = built.suite
    per_seed = seed_conditions(ctx, built)
    rows, records = split_rows(ctx, "eval")
    found = evaluate_set(suite, records, cfg.alphas, cfg.frontier_tolerance, features=rows.features,
                         distance_gate=built.distance)
    by_seed, seeded = _every_seed(built, per_seed, records, found)
    heldout = _eval_sets(cfg, ctx, built, per_seed)
    capability = _capability(cfg, suite)
    payload = {
        "layer": ctx.layer, "alpha": cfg.alpha, "positions": cfg.positions, "n_eval": len(records),
        **{k: found.payload[k] for k in ("refusal", "paired_vs_baseline", "sweep", "frontier", "gate_decisions",
                                          "distance_scores")},
        "seed_averaged": seeded, "reference_seed": built.reference_seed,
        "steer_sae": {str(s): info for s, (_, info) in built.sae_vectors.items()},
        "ablate_by_seed": seeded["by_seed"].get("ablate", {}),
        "ablated_features": {str(s): selected_union(ctx, s) for s in built.saes},
        "eval_sets": {name: entry["payload"] for name, entry in heldout.items()},
        **capability,
    }
    write_json(out / "results.json", payload)
    write_json(out / "gate_decisions.json", {name: [d.to_dict() for d in ds] for name, ds in found.decisions.items()})
    write_json(out / "rows.json", {name: [r.to_dict() for r in rs] for name, rs in found.results.items()})
    write_json(out / "rows_by_seed.json", {"eval": _rows(by_seed), **{name: _rows(entry["by_seed"])
                                                                       for name, entry in heldout.items()}})
    write_json(out / "eval_sets.json", {name: {"manifest": entry["payload"]["manifest"],
                                               "rows": {c: [r.to_dict() for r in rs] for c, rs in entry["results"].items()}}
                                        for name, entry in heldout.items()})
    return {"n_eval": len(records), "conditions": sorted(payload["refusal"]),
            "seed_conditions": {c: sorted(t) for c, t in seeded["by_seed"].items()},
            "eval_sets": {name: entry["payload"]["n"] for name, entry in heldout.items()}}


def _every_seed(built: RunSuite, per_seed: dict, records: list, found: SetEvaluation) -> tuple[dict, dict[str, Any]]:
    """The SAE-dependent conditions under every SAE seed on `records` (the reference seed's runs reused):
    `({condition: {seed: results}}, seed_averaged payload + per-seed probe decision counts)`."""
    by_seed, counts = refusal_by_seed(built.suite, per_seed, built.reference_seed, records, found.inputs,
                                      found.results, found.decisions)
    averaged = seed_averaged(records, found.results["baseline"], by_seed)
    averaged["gate_decisions"] = {c: {str(s): n for s, n in per.items()} for c, per in counts.items()}
    return by_seed, averaged


def _rows(by_seed: dict) -> dict[str, dict[str, list]]:
    """`{condition: {seed: [row dicts]}}` of per-seed results, for rows_by_seed.json."""
    return {c: {str(s): [r.to_dict() for r in rs] for s, rs in per.items()} for c, per in by_seed.items()}


def _eval_sets(cfg: Config, ctx: RunContext, built: RunSuite, per_seed: dict) -> dict[str, dict[str, Any]]:
    """Each held-out set under every condition (the SAE-dependent ones under every seed):
    `{name: {"payload": ..., "results": ..., "by_seed": ...}}`."""
    if not cfg.eval_sets:
        return {}
    sets = load_heldout_sets(cfg.eval_sets, ctx.prompts, seed=ctx.cfg.seed)
    tokenizer = built.suite.setup.tokenizer
    out = {}
    for name, held in sets.items():
        print(f"  eval set {name} ({len(held.records)} prompts)", flush=True)
        records = [held.records[i] for i in length_order(held.records, tokenizer, ctx.cfg.chat_template)]
        found = evaluate_set(built.suite, records, cfg.alphas, cfg.frontier_tolerance, distance_gate=built.distance)
        by_seed, seeded = _every_seed(built, per_seed, records, found)
        out[name] = {"payload": {"manifest": held.manifest(), **found.payload, "seed_averaged": seeded},
                     "results": found.results, "by_seed": by_seed}
    return out


def _capability(cfg: Config, suite: Any) -> dict[str, Any]:
    """Capability tasks and the benign-text loss / KL under the configured conditions."""
    conditions = suite.names if cfg.capability_conditions is None else list(cfg.capability_conditions)
    out: dict[str, Any] = {"capability": {}, "capability_paired": {}, "capability_readable": {}, "benign_text": {}}
    tasks = load_capability_tasks(cfg.capability, cfg.capability_limit)
    if tasks:
        found = capability_under_conditions(suite, tasks, conditions, cfg.max_new_tokens)
        out["capability"] = found["scores"]
        out["capability_paired"] = found["paired_vs_baseline"]
        out["capability_readable"] = readability(found["scores"]["baseline"], tasks)
    items = [item for spec in cfg.benign_text for item in load_benign_texts(spec, cfg.benign_limit)]
    if items:
        s = suite.setup
        items = complete_responses(s.model, s.tokenizer, items, cfg.benign_response_tokens, s.batch_size,
                                   suite.chat_template)
        print(f"  benign text ({len(items)} responses) under {len(suite.names)} conditions", flush=True)
        out["benign_text"] = benign_under_conditions(suite, items, suite.names, cfg.benign_response_tokens,
                                                     cfg.benign_batch_size)
    return out


def results_path(ctx: RunContext, name: str = "results") -> Path:
    """This run's evaluation outputs: "results", "rows", "rows_by_seed", "gate_decisions" or "eval_sets" (JSON)."""
    return ctx.stage_dir(NAME) / f"{name}.json"


STAGE = PipelineStage(NAME, run, section=NAME, uses=("max_length", "chat_template", "seed", "gates.external_classifier",
                                                   "gates.external_kind", "gates.external_threshold"),
                      after=("gates",))
