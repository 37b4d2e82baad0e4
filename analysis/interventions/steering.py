"""Steering: add a direction to the residual stream (`steer`) or a latent change in SAE space (`steer_sae`).

Both are context managers over `activations.hooks.residual_hooks`; nest `with` blocks to compose them
(hooks on the same layer run in the order the blocks were entered) and every hook is removed on exit,
also when the body raises:

    with steer(adapter, 9, safety_vector, alphas=torch.tensor([0.0, 4.0, 8.0])):
        with ablate_direction(adapter, refusal_dir, layers=[9]):
            out = model.generate(**batch)

Strengths may differ per row (`alphas` of shape `(batch,)`), and so may the vectors (`(batch, d_model)`),
so one batched forward runs a whole sweep. A row whose strength is 0 is never written: its outputs are
bit-identical to a run without the hook (and when every strength is 0 the hook returns None).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from analysis.interventions.core import (
    PositionMask,
    active_rows,
    as_alphas,
    as_direction_rows,
    check_batch,
    check_positions,
    check_sae_width,
    declared_batch,
    edit_rows,
    per_row,
    sae_round_trip,
)

OPERATORS = ("add", "ablate", "ablate_then_add")


def _vector_layer_matches(vectors: Any, layer: int) -> None:
    items = vectors if isinstance(vectors, (list, tuple)) else [vectors]
    for item in items:
        own = getattr(item, "layer", None)
        if own is not None and not isinstance(item, torch.Tensor) and int(own) != layer:
            raise ValueError(
                f"steering vector belongs to layer {own} but steer() was asked for layer {layer} "
                "(pass vector.vector to apply it at another layer on purpose)"
            )


def _operator_fn(operator: str, vectors: torch.Tensor, alphas: torch.Tensor):
    """Build `fn(x (rows, pos, d), rows) -> edited x` for one operator."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {', '.join(OPERATORS)}, got {operator!r}")
    norms = torch.linalg.vector_norm(vectors.double(), dim=-1)
    if operator != "add" and bool((norms == 0).any()):
        raise ValueError(f"operator {operator!r} needs a non-zero vector to define a direction")

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        vec = per_row(vectors, rows, trailing=1).to(x.dtype)
        alpha = per_row(alphas, rows, trailing=0).to(x.dtype)
        if operator == "add":
            return x + alpha * vec
        unit = vec / torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
        projection = (x * unit).sum(-1, keepdim=True) * unit
        if operator == "ablate":
            return x - alpha * projection
        return x - projection + alpha * vec

    return fn


@contextmanager
def steer(
    adapter: ModelAdapter,
    layer: int,
    vectors: Any,
    alphas: float | torch.Tensor = 1.0,
    positions: str | PositionMask = "all",
    operator: str = "add",
) -> Iterator[None]:
    """Edit the residual stream after block `layer` along `vectors` while the block is open.

    Args:
        adapter: the model adapter.
        layer: residual layer (output of block `layer`; -1 = embeddings).
        vectors: `(d_model,)` shared or `(batch, d_model)` per row; a tensor, a `SteeringVector`
            (anything with `.vector`; its `.layer` must equal `layer`) or a list of them (one per row).
        alphas: strength, scalar or `(batch,)`. A row with alpha 0 is left untouched (for every operator).
        positions: `"all"` (every position, prompt and generated; left-pad positions too, which attention
            masks out) or `"generated"` (the last prompt position and every generated token; needs the KV
            cache, i.e. `generate(..., use_cache=True)`, the default).
        operator: `"add"`: x + α v;  `"ablate"`: x − α (x·v̂) v̂ (α = 1 removes the component along v);
            `"ablate_then_add"`: x − (x·v̂) v̂ + α v (the component along v̂ is set to α‖v‖).
    """
    adapter.check_layer(layer)
    check_positions(positions)
    _vector_layer_matches(vectors, layer)
    vecs = as_direction_rows(vectors, adapter.d_model, "steer")
    alpha = as_alphas(alphas)
    expected = declared_batch(vecs, alpha)
    fn = _operator_fn(operator, vecs, alpha)
    if not bool((alpha != 0).any()):
        yield  # every strength is 0: no hook at all, so the run is exactly the unsteered one
        return

    def edit(hidden: torch.Tensor) -> torch.Tensor | None:
        check_batch(expected, hidden, "steer")
        return edit_rows(hidden, positions, active_rows(alpha, hidden.shape[0]), fn)

    with residual_hooks(adapter, {layer: edit}):
        yield


@contextmanager
def steer_sae(
    adapter: ModelAdapter,
    layer: int,
    sae: Any,
    latent_deltas: torch.Tensor,
    alphas: float | torch.Tensor = 1.0,
    positions: str | PositionMask = "all",
) -> Iterator[None]:
    """Steer in SAE space: z = encode(x), z' = z + α δ, x' = decode(z') + (x − decode(z)).

    The reconstruction error is kept, so α = 0 reproduces x (rows with α = 0 are not touched at all,
    and with every α = 0 no hook is registered). Computed in the SAE's dtype, cast back to the model's.

    Args:
        sae: any object with `encode(x (n, d_in)) -> z (n, d_sae)` and `decode(z) -> (n, d_in)`.
        latent_deltas: `(d_sae,)` shared or `(batch, d_sae)` per row.
        alphas, positions: as in `steer`.
    """
    adapter.check_layer(layer)
    check_positions(positions)
    check_sae_width(sae, adapter.d_model, "steer_sae")
    deltas = torch.as_tensor(latent_deltas).detach().to(torch.float32)
    if deltas.ndim not in (1, 2) or deltas.shape[-1] == 0:
        raise ValueError(f"steer_sae: latent_deltas must be (d_sae,) or (batch, d_sae), got {tuple(deltas.shape)}")
    if not torch.isfinite(deltas).all():
        raise ValueError("steer_sae: latent_deltas contain NaN or infinite values")
    alpha = as_alphas(alphas)
    expected = declared_batch(deltas, alpha)
    if not bool((alpha != 0).any()):
        yield
        return

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        delta = per_row(deltas, rows, trailing=1)
        strength = per_row(alpha, rows, trailing=0)

        def shift(z: torch.Tensor) -> torch.Tensor:
            if z.shape[-1] != delta.shape[-1]:
                raise ValueError(f"steer_sae: latent_deltas have d_sae={delta.shape[-1]} but the SAE has {z.shape[-1]}")
            return z + (strength * delta).to(device=z.device, dtype=z.dtype)

        return sae_round_trip(sae, x, shift, "steer_sae")

    def edit(hidden: torch.Tensor) -> torch.Tensor | None:
        check_batch(expected, hidden, "steer_sae")
        return edit_rows(hidden, positions, active_rows(alpha, hidden.shape[0]), fn)

    with residual_hooks(adapter, {layer: edit}):
        yield
