"""The rows of consecutive whole prompts as the writer buffers them, and a shard's columns built from them.

A harvest hands over one batch at a time: `PromptRows` holds its prompts' ids, categories and splits
once per prompt (`p` entries), how many rows each prompt has, and the per-row integer columns and
activation blocks (`n` rows, views of the batch's host tensors, never copied). `shard_columns`
joins the runs of one shard into what `commit.write_shard_file` writes: the prompt table, the
per-row `prompt_index` into it, and the activation blocks (still one per run). No Python object is
made per row anywhere on this path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.store.format import layer_key


@dataclass
class PromptRows:
    """Rows of `p` consecutive whole prompts, `n` rows in all, prompt after prompt in position order.

    prompt_ids, categories, splits: length-p lists of str; rows: `(p,)` int64 rows per prompt (>= 1);
    position, token_id: `(n,)` int32; position_kind: `(n,)` int8; layers: layer → `(n, d_model)`
    activations in the storage representation.
    """

    prompt_ids: list[str]
    categories: list[str]
    splits: list[str]
    rows: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    position_kind: np.ndarray
    layers: dict[int, np.ndarray]

    @property
    def n_rows(self) -> int:
        return int(self.position.shape[0])

    def take(self, start: int, stop: int) -> "PromptRows":
        """Prompts `[start, stop)` (their rows are views, not copies)."""
        ends = np.cumsum(self.rows)
        lo = int(ends[start - 1]) if start else 0
        hi = int(ends[stop - 1])
        return PromptRows(
            self.prompt_ids[start:stop], self.categories[start:stop], self.splits[start:stop], self.rows[start:stop],
            self.position[lo:hi], self.token_id[lo:hi], self.position_kind[lo:hi],
            {layer: x[lo:hi] for layer, x in self.layers.items()},
        )


def split_at_shard_ends(rows: PromptRows, buffered: int, rows_per_shard: int) -> list[PromptRows]:
    """Cut `rows` where a shard fills up: the shard already holds `buffered` rows and is written
    once it holds `rows_per_shard` or more, after a whole prompt. Every piece but the last fills a
    shard; exactly what adding the prompts one at a time and flushing after each full buffer gives."""
    fill = buffered + np.cumsum(rows.rows)  # rows in the buffer after each prompt, were nothing written
    pieces, start, written, p = [], 0, 0, len(rows.prompt_ids)
    while start < p:
        full = int(np.searchsorted(fill, written + rows_per_shard, "left"))  # first prompt that fills the shard
        if full >= p:
            pieces.append(rows.take(start, p))
            break
        pieces.append(rows.take(start, full + 1))
        start, written = full + 1, int(fill[full])
    return pieces


def shard_columns(runs: list[PromptRows], layers: list[int]) -> dict[str, Any]:
    """The columns of one shard made of `runs` (in order): `prompt_id`, `category`, `split` (p,)
    object arrays (the prompt table), `prompt_rows` (p,) int64, `prompt_index`, `position`,
    `token_id` (n,) int32, `position_kind` (n,) int8, and `layer_<l>`: the runs' activation blocks."""
    counts = np.concatenate([r.rows for r in runs]).astype(np.int64)
    return {
        "prompt_id": np.array([p for r in runs for p in r.prompt_ids], dtype=object),
        "category": np.array([c for r in runs for c in r.categories], dtype=object),
        "split": np.array([s for r in runs for s in r.splits], dtype=object),
        "prompt_rows": counts,
        "prompt_index": np.repeat(np.arange(len(counts), dtype=np.int32), counts),
        "position": np.concatenate([r.position for r in runs]).astype(np.int32, copy=False),
        "token_id": np.concatenate([r.token_id for r in runs]).astype(np.int32, copy=False),
        "position_kind": np.concatenate([r.position_kind for r in runs]).astype(np.int8, copy=False),
        **{layer_key(layer): [r.layers[layer] for r in runs] for layer in layers},
    }
