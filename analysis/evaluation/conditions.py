"""Refusal under an intervention: run the refusal-token evaluation with per-row steering plans.

A *plan* is what each row of the evaluation gets: a steering vector `(n, d_model)` (or one shared
`(d_model,)`) and a signed strength `(n,)`. Unconditional conditions give every row the same plan;
gates give each row its own, from the gate's decision on that row's unsteered activations (never
its label). Plans are applied batch by batch through `analysis.interventions.steering.steer`, i.e. the one hook
mechanism, on every position (prompt and generated) unless `positions="generated"`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.hooks import BlockOutputCache
from activations.prefix_cache import PrefixCache
from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES, PromptRecord
from analysis.evaluation.refusal import (
    RefusalResult,
    evaluate_refusal,
    summarise_refusal,
)
from analysis.interventions.steering import steer


@dataclass
class EvalSetup:
    """The model under evaluation and how it is steered."""

    model: torch.nn.Module
    tokenizer: Any
    spec: Any  # probes.refusal_tokens.RefusalTokenSpec
    layer: int
    positions: str = "all"
    batch_size: int = 32
    max_length: int = 256
    reuse_blocks: bool = True
    _cache: BlockOutputCache | None = field(default=None, repr=False)
    _prefix: PrefixCache | None = field(default=None, repr=False)

    @property
    def adapter(self) -> ModelAdapter:
        return ModelAdapter(self.model)

    @property
    def block_cache(self) -> BlockOutputCache | None:
        """Blocks 0..layer of the unsteered forward, kept per batch so the many conditions at `layer`
        run only the blocks above it (None with `reuse_blocks=False`)."""
        if self.reuse_blocks and self._cache is None:
            self._cache = BlockOutputCache(self.adapter, self.layer)
        return self._cache if self.reuse_blocks else None

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """KV caches of every column but the last, per batch, for interventions confined to the last
        prompt position (None with `reuse_blocks=False`)."""
        if self.reuse_blocks and self._prefix is None:
            self._prefix = PrefixCache(self.model)
        return self._prefix if self.reuse_blocks else None


@dataclass
class Plan:
    """Per-row steering: `vectors` (n, d_model) or (d_model,), signed `alphas` (n,)."""

    vectors: np.ndarray
    alphas: np.ndarray

    @staticmethod
    def uniform(vector: np.ndarray, alpha: float, n: int) -> "Plan":
        return Plan(np.asarray(vector, dtype=np.float32), np.full(n, float(alpha), dtype=np.float32))

    def context(self, setup: EvalSetup) -> Callable[[np.ndarray], AbstractContextManager]:
        """`make_context(rows)` for `evaluate_refusal`: steer the batch's rows by their plan."""
        adapter = setup.adapter
        device = adapter.device

        def make(rows: np.ndarray) -> AbstractContextManager:
            alphas = torch.as_tensor(self.alphas[rows], device=device)
            if not bool((alphas != 0).any()):
                return nullcontext()
            vecs = self.vectors if self.vectors.ndim == 1 else self.vectors[rows]
            vecs = torch.as_tensor(vecs, device=device, dtype=adapter.dtype)
            return steer(adapter, setup.layer, vecs, alphas.to(adapter.dtype), positions=setup.positions)

        return make


def plan_from_decisions(
    decisions: Sequence[Any], category_vectors: Mapping[str, np.ndarray], d_model: int
) -> Plan:
    """Turn gate decisions (objects with `.category`, `.signed_strength`) into a per-row plan.

    Category "none" (or a category without a vector) gets strength 0; "global" uses the vector named
    "global". A decision to steer *away* subtracts that category's vector.
    """
    n = len(decisions)
    vectors = np.zeros((n, d_model), dtype=np.float32)
    alphas = np.zeros(n, dtype=np.float32)
    for i, decision in enumerate(decisions):
        vector = category_vectors.get(decision.category)
        if vector is None or decision.signed_strength == 0:
            continue
        vectors[i] = vector
        alphas[i] = decision.signed_strength
    return Plan(vectors, alphas)


