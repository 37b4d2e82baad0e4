"""Shared pieces of the interventions: argument checks, position selection, per-row edits, SAE round trips.

Every intervention is an `edit(hidden (batch, seq, d_model)) -> replacement | None` handed to
`activations.hooks.residual_hooks`. The helpers here build such edits so that

* only the selected rows and positions are written (rows with strength 0 are never touched, so they stay
  bit-identical to a run without the hook);
* arithmetic happens in float32 or wider (float64 models stay float64; SAE space uses the SAE's dtype)
  and the result is cast back to the hidden dtype;
* `positions="generated"` edits the last position of every forward: in the prefill pass that is the last
  prompt token (it predicts the first response token; left padding makes it the last real token of every
  row), and with a KV cache every decode step has `seq == 1`, so each generated token is edited.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

POSITIONS = ("all", "generated")

PositionMask = Callable[[tuple[int, int]], torch.Tensor]
"""`mask(shape (batch, seq)) -> (batch, seq) bool`: the positions to edit in a forward of that shape
(e.g. the user-content tokens of a left-padded batch, from `activations.positions`)."""


def check_positions(positions: Any) -> Any:
    """Return `positions` if it is `"all"`, `"generated"` or a `PositionMask` callable, else raise."""
    if callable(positions):
        return positions
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)} or a mask callable, got {positions!r}")
    return positions


def as_direction_rows(vectors: Any, d_model: int, what: str = "vectors") -> torch.Tensor:
    """Coerce a tensor, a `SteeringVector`-like object (has `.vector`) or a list of them to float32.

    Returns `(d_model,)` for one shared vector or `(batch, d_model)` for one vector per row.
    """
    if isinstance(vectors, (list, tuple)):
        if not vectors:
            raise ValueError(f"{what}: empty list of vectors")
        rows = torch.stack([as_direction_rows(v, d_model, what) for v in vectors])
        if rows.ndim != 2:
            raise ValueError(f"{what}: each listed vector must have shape (d_model,)")
        return rows
    tensor = getattr(vectors, "vector", vectors)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor or an object with .vector, got {type(vectors).__name__}")
    tensor = tensor.detach().to(torch.float32)
    if tensor.ndim not in (1, 2) or tensor.shape[-1] != d_model:
        raise ValueError(f"{what}: expected shape (d_model,) or (batch, d_model) with d_model={d_model}, "
                         f"got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return tensor


def as_alphas(alphas: float | torch.Tensor) -> torch.Tensor:
    """Strengths as float32: a 0-d tensor (shared) or `(batch,)` (one per row)."""
    tensor = torch.as_tensor(alphas, dtype=torch.float32).detach()
    if tensor.ndim > 1:
        raise ValueError(f"alphas must be a scalar or shape (batch,), got {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError("alphas contain NaN or infinite values")
    return tensor.cpu()


def declared_batch(vectors: torch.Tensor | None, alphas: torch.Tensor | None) -> int | None:
    """The batch size fixed by per-row arguments (`(batch, d)` vectors, `(batch,)` alphas), or None."""
    sizes = set()
    if vectors is not None and vectors.ndim == 2:
        sizes.add(int(vectors.shape[0]))
    if alphas is not None and alphas.ndim == 1:
        sizes.add(int(alphas.shape[0]))
    if len(sizes) > 1:
        raise ValueError(f"per-row arguments disagree on the batch size: {sorted(sizes)}")
    return next(iter(sizes), None)


def check_batch(expected: int | None, hidden: torch.Tensor, who: str) -> None:
    """Raise if per-row arguments were given for a different batch size than the forward's."""
    if expected is not None and hidden.shape[0] != expected:
        raise ValueError(
            f"{who}: per-row arguments are for batch {expected} but the forward has batch {hidden.shape[0]} "
            "(beam search or num_return_sequences enlarge the batch; repeat the rows to match)"
        )


def active_rows(alphas: torch.Tensor, batch: int) -> torch.Tensor | None:
    """`(batch,)` bool of rows whose strength is non-zero; None when every row is active."""
    nonzero = (alphas != 0).expand(batch) if alphas.ndim == 0 else alphas != 0
    return None if bool(nonzero.all()) else nonzero


def per_row(values: torch.Tensor, rows: torch.Tensor, trailing: int) -> torch.Tensor:
    """Pick `rows` of a per-row argument, or broadcast a shared one, ready to broadcast over positions.

    `trailing` is the number of non-batch dims of one row's value: 0 for alphas (result `(rows, 1, 1)`),
    1 for vectors (result `(rows, 1, d)`).
    """
    values = values.to(rows.device)
    picked = values[rows] if values.ndim == trailing + 1 else values.expand(rows.numel(), *values.shape)
    return picked.reshape(rows.numel(), 1, *(picked.shape[1:] or (1,)))


