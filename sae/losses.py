"""Loss terms of SAE training, each returned separately so it can be logged.

- `fvu`: fraction of variance unexplained (normalised MSE) — the reconstruction objective.
- `auxk`: AuxK (Gao et al. 2024): the top-k_aux *dead* latents reconstruct the residual
  `x - x_hat` (detached); the gradient reaches their encoder columns and revives them.
- `l1`: mean over rows of the L1 norm of the latent activations (decoder rows are unit norm).
- `contrastive`: supervised contrastive loss (SupCon, Khosla et al. 2020) on L2-normalised codes:
  rows of the same refusal category are pulled together, everything else (benign, other
  categories) is pushed apart. Uses the (batch, batch) Gram matrix of normalised codes only.

A non-finite term stops training with `NonFiniteLossError` naming the term and step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from activations.records import CATEGORIES, REFUSAL_CATEGORIES
from sae.config import SAEConfig
from sae.model import ForwardOutput, total_variance

TERM_NAMES: tuple[str, ...] = ("fvu", "auxk", "l1", "contrastive", "total")
ANCHOR_CLASS_IDS: tuple[int, ...] = tuple(CATEGORIES.index(c) for c in REFUSAL_CATEGORIES)
"""Class ids (indices into CATEGORIES) whose rows are contrastive anchors; benign/contrast are not."""


class LossTerms(NamedTuple):
    """Float32 scalars; `total` = fvu + auxk_coeff·auxk + l1_coeff·l1 + contrastive_coeff·contrastive."""

    fvu: Tensor
    auxk: Tensor
    l1: Tensor
    contrastive: Tensor
    total: Tensor


class NonFiniteLossError(ValueError):
    """A loss term became NaN or infinite."""


def auxk_loss(x: Tensor, out: ForwardOutput, variance: Tensor | None = None) -> Tensor:
    """AuxK loss: `aux_scale * ||aux_x_hat - (x - x_hat)||² / total variance` (0 when unused).

    `variance`: the denominator (default: the batch's total variance; see `sae.step.ddp_variance`).
    """
    if out.aux_x_hat is None or out.aux_scale is None:
        return out.fvu.new_zeros(())
    target = x.to(torch.float32)
    residual = (target - out.x_hat.to(torch.float32)).detach()
    denominator = total_variance(target) if variance is None else variance
    return out.aux_scale * F.mse_loss(out.aux_x_hat.to(torch.float32), residual, reduction="sum") / denominator


def l1_penalty(latent_values: Tensor) -> Tensor:
    """Mean over rows of the L1 norm of `(batch, n)` latent activations."""
    return latent_values.to(torch.float32).abs().sum(dim=-1).mean()


def supervised_contrastive(
    latent_values: Tensor, latent_indices: Tensor, labels: Tensor, d_sae: int, temperature: float
) -> Tensor:
    """SupCon loss on sparse codes.

    Args:
        latent_values, latent_indices: `(batch, n)` sparse codes.
        labels: `(batch,)` int64 class ids (indices into CATEGORIES; -1 = unknown).
        temperature: cosine similarities are divided by it.
    Returns:
        Mean over anchors (refusal-category rows with at least one same-label row in the batch) of
        `-mean_{p in P(a)} log softmax_{b != a}(cos(a, b) / T)[p]`; 0 when the batch has no anchor.
    """
    batch = latent_values.shape[0]
    codes = latent_values.new_zeros(batch, d_sae, dtype=torch.float32)
    codes = codes.scatter_add(1, latent_indices, latent_values.to(torch.float32))  # (batch, d_sae)
    normed = F.normalize(codes, dim=1)
    self_pair = torch.eye(batch, dtype=torch.bool, device=codes.device)
    logits = (normed @ normed.t() / temperature).masked_fill(self_pair, float("-inf"))  # (batch, batch)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    anchors = torch.isin(labels, torch.tensor(ANCHOR_CLASS_IDS, device=labels.device))
    positives = (labels[:, None] == labels[None, :]) & ~self_pair & anchors[:, None]
    n_pos = positives.sum(dim=1)
    valid = n_pos > 0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    return -(mean_log_prob * valid).sum() / valid.sum().clamp_min(1)


def compute_loss_terms(x: Tensor, out: ForwardOutput, cfg: SAEConfig, labels: Tensor | None = None,
                       variance: Tensor | None = None) -> LossTerms:
    """All loss terms for one SAE on one batch `x (batch, d_in)`; terms with coefficient 0 are 0.

    `variance`: denominator of the AuxK term (default: the batch's total variance)."""
    zero = out.fvu.new_zeros(())
    aux = auxk_loss(x, out, variance) if cfg.auxk_coeff > 0 else zero
    l1 = l1_penalty(out.latent_values) if cfg.l1_coeff > 0 else zero
    contrastive = zero
    if cfg.contrastive_coeff > 0 and labels is not None:
        contrastive = supervised_contrastive(
            out.latent_values, out.latent_indices, labels, out.d_sae, cfg.contrastive_temperature
        )
    total = out.fvu + cfg.auxk_coeff * aux + cfg.l1_coeff * l1 + cfg.contrastive_coeff * contrastive
    return LossTerms(out.fvu, aux, l1, contrastive, total)


def check_finite(terms: LossTerms, step: int, seed: int | None = None) -> None:
    """Raise `NonFiniteLossError` naming the first non-finite term (synchronises with the device)."""
    for name, value in zip(TERM_NAMES, terms):
        if not bool(torch.isfinite(value).all()):
            where = f" of seed {seed}" if seed is not None else ""
            raise NonFiniteLossError(f"non-finite loss term '{name}' = {float(value)} at step {step}{where}")


class NonFiniteMonitor:
    """Records, on the device and without host syncs, the first step each term went non-finite.

    `record` is called every step; `raise_if_bad` (a host sync) at logging intervals and at the end.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)
        self.first_bad: Tensor | None = None  # (n_seeds, n_terms) int64, -1 = fine so far

    def record(self, seed_index: int, terms: LossTerms, step: int) -> None:
        values = torch.stack([t.detach().to(torch.float32) for t in terms])
        if self.first_bad is None or self.first_bad.device != values.device:
            self.first_bad = torch.full((len(self.seeds), len(TERM_NAMES)), -1, dtype=torch.int64, device=values.device)
        row = self.first_bad[seed_index]
        bad = ~torch.isfinite(values)
        self.first_bad[seed_index] = torch.where((row < 0) & bad, torch.full_like(row, step), row)

    def raise_if_bad(self) -> None:
        if self.first_bad is None:
            return
        first = self.first_bad.cpu()
        hits = [(int(first[i, j]), j, i) for i in range(first.shape[0]) for j in range(first.shape[1]) if first[i, j] >= 0]
        if hits:
            step, term, seed_index = min(hits)
            raise NonFiniteLossError(
                f"non-finite loss term '{TERM_NAMES[term]}' at step {step} of seed {self.seeds[seed_index]}"
            )
