"""Harvest residual-stream activations of many prompts into an activation shard store.

For each prompt the output of every requested block `l` (== `hidden_states[l + 1]`) is captured at
the last prompt token (`positions="last"`; with the chat template that is the position predicting
the first response token) or at every prompt token (`positions="all"`). Every row records its
position kind (template prefix, user content, template suffix, response start; `activations.positions`). All layers come from one
forward that stops right after the deepest requested block: no later block, final norm or logits
are computed. Prompts run in length-bucketed batches; prompts already in the store are skipped, so
rerunning an interrupted harvest resumes it.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from activations.progress import progress_bar

from activations.adapter import ModelAdapter
from activations.harvest_batches import PromptBatch, prefetched_batches
from activations.host_staging import HostStaging
from activations.hooks import capture_residuals
from activations.model_identity import model_identity, weights_fingerprint  # noqa: F401 (re-exported)
from activations.model_loading import ModelOptions
from activations.prompts.hashing import records_sha256
from activations.records import PromptRecord
from activations.store.format import POSITION_MODES, STORAGE_DTYPES
from activations.store.write import ShardWriter

SHARD_TARGET_BYTES = 64 << 20
"""Default shard size: rows are buffered until a shard holds about this many bytes."""


@dataclass
class HarvestConfig:
    """The `harvest` stage (pipeline section `harvest:`, flags `--harvest.*`).

    Args:
        layers: block indices to capture (layer l = `hidden_states[l + 1]`); None = one a third of
            the way up and one at two thirds. The first one is the pipeline's primary layer.
        batch_size: prompts per forward.
        storage_dtype: dtype of the stored activations (bfloat16 is stored as its uint16 bits).
        rows_per_shard: rows per shard (None: about 64 MiB of activations per shard).
    """

    layers: list[int] | None = None
    batch_size: int = 32
    storage_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    rows_per_shard: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage_dtype {self.storage_dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")


def default_model_info(model: torch.nn.Module, name: str | None = None) -> dict[str, Any]:
    """Model identity for the manifest (`activations.model_identity.model_identity`): id, family,
    revision, compute dtype and weights fingerprints; `name` defaults to the model's name_or_path."""
    return model_identity(model, name or str(getattr(model.config, "name_or_path", "") or "unknown"))


def prompt_info_from_records(records: Sequence[PromptRecord]) -> dict[str, dict[str, str]]:
    """`{"prompt_sources": {source: sha256}, "split_hashes": {split: sha256}}` of a prompt list."""
    by_source: dict[str, list[PromptRecord]] = defaultdict(list)
    by_split: dict[str, list[PromptRecord]] = defaultdict(list)
    for record in records:
        by_source[record.source or "unknown"].append(record)
        by_split[record.split or "unsplit"].append(record)
    return {
        "prompt_sources": {k: records_sha256(v) for k, v in sorted(by_source.items())},
        "split_hashes": {k: records_sha256(v) for k, v in sorted(by_split.items())},
    }


def prompt_info_from_manifest(manifest: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The same identity from a `PromptSet.manifest()`: each source spec's data hash and each split's hash."""
    return {
        "prompt_sources": {s["spec"]: s["sha256"] for s in manifest.get("sources", [])},
        "split_hashes": {name: s["sha256"] for name, s in manifest.get("splits", {}).items() if s.get("n", 1)},
    }


def _to_storage(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Rows `(n, d_model)` in the store's on-disk representation (bfloat16 → its int16 bits)."""
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).contiguous().view(torch.int16)
    return hidden.to(torch.float16 if dtype == "float16" else torch.float32).contiguous()


