"""Category steering directions from extract rows: residual mean differences and SAE-space vectors.

Residual (CAA):  v(c, l) = mean(a | c) - mean(a | benign)             (float64 accumulation)

SAE space:       v_z(c) = mean(z | c) - mean(z | benign), then filtered:
  1. `restrict_to`: keep only the given latent ids (e.g. the L1-selected features of c);
  2. inactive:     drop latents with mean(z | c) <= tau;
  3. shared:       drop latents active in BOTH c and benign, where "active in g" means
                   mean(z | g) > tau, or (with `shared_frequency`) the fraction of g's rows with
                   z > fire_threshold exceeds `shared_frequency`;
  4. `top_k`:      keep the k largest |v_z| among the rest.
  It is decoded to the residual stream with `decode_latent_vector(v_z, W_dec) = v_z @ W_dec`.

Why no b_dec: the SAE decoder is affine, x_hat(z) = z @ W_dec + b_dec, so the residual-space difference
of two decoded latent codes is x_hat(z1) - x_hat(z2) = (z1 - z2) @ W_dec; b_dec cancels. A vector
built from a difference of latent means therefore maps through W_dec alone (adding b_dec would add a
constant offset that is not part of any category difference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from activations.records import BENIGN, REFUSAL_CATEGORIES
from probes.rows import LabelledRows, category_mean, require_split
from probes.vectors import SteeringVector, VectorSet


def mean_difference(rows: LabelledRows, category: str, baseline: str | Sequence[str] = BENIGN) -> np.ndarray:
    """v = mean(features | category) - mean(features | baseline), shape (d,), float64; extract rows only."""
    require_split(rows.splits, "extract", "mean-difference vector")
    return category_mean(rows, category) - category_mean(rows, baseline)


def _provenance_meta(rows: LabelledRows, category: str, baseline: str | Sequence[str]) -> dict[str, Any]:
    base = [baseline] if isinstance(baseline, str) else list(baseline)
    return {"category": category, "baseline": base,
            "n_rows": {"category": int(rows.category_mask(category).sum()),
                       "baseline": int(rows.category_mask(base).sum())},
            "splits": rows.provenance()}


def residual_steering_vectors(
    rows: LabelledRows,
    layer: int,
    model: str,
    categories: Iterable[str] = REFUSAL_CATEGORIES,
    baseline: str | Sequence[str] = BENIGN,
) -> VectorSet:
    """CAA vectors per category from residual activations (n, d_model) of extract rows at `layer`."""
    vectors = {}
    for category in categories:
        v = mean_difference(rows, category, baseline)
        meta = {"model": model, "space": "residual", "method": "mean_difference",
                **_provenance_meta(rows, category, baseline)}
        vectors[category] = SteeringVector(torch.from_numpy(v), layer, meta)
    return VectorSet(vectors)


@dataclass(frozen=True)
class LatentDirection:
    """A filtered SAE-space direction for one category.

    v_z: (d_sae,) float64, zero outside `kept`; kept: (m,) int64 latent ids; removed_inactive /
    removed_shared: latent ids dropped by each filter (among those still candidates at that step).
    """

    category: str
    v_z: np.ndarray
    kept: np.ndarray
    removed_inactive: np.ndarray
    removed_shared: np.ndarray
    params: dict[str, Any]


def _active(z: np.ndarray, mean: np.ndarray, tau: float, shared_frequency: float | None,
            fire_threshold: float) -> np.ndarray:
    """(d_sae,) bool: mean above tau, or firing fraction above shared_frequency when given."""
    active = mean > tau
    if shared_frequency is not None:
        active |= np.mean(z > fire_threshold, axis=0, dtype=np.float64) > shared_frequency
    return active


def sae_latent_direction(
    rows: LabelledRows,
    category: str,
    *,
    tau: float = 0.0,
    shared_frequency: float | None = None,
    fire_threshold: float = 0.0,
    top_k: int | None = None,
    restrict_to: Iterable[int] | None = None,
    baseline: str = BENIGN,
) -> LatentDirection:
    """Filtered v_z(c) from SAE latents z (n, d_sae) of extract rows (see the module docstring)."""
    require_split(rows.splits, "extract", "SAE latent direction")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    cat_mask, base_mask = rows.category_mask(category), rows.category_mask(baseline)
    if not cat_mask.any() or not base_mask.any():
        empty = category if not cat_mask.any() else baseline
        raise ValueError(f"category {empty!r} has no extract rows")
    z_cat, z_base = rows.features[cat_mask], rows.features[base_mask]
    mean_cat = np.mean(z_cat, axis=0, dtype=np.float64)
    mean_base = np.mean(z_base, axis=0, dtype=np.float64)
    d = rows.d

    candidate = np.zeros(d, dtype=bool)
    if restrict_to is None:
        candidate[:] = True
    else:
        ids = np.asarray(list(restrict_to), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= d):
            raise ValueError(f"restrict_to holds latent ids outside [0, {d})")
        candidate[ids] = True

    inactive = candidate & ~(mean_cat > tau)
    candidate &= ~inactive
    shared = candidate & _active(z_cat, mean_cat, tau, shared_frequency, fire_threshold) \
        & _active(z_base, mean_base, tau, shared_frequency, fire_threshold)
    candidate &= ~shared

    diff = mean_cat - mean_base
    kept = np.flatnonzero(candidate)
    if top_k is not None and kept.size > top_k:
        kept = kept[np.argsort(-np.abs(diff[kept]), kind="stable")[:top_k]]
    kept = np.sort(kept)
    v_z = np.zeros(d, dtype=np.float64)
    v_z[kept] = diff[kept]
    params = {"tau": tau, "shared_frequency": shared_frequency, "fire_threshold": fire_threshold,
              "top_k": top_k, "restricted": restrict_to is not None, "baseline": baseline}
    return LatentDirection(category, v_z, kept.astype(np.int64), np.flatnonzero(inactive),
                           np.flatnonzero(shared), params)


def decode_latent_vector(v_z: np.ndarray | torch.Tensor, W_dec: np.ndarray | torch.Tensor) -> np.ndarray:
    """Residual-stream direction (d_model,) float64 = v_z (d_sae,) @ W_dec (d_sae, d_model); no b_dec."""
    v = v_z.detach().cpu().double().numpy() if isinstance(v_z, torch.Tensor) else np.asarray(v_z, dtype=np.float64)
    W = W_dec.detach().cpu().double().numpy() if isinstance(W_dec, torch.Tensor) else np.asarray(W_dec, dtype=np.float64)
    if v.ndim != 1 or W.ndim != 2 or W.shape[0] != v.shape[0]:
        raise ValueError(f"need v_z (d_sae,) and W_dec (d_sae, d_model); got {v.shape} and {W.shape}")
    return v @ W


def sae_steering_vectors(
    rows: LabelledRows,
    W_dec: np.ndarray | torch.Tensor,
    layer: int,
    model: str,
    categories: Iterable[str] = REFUSAL_CATEGORIES,
    restrict_to: dict[str, Iterable[int]] | None = None,
    **filter_kwargs: Any,
) -> tuple[VectorSet, dict[str, LatentDirection]]:
    """Per category: filtered latent direction and its decoded residual SteeringVector (space "sae").

    `restrict_to` maps a category to its allowed latent ids (e.g. the L1-selected features).
    """
    vectors, latents = {}, {}
    for category in categories:
        allowed = None if restrict_to is None else restrict_to.get(category)
        direction = sae_latent_direction(rows, category, restrict_to=allowed, **filter_kwargs)
        if direction.kept.size == 0:
            raise ValueError(f"SAE direction for {category!r} is empty after filtering; lower tau or loosen filters")
        meta = {"model": model, "space": "sae", "method": "sae_mean_difference", "n_latents": int(direction.kept.size),
                "filters": direction.params, **_provenance_meta(rows, category, direction.params["baseline"])}
        vectors[category] = SteeringVector(torch.from_numpy(decode_latent_vector(direction.v_z, W_dec)), layer, meta)
        latents[category] = direction
    return VectorSet(vectors), latents
