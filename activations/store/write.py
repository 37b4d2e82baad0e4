"""Write an activation shard store (schema version 3, see docs/shards.md), crash-safely and resumably.

`ShardWriter` buffers whole prompts and writes a shard once `rows_per_shard` rows are buffered:
the shard goes to a temp file in the same folder, is fsynced and `os.replace`d into place, and only
then is `manifest.json` rewritten (atomically) to list it. A kill at any moment therefore leaves a
store whose manifest lists only complete shards; a prompt's rows always sit in one shard.

Opening a folder that already holds a store of the same harvest (model — its weights fingerprint,
not its path —, layers, d_model, dtype, positions, template, max length, prompt hashes) resumes it: `writer.stored_prompt_ids` tells the
harvester what to skip. A store of a different harvest is refused with one ValueError line.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from activations.model_identity import comparable
from activations.positions import CONTENT, POSITION_KINDS, RESPONSE_START
from activations.records import CATEGORIES, SPLITS
from activations.store.commit import publish_shard, write_temp_shard
from activations.io import write_json
from activations.store.format import (
    MANIFEST_NAME,
    POSITION_MODES,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    TEMP_PREFIX,
    encode_rows,
    read_manifest,
)
from activations.store.prompt_rows import PromptRows, shard_columns, split_at_shard_ends
from activations.store.shard_file import read_shard_prompt_ids

IDENTITY_KEYS = (
    "schema_version",
    "model",
    "layers",
    "d_model",
    "dtype",
    "positions",
    "chat_template",
    "max_length",
    "prompt_sources",
    "split_hashes",
)
"""Manifest keys that must match for a folder to be resumed."""

BACKGROUND_SHARDS = 4
"""Shards a background writer writes at once (checksumming and fsyncing some while writing the next)."""


class HarvestMismatch(ValueError):
    """The folder already holds a store of a different harvest."""


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else ", ".join(f"{k}={v!r}" for k, v in value.items())


class ShardWriter:
    """Append whole prompts' activation rows to a shard store.

    Args:
        directory: store folder (created if missing).
        layers: block indices stored (layer l == hidden_states[l+1]).
        d_model: residual width.
        dtype: storage dtype, float32 | float16 | bfloat16.
        positions: "last" (exactly one row per prompt) or "all" (one row per prompt token).
        model_info: identity of the model, e.g. {"id": ..., "revision": ..., "weights_fingerprint": ...}.
        prompt_info: {"prompt_sources": {spec: sha256}, "split_hashes": {split: sha256}}.
        rows_per_shard: a shard is written once this many rows are buffered (a shard may exceed it
            by the rows of its last prompt).
        chat_template, max_length: how prompts were encoded (part of the harvest identity).
        background: write shards on worker threads (h5py, hashing and fsync release the GIL), so a
            harvest keeps the GPU busy meanwhile. Up to `BACKGROUND_SHARDS` shards are written at
            once; they are still renamed and listed strictly in order. Errors of a background write
            are raised by the next `flush`, `wait`, `finish` or `close`.
    """

    def __init__(
        self,
        directory: str | Path,
        layers: list[int],
        d_model: int,
        dtype: str = "float16",
        positions: str = "last",
        model_info: Mapping[str, Any] | None = None,
        prompt_info: Mapping[str, Any] | None = None,
        rows_per_shard: int = 16384,
        *,
        chat_template: bool = True,
        max_length: int | None = None,
        background: bool = False,
    ) -> None:
        if not layers or len(set(layers)) != len(layers) or any(int(l) < 0 for l in layers):
            raise ValueError(f"layers must be distinct non-negative block indices, got {list(layers)}")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
        if positions not in POSITION_MODES:
            raise ValueError(f"unknown positions mode {positions!r}; expected one of {', '.join(POSITION_MODES)}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.directory = Path(directory)
        self.layers = sorted(int(l) for l in layers)
        self.d_model = int(d_model)
        self.dtype = dtype
        self.positions = positions
        self.rows_per_shard = int(rows_per_shard)
        prompt_info = dict(prompt_info or {})
        self.identity: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "model": dict(model_info or {}),
            "layers": self.layers,
            "d_model": self.d_model,
            "dtype": dtype,
            "positions": positions,
            "chat_template": bool(chat_template),
            "max_length": max_length,
            "prompt_sources": dict(prompt_info.get("prompt_sources", {})),
            "split_hashes": dict(prompt_info.get("split_hashes", {})),
        }
        self.identity = json.loads(json.dumps(self.identity))  # compare like the JSON it is saved as
        self._buffer: list[PromptRows] = []
        self._buffer_ids: set[str] = set()
        self._buffer_rows = 0
        self._pool = ThreadPoolExecutor(BACKGROUND_SHARDS, thread_name_prefix="shard-writer") if background else None
        self._in_flight: deque[Future[None]] = deque()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()
        self.manifest = self._open_existing() if (self.directory / MANIFEST_NAME).exists() else self._start_new()
        self.stored_prompt_ids: set[str] = self._stored_ids()
        """Prompt ids whose shards are on disk and listed in the manifest."""
        self._seen_ids: set[str] = set(self.stored_prompt_ids)
        self._next_index = len(self.manifest["shards"])

    # ---- opening / resuming ------------------------------------------------------------------
    def _remove_temp_files(self) -> None:
        for stray in self.directory.glob(f"{TEMP_PREFIX}*"):
            stray.unlink(missing_ok=True)

    def _start_new(self) -> dict[str, Any]:
        leftovers = sorted(self.directory.glob("shard-*.h5"))
        if leftovers:
            raise ValueError(f"{self.directory} holds shard files (e.g. {leftovers[0].name}) but no {MANIFEST_NAME}")
        manifest = {
            **self.identity,
            "shards": [],
            "total_rows": 0,
            "rows_per_split": {},
            "rows_per_category": {},
            "complete": False,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(self.directory / MANIFEST_NAME, manifest)
        return manifest

    def _open_existing(self) -> dict[str, Any]:
        manifest = read_manifest(self.directory)
        for key in IDENTITY_KEYS:
            same = (comparable(manifest.get(key)) == comparable(self.identity[key]) if key == "model"
                    else manifest.get(key) == self.identity[key])
            if not same:
                raise HarvestMismatch(
                    f"{self.directory} already holds a different harvest: its {key} is "
                    f"{_describe(manifest.get(key))}, this run's is {_describe(self.identity[key])}; "
                    "use another output folder"
                )
        listed = {entry["file"] for entry in manifest["shards"]}
        for orphan in self.directory.glob("shard-*.h5"):  # renamed into place, killed before the manifest
            if orphan.name not in listed:
                orphan.unlink()
        return manifest

    def _stored_ids(self) -> set[str]:
        ids: set[str] = set()
        for entry in self.manifest["shards"]:
            path = self.directory / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"activation shard missing: {path} (listed in {MANIFEST_NAME})")
            if path.stat().st_size != entry["bytes"]:
                raise ValueError(f"activation shard {path} is {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
            ids.update(read_shard_prompt_ids(path, entry["rows"]))
        return ids

    # ---- adding rows -------------------------------------------------------------------------
    def add_prompt(
        self,
        prompt_id: str,
        category: str,
        split: str,
        positions: np.ndarray,
        token_ids: np.ndarray,
        activations: Mapping[int, np.ndarray],
        position_kinds: np.ndarray | None = None,
    ) -> None:
        """Buffer the rows of one prompt; writes a shard when `rows_per_shard` rows are buffered.

        Args:
            positions: `(k,)` token indices in the unpadded prompt.
            token_ids: `(k,)` token ids at those positions.
            activations: layer → `(k, d_model)` float array (or uint16 bfloat16 bits for a bfloat16 store).
            position_kinds: `(k,)` codes of `activations.positions.POSITION_KINDS`; None = every row is
                user content except the prompt's last row, the response start (what a prompt without
                a chat template is).
        """
        k = int(np.asarray(positions).size)
        self.add_prompts([prompt_id], [category], [split], [k], positions, token_ids, activations, position_kinds)

    def add_prompts(
        self,
        prompt_ids: Sequence[str],
        categories: Sequence[str],
        splits: Sequence[str],
        rows: Sequence[int] | np.ndarray,
        positions: np.ndarray,
        token_ids: np.ndarray,
        activations: Mapping[int, np.ndarray],
        position_kinds: np.ndarray | None = None,
    ) -> None:
        """Buffer the rows of several whole prompts at once (a harvest batch): the same as `add_prompt`
        for each in turn (shards end after the same prompts), with per-batch arrays instead of
        per-prompt ones; the activation arrays are kept as they are (views) until their shard is written.

        Args:
            prompt_ids, categories, splits: one per prompt (p of each).
            rows: `(p,)` rows of each prompt; the rows below hold prompt after prompt, `n = sum(rows)`.
            positions, token_ids: `(n,)`; activations: layer → `(n, d_model)`; position_kinds: `(n,)`
                codes, or None (each prompt's rows are content except its last, the response start).
        """
        ids, cats, spl = [str(i) for i in prompt_ids], list(categories), list(splits)
        counts = np.asarray(rows, dtype=np.int64).reshape(-1)
        p = len(ids)
        if p == 0 or not len(cats) == len(spl) == len(counts) == p:
            raise ValueError(f"add_prompts needs one category, split and row count per prompt; got {p} ids, "
                             f"{len(cats)} categories, {len(spl)} splits, {len(counts)} row counts")
        label = f"prompt {ids[0]!r}" if p == 1 else f"prompts {ids[0]!r}..{ids[-1]!r}"
        for prompt_id, category, split in zip(ids, cats, spl):
            if prompt_id in self._seen_ids:
                raise ValueError(f"prompt {prompt_id!r} is already in the store {self.directory}")
            if category not in CATEGORIES:
                raise ValueError(f"prompt {prompt_id!r} has unknown category {category!r}")
            if split not in SPLITS and split != "":
                raise ValueError(f"prompt {prompt_id!r} has unknown split {split!r}")
        if len(set(ids)) != p:
            raise ValueError(f"{label}: a prompt id occurs twice in one call")
        positions = np.asarray(positions, dtype=np.int32).reshape(-1)
        token_ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        n = len(positions)
        if counts.min() < 1 or n != counts.sum() or len(token_ids) != n or (self.positions == "last" and counts.max() != 1):
            raise ValueError(f"{label}: got {n} positions and {len(token_ids)} token ids for rows {counts.tolist()[:8]} "
                             f"(positions mode {self.positions!r})")
        if position_kinds is None:
            kinds = np.full(n, CONTENT, dtype=np.int8)
            kinds[np.cumsum(counts) - 1] = RESPONSE_START
        else:
            kinds = np.asarray(position_kinds, dtype=np.int8).reshape(-1)
            if len(kinds) != n or kinds.min() < 0 or kinds.max() >= len(POSITION_KINDS):
                raise ValueError(f"{label}: position_kinds must be {n} codes in [0, {len(POSITION_KINDS)})")
        blocks = {}
        for layer in self.layers:
            if layer not in activations:
                raise ValueError(f"{label}: activations lack layer {layer}")
            x = np.asarray(activations[layer])
            if x.shape != (n, self.d_model):
                raise ValueError(f"{label}: layer {layer} activations have shape {x.shape}, expected {(n, self.d_model)}")
            blocks[layer] = encode_rows(x, self.dtype)
        self._seen_ids.update(ids)
        run = PromptRows(ids, cats, spl, counts, positions, token_ids, kinds, blocks)
        for piece in split_at_shard_ends(run, self._buffer_rows, self.rows_per_shard):
            self._buffer.append(piece)
            self._buffer_ids.update(piece.prompt_ids)
            self._buffer_rows += piece.n_rows
            if self._buffer_rows >= self.rows_per_shard:
                self.flush()

    # ---- writing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the buffered prompts as the next shard, then list it in the manifest (both atomic).

        In background mode this hands the shard to a worker, first waiting for the oldest shard in
        flight when `BACKGROUND_SHARDS` are.
        """
        if not self._buffer:
            return
        rows, ids, index = self._buffer, self._buffer_ids, self._next_index
        self._buffer, self._buffer_ids, self._buffer_rows = [], set(), 0
        self._next_index += 1
        if self._pool is None:
            self._commit(index, rows, ids, None)
            return
        while len(self._in_flight) >= BACKGROUND_SHARDS:
            self._in_flight.popleft().result()
        previous = self._in_flight[-1] if self._in_flight else None
        self._in_flight.append(self._pool.submit(self._commit, index, rows, ids, previous))

    def _commit(self, index: int, rows: list[PromptRows], ids: set[str], previous: Future[None] | None) -> None:
        """Write shard `index`; publish it once the shard before it is published."""
        shard = write_temp_shard(self.directory, index, shard_columns(rows, self.layers), self.layers, self.dtype)
        try:
            if previous is not None:
                previous.result()  # an earlier shard failed: this one must not be listed either
            publish_shard(self.directory, self.manifest, shard)
        finally:
            shard.temp.unlink(missing_ok=True)
        self.stored_prompt_ids |= ids

    def wait(self) -> None:
        """Block until every shard in flight (background mode) is committed; re-raise an error."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def finish(self) -> Path:
        """Flush and mark the store complete (every prompt of the prompt set is in it)."""
        self.close()
        self.manifest["complete"] = True
        write_json(self.directory / MANIFEST_NAME, self.manifest)
        return self.directory

    def close(self) -> None:
        """Write buffered prompts and wait for them, without marking the store complete."""
        try:
            self.flush()
            self.wait()
        finally:
            self._in_flight.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the whole prompts buffered so far; the original error is what the caller sees
            self.close()
        except Exception:
            pass
