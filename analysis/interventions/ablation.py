"""Ablation and clamping: remove a residual direction, or zero / pin SAE features (error term kept).

All three are context managers over `activations.hooks.residual_hooks`; they compose with `steer` by
nesting `with` blocks, and their hooks are removed on exit, also when the body raises.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from analysis.interventions.core import (
    PositionMask,
    as_direction_rows,
    check_positions,
    check_sae_width,
    edit_rows,
    feature_index,
    sae_round_trip,
)


def _resolve_layers(adapter: ModelAdapter, layers: Sequence[int] | str) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be a list of ints or 'all', got {layers!r}")
        return [-1, *range(adapter.num_layers)]
    resolved = [adapter.check_layer(layer) for layer in layers]
    if not resolved:
        raise ValueError("ablate_direction: empty list of layers")
    return sorted(set(resolved))


@contextmanager
def ablate_direction(
    adapter: ModelAdapter,
    direction: Any,
    layers: Sequence[int] | str = "all",
    positions: str | PositionMask = "all",
) -> Iterator[None]:
    """Project `direction` out of the residual stream: x ← x − (x·r̂) r̂ at each listed layer.

    Args:
        direction: `(d_model,)` tensor or `SteeringVector`; it is normalised here (must be non-zero).
        layers: list of residual layers, or `"all"` = the embeddings (layer -1) and every block output
            (directional ablation as in Arditi et al. 2024).
        positions: `"all"`, `"generated"` (see `steer`) or a `PositionMask` (`core.py`).
    """
    check_positions(positions)
    vec = as_direction_rows(direction, adapter.d_model, "ablate_direction").double()
    if vec.ndim != 1:
        raise ValueError(f"ablate_direction: direction must have shape (d_model,), got {tuple(vec.shape)}")
    norm = torch.linalg.vector_norm(vec)
    if norm == 0:
        raise ValueError("ablate_direction: direction is the zero vector")
    unit = vec / norm

    def fn(x: torch.Tensor, _rows: torch.Tensor) -> torch.Tensor:
        r = unit.to(device=x.device, dtype=x.dtype)
        return x - (x @ r).unsqueeze(-1) * r

    def edit(hidden: torch.Tensor) -> torch.Tensor | None:
        return edit_rows(hidden, positions, None, fn)

    with residual_hooks(adapter, {layer: edit for layer in _resolve_layers(adapter, layers)}):
        yield


def _clamp_targets(
    ids: torch.Tensor, value: float | None, multiple: float | None, typical: torch.Tensor | None
) -> torch.Tensor:
    """The value each feature in `ids` is pinned to, `(len(ids),)` float32."""
    if (value is None) == (multiple is None):
        raise ValueError("clamp_features: give exactly one of value= or multiple=")
    if value is not None:
        if not torch.isfinite(torch.tensor(float(value))):
            raise ValueError(f"clamp_features: value must be finite, got {value}")
        return torch.full((ids.numel(),), float(value))
    if typical is None:
        raise ValueError("clamp_features: multiple= needs typical= (typical activation of each feature)")
    typ = torch.as_tensor(typical).detach().to(torch.float32).flatten()
    if typ.numel() == ids.numel():
        picked = typ
    elif typ.numel() > int(ids.max()):
        picked = typ[ids]
    else:
        raise ValueError(f"clamp_features: typical has {typ.numel()} entries; expected one per feature id "
                         f"({ids.numel()}) or one per SAE feature (> {int(ids.max())})")
    if not torch.isfinite(picked).all():
        raise ValueError("clamp_features: typical contains NaN or infinite values")
    return float(multiple) * picked


@contextmanager
def clamp_features(
    adapter: ModelAdapter,
    layer: int,
    sae: Any,
    feature_ids: Sequence[int],
    value: float | None = None,
    multiple: float | None = None,
    typical: torch.Tensor | None = None,
    positions: str | PositionMask = "all",
) -> Iterator[None]:
    """Pin SAE features at `layer` to a value: z'[ids] = value, or multiple × typical[ids].

    x' = x + decode(z') − decode(z), i.e. decode(z') plus the SAE's reconstruction error.

    Args:
        sae: any object with `encode(x (n, d_in)) -> z (n, d_sae)` and `decode(z) -> (n, d_in)`.
        feature_ids: SAE latent indices.
        value: fixed activation for every listed feature; or
        multiple, typical: `typical` is `(d_sae,)` or `(len(feature_ids),)` (e.g. mean activation when
            active); each feature is set to `multiple * typical`.
        positions: `"all"`, `"generated"` (see `steer`) or a `PositionMask` (`core.py`).
    """
    adapter.check_layer(layer)
    check_positions(positions)
    check_sae_width(sae, adapter.d_model, "clamp_features")
    ids = feature_index(feature_ids, "clamp_features")
    targets = _clamp_targets(ids, value, multiple, typical)

    def pin(z: torch.Tensor) -> torch.Tensor:
        if int(ids.max()) >= z.shape[-1]:
            raise ValueError(f"clamp_features: feature id {int(ids.max())} out of range for d_sae={z.shape[-1]}")
        z = z.clone()
        z[..., ids.to(z.device)] = targets.to(device=z.device, dtype=z.dtype)
        return z

    def edit(hidden: torch.Tensor) -> torch.Tensor | None:
        return edit_rows(hidden, positions, None, lambda x, _rows: sae_round_trip(sae, x, pin, "clamp_features"))

    with residual_hooks(adapter, {layer: edit}):
        yield


@contextmanager
def ablate_features(
    adapter: ModelAdapter, layer: int, sae: Any, feature_ids: Sequence[int], positions: str | PositionMask = "all"
) -> Iterator[None]:
    """Zero the listed SAE features at `layer`, keeping the reconstruction error (clamp to 0)."""
    with clamp_features(adapter, layer, sae, feature_ids, value=0.0, positions=positions):
        yield
