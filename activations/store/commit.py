"""Commit one shard to a store folder: temp file → fsync → checksum → `os.replace` → manifest.

The order makes a kill at any moment harmless: until `os.replace` the shard exists only under a
temp name (deleted by the next writer), and until the manifest is rewritten (atomically) a renamed
shard is not listed (an orphan the next writer deletes). Readers only ever see listed shards.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from activations.io import file_sha256, fsync_dir, write_json
from activations.store.format import (
    BF16_ATTR,
    BF16_ENCODING,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    TEMP_PREFIX,
    layer_key,
    prompt_ids_digest,
)


def write_shard_file(path: Path, columns: Mapping[str, np.ndarray], layers: list[int], dtype: str) -> None:
    """Write one shard: `layer_<l>` (n, d_model) in the storage representation plus the row metadata.

    Datasets are contiguous and uncompressed (fastest to read; see docs/shards.md). The file is
    fsynced before returning.
    """
    strings = h5py.string_dtype(encoding="utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["dtype"] = dtype
        for layer in layers:
            ds = f.create_dataset(layer_key(layer), data=columns[layer_key(layer)])
            if dtype == "bfloat16":
                ds.attrs[BF16_ATTR] = BF16_ENCODING
        for name in ("prompt_id", "category", "split"):
            f.create_dataset(name, data=columns[name].astype(object), dtype=strings)
        f.create_dataset("position", data=columns["position"].astype(np.int32))
        f.create_dataset("token_id", data=columns["token_id"].astype(np.int32))
        f.create_dataset("position_kind", data=columns["position_kind"].astype(np.int8))
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def concat_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-prompt column dicts → one column dict (row order kept)."""
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


@dataclass
class PreparedShard:
    """A shard fully written, fsynced and checksummed under its temp name, not yet visible."""

    temp: Path
    final: Path
    entry: dict[str, Any]
    categories: list[str]
    splits: list[str]


def write_temp_shard(
    directory: Path, index: int, columns: Mapping[str, np.ndarray], layers: list[int], dtype: str
) -> PreparedShard:
    """Write shard number `index` under a temp name in `directory`, fsync it and compute its sha256."""
    name = SHARD_PATTERN.format(index=index)
    final, temp = directory / name, directory / f"{TEMP_PREFIX}{name}"
    try:
        write_shard_file(temp, columns, layers, dtype)
        sha256 = file_sha256(temp)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    entry = {
        "file": name,
        "rows": len(columns["prompt_id"]),
        "bytes": temp.stat().st_size,
        "sha256": sha256,
        "prompt_ids_sha256": prompt_ids_digest(columns["prompt_id"]),
    }
    return PreparedShard(temp, final, entry, columns["category"].tolist(), columns["split"].tolist())


def publish_shard(directory: Path, manifest: dict[str, Any], shard: PreparedShard) -> None:
    """Rename a prepared shard into place, then list it in `manifest` (updated in place, rewritten
    atomically). Shards must be published in index order."""
    if shard.entry["file"] != SHARD_PATTERN.format(index=len(manifest["shards"])):
        raise RuntimeError(f"shard {shard.entry['file']} published out of order")
    try:
        os.replace(shard.temp, shard.final)
    except BaseException:
        shard.temp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    manifest["shards"].append(shard.entry)
    manifest["total_rows"] = int(manifest["total_rows"]) + shard.entry["rows"]
    for key, values in (("rows_per_split", shard.splits), ("rows_per_category", shard.categories)):
        counts = Counter(manifest[key])
        counts.update(values)
        manifest[key] = dict(sorted(counts.items()))
    manifest["complete"] = False
    write_json(directory / MANIFEST_NAME, manifest)