def run_refusal(
    setup: EvalSetup,
    records: Sequence[PromptRecord],
    plan: Plan | None = None,
    context: Callable[[np.ndarray], AbstractContextManager] | None = None,
    progress: bool = False,
    at_layer: bool = True,
    desc: str = "refusal",
    last_column: bool = False,
) -> list[RefusalResult]:
    """Refusal-token evaluation of `records` under `plan` (steering) or `context` (e.g. ablation);
    `progress` shows a bar named `desc`.

    `at_layer`: the intervention acts at `setup.layer` or later, so batches seen unsteered before
    skip the blocks below it (`EvalSetup.block_cache`); pass False for one acting at earlier layers.
    `last_column`: the intervention touches only the last prompt position (at any layer), so each
    batch runs only that column on the cached prefix (`EvalSetup.prefix_cache`).
    """
    if plan is not None and context is not None:
        raise ValueError("give a steering plan or a context, not both")
    make_context = plan.context(setup) if plan is not None else context
    return evaluate_refusal(
        setup.model, setup.tokenizer, records, spec=setup.spec, make_context=make_context,
        batch_size=setup.batch_size, max_length=setup.max_length, progress=progress, desc=desc,
        cache=setup.prefix_cache if last_column else setup.block_cache if at_layer or make_context is None else None,
    )


def refusal_table(results: Sequence[RefusalResult]) -> dict[str, dict[str, Any]]:
    """Flat `{set: {rate, ci, n}}`: each category present, plus `over_refusal` and `harmful_refusal`."""
    summary = summarise_refusal(results, groups=["category", "over_refusal", "harmful_refusal"])
    table = dict(summary["category"])
    table["over_refusal"] = summary["over_refusal"]["all"]
    table["harmful_refusal"] = summary["harmful_refusal"]["all"]
    return table


def length_order(records: Sequence[PromptRecord], tokenizer: Any, chat_template: bool = True) -> np.ndarray:
    """Indices `(n,)` that sort `records` by formatted prompt length, then id: batches in this order
    carry little padding, and the order does not depend on the order the records came in."""
    from activations.tokenize import token_lengths

    lengths = token_lengths(tokenizer, [r.text for r in records], chat_template)
    return np.lexsort((np.array([r.id for r in records], dtype=object).astype(str), np.asarray(lengths)))


def rates_of(results: Sequence[RefusalResult]) -> tuple[float, float]:
    """(over-refusal rate, harmful refusal rate) of a result list, for gate tuning objectives."""
    refused = np.array([r.refused for r in results])
    cats = np.array([r.category for r in results])
    over = np.isin(cats, [BENIGN, CONTRAST])
    harm = np.isin(cats, list(REFUSAL_CATEGORIES))
    return float(refused[over].mean()) if over.any() else 0.0, float(refused[harm].mean()) if harm.any() else 0.0



def cached_outcome(setup: EvalSetup, records: Sequence[PromptRecord], baseline: Sequence[RefusalResult],
                   vectors: Mapping[str, np.ndarray]) -> Callable[[Sequence[Any]], tuple[float, float]]:
    """Gate-tuning objective `outcome(decisions) -> (over-refusal, harmful refusal)` on `records`.

    A row the decisions leave alone keeps its `baseline` verdict (an unsteered row is the baseline
    run); a steered row is run under its plan, and its verdict is remembered per (row, category,
    signed strength), so a grid whose points share strengths runs each row at most once per
    direction. Labels are read here, by the objective, never by a gate.
    """
    base = np.array([r.refused for r in baseline], dtype=bool)
    if len(base) != len(records):
        raise ValueError(f"baseline has {len(base)} results for {len(records)} records")
    cache: dict[tuple[int, str, float], bool] = {}

    def key(d: Any) -> tuple[int, str, float]:
        return (int(d.row), str(d.category), float(d.signed_strength))

    def outcome(decisions: Sequence[Any]) -> tuple[float, float]:
        steered = [d for d in decisions if d.signed_strength != 0 and d.category in vectors]
        todo = list({key(d): d for d in steered if key(d) not in cache}.values())
        if todo:
            plan = plan_from_decisions(todo, vectors, setup.adapter.d_model)
            for d, found in zip(todo, run_refusal(setup, [records[d.row] for d in todo], plan)):
                cache[key(d)] = found.refused
        refused = base.copy()
        for d in steered:
            refused[d.row] = cache[key(d)]
        return rates_of([RefusalResult(r.id, r.category, r.source, bool(f), "token") for r, f in zip(records, refused)])

    return outcome