def edit_rows(
    hidden: torch.Tensor,
    positions: Any,
    active: torch.Tensor | None,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor | None:
    """Apply `fn` to the selected rows and positions of `hidden (batch, seq, d_model)`.

    Args:
        positions: `"all"`, `"generated"` (last position of this forward) or a `PositionMask`.
        active: `(batch,)` bool of rows to edit, or None for all rows.
        fn: `fn(x (rows, pos, d_model) in float32 or wider, row_index (rows,) long) -> edited x` (same shape).

    Returns the new hidden state in the original dtype, or None when no row is active.
    """
    batch = hidden.shape[0]
    # row indices are found on the CPU (alphas live there), so no device sync is needed
    rows = torch.arange(batch) if active is None else active.cpu().nonzero().flatten()
    if rows.numel() == 0:
        return None
    rows = rows.to(hidden.device)
    work = torch.promote_types(hidden.dtype, torch.float32)
    if callable(positions):
        mask = positions((batch, hidden.shape[1])).to(hidden.device)
        if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"a position mask must be bool of shape {tuple(hidden.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        out = hidden.clone()
        edited = fn(hidden[rows].to(work), rows).to(hidden.dtype)
        out[rows] = torch.where(mask[rows].unsqueeze(-1), edited, hidden[rows])
        return out
    if rows.numel() == batch and positions == "all":
        return fn(hidden.to(work), rows).to(hidden.dtype)
    cols = slice(None) if positions == "all" else slice(-1, None)
    out = hidden.clone()
    out[rows, cols] = fn(hidden[rows, cols].to(work), rows).to(hidden.dtype)
    return out


def sae_param_dtype(sae: Any) -> tuple[torch.dtype, torch.device | None]:
    """dtype and device of the SAE's parameters (float32 / unknown device when it has none)."""
    params = list(sae.parameters()) if hasattr(sae, "parameters") else []
    if not params:
        return torch.float32, None
    return params[0].dtype, params[0].device


def sae_round_trip(
    sae: Any, x: torch.Tensor, edit_latents: Callable[[torch.Tensor], torch.Tensor], who: str
) -> torch.Tensor:
    """Edit `x (rows, pos, d_in)` in SAE space, keeping the reconstruction error.

    `z = encode(x)`, `z' = edit_latents(z (rows, pos, d_sae))`, and the result is
    `x + decode(z') - decode(z)`, which equals `decode(z') + (x - decode(z))` (the error term is kept) but
    loses less precision. Computed in the SAE's dtype/device, returned in `x`'s dtype/device.
    """
    dtype, device = sae_param_dtype(sae)
    rows, pos, d_in = x.shape
    flat = x.reshape(rows * pos, d_in).to(dtype=dtype, device=device or x.device)
    with torch.no_grad():
        z = sae.encode(flat)
        if z.ndim != 2 or z.shape[0] != flat.shape[0]:
            raise ValueError(f"{who}: sae.encode returned shape {tuple(z.shape)}, expected (n, d_sae)")
        z_new = edit_latents(z.reshape(rows, pos, -1)).reshape(z.shape).to(z.dtype)
        change = sae.decode(z_new) - sae.decode(z)
    if change.shape != flat.shape:
        raise ValueError(f"{who}: sae.decode returned shape {tuple(change.shape)}, expected {tuple(flat.shape)} "
                         "(does the SAE's d_in match the model's d_model?)")
    return x + change.reshape(rows, pos, d_in).to(dtype=x.dtype, device=x.device)


def check_sae_width(sae: Any, d_model: int, who: str) -> None:
    """Raise early when the SAE declares an input width different from the model's d_model."""
    w_dec = getattr(sae, "W_dec", None)
    if isinstance(w_dec, torch.Tensor) and w_dec.ndim == 2 and w_dec.shape[1] != d_model:
        raise ValueError(f"{who}: SAE d_in is {w_dec.shape[1]} but the model's d_model is {d_model}")


def feature_index(feature_ids: Sequence[int], who: str) -> torch.Tensor:
    """Feature ids as a long tensor; raise on an empty or negative list."""
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"{who}: feature_ids must be a non-empty list of ints")
    if (ids < 0).any():
        raise ValueError(f"{who}: feature ids must be non-negative, got {ids.tolist()}")
    return ids
