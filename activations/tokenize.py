"""Prompt formatting and batch encoding: chat template with the generation prompt, left padding.

With the template applied, the last token of every row is the position that predicts the first
response token — the position whose residual state the framework harvests, probes and steers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, text: str, chat_template: bool = True, system_prompt: str | None = None) -> str:
    """The exact string fed to the model for one user prompt."""
    if not (chat_template and has_chat_template(tokenizer)):
        return text
    messages = [{"role": "user", "content": text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    chat_template: bool = True,
    max_length: int | None = None,
    system_prompt: str | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise a batch with left padding.

    Returns `input_ids` and `attention_mask`, both `(batch, seq)`. Over-long prompts are truncated
    from the left so the generation prompt at the end is kept.
    """
    if len(texts) == 0:
        raise ValueError("no prompts to encode")
    use_template = chat_template and has_chat_template(tokenizer)
    strings = [format_prompt(tokenizer, t, chat_template, system_prompt) for t in texts]
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    batch = tokenizer(
        strings,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=not use_template,
        return_tensors="pt",
    )
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def token_lengths(
    tokenizer: Any, texts: Sequence[str], chat_template: bool = True, system_prompt: str | None = None
) -> list[int]:
    """Unpadded token count of each formatted prompt (for length-bucketed batching)."""
    use_template = chat_template and has_chat_template(tokenizer)
    strings = [format_prompt(tokenizer, t, chat_template, system_prompt) for t in texts]
    ids = tokenizer(strings, add_special_tokens=not use_template)["input_ids"]
    return [len(row) for row in ids]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `(batch, seq)` that start at 0 on each row's first real token (left padding)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)
