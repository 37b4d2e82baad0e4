"""SAE quality on activation rows it was not trained on: FVU and L0 per position kind, dead and dense latents.

The one definition of dead and dense latents (used in metrics.json, cfg.json, summary.json and the
report): over the `n_rows` evaluation rows (the held-out `metrics_split`, rows of the kinds the SAE
trains on, attention sink excluded),

- a latent is **dead** when it fires (activation > 0) on none of them;
- a latent is **dense** when it fires on more than `DENSE_THRESHOLD` (10%) of them.

Both come with a Wilson 95% CI over the `n_latents` latents. (The training-time tracker's count of
latents silent for `dead_tokens_threshold` rows only decides which latents AuxK revives; it is
logged as `auxk_dead_fraction`.)

    quality = evaluate_quality([sae0, sae1], store, layer, data_cfg)   # one entry per SAE
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from activations.positions import KIND_CODES
from activations.stats import wilson_ci
from activations.store import ActivationStore
from sae.model import SparseAutoencoder
from sae.rows import kind_mask

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of the evaluation rows is dense."""

KIND_GROUPS = ("content", "response_start")
"""Position kinds scored separately (besides all evaluation rows together)."""


@dataclass
class _Scores:
    """float64 accumulators of one SAE on one group of rows."""

    sq_err: float = 0.0
    sum_sq: float = 0.0
    l0: float = 0.0
    n: int = 0
    sum_x: np.ndarray | None = None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, active: torch.Tensor) -> None:
        """x, x_hat `(m, d)` float64; active `(m,)` number of non-zero latents per row."""
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        column = x.sum(dim=0).numpy()
        self.sum_x = column if self.sum_x is None else self.sum_x + column
        self.l0 += float(active.sum())
        self.n += int(x.shape[0])

    def result(self) -> dict[str, Any]:
        """`{fvu, l0, n_rows}` (fvu pooled about the group's mean; None for no rows or no variance)."""
        if self.n == 0:
            return {"fvu": None, "l0": None, "n_rows": 0}
        variance = self.sum_sq - float(self.sum_x @ self.sum_x) / self.n  # type: ignore[operator]
        return {"fvu": self.sq_err / variance if variance > 0 else None, "l0": self.l0 / self.n, "n_rows": self.n}


@dataclass
class _SAEState:
    groups: dict[str, _Scores] = field(default_factory=dict)
    fires: np.ndarray | None = None


def _rows_to_score(n: int, max_rows: int, seed: int) -> np.ndarray:
    """`(n,)` bool: all rows, or a seeded random `max_rows` of them (not the first ones: stores are
    ordered by prompt length)."""
    keep = np.ones(n, dtype=bool)
    if n > max_rows:
        keep[:] = False
        keep[np.random.default_rng(seed).choice(n, size=max_rows, replace=False)] = True
    return keep


def metrics_split(store: ActivationStore, data: Any) -> tuple[str | list[str] | None, bool]:
    """(split scored, held out?): `data.metrics_split` when the store has rows there and it is not
    a training split, else the training split (then the scores are not held out)."""
    train = data.split if isinstance(data.split, list) else [data.split]
    chosen = data.metrics_split
    if chosen is not None and chosen not in train and len(store.meta(chosen, data.categories)) > 0:
        return chosen, True
    return data.split, False


@torch.no_grad()
def evaluate_quality(
    saes: Sequence[SparseAutoencoder], store: ActivationStore, layer: int, data: Any, chunk_rows: int = 4096
) -> list[dict[str, Any]]:
    """Per SAE: FVU / L0 over the evaluation rows and per kind in `KIND_GROUPS`, dead and dense latents.

    `data` is the run's `sae.config.DataConfig`: its `position_kinds` and `exclude_sink` choose the
    evaluation rows (on `metrics_split`, at most `metrics_rows`, drawn with `data_seed`).
    """
    split, held_out = metrics_split(store, data)
    meta = store.meta(split, data.categories)
    by_kind, not_sink = kind_mask(meta, data.position_kinds, data.exclude_sink, f"activation store {store.directory}")
    sample = not_sink & _rows_to_score(len(meta), data.metrics_rows, data.data_seed)
    groups = {"all": sample & by_kind, **{k: sample & (meta.position_kind == KIND_CODES[k]) for k in KIND_GROUPS}}
    states = [_SAEState({name: _Scores() for name in groups}, np.zeros(sae.d_sae, dtype=np.int64)) for sae in saes]
    was_training = [sae.training for sae in saes]
    at = 0
    try:
        for sae in saes:
            sae.eval()
        for x, _ in store.iter_chunks(layer, split, data.categories, chunk_rows=chunk_rows):
            masks = {name: mask[at: at + len(x)] for name, mask in groups.items()}
            at += len(x)
            union = np.logical_or.reduce(list(masks.values()))
            if not union.any():
                continue
            rows = torch.from_numpy(x[union])
            target = rows.to(torch.float64)
            sub = {name: torch.from_numpy(m[union]) for name, m in masks.items()}
            for sae, state in zip(saes, states):
                out = sae(rows.to(sae.device))
                x_hat = out.x_hat.detach().to("cpu", torch.float64)
                fired = (out.latent_values != 0).cpu()
                active = fired.sum(dim=1)
                for name, m in sub.items():
                    if m.any():
                        state.groups[name].add(target[m], x_hat[m], active[m])
                in_all = sub["all"]
                ids = out.latent_indices.cpu()[in_all][fired[in_all]]
                np.add.at(state.fires, ids.numpy(), 1)
    finally:
        for sae, mode in zip(saes, was_training):
            sae.train(mode)
    label = split if isinstance(split, str) else ("all" if split is None else "+".join(split))
    return [_record(state, sae.d_sae, label, held_out) for sae, state in zip(saes, states)]


def _record(state: _SAEState, d_sae: int, split: str, held_out: bool) -> dict[str, Any]:
    overall = state.groups["all"].result()
    n = overall["n_rows"]
    if n == 0:
        raise ValueError("no evaluation rows for the SAE metrics (check metrics_split and position_kinds)")
    frequency = state.fires / n  # type: ignore[operator]
    n_dead, n_dense = int((state.fires == 0).sum()), int((frequency > DENSE_THRESHOLD).sum())
    return {
        **overall, "metrics_split": split, "held_out": held_out,
        "by_kind": {k: state.groups[k].result() for k in KIND_GROUPS},
        "dead_fraction": n_dead / d_sae, "dead_fraction_ci": list(wilson_ci(n_dead, d_sae)),
        "dense_fraction": n_dense / d_sae, "dense_fraction_ci": list(wilson_ci(n_dense, d_sae)),
        "dense_threshold": DENSE_THRESHOLD, "n_latents": d_sae,
        "firing_frequency": frequency,
    }
