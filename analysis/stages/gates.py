"""The `gates` stage: the distance gate and the probe gate, tuned on calibrate (`RUN/gates/`).

Row alignment: gate features come from the harvested last-token activations (the unsteered model's
own states, which is what a deployed gate would see), matched to prompts by id. Labels are read only
by the tuning objective on calibrate and by the rate tables, never by a gate. Gates steer with the
evaluate stage's strength (`evaluate.alpha`) at its positions, so the stage also reads that section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from activations.io import write_json
from activations.records import PromptRecord
from activations.store import ActivationStore
from activations.tokenize import token_lengths
from analysis.evaluation.conditions import EvalSetup, Plan, plan_from_decisions, rates_of, run_refusal
from analysis.evaluation.refusal import RefusalResult
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.harvest import store_dir
from analysis.stages.refusal_tokens import target_spec
from analysis.stages.select import selection_dir
from analysis.stages.train import run_saes
from analysis.stages.vectors import vector_set
from probes.gate_tuning import DistanceGrid, fit_distance_gate, tune_distance_gate, tune_probe_gate
from probes.heads import HeadResult
from probes.latents import encode_latents
from probes.rows import LabelledRows, load_last_token_rows

NAME = "gates"


@dataclass
class Config:
    """Gate tuning (pipeline section `gates:`).

    Args:
        distance_t_low, distance_t_high: the distance gate's threshold grid (steer away below
            t_low, toward above t_high); every grid point runs the steered model on calibrate, so
            the grid is small.
        distance_partial: strength multipliers between the thresholds.
        external_classifier: hub id or local folder of an external refusal classifier or judge
            (`probes.model_gates.ExternalClassifierGate`); the evaluate stage then adds the
            `conditional_external` condition. None = no external gate.
        external_kind: "sequence-classifier" (probability of its refuse labels) or "causal-judge".
        external_threshold: refuse score at or above which the gate steers toward refusal.
    """

    distance_t_low: list[float] = field(default_factory=lambda: [0.45, 0.5])
    distance_t_high: list[float] = field(default_factory=lambda: [0.5, 0.55])
    distance_partial: list[float] = field(default_factory=lambda: [0.0])
    external_classifier: str | None = None
    external_kind: Literal["sequence-classifier", "causal-judge"] = "sequence-classifier"
    external_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.external_threshold <= 1.0:
            raise ValueError(f"external_threshold must lie in [0, 1], got {self.external_threshold}")


def external_gate(cfg: Config, alpha: float, device: str, batch_size: int, max_length: int) -> Any:
    """The configured external classifier gate, or None."""
    from probes.model_gates import ExternalClassifierGate

    if cfg.external_classifier is None:
        return None
    return ExternalClassifierGate(cfg.external_classifier, kind=cfg.external_kind, threshold=cfg.external_threshold,
                                  alpha_toward=alpha, device=device, batch_size=batch_size, max_length=max_length)


def split_rows(ctx: RunContext, split: str) -> tuple[LabelledRows, list[PromptRecord]]:
    """Last-token rows of one split at the primary layer and the prompt records in the same order.

    Rows are sorted by prompt length, so the fixed-order batches of the evaluation carry little padding.
    """
    store = ActivationStore(store_dir(ctx, "last"))
    rows = load_last_token_rows(store, ctx.layer, splits=(split,))
    by_id = {r.id: r for r in ctx.split(split)}
    missing = [i for i in rows.ids if str(i) not in by_id]
    if missing:
        raise ValueError(f"harvested prompt {missing[0]!r} is not in the {split} split of the prompt set")
    records = [by_id[str(i)] for i in rows.ids]
    lengths = token_lengths(ctx.model("target")[1], [r.text for r in records], ctx.cfg.chat_template)
    order = np.argsort(lengths, kind="stable")
    return rows.subset(order), [records[i] for i in order]


def eval_setup(ctx: RunContext) -> EvalSetup:
    """The target model, its token spec and the evaluate section's positions and batch size."""
    model, tokenizer = ctx.model("target")
    cfg = ctx.cfg.evaluate
    return EvalSetup(model, tokenizer, target_spec(ctx), ctx.layer, cfg.positions, cfg.batch_size, ctx.cfg.max_length)


def residual_vectors(ctx: RunContext) -> dict[str, np.ndarray]:
    """Category vectors and "global" (refusal − benign) at the primary layer, as float32 arrays."""
    vectors = vector_set(ctx, "residual")
    return {name: vectors[name].vector.numpy().astype(np.float32) for name in vectors}


def reusing_outcome(setup: EvalSetup, records: list[PromptRecord], baseline: list[RefusalResult],
                    vectors: dict[str, np.ndarray]):
    """Gate-tuning objective on calibrate: steer only the rows the gate acts on, reuse the baseline
    verdict of the others (an unsteered row is bit-identical to the baseline run)."""
    base = np.array([r.refused for r in baseline])

    def outcome(decisions: list[Any]) -> tuple[float, float]:
        plan = plan_from_decisions(decisions, vectors, setup.adapter.d_model)
        active = np.flatnonzero(plan.alphas != 0)
        refused = base.copy()
        if active.size:
            sub = Plan(plan.vectors[active], plan.alphas[active])
            refused[active] = [r.refused for r in run_refusal(setup, [records[i] for i in active], sub)]
        cats = [r.category for r in records]
        return rates_of([RefusalResult(r.id, c, r.source, bool(f), "token") for r, c, f in zip(records, cats, refused)])

    return outcome


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Distance gate (residual) and probe gate (SAE latents of the reference seed), tuned on calibrate."""
    alpha = ctx.cfg.evaluate.alpha
    out = ctx.stage_dir(NAME)
    setup = eval_setup(ctx)
    vectors = residual_vectors(ctx)
    extract, _ = split_rows(ctx, "extract")
    calibrate, cal_records = split_rows(ctx, "calibrate")
    baseline = run_refusal(setup, cal_records, progress=True, desc="calibrate baseline")
    grid = DistanceGrid(t_low=tuple(cfg.distance_t_low), t_high=tuple(cfg.distance_t_high), alpha_toward=(alpha,),
                        alpha_away=(alpha,), partial=tuple(cfg.distance_partial))
    distance, report = tune_distance_gate(
        fit_distance_gate(extract), calibrate, reusing_outcome(setup, cal_records, baseline, vectors), grid
    )
    distance.save(out / "distance.json")
    head = HeadResult.load(str(selection_dir(ctx, "sae") / "head"))
    reference_seed, sae = next(iter(run_saes(ctx).items()))
    latents = calibrate.with_features(encode_latents(sae, calibrate.features))
    probe = tune_probe_gate(head, latents, alpha_toward=alpha)
    probe.save(out / "probe.json")
    write_json(out / "tuning.json", {"distance": report.to_dict(), "probe": probe.meta, "probe_sae_seed": reference_seed})
    return {"distance_chosen": report.chosen, "distance_baseline": report.baseline,
            "probe_thresholds": probe.thresholds, "probe_sae_seed": reference_seed}


def gate_path(ctx: RunContext, name: str) -> Path:
    """One of this run's tuned gates: "distance" or "probe"."""
    return ctx.stage_dir(NAME) / f"{name}.json"


STAGE = PipelineStage(NAME, run, section=NAME,
                      uses=("evaluate.alpha", "evaluate.positions", "evaluate.batch_size", "max_length", "chat_template"),
                      after=("vectors",))
