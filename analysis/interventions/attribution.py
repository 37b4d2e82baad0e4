"""Attribution patching (a first-order estimate of activation patching) and its validation.

For a clean prompt and a corrupted one, the effect of patching unit i of the activation e at `layer` from
its clean to its corrupted value on a metric L (e.g. the log-probability of refusing) is approximated by

    score_i = Σ_positions (e_corrupt − e_clean)_i · ∂L/∂e_i |clean

with ONE clean forward (with gradients), ONE corrupted forward (no gradients) and ONE backward. Units are
either the d_model residual coordinates at `layer`, or the latents of an SAE at that layer
(x = decode(z) + err; z is made a leaf that requires grad inside the hook, the error is held fixed).
`activation_patching` measures the real ΔL of patching each unit, one forward per unit, and
`validate_attribution` reports the Spearman rank correlation between the two.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from activations.progress import progress_bar

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.tokenize import position_ids_from_mask
from analysis.interventions.core import check_sae_width, sae_param_dtype
from analysis.evaluation.logit_metrics import Metric, evaluate_metric, resolve_metric


@dataclass(frozen=True)
class Attribution:
    """Attribution scores of one layer; all tensors float64 on CPU.

    scores: `(batch, n_units)` Σ_pos delta · grad; gradients, deltas: `(batch, n_pos, n_units)`;
    clean_metric, corrupt_metric: `(batch,)`. `space` is "residual" or "sae".
    """

    scores: torch.Tensor
    gradients: torch.Tensor
    deltas: torch.Tensor
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    layer: int
    space: str
    positions: tuple[int, ...]

    def mean_scores(self) -> torch.Tensor:
        """Scores averaged over prompt pairs, `(n_units,)`."""
        return self.scores.mean(0)

    def top_units(self, n: int) -> list[int]:
        """The `n` units with the largest |mean score|, largest first."""
        if n <= 0:
            raise ValueError(f"top_units: n must be positive, got {n}")
        order = torch.argsort(self.mean_scores().abs(), descending=True)
        return order[:n].tolist()


def resolve_positions(positions: str | Sequence[int], clean_len: int, corrupt_len: int) -> tuple[int, ...]:
    """Position indices used for both prompts: "last" → (-1,), "all" → every position (same lengths needed).

    Non-negative indices count from the start of the padded sequence and need equal lengths; negative ones
    count from the end, which lines up left-padded prompts of different lengths.
    """
    if positions == "last":
        return (-1,)
    if positions == "all":
        if clean_len != corrupt_len:
            raise ValueError(f"positions='all' needs clean and corrupt prompts of equal length, got {clean_len} "
                             f"and {corrupt_len} (encode them in one padded batch)")
        return tuple(range(-clean_len, 0))
    if isinstance(positions, str):
        raise ValueError(f"positions must be 'last', 'all' or a list of ints, got {positions!r}")
    resolved = tuple(int(p) for p in positions)
    if not resolved:
        raise ValueError("positions: empty list")
    shortest = min(clean_len, corrupt_len)
    for p in resolved:
        if p >= 0 and clean_len != corrupt_len:
            raise ValueError(f"position {p} counts from the start but the prompts have different lengths "
                             f"({clean_len}, {corrupt_len}); use negative indices")
        if not -shortest <= p < shortest:
            raise ValueError(f"position {p} out of range for sequences of length {shortest}")
    return tuple(p - clean_len if p >= 0 else p for p in resolved)


def prepare_inputs(adapter: ModelAdapter, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the model inputs to the model's device (as normal, non-inference tensors) and add
    `position_ids` from the attention mask so left-padded rows get the positions of an unpadded run."""
    if "input_ids" not in inputs:
        raise ValueError("model inputs need 'input_ids' (use activations.tokenize.encode_prompts)")
    out = {k: v.clone().to(adapter.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if "attention_mask" in out and "position_ids" not in out:
        out["position_ids"] = position_ids_from_mask(out["attention_mask"])
    return out


def run_logits(adapter: ModelAdapter, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Final logits `(batch, seq, vocab)` of one forward without a KV cache."""
    return adapter.model(**inputs, use_cache=False).logits


def encode_latents(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """SAE latents of `x (batch, n_pos, d_in)` → `(batch, n_pos, d_sae)` in the SAE's dtype (no grad)."""
    dtype, device = sae_param_dtype(sae)
    batch, n_pos, d_in = x.shape
    with torch.no_grad():
        z = sae.encode(x.reshape(batch * n_pos, d_in).to(dtype=dtype, device=device or x.device))
    if z.ndim != 2 or z.shape[0] != batch * n_pos:
        raise ValueError(f"sae.encode returned shape {tuple(z.shape)}, expected ({batch * n_pos}, d_sae)")
    return z.reshape(batch, n_pos, -1)


def corrupt_pass(
    adapter: ModelAdapter, inputs: dict[str, torch.Tensor], layer: int, metric: Metric, pos: tuple[int, ...],
    sae: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward without gradients: (units at `pos` `(batch, n_pos, n_units)`, metric `(batch,)`)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(hidden: torch.Tensor) -> None:
        captured["hidden"] = hidden.detach()[:, list(pos)]

    with torch.no_grad(), residual_hooks(adapter, {layer: keep}):
        values = evaluate_metric(metric, run_logits(adapter, inputs))
    units = captured["hidden"] if sae is None else encode_latents(sae, captured["hidden"])
    return units, values


def clean_pass_with_grad(
    adapter: ModelAdapter, inputs: dict[str, torch.Tensor], layer: int, metric: Metric, pos: tuple[int, ...],
    sae: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward with a grad leaf at `layer`, one backward.

    Returns (units at `pos` `(batch, n_pos, n_units)`, ∂L/∂units (same shape), metric `(batch,)`). The
    forward values are exactly the clean ones: in SAE space x is replaced by x + (decode(z) − decode(z)
    detached), which is x to the bit but routes the gradient to the leaf z.
    """
    leaves: dict[str, torch.Tensor] = {}

    def make_leaf(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.detach()
        if sae is None:
            leaf = x.clone().requires_grad_(True)
            leaves["leaf"] = leaf
            return leaf
        z = encode_latents(sae, x[:, list(pos)]).requires_grad_(True)
        leaves["leaf"] = z
        recon = sae.decode(z.reshape(-1, z.shape[-1]))
        bump = torch.zeros_like(x)
        bump[:, list(pos)] = (recon - recon.detach()).reshape(x.shape[0], len(pos), -1).to(x.dtype)
        return x + bump

    with torch.inference_mode(False), torch.enable_grad(), residual_hooks(adapter, {layer: make_leaf}):
        # clone here so inputs made under inference_mode become ordinary tensors autograd can use
        values = evaluate_metric(metric, run_logits(adapter, {k: v.clone() for k, v in inputs.items()}))
        leaf = leaves["leaf"]
        (grad,) = torch.autograd.grad(values.sum(), [leaf], allow_unused=True)
    if grad is None:
        raise ValueError(f"metric does not depend on layer {layer}: its gradient is missing")
    units = leaf.detach() if sae is not None else leaf.detach()[:, list(pos)]
    grad = grad if sae is not None else grad[:, list(pos)]
    return units, grad, values.detach()


def _checked_inputs(
    adapter: ModelAdapter, clean: Mapping[str, torch.Tensor], corrupt: Mapping[str, torch.Tensor], layer: int,
    sae: Any, positions: str | Sequence[int],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[int, ...]]:
    adapter.check_layer(layer)
    if sae is not None:
        check_sae_width(sae, adapter.d_model, "attribution")
    clean_in, corrupt_in = prepare_inputs(adapter, clean), prepare_inputs(adapter, corrupt)
    if clean_in["input_ids"].shape[0] != corrupt_in["input_ids"].shape[0]:
        raise ValueError(f"clean and corrupt batches differ in size: {clean_in['input_ids'].shape[0]} vs "
                         f"{corrupt_in['input_ids'].shape[0]}")
    pos = resolve_positions(positions, clean_in["input_ids"].shape[1], corrupt_in["input_ids"].shape[1])
    return clean_in, corrupt_in, pos


def attribution_patching(
    adapter: ModelAdapter,
    clean: Mapping[str, torch.Tensor],
    corrupt: Mapping[str, torch.Tensor],
    layer: int,
    metric: Metric | int | Sequence[int],
    sae: Any = None,
    positions: str | Sequence[int] = "last",
) -> Attribution:
    """Score every unit at `layer` by (e_corrupt − e_clean) · ∂L/∂e_clean, summed over `positions`.

    Args:
        clean, corrupt: model inputs (`input_ids`, `attention_mask`, left padded), same batch size; row b of
            `corrupt` is the counterfactual of row b of `clean`.
        metric: callable logits `(batch, seq, vocab)` → `(batch,)` (see `analysis.evaluation.logit_metrics`), or a token
            id / list of ids (log-probability of that set at the last position).
        sae: None for residual units (d_model), or an SAE (`encode`/`decode`) for latent units (d_sae).
        positions: "last" (default), "all" or a list of indices (negative = from the end).
    """
    metric = resolve_metric(metric)
    clean_in, corrupt_in, pos = _checked_inputs(adapter, clean, corrupt, layer, sae, positions)
    corrupt_units, corrupt_values = corrupt_pass(adapter, corrupt_in, layer, metric, pos, sae)
    clean_units, grad, clean_values = clean_pass_with_grad(adapter, clean_in, layer, metric, pos, sae)
    deltas = (corrupt_units.double() - clean_units.double()).cpu()
    gradients = grad.double().cpu()
    return Attribution(
        scores=(deltas * gradients).sum(1), gradients=gradients, deltas=deltas,
        clean_metric=clean_values.double().cpu(), corrupt_metric=corrupt_values.double().cpu(),
        layer=layer, space="residual" if sae is None else "sae", positions=pos,
    )


@dataclass(frozen=True)
class Patching:
    """Measured effects: `effects (batch, len(units))` = L(clean with unit patched) − L(clean), float64."""

    units: list[int]
    effects: torch.Tensor
    clean_metric: torch.Tensor


def activation_patching(
    adapter: ModelAdapter,
    clean: Mapping[str, torch.Tensor],
    corrupt: Mapping[str, torch.Tensor],
    layer: int,
    metric: Metric | int | Sequence[int],
    sae: Any = None,
    positions: str | Sequence[int] = "last",
    units: Sequence[int] | None = None,
) -> Patching:
    """Patch each unit (all, or the listed `units`) from its clean to its corrupted value, one forward each.

    Residual units replace `e[:, pos, i]`; SAE units replace latent i and edit x by decode(z') − decode(z)
    (error term kept). Returns ΔL per row and unit.
    """
    metric = resolve_metric(metric)
    clean_in, corrupt_in, pos = _checked_inputs(adapter, clean, corrupt, layer, sae, positions)
    corrupt_units, _ = corrupt_pass(adapter, corrupt_in, layer, metric, pos, sae)
    with torch.no_grad():
        clean_values = evaluate_metric(metric, run_logits(adapter, clean_in)).double().cpu()
    n_units = corrupt_units.shape[-1]
    chosen = list(range(n_units)) if units is None else [int(u) for u in units]
    if not chosen or min(chosen) < 0 or max(chosen) >= n_units:
        raise ValueError(f"units must be a non-empty list of indices in 0..{n_units - 1}")
    cols = list(pos)
    effects = torch.empty(clean_values.shape[0], len(chosen), dtype=torch.float64)
    for j, unit in enumerate(progress_bar(chosen, desc=f"patching layer {layer}", leave=False)):

        def patch(hidden: torch.Tensor, unit: int = unit) -> torch.Tensor:
            out = hidden.clone()
            if sae is None:
                out[:, cols, unit] = corrupt_units[..., unit].to(hidden.dtype)
                return out
            z = encode_latents(sae, hidden[:, cols])
            z_new = z.clone()
            z_new[..., unit] = corrupt_units[..., unit].to(z.dtype)
            with torch.no_grad():
                change = sae.decode(z_new.reshape(-1, z.shape[-1])) - sae.decode(z.reshape(-1, z.shape[-1]))
            out[:, cols] = (hidden[:, cols] + change.reshape(hidden.shape[0], len(cols), -1).to(hidden.dtype))
            return out

        with torch.no_grad(), residual_hooks(adapter, {layer: patch}):
            patched = evaluate_metric(metric, run_logits(adapter, clean_in)).double().cpu()
        effects[:, j] = patched - clean_values
    return Patching(units=chosen, effects=effects, clean_metric=clean_values)


@dataclass(frozen=True)
class AttributionCheck:
    """Spearman rank correlation over units between mean attribution score and mean patching effect."""

    spearman: float
    p_value: float
    n_units: int
    attribution: Attribution
    patching: Patching


def validate_attribution(
    adapter: ModelAdapter,
    clean: Mapping[str, torch.Tensor],
    corrupt: Mapping[str, torch.Tensor],
    layer: int,
    metric: Metric | int | Sequence[int],
    sae: Any = None,
    positions: str | Sequence[int] = "last",
    top_n: int | None = None,
) -> AttributionCheck:
    """Run attribution patching and real activation patching (on all units, or the `top_n` by |score|)
    and report their Spearman rank correlation (scipy.stats.spearmanr, over the units' row means)."""
    from scipy.stats import spearmanr

    attribution = attribution_patching(adapter, clean, corrupt, layer, metric, sae, positions)
    units = None if top_n is None else attribution.top_units(top_n)
    patching = activation_patching(adapter, clean, corrupt, layer, metric, sae, positions, units)
    predicted = attribution.mean_scores()[patching.units].numpy()
    measured = patching.effects.mean(0).numpy()
    if len(patching.units) < 3:
        raise ValueError("validate_attribution needs at least 3 units for a rank correlation")
    result = spearmanr(predicted, measured)
    return AttributionCheck(float(result.statistic), float(result.pvalue), len(patching.units), attribution, patching)
