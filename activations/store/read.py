"""Read an activation shard store (schema versions 1, 2 and 3, see docs/shards.md).

`ActivationStore(dir)` checks the manifest against the files (existence and byte size always), then
serves float32 activation rows of one layer, optionally filtered by split and category, either all
at once (`load`) or in fixed-size chunks read shard by shard (`iter_chunks`).

Checksums (`verify`): by default ("once") every shard's sha256 is checked the first time this
process reads it, and remembered per process (keyed by path, size, mtime and inode), so a corrupted
shard stops the first reader with one error naming the file, and a process reads each shard's
bytes for hashing once (`bench/store_verify.py` measures the cost). `verify=True` checks every
shard when the store is opened; `verify=False` checks sizes only.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from activations.io import file_sha256
from activations.records import CATEGORIES, SPLITS
from activations.store.format import BF16_ATTR, STRING_FIELDS, RowMeta, decode_rows, layer_key, read_manifest
from activations.store.shard_file import (
    COLUMN_BYTES,
    dataset_of,
    open_shard,
    read_shard_meta,
    string_column,
)


_VERIFIED: set[tuple[str, int, int, int, str]] = set()
"""Shards whose sha256 this process has checked: (real path, size, mtime_ns, inode, expected sha256)."""
_VERIFIED_LOCK = threading.Lock()
HASH_THREADS = 4
"""Shards hashed at once (hashlib releases the GIL on large reads)."""


def _verify_key(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    stat = path.stat()
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256)


def verify_shards(paths_and_sums: Iterable[tuple[Path, str]], force: bool = False) -> None:
    """Check each shard's sha256 against the manifest's, at most once per process (unless `force`).

    Raises ValueError naming the first shard whose bytes differ.
    """
    todo = []
    for path, expected in paths_and_sums:
        key = _verify_key(path, expected)
        with _VERIFIED_LOCK:
            if force or key not in _VERIFIED:
                todo.append((path, expected, key))
    if not todo:
        return
    with ThreadPoolExecutor(min(HASH_THREADS, len(todo))) as pool:
        digests = list(pool.map(lambda item: file_sha256(item[0]), todo))
    for (path, expected, key), digest in zip(todo, digests):
        if digest != expected:
            raise ValueError(f"activation shard {path} fails its sha256 checksum: {path.name} is corrupt (manifest "
                             f"{expected[:12]}…, file {digest[:12]}…); harvest again into a new folder")
        with _VERIFIED_LOCK:
            _VERIFIED.add(key)


def forget_verified() -> None:
    """Forget which shards this process has verified (benchmarks and tests)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()


