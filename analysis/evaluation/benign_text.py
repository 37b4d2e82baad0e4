"""What steering costs on ordinary text: next-token loss and KL to the unsteered model on benign responses.

For each (request, response) pair the request goes through the chat template with its generation
prompt and the response follows as the assistant's reply (teacher forcing). At every response
token t the unsteered model gives p_t and the condition gives q_t; reported per condition:

  loss  mean over response tokens of -log q_t(token)      (the condition's next-token loss, nats)
  kl    mean over response tokens of KL(p_t || q_t)       (how far the condition moves the model)

both with a 95% percentile bootstrap CI over texts (the statistic is the token-weighted mean).
Unlike multiple-choice accuracy these move smoothly with the steering strength and do not sit at a
chance floor on a small model. KL is exactly 0 for the unsteered model (the same forward twice).

Sources (`load_benign_texts(spec)`): `builtin` (12 project-written pairs), `alpaca:PATH` (a JSON
array or JSONL with `instruction`, optional `input` and `output`, or Alpaca's `seed_tasks.jsonl`
whose `instances[0]` holds them), `ultrachat:PATH` (`ultra_eval.json`: the request in `data`),
`jsonl:PATH` (`prompt`, optional `response`). A request without a response gets the unsteered
model's greedy reply (`complete_responses`), so the measure is then: how unlikely does steering make
what the model would have said.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.prompts.readers import read_file_rows
from activations.stats import bootstrap_ci_rows
from activations.tokenize import (
    format_prompt,
    has_chat_template,
    position_ids_from_mask,
)
from analysis.evaluation.builtin_capability import builtin_benign_pairs
from analysis.evaluation.capability import supports_logits_to_keep
from analysis.evaluation.generation import (
    MakeContext,
    enter_batch_context,
    generate_texts,
    model_device,
)

KINDS = ("builtin", "alpaca", "ultrachat", "jsonl")


@dataclass(frozen=True)
class BenignText:
    """One benign request and the response scored after it (None: to be generated)."""

    id: str
    prompt: str
    response: str | None = None


def load_benign_texts(spec: str, limit: int | None = None) -> list[BenignText]:
    """The first `limit` pairs of one source spec (see the module docstring)."""
    kind, _, location = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown benign-text source {spec!r}; expected builtin, alpaca:PATH, ultrachat:PATH or jsonl:PATH")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of texts, got {limit}")
    if kind == "builtin":
        items = [BenignText(f"builtin/{i}", p, r) for i, (p, r) in enumerate(builtin_benign_pairs())]
        return items[:limit]
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"benign-text file not found: {location} (spec {spec!r})")
    rows = read_file_rows(path, "jsonl" if path.suffix == ".jsonl" else "json", spec)
    items = []
    for line, row in enumerate(rows, start=1):
        item = _item(kind, row, f"{path.stem}/{line}", f"{path}:{line}")
        if item is not None:
            items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"benign-text source {spec!r} holds no usable requests")
    return items


def _item(kind: str, row: dict[str, Any], item_id: str, where: str) -> BenignText | None:
    if kind == "ultrachat":
        prompt, response = row.get("data"), None
    elif kind == "jsonl":
        prompt, response = row.get("prompt"), row.get("response")
    else:  # alpaca: plain rows, or seed tasks with instances
        source = (row.get("instances") or [row])[0] if isinstance(row.get("instances"), list) else row
        prompt = row.get("instruction")
        extra = str(source.get("input") or "").strip()
        prompt = f"{prompt}\n\n{extra}" if prompt and extra else prompt
        response = source.get("output")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: no request text (expected field "
                         f"{'data' if kind == 'ultrachat' else 'prompt' if kind == 'jsonl' else 'instruction'})")
    response = response.strip() if isinstance(response, str) and response.strip() else None
    return BenignText(item_id, prompt.strip(), response)


def complete_responses(model: torch.nn.Module, tokenizer: Any, items: Sequence[BenignText], max_new_tokens: int,
                       batch_size: int = 16, chat_template: bool = True) -> list[BenignText]:
    """Fill every missing response with the unsteered model's greedy reply (empty replies are dropped)."""
    missing = [i for i, item in enumerate(items) if item.response is None]
    out = list(items)
    if missing:
        replies = generate_texts(model, tokenizer, [items[i].prompt for i in missing], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, chat_template=chat_template, max_length=None)
        for i, reply in zip(missing, replies):
            out[i] = replace(items[i], response=reply.strip() or None)
    return [item for item in out if item.response]


