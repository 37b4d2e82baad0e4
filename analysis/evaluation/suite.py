"""Every condition of a run, applicable to any list of prompts: the eval split, a held-out benchmark,
capability questions or benign texts.

A `ConditionSuite` holds what the conditions need (steering vectors, tuned gates, the SAE to ablate)
and turns the gate inputs of a list of prompts (`RowInputs`: texts, last-token residuals at the
steering layer, first-token class logits; never a label) into one `make_context(rows)` per
condition, the hook point every evaluation in this package takes:

  baseline               None (no intervention)
  steer_toward / _away   +/- alpha * v_global on every row
  steer_lowrank          +alpha * the low-rank combined vector (when the run has one)
  steer_sae (any name in `steering`)
                         +alpha * that vector on every row (e.g. the reference SAE seed's pooled
                         SAE-space vector)
  conditional_<gate>     each row steered by its gate's decision (`plan_from_decisions`)
  ablate (and any other named intervention context, e.g. a random-feature control)
                         the suite's `interventions`, applied to every row

    suite = ConditionSuite(setup, alpha, vectors, lowrank, gates, {"ablate": ablate_context})
    inputs = suite.row_inputs([r.text for r in records])
    results, decisions = refusal_under_conditions(suite, records, inputs)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from activations.hooks import last_token_residuals
from activations.records import PromptRecord
from analysis.evaluation.conditions import (
    EvalSetup,
    Plan,
    plan_from_decisions,
    refusal_table,
    run_refusal,
)
from analysis.evaluation.refusal import RefusalResult, build_results
from probes.refusal_tokens import (
    first_token_decisions,
    first_token_logits,
    refusal_log_odds,
)

MakeContext = Callable[[np.ndarray], AbstractContextManager]


@dataclass
class RowInputs:
    """What gates read for n prompts: `texts` (n), `features` (n, d_model) float32 last-token residuals
    at the steering layer of the unsteered model, `logits` (n, n_classes) first-token class logits."""

    texts: list[str]
    features: np.ndarray
    logits: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.features.shape[0] != n or self.logits.shape[0] != n:
            raise ValueError(f"gate inputs disagree: {n} texts, {self.features.shape[0]} feature rows, "
                             f"{self.logits.shape[0]} logit rows")


GateFn = Callable[[RowInputs], list]
"""`decide(inputs) -> list[GateDecision]`, one per row (features, logits or texts only)."""


@dataclass
class ConditionSuite:
    """The conditions of one run (see the module docstring).

    `vectors`: category name -> (d_model,) float32, including "global"; `gates`: condition name ->
    `GateFn`; `interventions`: condition name -> `make_context` applied to every row (e.g. "ablate":
    the selected SAE features zeroed); `steering`: condition name -> (d_model,) float32 vector steered
    with +alpha on every row (e.g. "steer_sae"). `chat_template` is the harvest's, used when residuals are
    computed here. `labels`: condition name -> what its progress bar says (default: the name).
    """

    setup: EvalSetup
    alpha: float
    vectors: dict[str, np.ndarray]
    lowrank: np.ndarray | None = None
    gates: dict[str, GateFn] = field(default_factory=dict)
    interventions: dict[str, MakeContext] = field(default_factory=dict)
    chat_template: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    steering: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "global" not in self.vectors:
            raise ValueError("the condition suite needs the 'global' steering vector")

    @property
    def names(self) -> list[str]:
        """Condition names in report order."""
        names = ["baseline", "steer_toward", "steer_away"]
        names += ["steer_lowrank"] if self.lowrank is not None else []
        return names + list(self.steering) + list(self.gates) + list(self.interventions)

    def row_inputs(self, texts: Sequence[str], features: np.ndarray | None = None,
                   logits: torch.Tensor | None = None) -> RowInputs:
        """Gate inputs of `texts`; residuals and logits are computed on the unsteered model unless given."""
        s = self.setup
        texts = list(texts)
        if features is None:
            features = last_token_residuals(s.model, s.tokenizer, texts, s.layer, s.batch_size, s.max_length,
                                            self.chat_template)
        if logits is None:
            logits = first_token_logits(s.model, s.tokenizer, texts, s.spec, batch_size=s.batch_size,
                                        max_length=s.max_length, cache=s.block_cache, progress=True,
                                        desc="condition baseline")
        return RowInputs(texts, np.asarray(features, dtype=np.float32), logits)

    def contexts(self, inputs: RowInputs, positions: str | None = None
                 ) -> tuple[dict[str, MakeContext | None], dict[str, list]]:
        """`({condition: make_context or None}, {gated condition: decisions})` for these rows.

        `positions` overrides the setup's (capability scoring needs "all": a forward without a KV
        cache has no generated positions)."""
        setup = self.setup if positions is None else replace(self.setup, positions=positions)
        plans, decisions = self.plans(inputs)
        contexts: dict[str, MakeContext | None] = {"baseline": None}
        contexts.update({name: plan.context(setup) for name, plan in plans.items()})
        contexts.update(self.interventions)
        return {name: contexts[name] for name in self.names}, decisions

    def plans(self, inputs: RowInputs) -> tuple[dict[str, Plan], dict[str, list]]:
        """`({steering condition: per-row Plan}, {gated condition: decisions})` for these rows."""
        n = len(inputs.texts)
        plans = {"steer_toward": Plan.uniform(self.vectors["global"], self.alpha, n),
                 "steer_away": Plan.uniform(self.vectors["global"], -self.alpha, n)}
        if self.lowrank is not None:
            plans["steer_lowrank"] = Plan.uniform(self.lowrank, self.alpha, n)
        plans.update({name: Plan.uniform(vector, self.alpha, n) for name, vector in self.steering.items()})
        decisions = {name: decide(inputs) for name, decide in self.gates.items()}
        for name, found in decisions.items():
            plans[name] = plan_from_decisions(found, self.vectors, self.setup.adapter.d_model)
        return plans, decisions

    def strength_context(self, n: int, alpha: float) -> MakeContext:
        """`make_context` of unconditional steering with alpha * v_global (any sign) on n rows."""
        return Plan.uniform(self.vectors["global"], alpha, n).context(self.setup)


def refusal_under_conditions(suite: ConditionSuite, records: Sequence[PromptRecord], inputs: RowInputs,
                             progress: bool = True) -> tuple[dict[str, list[RefusalResult]], dict[str, list]]:
    """Refusal of `records` under every condition: `({condition: results}, {gate: decisions})`.

    The baseline comes from `inputs.logits` (the unsteered first-token logits), so it costs no pass;
    under a gated condition the rows its gate leaves unsteered keep their baseline result, and only
    the steered rows run (in their order, so the batches are the same for the same prompts).
    """
    records = list(records)
    plans, decisions = suite.plans(inputs)
    baseline = build_results(records, first_token_decisions(inputs.logits), refusal_log_odds(inputs.logits))
    results = {"baseline": baseline}
    for name in suite.names[1:]:
        if name in decisions:  # a row its gate leaves alone is the baseline run: only steered rows run
            results[name] = gated_refusal(suite.setup, records, plans[name], baseline, name, progress)
        elif name in suite.interventions:
            results[name] = run_refusal(suite.setup, records, context=suite.interventions[name], progress=progress,
                                        desc=f"condition {suite.labels.get(name, name)}")
        else:
            results[name] = run_refusal(suite.setup, records, plans[name], progress=progress,
                                        desc=f"condition {suite.labels.get(name, name)}")
    return results, decisions


def gated_refusal(setup: EvalSetup, records: Sequence[PromptRecord], plan: Plan, baseline: Sequence[RefusalResult],
                  name: str, progress: bool = True) -> list[RefusalResult]:
    """Refusal under a gate's per-row `plan`: rows it leaves unsteered (alpha 0) keep their `baseline`
    result; only the steered rows run, in their order (the same batches for the same prompts)."""
    active = np.flatnonzero(plan.alphas != 0)
    found = list(baseline)
    if active.size:
        steered = run_refusal(setup, [records[i] for i in active], Plan(plan.vectors[active], plan.alphas[active]),
                              progress=progress, desc=f"condition {name} ({active.size} of {len(records)} steered)")
        for i, r in zip(active, steered):
            found[i] = r
    return found


def strength_sweep(suite: ConditionSuite, records: Sequence[PromptRecord], alphas: Sequence[float],
                   done: Mapping[str, list[RefusalResult]] | None = None) -> list[dict[str, Any]]:
    """Unconditional steering at +/- each alpha: `{condition, strength, over_refusal, harmful}` points
    (rates with CIs). Runs at `suite.alpha` reuse `done["steer_toward"]` / `done["steer_away"]`."""
    records = list(records)
    points = []
    for alpha in alphas:
        for sign, name in ((1, "steer_toward"), (-1, "steer_away")):
            if done is not None and name in done and alpha == suite.alpha:
                found = done[name]
            else:
                found = run_refusal(suite.setup, records, context=suite.strength_context(len(records), sign * alpha),
                                    progress=True, desc=f"sweep {name} {alpha:g}")
            table = refusal_table(found)
            points.append({"condition": name, "strength": float(alpha), "over_refusal": table["over_refusal"],
                           "harmful": table["harmful_refusal"]})
    return points


def decision_counts(decisions: Sequence[Any]) -> dict[str, int]:
    """`{"direction:category": count}` of a list of gate decisions."""
    counts: dict[str, int] = {}
    for d in decisions:
        key = f"{d.direction}:{d.category}"
        counts[key] = counts.get(key, 0) + 1
    return counts
