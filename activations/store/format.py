"""Shared pieces of the activation shard format (schema version 3, see docs/shards.md).

Holds the constants, the row metadata value object, the storage-dtype codecs (bfloat16 is stored
as its raw uint16 bits) and the atomic JSON / checksum helpers used by the writer and the reader.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from activations.io import read_json

SCHEMA_VERSION = 3
"""Written by `ShardWriter`. Version 2 added the per-row `position_kind` column; version 3 keeps
prompt id, category and split once per prompt (the shard's prompt table, group `prompts`) and a
per-row `prompt_index` into it, instead of one string per row."""
READABLE_VERSIONS = (1, 2, 3)
"""Versions the reader opens; version-1 rows read with position kind UNKNOWN (-1), except the
last row of each prompt, which is always the response-start position."""
PROMPT_TABLE = "prompts"
"""HDF5 group of a version-3 shard holding one entry per prompt: `prompt_id`, `category`, `split`."""
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.h5"
TEMP_PREFIX = ".tmp-"
"""Files starting with this prefix are unfinished writes; a writer deletes them on open."""

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
POSITION_MODES = ("last", "all")
STRING_FIELDS = ("prompt_id", "category", "split")

BF16_ATTR = "encoding"
"""Attribute set on a `layer_<l>` dataset holding bfloat16 values as uint16 bits."""
BF16_ENCODING = "bfloat16-as-uint16"


def layer_key(layer: int) -> str:
    """Name of the HDF5 dataset holding block `layer`'s output."""
    return f"layer_{layer}"


def physical_dtype(dtype: str) -> np.dtype:
    """Numpy dtype written to disk for a storage dtype name."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a (quiet) NaN instead of letting the rounding carry it to infinity
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bfloat16 bits (uint16) to float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert activations `(n, d_model)` to the on-disk representation of `dtype`.

    For bfloat16 a uint16 array is taken as already-encoded bfloat16 bits (what a harvester
    gets from `tensor.to(torch.bfloat16).view(torch.int16)`), anything else is rounded from float32.
    """
    target = physical_dtype(dtype)
    if dtype == "bfloat16":
        if x.dtype in (np.uint16, np.int16):
            return x.view(np.uint16)
        return float32_to_bf16_bits(x)
    if x.dtype in (np.uint16, np.int16):
        raise ValueError(f"got uint16 activations but the store dtype is {dtype}, not bfloat16")
    return np.ascontiguousarray(x, dtype=target)


def decode_rows(raw: np.ndarray, encoding: str | None) -> np.ndarray:
    """On-disk rows → float32 `(n, d_model)`."""
    if encoding == BF16_ENCODING:
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32, copy=False)


@dataclass
class RowMeta:
    """Per-row metadata of activation rows, one numpy array per field, all of length `n`.

    `prompt_id`, `category`, `split`: object arrays of str; `position`: int32 token index in the
    unpadded prompt; `token_id`: int32 id of the token at that position; `position_kind`: int8 code
    of `activations.positions.POSITION_KINDS` (-1 = unknown, schema-1 stores).
    """

    prompt_id: np.ndarray
    category: np.ndarray
    split: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    position_kind: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_id)

    def select(self, index: np.ndarray | slice) -> "RowMeta":
        """Rows picked by a boolean mask, an index array or a slice."""
        return RowMeta(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(parts: list["RowMeta"]) -> "RowMeta":
        """Concatenate row metadata in order (an empty list gives zero rows)."""
        if not parts:
            return RowMeta.empty()
        return RowMeta(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(RowMeta)})

    @staticmethod
    def empty() -> "RowMeta":
        """Zero rows."""
        strings = {name: np.empty(0, dtype=object) for name in STRING_FIELDS}
        return RowMeta(**strings, position=np.empty(0, np.int32), token_id=np.empty(0, np.int32),
                       position_kind=np.empty(0, np.int8))


def prompt_ids_digest(prompt_ids: np.ndarray | list[str], rows: np.ndarray | list[int] | None = None) -> str:
    """sha256 of the per-row prompt ids joined by newlines (row order).

    With `rows`, `prompt_ids` holds each prompt once and `rows[i]` is how many consecutive rows
    prompt i has (the same digest, with no Python string per row)."""
    if rows is None:
        return hashlib.sha256("\n".join(str(p) for p in prompt_ids).encode("utf-8")).hexdigest()
    digest = hashlib.sha256()
    pieces = [(str(p) + "\n") * int(k) for p, k in zip(prompt_ids, rows)]
    if pieces:
        pieces[-1] = pieces[-1][:-1]  # no newline after the last row
    digest.update("".join(pieces).encode("utf-8"))
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and sanity-check `DIR/manifest.json`."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no activation store at {directory}: {MANIFEST_NAME} missing")
    manifest = read_json(path, "activation store manifest")
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path} has schema_version {version!r}; this reader supports "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("layers", "d_model", "dtype", "positions", "shards"):
        if key not in manifest:
            raise ValueError(f"{path} lacks the required key {key!r}")
    return manifest