@dataclass(frozen=True)
class BenignShift:
    """Per-text sums over response tokens: `nll` (n,) of the condition, `kl` (n,) to the unsteered
    model, `n_tokens` (n,) int64. All float64."""

    nll: np.ndarray
    kl: np.ndarray
    n_tokens: np.ndarray

    def summary(self, n_resamples: int = 1000) -> dict[str, Any]:
        """`{loss: {value, ci, n}, kl: {value, ci, n}, n_tokens}`: token-weighted means with a
        percentile bootstrap CI over texts (n = number of texts)."""
        n = int(self.n_tokens.size)
        out: dict[str, Any] = {"n_tokens": int(self.n_tokens.sum())}
        for name, sums in (("loss", self.nll), ("kl", self.kl)):
            value = float(sums.sum() / self.n_tokens.sum())
            lo, hi = bootstrap_ci_rows(lambda idx, s=sums: float(s[idx].sum() / self.n_tokens[idx].sum()), n,
                                       n_resamples=n_resamples)
            out[name] = {"value": value, "ci": [min(lo, value), max(hi, value)], "n": n}
        return out


def _sequences(tokenizer: Any, items: Sequence[BenignText], chat_template: bool, max_response_tokens: int,
               max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, number of response tokens at the end) per item."""
    use_template = chat_template and has_chat_template(tokenizer)
    out = []
    for item in items:
        prompt_ids = tokenizer(format_prompt(tokenizer, item.prompt, chat_template),
                               add_special_tokens=not use_template)["input_ids"]
        text = item.response if use_template else " " + item.response
        response_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_response_tokens]
        if not response_ids:
            raise ValueError(f"benign text {item.id!r}: the response tokenises to nothing")
        ids = (prompt_ids + response_ids)[-max_length:]
        out.append((ids, min(len(response_ids), len(ids) - 1)))
    return out


@torch.no_grad()
def _response_logprobs(model: torch.nn.Module, pad_id: int, batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs `(batch, keep, vocab)` float32 at the positions predicting the last `keep` tokens, and
    the targets `(batch, keep)`; one left-padded forward."""
    device = model_device(model)
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    keep = max(n for _, n in batch)
    kwargs: dict[str, Any] = {"logits_to_keep": keep + 1} if supports_logits_to_keep(model) else {}
    input_ids, mask = input_ids.to(device), mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False, **kwargs).logits[:, -(keep + 1):-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu(), input_ids[:, -keep:].cpu()


def benign_text_shift(model: torch.nn.Module, tokenizer: Any, items: Sequence[BenignText],
                      make_context: MakeContext | None = None, batch_size: int = 8, max_response_tokens: int = 64,
                      chat_template: bool = True, max_length: int = 512) -> BenignShift:
    """Loss of the condition and KL to the unsteered model on each item's response (module docstring).

    Each batch runs the unsteered forward, then the forward inside `make_context(rows)` (rows = item
    indices); with `make_context=None` the second forward is skipped and KL is 0.
    """
    items = list(items)
    if not items or any(item.response is None for item in items):
        raise ValueError("benign_text_shift needs items that all carry a response (see complete_responses)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequences = _sequences(tokenizer, items, chat_template, max_response_tokens, max_length)
    nll, kl, counts = np.zeros(len(items)), np.zeros(len(items)), np.zeros(len(items), dtype=np.int64)
    for start in range(0, len(items), batch_size):
        batch = sequences[start:start + batch_size]
        base, targets = _response_logprobs(model, tokenizer.pad_token_id, batch)
        if make_context is None:
            steered = base
        else:
            with enter_batch_context(make_context, list(range(start, start + len(batch)))):
                steered, _ = _response_logprobs(model, tokenizer.pad_token_id, batch)
        token_kl = (base.exp() * (base - steered)).sum(-1).double()  # (batch, keep); sums in float64
        token_nll = -steered.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
        for row, (_, n_resp) in enumerate(batch):
            i = start + row
            nll[i] = float(token_nll[row, -n_resp:].sum())
            kl[i] = float(token_kl[row, -n_resp:].sum().clamp(min=0.0))
            counts[i] = n_resp
    return BenignShift(nll, kl, counts)
