"""Inputs of the `select` and `vectors` stages: last-token rows from a shard store, SAEs, latents.

- `load_last_token_rows(store, layer, splits)`: one row per prompt (the last prompt token; for an
  `all`-positions store the row with the largest position of each prompt) as `LabelledRows`.
- `keep_classes` / `require_rows`: restrict rows to the categories a stage uses and stop with one
  line when a category has no rows in a split.
- `load_sae_seeds(run_dir, layer, seeds, device)`: the seeds of a training run, checked against the
  layer they were trained on; `check_sae_width` checks `d_in` against the store's `d_model`.
- `encode_latents(sae, x)`: dense SAE codes `(n, d_sae)` float32, in batches.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from activations.records import CONTRAST, SPLITS
from activations.store import ActivationStore
from activations.store_format import RowMeta
from probes.protocol import LabelledRows
from sae.export import CFG_NAME, load_sae_run
from sae.model import SparseAutoencoder


def open_store(store: ActivationStore | str | Path) -> ActivationStore:
    """An `ActivationStore`, opened from a path when needed (FileNotFoundError names a missing folder)."""
    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def model_name(store: ActivationStore) -> str:
    """The model id recorded in the store manifest ("unknown" when absent)."""
    model = store.manifest.get("model") or {}
    return str(model.get("id", "unknown")) if isinstance(model, dict) else str(model)


def last_token_index(meta: RowMeta) -> np.ndarray:
    """Sorted row indices (m,) of the largest-position row of each prompt in `meta`."""
    ids = np.asarray(meta.prompt_id).astype(str)
    order = np.lexsort((np.asarray(meta.position), ids))  # by prompt id, then position
    sorted_ids = ids[order]
    last = np.r_[sorted_ids[1:] != sorted_ids[:-1], True]
    return np.sort(order[last])


def _load_all_positions(store: ActivationStore, layer: int, splits: Sequence[str],
                        chunk_rows: int) -> tuple[np.ndarray, RowMeta]:
    """Last-token rows of an `all`-positions store, read chunk by chunk (memory ~ one chunk + result)."""
    meta = store.meta(split=list(splits))
    wanted = last_token_index(meta)
    picked, offset = [], 0
    for block, _ in store.iter_chunks(layer, split=list(splits), chunk_rows=chunk_rows):
        inside = wanted[(wanted >= offset) & (wanted < offset + len(block))] - offset
        picked.append(block[inside])
        offset += len(block)
    x = np.concatenate(picked) if picked else np.empty((0, store.d_model), np.float32)
    return x, meta.select(wanted)


def load_last_token_rows(
    store: ActivationStore,
    layer: int,
    splits: Sequence[str] = SPLITS,
    chunk_rows: int = 65536,
) -> LabelledRows:
    """One row per prompt of `splits`: its last-token activation `(n, d_model)` float32 at `layer`."""
    if layer not in store.layers:
        raise ValueError(f"layer {layer} is not in the store {store.directory}; available layers: {store.layers}")
    unsplit = store.meta(split=None).split
    n_unsplit = int(np.sum(np.asarray(unsplit).astype(str) == ""))
    if n_unsplit:
        raise ValueError(f"{n_unsplit} rows of the store {store.directory} have no split; "
                         "harvest a prompt set whose prompts carry extract/calibrate/eval splits")
    if store.positions == "all":
        x, meta = _load_all_positions(store, layer, splits, chunk_rows)
    else:
        x, meta = store.load(layer, split=list(splits))
    if len(meta) == 0:
        raise ValueError(f"the store {store.directory} has no rows in the splits {list(splits)}")
    return LabelledRows.from_meta(x, meta)


def keep_classes(rows: LabelledRows, classes: Sequence[str], keep_contrast: bool = True) -> tuple[LabelledRows, int]:
    """Rows whose category is in `classes` (plus contrast rows if `keep_contrast`); returns (rows, n dropped)."""
    allowed = list(classes) + ([CONTRAST] if keep_contrast else [])
    mask = np.isin(rows.categories, allowed)
    if not mask.any():
        raise ValueError(f"no rows of the categories {allowed}")
    return rows.subset(mask), int((~mask).sum())


def require_rows(rows: LabelledRows, categories: Iterable[str], splits: Sequence[str], where: str) -> None:
    """ValueError naming the first category without rows in one of `splits`."""
    for split in splits:
        in_split = rows.splits == split
        for category in categories:
            if not np.any(in_split & (rows.categories == category)):
                raise ValueError(f"{where}: category {category!r} has no rows in the {split!r} split")


def row_counts(rows: LabelledRows) -> dict[str, dict[str, int]]:
    """{split: {category: n_rows}} for the splits and categories present."""
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        mask = rows.splits == split
        if mask.any():
            cats, counts = np.unique(rows.categories[mask], return_counts=True)
            out[split] = {str(c): int(n) for c, n in zip(cats, counts)}
    return out


def _trained_layer(seed_dir: Path) -> int | None:
    """The layer recorded in an exported SAE's cfg.json (None when it records none)."""
    cfg = json.loads((seed_dir / CFG_NAME).read_text(encoding="utf-8"))
    layer = cfg.get("hook_layer", (cfg.get("refusal_sae") or {}).get("layer"))
    return None if layer is None else int(layer)