def _as_tuple(value: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> tuple[str, ...] | None:
    """Normalise a filter argument and reject names outside the vocabulary."""
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; expected one of {', '.join(allowed)}")
    return names


class ActivationStore:
    """Read-only view of `DIR/manifest.json` + `DIR/shard-*.h5`.

    Args:
        directory: the store folder.
        verify: "once" (each shard's sha256 checked the first time this process reads it), True
            (every shard now, even if checked before) or False (sizes only).
    """

    def __init__(self, directory: str | Path, verify: bool | Literal["once"] = "once") -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"activation store folder not found: {self.directory}")
        if verify not in (True, False, "once"):
            raise ValueError(f"verify must be True, False or 'once', got {verify!r}")
        self.verify = verify
        self.manifest: dict[str, Any] = read_manifest(self.directory)
        self._shards: list[dict[str, Any]] = list(self.manifest["shards"])
        self._meta_cache: dict[int, RowMeta] = {}
        self._column_cache: dict[tuple[int, str], np.ndarray] = {}
        for entry in self._shards:
            self._check_shard_file(entry)
        if verify is True:
            self._verify(range(len(self._shards)), force=True)

    def _check_shard_file(self, entry: dict[str, Any]) -> None:
        path = self.directory / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"activation shard missing: {path} (listed in {self.directory}/manifest.json)")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise ValueError(f"activation shard {path} is {size} bytes, the manifest says {entry['bytes']} (truncated?)")

    def _verify(self, indices: Iterable[int], force: bool = False) -> None:
        """Checksum the shards `indices` (once per process unless `force`); no-op with verify=False."""
        if self.verify is False:
            return
        verify_shards(((self.directory / self._shards[i]["file"], self._shards[i]["sha256"]) for i in indices
                       if "sha256" in self._shards[i]), force=force)

    # ---- description -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Layers stored (block indices; layer l == hidden_states[l+1])."""
        return list(self.manifest["layers"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        """Storage dtype name: float32, float16 or bfloat16."""
        return str(self.manifest["dtype"])

    @property
    def positions(self) -> str:
        """`last` (one row per prompt) or `all` (one row per prompt token)."""
        return str(self.manifest["positions"])

    @property
    def schema_version(self) -> int:
        """The manifest's schema version (1: no per-row position kinds; 2: with them)."""
        return int(self.manifest["schema_version"])

    @property
    def n_rows(self) -> int:
        return int(sum(entry["rows"] for entry in self._shards))

    @property
    def complete(self) -> bool:
        """True when the harvest that wrote the store finished."""
        return bool(self.manifest.get("complete", False))

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.directory)!r}, rows={self.n_rows}, layers={self.layers}, "
            f"d_model={self.d_model}, dtype={self.dtype}, positions={self.positions})"
        )

    # ---- metadata ----------------------------------------------------------------------------
    def _shard_meta(self, index: int) -> RowMeta:
        if index not in self._meta_cache:
            self._verify([index])
            entry = self._shards[index]
            self._meta_cache[index] = read_shard_meta(self.directory / entry["file"], entry["rows"])
        return self._meta_cache[index]

    def _shard_column(self, index: int, name: str) -> np.ndarray:
        """One metadata column of one shard: `category` / `split` as fixed-width bytes (read by HDF5's
        own conversion, no Python string per row: the fast path for millions of rows), numbers as stored."""
        key = (index, name)
        if key not in self._column_cache:
            self._verify([index])
            entry = self._shards[index]
            path = self.directory / entry["file"]
            with open_shard(path) as f:
                values = (string_column(f, path, name, as_bytes=True) if name in STRING_FIELDS
                          else dataset_of(f, path, name)[...])
            if len(values) != entry["rows"]:
                raise ValueError(f"activation shard {path} has {len(values)} rows in {name!r}; the manifest says {entry['rows']}")
            self._column_cache[key] = values
        return self._column_cache[key]

    def _masks(self, split: str | Sequence[str] | None, categories: Sequence[str] | None) -> Iterator[tuple[int, np.ndarray | None]]:
        """Per shard: its index and a boolean row mask (None = every row)."""
        splits = _as_tuple(split, SPLITS, "split")
        cats = _as_tuple(categories, CATEGORIES, "category")
        if splits is not None or cats is not None:
            self._verify(range(len(self._shards)))  # every shard's metadata is read: checksum them in parallel
        for index in range(len(self._shards)):
            if splits is None and cats is None:
                yield index, None
                continue
            mask = np.ones(int(self._shards[index]["rows"]), dtype=bool)
            if splits is not None:
                mask &= np.isin(self._shard_column(index, "split"), [s.encode() for s in splits])
            if cats is not None:
                mask &= np.isin(self._shard_column(index, "category"), [c.encode() for c in cats])
            yield index, mask

    def column(self, name: str, split: str | Sequence[str] | None = None,
               categories: Sequence[str] | None = None) -> np.ndarray:
        """One metadata column of the selected rows in store order, read without the others:
        `category` / `split` as fixed-width bytes (`S64`), `position` / `token_id` as int32."""
        parts = []
        for index, mask in self._masks(split, categories):
            values = self._shard_column(index, name)
            parts.append(values if mask is None else values[mask])
        return np.concatenate(parts) if parts else np.empty(0, dtype=COLUMN_BYTES if name in STRING_FIELDS else np.int32)

    def meta(self, split: str | Sequence[str] | None = None, categories: Sequence[str] | None = None) -> RowMeta:
        """Row metadata (no activations) of the selected rows, in store order."""
        self._verify(range(len(self._shards)))
        parts = []
        for index, mask in self._masks(split, categories):
            meta = self._shard_meta(index)
            parts.append(meta if mask is None else meta.select(mask))
        return RowMeta.concat(parts)

    def row_ids(self, split: str | Sequence[str] | None = None, categories: Sequence[str] | None = None) -> np.ndarray:
        """Sorted int64 global row ids (shards concatenated in manifest order) of the selected rows;
        row i of `meta(split, categories)` is global row `row_ids(...)[i]` (`activations.store.raw`)."""
        parts, first = [], 0
        for index, mask in self._masks(split, categories):
            rows = int(self._shards[index]["rows"])
            parts.append(first + (np.arange(rows, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)))
            first += rows
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # ---- activations -------------------------------------------------------------------------
    def _dataset(self, f: h5py.File, layer: int, index: int) -> h5py.Dataset:
        key = layer_key(layer)
        path = self.directory / self._shards[index]["file"]
        if key not in f:
            raise ValueError(f"activation shard {path} lacks the dataset {key!r}")
        ds = f[key]
        if ds.shape != (self._shards[index]["rows"], self.d_model):
            raise ValueError(
                f"activation shard {path}: {key} has shape {ds.shape}, expected "
                f"({self._shards[index]['rows']}, {self.d_model})"
            )
        return ds

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in the store {self.directory}; available layers: {self.layers}")

    def load(
        self,
        layer: int,
        split: str | Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, RowMeta]:
        """All selected rows of `layer` as float32 `(n, d_model)` plus their `RowMeta`."""
        self._check_layer(layer)
        selections = list(self._masks(split, categories))
        counts = [self._shards[i]["rows"] if m is None else int(m.sum()) for i, m in selections]
        self._verify([i for (i, _), count in zip(selections, counts) if count])  # in parallel, before reading
        out = np.empty((sum(counts), self.d_model), dtype=np.float32)
        metas: list[RowMeta] = []
        at = 0
        for (index, mask), count in zip(selections, counts):
            if count == 0:
                continue
            with open_shard(self.directory / self._shards[index]["file"]) as f:
                ds = self._dataset(f, layer, index)
                encoding = ds.attrs.get(BF16_ATTR)
                if mask is None:
                    out[at : at + count] = decode_rows(ds[...], encoding)
                else:
                    rows = np.flatnonzero(mask)
                    lo, hi = int(rows[0]), int(rows[-1]) + 1
                    out[at : at + count] = decode_rows(ds[lo:hi], encoding)[mask[lo:hi]]
            meta = self._shard_meta(index)
            metas.append(meta if mask is None else meta.select(mask))
            at += count
        return out, RowMeta.concat(metas)

    def _pieces(
        self, layer: int, split: str | Sequence[str] | None, categories: Sequence[str] | None, window: int
    ) -> Iterator[tuple[np.ndarray, RowMeta]]:
        """Selected rows in store order, read `window` stored rows at a time."""
        for index, mask in self._masks(split, categories):
            rows = self._shards[index]["rows"]
            if rows == 0 or (mask is not None and not mask.any()):
                continue
            self._verify([index])
            with open_shard(self.directory / self._shards[index]["file"]) as f:
                ds = self._dataset(f, layer, index)
                encoding = ds.attrs.get(BF16_ATTR)
                for lo in range(0, rows, window):
                    hi = min(lo + window, rows)
                    keep = slice(None) if mask is None else mask[lo:hi]
                    if mask is not None and not keep.any():
                        continue
                    block = decode_rows(ds[lo:hi], encoding)
                    yield block[keep], self._shard_meta(index).select(slice(lo, hi)).select(keep)

    def iter_chunks(
        self,
        layer: int,
        split: str | Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
        chunk_rows: int = 65536,
    ) -> Iterator[tuple[np.ndarray, RowMeta]]:
        """Yield `(float32 (m, d_model), RowMeta)` with m == chunk_rows except for the last chunk.

        Reads contiguous row ranges shard by shard, so memory stays near `2 * chunk_rows` rows;
        concatenating the chunks gives exactly `load(layer, split, categories)`.
        """
        self._check_layer(layer)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        pending: list[tuple[np.ndarray, RowMeta]] = []
        pending_rows = 0
        for block, meta in self._pieces(layer, split, categories, chunk_rows):
            pending.append((block, meta))
            pending_rows += len(block)
            while pending_rows >= chunk_rows:
                x = np.concatenate([b for b, _ in pending]) if len(pending) > 1 else pending[0][0]
                m = RowMeta.concat([mm for _, mm in pending]) if len(pending) > 1 else pending[0][1]
                yield x[:chunk_rows], m.select(slice(0, chunk_rows))
                rest = len(x) - chunk_rows
                pending = [(x[chunk_rows:], m.select(slice(chunk_rows, None)))] if rest else []
                pending_rows = rest
        if pending_rows:
            yield np.concatenate([b for b, _ in pending]), RowMeta.concat([m for _, m in pending])
