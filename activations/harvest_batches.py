"""Tokenise prompts once and group them into length-bucketed, left-padded batches for harvesting.

Each prompt is formatted exactly as `activations.tokenize.encode_prompts` does (chat template with
the generation prompt, left truncation to `max_length`), tokenised once (with each token's position
kind, `activations.positions`), sorted by token length
(longest first, so an out-of-memory batch shows up at the start) and cut into batches of
neighbours, which keeps padding small.

`prefetched_batches` overlaps tokenisation with the model: prompts are ordered by character
length, cut into chunks that double in size, and each chunk is tokenised *and made into batches* on a
worker thread while the previous chunk's batches run; within a chunk, batches are sorted by exact
token length. With `pin_memory` the batches' tensors are page-locked there too, so copying them to a
GPU is asynchronous: from pageable memory every host→device copy first waits for the GPU to finish
the work already queued, and the forward loop could not queue a batch while the previous one runs.
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

    @property
    def token_index(self) -> torch.Tensor:
        """`(n_tokens,)` int64 flat positions of the real tokens in `(batch * seq)`, row-major
        (computed once, by the worker thread that makes the batch; page-locked by `pin_memory()`)."""
        cached = self.__dict__.get("_token_index")
        if cached is None:
            cached = self.__dict__["_token_index"] = self.attention_mask.reshape(-1).nonzero().squeeze(1)
        return cached

    def pin_memory(self) -> "PromptBatch":
        """This batch with its tensors (and the token index) in page-locked memory (needs CUDA)."""
        batch = PromptBatch(self.records, self.input_ids.pin_memory(), self.attention_mask.pin_memory(),
                            self.position_ids.pin_memory(), self.lengths, self.kinds)
        batch.__dict__["_token_index"] = self.token_index.pin_memory()
        return batch


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
    pin_memory: bool = False,
) -> Iterator[PromptBatch]:
    """Length-bucketed batches whose tokenisation and batching run one chunk ahead on a worker thread.

    Chunks hold `first_chunk` (default 4 batches) prompts, then twice as many each time, taken
    longest-first by character length. Only one thread uses the tokenizer at a time. `pin_memory`:
    page-locked tensors (for asynchronous copies to a GPU; needs CUDA).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_chars = sorted(records, key=lambda r: (-len(r.text), r.id))
    size = first_chunk or 4 * batch_size
    chunks: list[list[PromptRecord]] = []
    while by_chars:
        chunks.append(by_chars[:size])
        by_chars, size = by_chars[size:], size * 2

    def make(chunk: list[PromptRecord]) -> list[PromptBatch]:
        token_ids, kinds = tokenize_with_kinds(tokenizer, chunk, chat_template, max_length)
        batches = list(length_bucketed_batches(chunk, token_ids, batch_size, tokenizer.pad_token_id, kinds))
        for batch in batches:
            batch.token_index  # computed here, off the caller's thread  # noqa: B018
        return [b.pin_memory() for b in batches] if pin_memory else batches

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    try:
        pending = pool.submit(make, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            ready = pending.result()
            pending = pool.submit(make, chunks[index + 1]) if index + 1 < len(chunks) else None
            yield from ready
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
