"""The intervention stages: gates tuned on calibrate, then every condition evaluated on eval.

Row alignment: gate features come from the harvested last-token activations (the unsteered model's
own states, which is what a deployed gate would see), matched to prompts by id. Labels are read only
by the tuning objective on calibrate and by the rate tables, never by a gate.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from activations.records import BENIGN, CONTRAST, PromptRecord
from activations.store import ActivationStore
from activations.tokenize import token_lengths
from analysis.conditions import EvalSetup, Plan, plan_from_decisions, rates_of, run_refusal
from analysis.pipeline_run import PipelineRun
from analysis.pipeline_stages import saes, target_spec
from analysis.refusal_eval import RefusalResult
from analysis.stage_runner import write_json_atomic
from probes.gate_tuning import DistanceGrid, fit_distance_gate, tune_distance_gate, tune_probe_gate
from probes.heads import HeadResult
from probes.protocol import LabelledRows
from probes.stage_data import encode_latents, load_last_token_rows
from probes.vectors import VectorSet


def split_rows(run: PipelineRun, split: str) -> tuple[LabelledRows, list[PromptRecord]]:
    """Last-token rows of one split at the primary layer and the prompt records in the same order.

    Rows are sorted by prompt length, so the fixed-order batches of the evaluation carry little padding.
    """
    store = ActivationStore(run.stage_dir("harvest") / "last")
    rows = load_last_token_rows(store, run.layer, splits=(split,))
    by_id = {r.id: r for r in run.split(split)}
    missing = [i for i in rows.ids if str(i) not in by_id]
    if missing:
        raise ValueError(f"harvested prompt {missing[0]!r} is not in the {split} split of the prompt set")
    records = [by_id[str(i)] for i in rows.ids]
    lengths = token_lengths(run.model("target")[1], [r.text for r in records], run.cfg.harvest.chat_template)
    order = np.argsort(lengths, kind="stable")
    return rows.subset(order), [records[i] for i in order]


def eval_setup(run: PipelineRun) -> EvalSetup:
    model, tokenizer = run.model("target")
    cfg = run.cfg.evaluation
    return EvalSetup(model, tokenizer, target_spec(run), run.layer, cfg.positions, cfg.batch_size,
                     run.cfg.harvest.max_length)


def residual_vectors(run: PipelineRun) -> dict[str, np.ndarray]:
    """Category vectors and "global" (refusal − benign) at the primary layer, as float32 arrays."""
    vectors = VectorSet.load(run.stage_dir("vectors") / "residual", expected_layer=run.layer)
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


def stage_gates(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Distance gate (residual) and probe gate (SAE latents of the reference seed), tuned on calibrate."""
    cfg = run.cfg.evaluation
    setup = eval_setup(run)
    vectors = residual_vectors(run)
    extract, _ = split_rows(run, "extract")
    calibrate, cal_records = split_rows(run, "calibrate")
    baseline = run_refusal(setup, cal_records, progress=True)
    # Each grid point runs the steered model on calibrate, so the grid is small: thresholds only,
    # at the condition-table strength.
    grid = DistanceGrid(t_low=(0.45, 0.5), t_high=(0.5, 0.55), alpha_toward=(cfg.alpha,),
                        alpha_away=(cfg.alpha,), partial=(0.0,))
    distance, report = tune_distance_gate(
        fit_distance_gate(extract), calibrate, reusing_outcome(setup, cal_records, baseline, vectors), grid
    )
    distance.save(out / "distance.json")
    head = HeadResult.load(str(run.stage_dir("select") / "sae" / "head"))
    reference_seed, sae = next(iter(saes(run).items()))
    latents = calibrate.with_features(encode_latents(sae, calibrate.features))
    probe = tune_probe_gate(head, latents, alpha_toward=cfg.alpha)
    probe.save(out / "probe.json")
    write_json_atomic(out / "tuning.json", {"distance": report.to_dict(), "probe": probe.meta,
                                            "probe_sae_seed": reference_seed})
    return {"distance_chosen": report.chosen, "distance_baseline": report.baseline,
            "probe_thresholds": probe.thresholds, "probe_sae_seed": reference_seed}


def selected_union(run: PipelineRun, seed: int) -> list[int]:
    features = json.loads((run.stage_dir("select") / "sae" / f"seed_{seed}" / "features.json").read_text())
    ids: set[int] = set()
    for name, entry in features["per_class"].items():
        if name not in (BENIGN, CONTRAST):
            ids.update(int(i) for i in entry["feature_ids"])
    return sorted(ids)