def _capture_batch(
    adapter: ModelAdapter, batch: PromptBatch, layers: list[int], positions: str, dtype: str
) -> dict[int, torch.Tensor]:
    """One truncated forward → `{layer: rows (n_rows, d_model)}` in storage dtype, on the model device.

    Rows are the last column (`last`) or every real token in row-major order (`all`).
    """
    device = adapter.device
    token_index = None
    if positions == "all":  # computed (and page-locked, on a GPU) by the batch's worker thread
        token_index = batch.token_index.to(device, non_blocking=True)

    def rows(hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[:, -1, :] if token_index is None else hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_index)
        return _to_storage(picked, dtype)

    return capture_residuals(
        adapter, layers, batch.input_ids.to(device, non_blocking=True),
        batch.attention_mask.to(device, non_blocking=True),
        position_ids=batch.position_ids.to(device, non_blocking=True), reduce=rows,
    )


def batch_row_meta(batch: PromptBatch, positions: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-batch row metadata, prompt after prompt in row order of `_capture_batch`: `(rows per
    prompt (b,), positions (n,), token ids (n,), position kinds (n,) or None)`; a few numpy calls per
    batch, no Python loop over rows."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)
    if positions == "last":
        rows = np.ones(len(lengths), dtype=np.int64)
        kinds = None if batch.kinds is None else np.array([k[-1] for k in batch.kinds], dtype=np.int8)
        return rows, lengths - 1, batch.input_ids[:, -1].numpy(), kinds
    # every real token, row-major (left padding: each prompt's tokens are the last `length` columns)
    starts = np.cumsum(lengths) - lengths
    where = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    token_ids = batch.input_ids[batch.attention_mask.bool()].numpy()
    kinds = None if batch.kinds is None else np.concatenate(batch.kinds).astype(np.int8, copy=False)
    return lengths, where, token_ids, kinds


def _store_batch(writer: ShardWriter, batch: PromptBatch, rows: Mapping[int, torch.Tensor], positions: str) -> None:
    """Hand a batch's captured rows to the writer in one call (whole prompts, back to back)."""
    # views, no copy: the writer's row blocks keep these host tensors (`HostStaging.take`) until their shard is written
    host = {layer: t.numpy() if t.dtype != torch.int16 else t.numpy().view(np.uint16) for layer, t in rows.items()}
    counts, where, token_ids, kinds = batch_row_meta(batch, positions)
    records = batch.records
    writer.add_prompts([r.id for r in records], [r.category for r in records], [r.split for r in records],
                       counts, where, token_ids, host, position_kinds=kinds)


def harvest(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    layers: Sequence[int],
    out_dir: str | Path,
    positions: str = "last",
    batch_size: int = HarvestConfig.batch_size,
    max_length: int | None = ModelOptions.max_length,
    dtype: str = HarvestConfig.storage_dtype,
    chat_template: bool = ModelOptions.chat_template,
    model_info: Mapping[str, Any] | None = None,
    prompt_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    rows_per_shard: int | None = None,
) -> Path:
    """Capture block outputs of `layers` for every record and store them under `out_dir`.

    Args:
        model, tokenizer: a causal LM (eval mode) and its tokenizer.
        records: prompts with unique ids.
        layers: block indices; layer l is `hidden_states[l + 1]`.
        out_dir: store folder; an existing store of the same harvest is resumed.
        positions: "last" (one row per prompt) or "all" (one row per prompt token).
        dtype: storage dtype, float16 | bfloat16 | float32.
        model_info, prompt_info: identities for the manifest (derived from the model / records if None).
        rows_per_shard: rows per shard (default: about 64 MiB of activations per shard).

    Returns the store folder. Raises ValueError for an empty prompt list, a layer out of range,
    duplicate prompt ids, or a folder holding a different harvest.
    """
    if len(records) == 0:
        raise ValueError("no prompts to harvest: the prompt set is empty")
    if positions not in POSITION_MODES:
        raise ValueError(f"unknown positions mode {positions!r}; expected one of {', '.join(POSITION_MODES)}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {', '.join(STORAGE_DTYPES)}")
    adapter = ModelAdapter(model)
    layers = sorted({adapter.check_layer(int(layer)) for layer in layers})
    if not layers:
        raise ValueError("no layers to harvest")
    if layers[0] < 0:
        raise ValueError(f"layer -1 (the embeddings) cannot be harvested; use blocks 0..{adapter.num_layers - 1}")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"prompt id {duplicate!r} occurs more than once in the prompt set")
    if rows_per_shard is None:
        bytes_per_row = adapter.d_model * (4 if dtype == "float32" else 2) * len(layers)
        rows_per_shard = max(64, SHARD_TARGET_BYTES // bytes_per_row)
    writer = ShardWriter(
        out_dir, layers, adapter.d_model, dtype, positions,
        model_info=model_info if model_info is not None else default_model_info(model),
        prompt_info=prompt_info if prompt_info is not None else prompt_info_from_records(records),
        rows_per_shard=rows_per_shard, chat_template=chat_template, max_length=max_length, background=True,
    )
    todo = [r for r in records if r.id not in writer.stored_prompt_ids]
    with writer, torch.inference_mode():
        if todo:
            batches = prefetched_batches(tokenizer, todo, batch_size, chat_template, max_length,
                                         pin_memory=adapter.device.type == "cuda")
            try:
                _run_batches(adapter, writer, batches, layers, positions, dtype, len(todo), progress)
            finally:
                batches.close()
        writer.finish()
    return Path(out_dir)


DRAIN_AHEAD = 2
"""Batches whose rows may wait for the writer thread before the forward loop waits for it."""


def host_staging(device: torch.device) -> HostStaging | None:
    """The harvest's host slots: DRAIN_AHEAD batches queued + one being stored + one being filled (the
    forward loop waits only then); None on the CPU, where captured rows are fresh host tensors already."""
    return HostStaging(DRAIN_AHEAD + 2, pin=True) if device.type == "cuda" else None


def _run_batches(
    adapter: ModelAdapter, writer: ShardWriter, batches: Any, layers: list[int], positions: str,
    dtype: str, n_prompts: int, progress: bool,
) -> None:
    """Forward each batch, copy its rows into a reusable host slot (`HostStaging`: asynchronous from
    CUDA, no page-locked allocation per batch) and hand them to a writer thread, which waits for the
    copy, moves the rows out of the slot and buffers them as one block per batch (shards are written
    by the writer's own background threads). The forward loop never waits for the disk, a copy or a
    checksum unless the writer falls `DRAIN_AHEAD` batches behind."""
    staging = host_staging(adapter.device)
    bar = progress_bar(total=n_prompts, unit="prompt", desc="harvest", disable=not progress)
    started, done = time.perf_counter(), {"prompts": 0, "tokens": 0}
    handoff: queue.Queue[Any] = queue.Queue(maxsize=DRAIN_AHEAD)
    failed: list[BaseException] = []

    def drain() -> None:
        while (item := handoff.get()) is not None:
            batch, staged = item
            if failed:
                if staging is not None:
                    staging.release(staged)
                continue
            try:
                _store_batch(writer, batch, staging.take(staged) if staging is not None else staged, positions)
            except BaseException as error:
                failed.append(error)
                continue
            done["prompts"] += len(batch.records)
            done["tokens"] += batch.n_tokens
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(len(batch.records))
            bar.set_postfix(prompts_s=f"{done['prompts'] / elapsed:.1f}", tok_s=f"{done['tokens'] / elapsed:.0f}")

    thread = threading.Thread(target=drain, name="harvest-drain", daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 0.001))  # the forward loop gets the GIL back quickly
    thread.start()
    try:
        for batch in batches:
            if failed:
                break
            captured = _capture_batch(adapter, batch, layers, positions, dtype)
            handoff.put((batch, staging.stage(captured) if staging is not None else captured))
    finally:
        handoff.put(None)
        thread.join()
        sys.setswitchinterval(switch)
        bar.close()
    if failed:
        raise failed[0]
