"""Commit one shard to a store folder: temp file → fsync → checksum → `os.replace` → manifest.

The order makes a kill at any moment harmless: until `os.replace` the shard exists only under a
temp name (deleted by the next writer), and until the manifest is rewritten (atomically) a renamed
shard is not listed (an orphan the next writer deletes). Readers only ever see listed shards.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from activations.io import fsync_dir, write_json
from activations.store.format import (
    BF16_ATTR,
    BF16_ENCODING,
    MANIFEST_NAME,
    PROMPT_TABLE,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    TEMP_PREFIX,
    layer_key,
    prompt_ids_digest,
)


IOV_BATCH = 512
"""Row blocks handed to one `os.pwritev` call (below the kernel's IOV_MAX of 1024)."""


def _pwrite_all(fd: int, blocks: list[np.ndarray], offset: int) -> None:
    """Write `blocks` back to back at `offset` (positional writes: the GIL is released)."""
    for start in range(0, len(blocks), IOV_BATCH):
        views = [_block_bytes(b) for b in blocks[start : start + IOV_BATCH]]
        total = sum(len(v) for v in views)
        done = os.pwritev(fd, views, offset)
        while done < total:  # a short write: finish the rest block by block
            flat = b"".join(bytes(v) for v in views)[done:]
            done += os.pwrite(fd, flat, offset + done)
        offset += total


def _block_bytes(block: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(block)).cast("B")


def _read_span(fd: int, start: int, stop: int, digest: Any) -> None:
    """Hash the file's bytes [start, stop) (positional reads)."""
    while start < stop:
        chunk = os.pread(fd, min(stop - start, 4 << 20), start)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {start} while checksumming a shard")
        digest.update(chunk)
        start += len(chunk)


def shard_sha256(fd: int, size: int, spans: list[tuple[int, list[np.ndarray]]]) -> str:
    """sha256 of a shard file of `size` bytes whose activation bytes are `spans` ((offset, row
    blocks), by offset): those are hashed from memory, only the rest (HDF5 structure and row
    metadata, kilobytes) is read back from the file. Runs while the blocks are being written."""
    digest = hashlib.sha256()
    position = 0
    for offset, parts in spans:
        _read_span(fd, position, offset, digest)
        for block in parts:
            view = _block_bytes(block)
            digest.update(view)
            offset += len(view)
        position = offset
    _read_span(fd, position, size, digest)
    return digest.hexdigest()


def write_shard_file(path: Path, columns: Mapping[str, Any], layers: list[int], dtype: str) -> str:
    """Write one shard: `layer_<l>` (n, d_model) in the storage representation, the per-row
    `prompt_index`, `position`, `token_id`, `position_kind` and the prompt table (group `prompts`:
    `prompt_id`, `category`, `split`, one entry per prompt); returns the file's sha256.

    `columns` is what `prompt_rows.shard_columns` makes; `columns[layer_<l>]` is an `(n, d_model)`
    array or a list of row blocks (one per batch, never concatenated). Datasets are contiguous and
    uncompressed (fastest to read; see docs/shards.md): h5py lays the file out (the layer datasets
    allocated, not filled) and writes the metadata (integer arrays and a few strings per prompt:
    nothing per row that holds the GIL long), then the activation bytes go straight to their offsets
    with `os.pwritev`, which releases the GIL, so a harvest's forward passes keep running meanwhile.
    The checksum is computed from the same bytes in memory while they are written and fsynced (no
    read-back of the activations, and the hashing overlaps the disk). The file is fsynced before returning.
    """
    strings = h5py.string_dtype(encoding="utf-8")
    blocks = {}
    for layer in layers:
        value = columns[layer_key(layer)]
        blocks[layer] = [np.asarray(b) for b in value] if isinstance(value, list) else [np.asarray(value)]
    offsets: dict[int, int] = {}
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["dtype"] = dtype
        for layer in layers:
            parts = blocks[layer]
            shape = (sum(len(b) for b in parts), parts[0].shape[1])
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dsid = h5py.h5d.create(f.id, layer_key(layer).encode(), h5py.h5t.py_create(parts[0].dtype),
                                   h5py.h5s.create_simple(shape), dcpl=dcpl)
            ds = h5py.Dataset(dsid)
            if dtype == "bfloat16":
                ds.attrs[BF16_ATTR] = BF16_ENCODING
            offsets[layer] = int(dsid.get_offset())
        table = f.create_group(PROMPT_TABLE)
        for name in ("prompt_id", "category", "split"):  # one string per prompt, not per row
            table.create_dataset(name, data=np.asarray(columns[name], dtype=object), dtype=strings)
        f.create_dataset("prompt_index", data=np.asarray(columns["prompt_index"], dtype=np.int32))
        f.create_dataset("position", data=np.asarray(columns["position"], dtype=np.int32))
        f.create_dataset("token_id", data=np.asarray(columns["token_id"], dtype=np.int32))
        f.create_dataset("position_kind", data=np.asarray(columns["position_kind"], dtype=np.int8))
    spans = sorted(((offsets[layer], blocks[layer]) for layer in layers), key=lambda span: span[0])
    with open(path, "rb+") as handle:
        fd = handle.fileno()
        end = max(offset + sum(b.nbytes for b in parts) for offset, parts in spans)
        size = max(os.fstat(fd).st_size, end)
        failed: list[BaseException] = []

        def write_and_sync() -> None:
            try:
                for layer in layers:
                    _pwrite_all(fd, blocks[layer], offsets[layer])
                os.fsync(fd)
            except BaseException as error:  # re-raised below, after the checksum
                failed.append(error)

        writer = threading.Thread(target=write_and_sync, name="shard-pwrite", daemon=True)
        writer.start()
        try:
            sha256 = shard_sha256(fd, size, spans)
        finally:
            writer.join()
        if failed:
            raise failed[0]
        if os.fstat(fd).st_size != size:
            raise OSError(f"shard {path} is {os.fstat(fd).st_size} bytes after writing, expected {size}")
    return sha256


@dataclass
class PreparedShard:
    """A shard fully written, fsynced and checksummed under its temp name, not yet visible."""

    temp: Path
    final: Path
    entry: dict[str, Any]
    rows_per_category: Counter[str]
    rows_per_split: Counter[str]


def write_temp_shard(
    directory: Path, index: int, columns: Mapping[str, np.ndarray], layers: list[int], dtype: str
) -> PreparedShard:
    """Write shard number `index` under a temp name in `directory`, fsync it and compute its sha256
    (while writing: `write_shard_file`). `columns`: `prompt_rows.shard_columns`."""
    name = SHARD_PATTERN.format(index=index)
    final, temp = directory / name, directory / f"{TEMP_PREFIX}{name}"
    try:
        sha256 = write_shard_file(temp, columns, layers, dtype)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    counts = [int(k) for k in columns["prompt_rows"]]
    entry = {
        "file": name,
        "rows": len(columns["prompt_index"]),
        "bytes": temp.stat().st_size,
        "sha256": sha256,
        "prompt_ids_sha256": prompt_ids_digest(columns["prompt_id"], counts),
    }
    by_category: Counter[str] = Counter()
    by_split: Counter[str] = Counter()
    for category, split, k in zip(columns["category"], columns["split"], counts):
        by_category[str(category)] += k
        by_split[str(split)] += k
    return PreparedShard(temp, final, entry, by_category, by_split)


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
    for key, added in (("rows_per_split", shard.rows_per_split), ("rows_per_category", shard.rows_per_category)):
        counts = Counter(manifest[key])
        counts.update(added)
        manifest[key] = dict(sorted(counts.items()))
    manifest["complete"] = False
    write_json(directory / MANIFEST_NAME, manifest)
