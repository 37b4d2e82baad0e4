"""Capability under an intervention: multiple-choice log-likelihood and short generative exact match.

Steering is active on EVERY scored position. `make_context(row_indices)` is entered around each
batch's whole forward (multiple choice) or whole generation (GSM8K-style), and this module never
restricts which positions an intervention touches: an edit installed by the context sees the full
`(batch, seq, d_model)` hidden state of the question and of the answer tokens being scored. (A
harness that steers only the last prompt position leaves the answer tokens' states untouched and
cannot show a capability change; see docs/evaluation.md.)

Multiple choice (cloze formulation): the prompt is the question with the chat template and its
generation prompt; each option's text is appended as the start of the assistant's reply (with a
leading space when no chat template is used). An option's score is the summed log-probability of
its tokens; the prediction is the argmax of the per-token mean ("score", length-normalised) and,
reported alongside, of the sum ("sum"). Prompt and option are tokenised separately and joined.

Generative exact match: greedy decoding of up to `max_new_tokens`; the LAST number in the response
is compared with the reference number (commas and `$` ignored, equal within 1e-6).

Row indices given to `make_context` are indices into the task's item list; a multiple-choice batch
holds one row per (item, option) so an item's index repeats once per option.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from activations.progress import progress_bar

from activations.tokenize import format_prompt, has_chat_template, position_ids_from_mask
from analysis.evaluation.capability_data import GenItem, MCItem, parse_number
from analysis.evaluation.generation import MakeContext, enter_batch_context, generate_texts, model_device
from activations.stats import rate

GEN_INSTRUCTION = "\nGive the final answer as a single number at the end."
"""Appended to each generative question (the model may reason before the final number)."""

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class MCScores:
    """Per-item option scores: `sum_logprob[i]` and `n_tokens[i]` are `(n_options_i,)` arrays."""

    sum_logprob: list[np.ndarray]
    n_tokens: list[np.ndarray]

    def predictions(self, normalise: bool = True) -> np.ndarray:
        """Chosen option per item `(n_items,)`: argmax of mean (normalise) or summed log-prob."""
        return np.array([
            int(np.argmax(s / n if normalise else s)) for s, n in zip(self.sum_logprob, self.n_tokens)
        ], dtype=np.int64)


def _mc_sequences(
    tokenizer: Any, items: Sequence[MCItem], chat_template: bool, max_length: int
) -> list[tuple[int, list[int], int]]:
    """One `(item_index, token_ids, n_continuation_tokens)` per (item, option), in item order."""
    use_template = chat_template and has_chat_template(tokenizer)
    sequences = []
    for index, item in enumerate(items):
        prompt = format_prompt(tokenizer, item.question, chat_template)
        prompt_ids = tokenizer(prompt, add_special_tokens=not use_template)["input_ids"]
        for option in item.options:
            continuation = option if use_template else " " + option
            cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont_ids:
                raise ValueError(f"item {item.id!r}: option {option!r} tokenises to nothing")
            if len(cont_ids) >= max_length:
                raise ValueError(f"item {item.id!r}: option longer than max_length={max_length} tokens")
            ids = (prompt_ids + cont_ids)[-max_length:]  # drop the start of an over-long question
            sequences.append((index, ids, len(cont_ids)))
    return sequences


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _continuation_logprobs(model: torch.nn.Module, pad_id: int, batch: list[tuple[int, list[int], int]]) -> np.ndarray:
    """Summed log-prob of each row's continuation `(batch,)` float64, from one left-padded forward."""
    device = model_device(model)
    width = max(len(ids) for _, ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, ids, _) in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    keep = max(n_cont for _, _, n_cont in batch) + 1  # positions predicting the continuation, plus one
    kwargs: dict[str, Any] = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    input_ids, mask = input_ids.to(device), mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, **kwargs).logits[:, -keep:]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, keep - 1, vocab)
    targets = input_ids[:, -(keep - 1):]
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    sums = [token_lp[row, -n_cont:].sum().item() for row, (_, _, n_cont) in enumerate(batch)]
    values = np.array(sums, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("multiple-choice scoring produced nan or inf log-probabilities")
    return values


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    make_context: MakeContext | None = None,
    batch_size: int = 16,
    chat_template: bool = True,
    max_length: int = 1024,
    progress: bool = False,
    desc: str = "multiple choice",
) -> MCScores:
    """Summed log-prob and token count of every option of every item (see the module docstring).

    `batch_size` counts (item, option) sequences; batches follow item order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("no multiple-choice items to score")
    sequences = _mc_sequences(tokenizer, items, chat_template, max_length)
    scores = np.empty(len(sequences), dtype=np.float64)
    starts = range(0, len(sequences), batch_size)
    for start in progress_bar(starts, desc=desc, disable=not progress, unit="batch"):
        batch = sequences[start : start + batch_size]
        with enter_batch_context(make_context, [index for index, _, _ in batch]):
            scores[start : start + len(batch)] = _continuation_logprobs(model, tokenizer.pad_token_id, batch)
    lengths = np.array([n_cont for _, _, n_cont in sequences], dtype=np.float64)
    bounds = np.cumsum([0] + [len(item.options) for item in items])
    return MCScores(
        sum_logprob=[scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
        n_tokens=[lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
    )


def extract_last_number(text: str) -> float | None:
    """The last number written in `text` (commas and `$` ignored), or None."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def answer_generative(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[GenItem],
    make_context: MakeContext | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    chat_template: bool = True,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[np.ndarray, list[str]]:
    """Greedy answers and exact-match flags: `(correct (n_items,) bool, responses)`."""
    if not items:
        raise ValueError("no generative items to answer")
    prompts = [item.question + GEN_INSTRUCTION for item in items]
    responses = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               make_context=make_context, chat_template=chat_template, max_length=None,
                               progress=progress, desc=desc)
    correct = []
    for item, response in zip(items, responses):
        predicted = extract_last_number(response)
        correct.append(predicted is not None and abs(predicted - float(parse_number(item.answer))) < 1e-6)
    return np.array(correct, dtype=bool), responses


