"""Read the row metadata of one shard file (schema versions 1, 2 and 3, see docs/shards.md).

Version 3 keeps prompt id, category and split once per prompt (the group `prompts`) and a per-row
`prompt_index` into it; versions 1 and 2 keep one string per row; version 1 has no `position_kind`.
Every reader gets the same per-row view (`RowMeta`, or one column) from all three.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from activations.positions import RESPONSE_START, UNKNOWN
from activations.store.format import PROMPT_TABLE, STRING_FIELDS, RowMeta

COLUMN_BYTES = np.dtype("S64")
"""Fixed width of category / split values read as bytes (`ActivationStore.column`; the vocabulary is shorter)."""


def open_shard(path: Path) -> h5py.File:
    """Open a shard read-only; an unreadable HDF5 file becomes a ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"activation shard missing: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"activation shard {path} is corrupt or truncated ({exc})") from None


def _derived_kinds(prompt_id: np.ndarray) -> np.ndarray:
    """Kinds of a schema-1 shard: unknown, except each prompt's last row (the response start)."""
    kinds = np.full(len(prompt_id), UNKNOWN, dtype=np.int8)
    if len(prompt_id):
        last = np.append(prompt_id[1:] != prompt_id[:-1], True)  # a prompt's rows are contiguous
        kinds[last] = RESPONSE_START
    return kinds


def _checked(path: Path, name: str, values: np.ndarray, expected_rows: int | None) -> np.ndarray:
    if expected_rows is not None and len(values) != expected_rows:
        raise ValueError(f"activation shard {path} has {len(values)} rows in {name!r}; the manifest says {expected_rows}")
    return values


def dataset_of(f: h5py.File, path: Path, name: str) -> h5py.Dataset:
    if name not in f:
        raise ValueError(f"activation shard {path} lacks the dataset {name!r}")
    return f[name]


def _prompt_index(f: h5py.File, path: Path, expected_rows: int | None) -> tuple[np.ndarray, int]:
    """A version-3 shard's per-row index into its prompt table, checked: `(n,)` int, and the table size."""
    index = _checked(path, "prompt_index", dataset_of(f, path, "prompt_index")[...], expected_rows)
    size = len(dataset_of(f, path, f"{PROMPT_TABLE}/prompt_id"))
    if len(index) and (index.min() < 0 or index.max() >= size):
        raise ValueError(f"activation shard {path}: prompt_index points outside its table of {size} prompts")
    return index, size


def string_column(f: h5py.File, path: Path, name: str, expected_rows: int | None = None, as_bytes: bool = False) -> np.ndarray:
    """Per-row `prompt_id` / `category` / `split` of an open shard: object array of str, or fixed-width
    bytes (`COLUMN_BYTES`, HDF5's own conversion) with `as_bytes`. A version-3 shard keeps the
    strings once per prompt (`prompts/<name>`) and the rows index them (`prompt_index`); versions 1
    and 2 keep one string per row."""
    def read(ds: h5py.Dataset) -> np.ndarray:
        return ds.astype(COLUMN_BYTES)[...] if as_bytes else np.asarray(ds.asstr()[...], dtype=object)

    if PROMPT_TABLE in f:
        index, _ = _prompt_index(f, path, expected_rows)
        return read(dataset_of(f, path, f"{PROMPT_TABLE}/{name}"))[index]
    return _checked(path, name, read(dataset_of(f, path, name)), expected_rows)


def read_shard_meta(path: Path, expected_rows: int | None = None) -> RowMeta:
    """All row metadata of one shard; checks every column has `expected_rows` rows.

    A schema-1 shard has no `position_kind` column: its kinds are derived (`_derived_kinds`).
    """
    with open_shard(path) as f:
        columns: dict[str, np.ndarray] = {name: string_column(f, path, name, expected_rows) for name in STRING_FIELDS}
        for name in ("position", "token_id", "position_kind"):
            if name == "position_kind" and name not in f and int(f.attrs.get("schema_version", 1)) == 1:
                columns[name] = _derived_kinds(columns["prompt_id"])
                continue
            columns[name] = _checked(path, name, dataset_of(f, path, name)[...], expected_rows)
    return RowMeta(**columns)


def read_shard_prompt_ids(path: Path, expected_rows: int | None = None) -> list[str]:
    """The distinct prompt ids of one shard (its prompt table; for versions 1 and 2, its rows' ids)."""
    with open_shard(path) as f:
        if PROMPT_TABLE in f:
            _prompt_index(f, path, expected_rows)
            return dataset_of(f, path, f"{PROMPT_TABLE}/prompt_id").asstr()[...].tolist()
        return sorted(set(string_column(f, path, "prompt_id", expected_rows).tolist()))
