"""Capability under every condition of a `ConditionSuite`, and which capability measures can be read.

Each condition steers the capability prompts as it steers refusal prompts: unconditional conditions
every item, gated conditions each item by its gate's decision on the item's own prompt (its
residuals and first-token logits on the unsteered model), ablation every item. Steering covers every
scored position (`positions="all"`, see docs/evaluation.md).

A measure sits *at chance* when the unsteered model's 95% CI reaches down to chance (multiple
choice: the mean of 1 / number of options; exact match: 0): it then cannot show harm from steering,
and `readability` marks it unreadable. The benign-text loss and KL (`analysis.evaluation.benign_text`)
have no such floor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from activations.stats import paired_compare
from analysis.evaluation.benign_text import BenignText, benign_text_shift
from analysis.evaluation.capability import GEN_INSTRUCTION, evaluate_capability
from analysis.evaluation.capability_data import GenItem, MCItem
from analysis.evaluation.suite import ConditionSuite


def chance_level(items: Sequence[MCItem | GenItem]) -> float:
    """Expected score of guessing: mean 1 / n_options for multiple choice, 0 for exact match."""
    if not items:
        raise ValueError("no items to compute a chance level for")
    if isinstance(items[0], MCItem):
        return float(np.mean([1.0 / len(item.options) for item in items]))
    return 0.0


def readability(baseline: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Per task: `{chance, score, ci, n, readable, reason}`; readable iff the baseline CI lies above chance."""
    out = {}
    for task, items in tasks.items():
        entry = baseline[task]
        chance = chance_level(items)
        lo = entry["ci"][0] if entry.get("score") is not None else None
        readable = lo is not None and lo > chance
        reason = ("baseline above chance" if readable else
                  f"baseline {entry.get('score')} with 95% CI reaching chance {chance:.3f}: cannot show harm")
        out[task] = {"chance": chance, "score": entry.get("score"), "ci": entry.get("ci"), "n": entry.get("n"),
                     "readable": bool(readable), "reason": reason}
    return out


def task_prompt(item: MCItem | GenItem) -> str:
    """The user prompt a capability item is asked with (what a gate sees)."""
    return item.question if isinstance(item, MCItem) else item.question + GEN_INSTRUCTION


def capability_under_conditions(suite: ConditionSuite, tasks: Mapping[str, Sequence[MCItem | GenItem]],
                                conditions: Sequence[str], max_new_tokens: int = 256) -> dict[str, Any]:
    """`{"scores": {condition: {task: {score, ci, n, metric, ...}}}, "paired_vs_baseline": {condition:
    {task: paired_compare}}, "gate_decisions": {task: {gate: n steered}}}` for the named conditions
    (the baseline always runs)."""
    unknown = sorted(set(conditions) - set(suite.names))
    if unknown:
        raise ValueError(f"unknown capability condition(s) {', '.join(unknown)}; the run has {', '.join(suite.names)}")
    names = ["baseline", *[c for c in conditions if c != "baseline"]]
    scores: dict[str, dict[str, Any]] = {name: {} for name in names}
    paired: dict[str, dict[str, Any]] = {name: {} for name in names if name != "baseline"}
    steered: dict[str, dict[str, int]] = {}
    setup = suite.setup
    for task, items in tasks.items():
        inputs = suite.row_inputs([task_prompt(item) for item in items])
        contexts, decisions = suite.contexts(inputs, positions="all")
        steered[task] = {gate: sum(d.direction != "none" for d in found) for gate, found in decisions.items()}
        for name in names:
            result = evaluate_capability(setup.model, setup.tokenizer, {task: items}, make_context=contexts[name],
                                         batch_size=setup.batch_size, max_new_tokens=max_new_tokens, per_item=True,
                                         progress=True, desc=f"capability {name} ({task})")[task]
            correct = result.pop("correct")
            scores[name][task] = result
            if name == "baseline":
                base_correct = correct
            else:
                paired[name][task] = paired_compare(base_correct, correct)
    return {"scores": scores, "paired_vs_baseline": paired, "gate_decisions": steered}


def benign_under_conditions(suite: ConditionSuite, items: Sequence[BenignText], conditions: Sequence[str],
                            max_response_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """`{condition: {loss: {value, ci, n}, kl: {value, ci, n}, n_tokens}}` on benign responses (items
    must carry responses, see `benign_text.complete_responses`)."""
    items = list(items)
    inputs = suite.row_inputs([item.prompt for item in items])
    contexts, _ = suite.contexts(inputs, positions="all")
    setup = suite.setup
    out = {}
    for name in ["baseline", *[c for c in conditions if c != "baseline"]]:
        shift = benign_text_shift(setup.model, setup.tokenizer, items, make_context=contexts[name],
                                  batch_size=batch_size, max_response_tokens=max_response_tokens,
                                  chat_template=suite.chat_template, max_length=setup.max_length)
        out[name] = shift.summary()
    return out
