"""Tokenise prompts once and group them into length-bucketed, left-padded batches for harvesting.

Each prompt is formatted exactly as `activations.tokenize.encode_prompts` does (chat template with
the generation prompt, left truncation to `max_length`), tokenised once (with each token's position
kind, `activations.positions`), sorted by token length
(longest first, so an out-of-memory batch shows up at the start) and cut into batches of
neighbours, which keeps padding small.

`prefetched_batches` overlaps tokenisation with the model: prompts are ordered by character
length, cut into chunks that double in size, and each chunk is tokenised on a worker thread while
the previous chunk's batches run; within a chunk, batches are sorted by exact token length.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from activations.positions import encode_with_kinds
from activations.records import PromptRecord


@dataclass
class PromptBatch:
    """A left-padded batch of prompts.

    `input_ids`, `attention_mask`, `position_ids`: `(batch, seq)` on the CPU; `lengths`: unpadded
    token count per row; `records`: the prompts in row order; `kinds`: per row, the `(length,)` int8
    position-kind codes of its tokens (`activations.positions`), or None when not computed.
    """

    records: list[PromptRecord]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]
    kinds: list[np.ndarray] | None = None

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(sum(self.lengths))


def tokenize_with_kinds(
    tokenizer: Any, records: Sequence[PromptRecord], chat_template: bool = True, max_length: int | None = None
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each formatted prompt (no padding, truncated from the left to `max_length`) and
    their position-kind codes (`activations.positions.encode_with_kinds`)."""
    return encode_with_kinds(tokenizer, [r.text for r in records], chat_template, max_length)


def tokenize_records(
    tokenizer: Any, records: Sequence[PromptRecord], chat_template: bool = True, max_length: int | None = None
) -> list[list[int]]:
    """Token ids of each formatted prompt (no padding), truncated from the left to `max_length`."""
    return tokenize_with_kinds(tokenizer, records, chat_template, max_length)[0]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token id lists → `(input_ids, attention_mask, position_ids)`, each `(batch, seq)`.

    Position ids count from 0 at each row's first real token, so a prompt's activations do not
    depend on how much padding its batch needed.
    """
    seq = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), seq), dtype=torch.long)
    position_ids = torch.zeros((len(ids), seq), dtype=torch.long)
    for i, row in enumerate(ids):
        n = len(row)
        if n == 0:
            raise ValueError("a prompt encoded to zero tokens")
        input_ids[i, seq - n :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, seq - n :] = 1
        position_ids[i, seq - n :] = torch.arange(n)
    return input_ids, attention_mask, position_ids


def length_bucketed_batches(
    records: Sequence[PromptRecord], token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int,
    kinds: Sequence[np.ndarray] | None = None,
) -> Iterator[PromptBatch]:
    """Batches of up to `batch_size` prompts of neighbouring token length, longest first (`kinds`:
    each prompt's position-kind codes, carried along)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(records)), key=lambda i: (-len(token_ids[i]), records[i].id))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids = [token_ids[i] for i in chosen]
        input_ids, attention_mask, position_ids = left_pad(ids, pad_id)
        yield PromptBatch(
            records=[records[i] for i in chosen],
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            lengths=[len(row) for row in ids],
            kinds=None if kinds is None else [kinds[i] for i in chosen],
        )


def prefetched_batches(
    tokenizer: Any,
    records: Sequence[PromptRecord],
    batch_size: int,
    chat_template: bool = True,
    max_length: int | None = None,
    first_chunk: int | None = None,
) -> Iterator[PromptBatch]:
    """Length-bucketed batches whose tokenisation runs one chunk ahead on a worker thread.

    Chunks hold `first_chunk` (default 4 batches) prompts, then twice as many each time, taken
    longest-first by character length. Only one thread uses the tokenizer at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_chars = sorted(records, key=lambda r: (-len(r.text), r.id))
    size = first_chunk or 4 * batch_size
    chunks: list[list[PromptRecord]] = []
    while by_chars:
        chunks.append(by_chars[:size])
        by_chars, size = by_chars[size:], size * 2
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    try:
        pending = pool.submit(tokenize_with_kinds, tokenizer, chunks[0], chat_template, max_length) if chunks else None
        for index, chunk in enumerate(chunks):
            token_ids, kinds = pending.result()
            later = index + 1 < len(chunks)
            pending = pool.submit(tokenize_with_kinds, tokenizer, chunks[index + 1], chat_template, max_length) if later else None
            yield from length_bucketed_batches(chunk, token_ids, batch_size, tokenizer.pad_token_id, kinds)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