def load_sae_seeds(
    run_dir: str | Path,
    layer: int | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
) -> dict[int, SparseAutoencoder]:
    """{seed: SAE in eval mode} of `RUN/seed_<s>/`; checks the requested seeds and the trained layer."""
    saes = load_sae_run(run_dir, device=device)
    if seeds is not None:
        missing = sorted(set(seeds) - set(saes))
        if missing:
            raise ValueError(f"SAE run {run_dir} has seeds {sorted(saes)}, not {missing}")
        saes = {s: saes[s] for s in seeds}
    if layer is not None:
        for seed in saes:
            trained = _trained_layer(Path(run_dir) / f"seed_{seed}")
            if trained is not None and trained != layer:
                raise ValueError(f"SAE seed {seed} of {run_dir} was trained on layer {trained}, not layer {layer}")
    return saes


def check_sae_width(saes: dict[int, SparseAutoencoder], d_model: int) -> None:
    """ValueError when an SAE's d_in differs from the activations' d_model."""
    if not saes:
        raise ValueError("no SAEs given")
    for seed, sae in saes.items():
        if sae.d_in != d_model:
            raise ValueError(f"SAE seed {seed} has d_in {sae.d_in} but the activation store has d_model {d_model}")


@torch.no_grad()
def encode_latents(sae: SparseAutoencoder, x: np.ndarray, batch_size: int = 4096, desc: str = "encode") -> np.ndarray:
    """Dense SAE codes (n, d_sae) float32 of activations x (n, d_in), computed in batches on the SAE's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = sae.training
    sae.eval()
    out = np.empty((x.shape[0], sae.d_sae), dtype=np.float32)
    try:
        for start in tqdm(range(0, x.shape[0], batch_size), desc=desc, disable=None):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32))
            z = sae.encode(batch.to(sae.device))
            out[start:start + batch.shape[0]] = z.float().cpu().numpy()
    finally:
        sae.train(was_training)
    if not np.isfinite(out).all():
        raise ValueError("SAE codes contain NaN or infinite values")
    return out


def sae_summary(sae: SparseAutoencoder, z: np.ndarray) -> dict[str, float | int | str]:
    """Width, architecture and mean L0 / never-firing fraction of codes z (n, d_sae)."""
    fires = z > 0
    return {"d_sae": sae.d_sae, "architecture": sae.cfg.architecture, "k": int(sae.cfg.k),
            "mean_l0": float(np.mean(fires.sum(axis=1), dtype=np.float64)),
            "never_fired_fraction": float(np.mean(~fires.any(axis=0), dtype=np.float64)), "n_rows": int(z.shape[0])}

