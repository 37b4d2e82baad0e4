"""Greedy text generation in batches, with an optional per-batch context (steering, gating).

Shared by refusal measurement (substring matching on responses), the GSM8K capability task and
the prompt rewriter. Prompts are encoded with `activations.tokenize.encode_prompts` (chat template
with the generation prompt, left padding) and decoded greedily with the KV cache.

`make_context(row_indices)` is entered around each batch's whole `generate` call, so hooks it
installs see the prompt forward `(batch, prompt_len, d_model)` and then every decoding step
`(batch, 1, d_model)`: an intervention applies to every position, prompt and response alike.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from activations.progress import progress_bar

from activations.tokenize import encode_prompts

MakeContext = Callable[[np.ndarray], AbstractContextManager]
"""`make_context(row_indices)`: a context manager entered around one batch's forward/generation.

`row_indices` is an int64 array `(batch,)`; entry i is the index, in the caller's input list, of
the item whose sequence sits in row i of the batch (repeated when one item spans several rows).
"""


def enter_batch_context(make_context: MakeContext | None, row_indices: Sequence[int]) -> AbstractContextManager:
    """`make_context(row_indices)` as an int64 array, or a no-op context when `make_context` is None."""
    if make_context is None:
        return nullcontext()
    return make_context(np.asarray(row_indices, dtype=np.int64))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def _generation_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> Any:
    """A greedy GenerationConfig that ignores sampling defaults shipped with the model."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    make_context: MakeContext | None = None,
    chat_template: bool = True,
    max_length: int | None = 512,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy responses (new tokens only, special tokens removed) to each prompt, in input order.

    Batches are formed in the given order (rows `[i, i + batch_size)`), left padded, and decoded
    with the KV cache; `make_context(row_indices)` is entered around each batch's generation.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        return []
    config = _generation_config(model, tokenizer, max_new_tokens)
    device = model_device(model)
    responses: list[str] = []
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, disable=not progress, unit="batch"):
        rows = np.arange(start, min(start + batch_size, len(texts)))
        batch = encode_prompts(tokenizer, texts[start : rows[-1] + 1], chat_template, max_length, device=device)
        with enter_batch_context(make_context, rows):
            output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return responses
