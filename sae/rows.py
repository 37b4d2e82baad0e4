"""Which activation rows train the SAE: position kinds, the attention sink, exact duplicates.

`training_rows(store, layer, data)` returns the sorted indices (into `store.meta(data.split,
data.categories)`, i.e. the rows of the training split in store order) that the SAE trains on, and
how many rows each rule removed. The rules, applied in this order:

1. `position_kind`: keep rows whose position kind is in `data.position_kinds` (default user content,
   template suffix and response start: never the template prefix shared by every prompt);
   `position_kinds=None` keeps every kind (the only way to train on a schema-1 store, which has no
   kinds);
2. `sink`: with `data.exclude_sink`, drop position 0 (the BOS / attention-sink token, whose norm is
   ~100x the others' in SmolLM2 and would otherwise carry almost all of the variance);
3. `duplicate`: with `data.drop_duplicates`, keep only the first of rows whose activations are
   bitwise identical (a shared prefix, or the same first content token after it, gives identical
   rows). Rows are compared through a 128-bit fingerprint (two independent multiply-add hashes of
   the row's 32-bit words), read chunk by chunk, so any store size works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from activations.positions import UNKNOWN, kind_codes
from activations.store.raw import LayerReader
from activations.store import ActivationStore, RowMeta

RULES = ("position_kind", "sink", "duplicate")
"""The filters in the order they apply (the keys of `RowSelection.removed`)."""


@dataclass(frozen=True)
class RowSelection:
    """The rows an SAE trains on.

    index: sorted int64 indices into the `n_candidates` rows of the training split (store order).
    removed: rule → rows that rule removed (of those the earlier rules kept).
    """

    index: np.ndarray
    n_candidates: int
    removed: dict[str, int]

    @property
    def n_rows(self) -> int:
        return int(self.index.size)

    def mask(self) -> np.ndarray:
        """`(n_candidates,)` bool: True for the rows kept."""
        out = np.zeros(self.n_candidates, dtype=bool)
        out[self.index] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        """Counts for metrics.json / cfg.json: candidates, removed per rule, kept."""
        return {"candidates": self.n_candidates, "removed": dict(self.removed), "kept": self.n_rows}


def kind_mask(meta: RowMeta, position_kinds: list[str] | None, exclude_sink: bool, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(kind mask, sink mask) over `meta`'s rows: kinds kept, and rows not at position 0 (when excluded).

    A row of unknown kind (schema-1 store) with `position_kinds` set is an error naming `where`.
    """
    n = len(meta)
    by_kind = np.ones(n, dtype=bool)
    if position_kinds is not None:
        codes = kind_codes(position_kinds)
        if np.any(meta.position_kind == UNKNOWN):
            raise ValueError(
                f"{where} has no position kinds (activation-store schema 1); re-harvest it, or set "
                "data.position_kinds to null to train on every row (template prefix included)"
            )
        by_kind = np.isin(meta.position_kind, codes)
    not_sink = meta.position != 0 if exclude_sink else np.ones(n, dtype=bool)
    return by_kind, not_sink


def _fingerprints(x: np.ndarray, multipliers: np.ndarray, block: int = 2048) -> np.ndarray:
    """`(n, 2)` uint64 hashes of rows `(n, d)` of any 2- or 4-byte dtype, on their bits:
    Σ word_j · m_j (mod 2^64), two sets of odd m."""
    x = np.ascontiguousarray(x)
    bits = x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)
    out = np.empty((len(bits), len(multipliers)), dtype=np.uint64)
    for lo in range(0, len(bits), block):
        words = bits[lo: lo + block].astype(np.uint64)
        for j, m in enumerate(multipliers):
            out[lo: lo + block, j] = (words * m).sum(axis=1, dtype=np.uint64)
    return out


def duplicate_mask(chunks: Any, d_model: int, progress: bool = False) -> np.ndarray:
    """`(n,)` bool over the concatenated rows of `chunks` (iterable of `(m, d_model)` rows in one
    2- or 4-byte dtype, e.g. the store's storage dtype): True for the first occurrence of each
    distinct row, False for later bitwise copies."""
    rng = np.random.default_rng(20240607)
    multipliers = rng.integers(1, 2**63, size=(2, d_model), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    keys = [_fingerprints(x, multipliers) for x in tqdm(chunks, desc="duplicate rows", disable=not progress)]
    if not keys:
        return np.zeros(0, dtype=bool)
    flat = np.ascontiguousarray(np.concatenate(keys)).view(np.dtype((np.void, 16))).ravel()
    _, first = np.unique(flat, return_index=True)
    keep = np.zeros(len(flat), dtype=bool)
    keep[first] = True
    return keep


def training_rows(store: ActivationStore, layer: int, data: Any, progress: bool = False) -> RowSelection:
    """The rows of `data.split` / `data.categories` that train the SAE, after the rules above.

    `data` is a `sae.config.DataConfig` (split, categories, position_kinds, exclude_sink,
    drop_duplicates, chunk_rows). Reads the activations once when `drop_duplicates` is on.
    """
    meta = store.meta(data.split, data.categories)
    by_kind, not_sink = kind_mask(meta, data.position_kinds, data.exclude_sink, f"activation store {store.directory}")
    keep = by_kind & not_sink
    removed = {"position_kind": int((~by_kind).sum()), "sink": int((by_kind & ~not_sink).sum()), "duplicate": 0}
    if data.drop_duplicates and keep.any():
        kept_rows = np.flatnonzero(keep)
        ids = store.row_ids(data.split, data.categories)[kept_rows]
        firsts = duplicate_mask(_raw_rows(LayerReader(store, layer), ids, data.chunk_rows), store.d_model, progress)
        removed["duplicate"] = int((~firsts).sum())
        keep[kept_rows[~firsts]] = False
    return RowSelection(np.flatnonzero(keep).astype(np.int64), len(meta), removed)


def _raw_rows(reader: LayerReader, ids: np.ndarray, chunk_rows: int) -> Any:
    """Yield rows `ids` (sorted global row ids) in chunks of the storage dtype (no float32 decode);
    the one buffer is reused, so each chunk must be consumed before the next."""
    buffer = reader.empty(min(chunk_rows, len(ids)))
    for a in range(0, len(ids), chunk_rows):
        part = ids[a: a + chunk_rows]
        reader.read(part, buffer)
        yield buffer[: len(part)]