def _task_kind(name: str, items: Sequence[Any]) -> type:
    if not items:
        raise ValueError(f"capability task {name!r} has no items")
    kinds = {type(item) for item in items}
    if len(kinds) != 1 or kinds.pop() not in (MCItem, GenItem):
        raise ValueError(f"capability task {name!r} must hold only MCItem or only GenItem items")
    return type(items[0])


def _score_dict(correct: np.ndarray) -> dict[str, Any]:
    summary = rate(correct)
    return {"score": summary["rate"], "ci": summary["ci"], "n": summary["n"]}


def evaluate_capability(
    model: torch.nn.Module,
    tokenizer: Any,
    task_items: Mapping[str, Sequence[MCItem] | Sequence[GenItem]],
    make_context: MakeContext | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    chat_template: bool = True,
    per_item: bool = False,
    progress: bool = False,
    desc: str = "capability",
) -> dict[str, dict[str, Any]]:
    """Accuracy of each task as `{task: {"score", "ci": [lo, hi], "n", "metric", ...}}` (Wilson 95%).

    Multiple-choice tasks also report `"sum"` (accuracy when options are ranked by summed
    log-prob). With `per_item`, each task adds `"correct"` (list of bools, item order) for paired
    before/after tests (`activations.stats.paired_compare`).
    """
    if not task_items:
        raise ValueError("no capability tasks given")
    results: dict[str, dict[str, Any]] = {}
    for name, items in task_items.items():
        items = list(items)
        if _task_kind(name, items) is MCItem:
            scores = score_multiple_choice(model, tokenizer, items, make_context, batch_size, chat_template,
                                           progress=progress, desc=f"{desc}: {name}")
            answers = np.array([item.answer for item in items])
            correct = scores.predictions(normalise=True) == answers
            result = _score_dict(correct)
            result["metric"] = "accuracy, options ranked by mean log-prob per token"
            result["sum"] = _score_dict(scores.predictions(normalise=False) == answers)
        else:
            correct, _ = answer_generative(model, tokenizer, items, make_context, batch_size, max_new_tokens,
                                           chat_template, progress, desc=f"{desc}: {name}")
            result = _score_dict(correct)
            result["metric"] = f"exact match of the last number, greedy, max {max_new_tokens} new tokens"
        if per_item:
            result["correct"] = [bool(c) for c in correct]
        results[name] = result
    return results
