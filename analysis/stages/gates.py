"""The `gates` stage: the distance gate and the probe gates, tuned on calibrate (`RUN/gates/`).

`distance.json`: the distance gate (residual states). `probe_seed_<s>.json`: one L1-probe gate per SAE
seed s, each from that seed's own head (`RUN/select/sae/seed_<s>/head`) on that seed's latents, its
thresholds tuned on calibrate by the same procedure; `probe.json` is the reference (first) seed's,
where earlier readers look for it.

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
from analysis.evaluation.conditions import EvalSetup, cached_outcome, length_order, run_refusal
from analysis.stages.context import PipelineStage, RunContext
from analysis.stages.harvest import store_dir
from analysis.stages.refusal_tokens import target_spec
from analysis.stages.select import selection_dir
from analysis.stages.train import run_saes
from analysis.stages.vectors import vector_set
from probes.gate_tuning import fit_distance_gate, quantile_grid, score_distribution, tune_distance_gate, tune_probe_gate
from probes.heads import HeadResult
from probes.latents import encode_latents
from probes.rows import LabelledRows, load_last_token_rows

NAME = "gates"


@dataclass
class Config:
    """Gate tuning (pipeline section `gates:`).

    Args:
        distance_quantiles: the distance gate's thresholds sit at these quantiles of its top score on
            calibrate (t_low also takes 0 = never steer away, t_high 1 = never steer toward, so the
            grid holds the one-sided and the no-op gates). Steered verdicts are cached per row, so
            the grid costs at most two steered passes over calibrate per strength.
        distance_partial: strength multipliers between the thresholds.
        distance_tolerance: the chosen distance gate may lower harmful refusal on calibrate by at
            most this much (a rate, 0.02 = 2 points) below the unsteered baseline.
        external_classifier: hub id or local folder of an external refusal classifier or judge
            (`probes.model_gates.ExternalClassifierGate`); the evaluate stage then adds the
            `conditional_external` condition. None = no external gate.
        external_kind: "sequence-classifier" (probability of its refuse labels) or "causal-judge".
        external_threshold: refuse score at or above which the gate steers toward refusal.
    """

    distance_quantiles: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    distance_partial: list[float] = field(default_factory=lambda: [0.0])
    distance_tolerance: float = 0.02
    external_classifier: str | None = None
    external_kind: Literal["sequence-classifier", "causal-judge"] = "sequence-classifier"
    external_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.distance_quantiles or not all(0.0 < q < 1.0 for q in self.distance_quantiles):
            raise ValueError(f"distance_quantiles must lie strictly between 0 and 1, got {self.distance_quantiles}")
        if not 0.0 <= self.distance_tolerance <= 1.0:
            raise ValueError(f"distance_tolerance must lie in [0, 1], got {self.distance_tolerance}")
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

    Rows are sorted by prompt length, then id (`length_order`), so the fixed-order batches of the
    evaluation carry little padding and any later run on the same prompts batches them identically.
    """
    store = ActivationStore(store_dir(ctx, "last"))
    rows = load_last_token_rows(store, ctx.layer, splits=(split,))
    by_id = {r.id: r for r in ctx.split(split)}
    missing = [i for i in rows.ids if str(i) not in by_id]
    if missing:
        raise ValueError(f"harvested prompt {missing[0]!r} is not in the {split} split of the prompt set")
    records = [by_id[str(i)] for i in rows.ids]
    order = length_order(records, ctx.model("target")[1], ctx.cfg.chat_template)
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


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Distance gate (residual) and one probe gate per SAE seed (its head on its latents), tuned on calibrate."""
    alpha = ctx.cfg.evaluate.alpha
    out = ctx.stage_dir(NAME)
    setup = eval_setup(ctx)
    vectors = residual_vectors(ctx)
    extract, _ = split_rows(ctx, "extract")
    calibrate, cal_records = split_rows(ctx, "calibrate")
    baseline = run_refusal(setup, cal_records, progress=True, desc="calibrate baseline")
    fitted = fit_distance_gate(extract)
    grid = quantile_grid(fitted, calibrate, cfg.distance_quantiles, (alpha,), (alpha,), tuple(cfg.distance_partial))
    distance, report = tune_distance_gate(fitted, calibrate, cached_outcome(setup, cal_records, baseline, vectors),
                                          grid, cfg.distance_tolerance)
    distance.save(out / "distance.json")
    probes = tune_probe_gates(ctx, calibrate, alpha)
    reference_seed = next(iter(probes))
    for seed, probe in probes.items():
        probe.save(gate_path(ctx, "probe", seed))
    probes[reference_seed].save(out / "probe.json")
    by_seed = {str(s): {**p.meta, "thresholds": p.thresholds} for s, p in probes.items()}  # meta has sae_seed
    write_json(out / "tuning.json", {"distance": report.to_dict(),
                                     "distance_scores": {"calibrate": score_distribution(distance, calibrate)},
                                     "probe": probes[reference_seed].meta, "probe_sae_seed": reference_seed,
                                     "probe_by_seed": by_seed})
    return {"distance_chosen": report.chosen, "distance_baseline": report.baseline,
            "distance_noop": report.chosen_is_noop, "probe_thresholds": probes[reference_seed].thresholds,
            "probe_sae_seed": reference_seed,
            "probe_thresholds_by_seed": {str(s): p.thresholds for s, p in probes.items()}}


def tune_probe_gates(ctx: RunContext, calibrate: LabelledRows, alpha: float) -> dict[int, Any]:
    """`{seed: ProbeGate}` for every SAE seed (reference first): seed s's L1 head on s's latents of the
    calibrate rows, thresholds tuned on calibrate (`probes.gate_tuning.tune_probe_gate`)."""
    out = {}
    for seed, sae in run_saes(ctx).items():
        head = HeadResult.load(str(selection_dir(ctx, "sae") / f"seed_{seed}" / "head"))
        latents = calibrate.with_features(encode_latents(sae, calibrate.features))
        probe = tune_probe_gate(head, latents, alpha_toward=alpha)
        probe.meta["sae_seed"] = seed
        out[seed] = probe
    return out


def gate_path(ctx: RunContext, name: str, seed: int | None = None) -> Path:
    """One of this run's tuned gates: "distance" or "probe" (the reference seed's); with `seed`, that
    SAE seed's probe gate (`probe_seed_<s>.json`)."""
    if seed is None:
        return ctx.stage_dir(NAME) / f"{name}.json"
    if name != "probe":
        raise ValueError(f"only the probe gate is per SAE seed, not {name!r}")
    return ctx.stage_dir(NAME) / f"probe_seed_{seed}.json"


STAGE = PipelineStage(NAME, run, section=NAME,
                      uses=("evaluate.alpha", "evaluate.positions", "evaluate.batch_size", "max_length", "chat_template"),
                      after=("vectors",))
