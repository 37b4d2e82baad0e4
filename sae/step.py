"""The SAE training step, shared by the Lightning module and a bare loop (benchmarks, quick tests).

One step for one seed: forward (with the dead-latent mask when AuxK is on) → loss terms → tracker
update. `BareTrainer` adds backward, parallel-gradient removal, Adam and decoder renormalisation
for several seeds without Lightning; `SAELightningModule` does the same inside `Trainer.fit`.
With `fused=True` the last three happen inside `FusedAdam` (`sae/kernels/fused.py` explains the path).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from sae.kernels import triton as triton_kernels
from sae.config import SAEConfig, default_lr
from sae.kernels.adam import FusedAdam
from sae.losses import LossTerms, compute_loss_terms
from sae.model import ForwardOutput, SparseAutoencoder
from sae.tracking import LatentTracker


def seed_step_loss(
    sae: SparseAutoencoder,
    tracker: LatentTracker,
    x: Tensor,
    labels: Tensor | None,
    cfg: SAEConfig,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    variance: Tensor | None = None,
) -> tuple[LossTerms, ForwardOutput]:
    """Loss terms of one SAE on a batch `x (batch, d_in)`; updates its latent tracker.

    `variance`: the denominator of the FVU-type terms (default: this batch's total variance;
    data-parallel ranks pass `ddp_variance`).
    """
    # AuxK only while some latent is dead: with none its term and gradient are exactly 0
    dead, n_dead = None, 0
    if cfg.auxk_coeff > 0:
        if sae.shard is not None:  # latent-parallel: this shard's dead latents, and how many are dead in all
            dead, n_dead = tracker.shard_dead_ids()
        else:
            dead = tracker.dead_ids()
            n_dead = dead.shape[0]
    out = sae(x, dead_ids=dead, variance=variance, n_dead=n_dead) if n_dead > 0 else sae(x, variance=variance)
    terms = compute_loss_terms(x, out, cfg, labels, variance)
    tracker.update(out.latent_values.detach(), out.latent_indices, all_reduce)
    return terms, out


class BareTrainer:
    """Several seeds' SAEs + trackers + one Adam, stepped by hand (no Lightning).

    Args:
        cfg: SAE configuration; seeds: one SAE per seed.
        lr: Adam learning rate (None = width-scaled default).
        device: where to train; autocast_dtype: e.g. torch.bfloat16 for mixed precision.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        seeds: list[int],
        lr: float | None = None,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 6.25e-10,
        fused: bool = False,
        exp_avg_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg, self.seeds, self.fused = cfg, list(seeds), fused
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.saes = [SparseAutoencoder(cfg, seed=s, device=self.device) for s in self.seeds]
        self.trackers = [LatentTracker(cfg.num_latents, cfg.dead_tokens_threshold).to(self.device) for _ in self.seeds]
        self.optimizer = make_optimizer(self.saes, lr or default_lr(cfg.num_latents), adam_betas, adam_eps, fused,
                                        exp_avg_dtype=exp_avg_dtype)

    def step(self, x: Tensor, labels: Tensor | None = None) -> list[LossTerms]:
        """One optimisation step of every seed on the same batch; returns each seed's loss terms."""
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            results = [seed_step_loss(sae, tr, x, labels, self.cfg)[0] for sae, tr in zip(self.saes, self.trackers)]
            total = torch.stack([terms.total for terms in results]).sum()
        total.backward()
        if not self.fused:
            for sae in self.saes:
                sae.remove_parallel_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.fused:
            for sae in self.saes:
                sae.normalize_decoder()
        return results


def make_optimizer(
    saes: list[SparseAutoencoder],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool,
    names: list[str] | None = None,
    exp_avg_dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> torch.optim.Optimizer:
    """The fused path's `FusedAdam` (switches the SAEs to it; `world_size` > 1: data-parallel), or
    torch Adam (fused kernel on CUDA)."""
    for sae in saes:
        sae.use_fused_training(fused)
    if fused:
        return FusedAdam(saes, lr=lr, betas=betas, eps=eps, names=names, exp_avg_dtype=exp_avg_dtype,
                         world_size=world_size)
    groups = [{"params": list(sae.parameters()), **({"name": names[i]} if names else {})} for i, sae in enumerate(saes)]
    cuda = all(p.device.type == "cuda" for sae in saes for p in sae.parameters())
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=True if cuda else None)


def fused_supported(device: torch.device, d_in: int) -> bool:
    """The fused path's default: on where its Triton kernels run (data-parallel too, `sae/kernels/ddp.py`)."""
    return triton_kernels.available(device) and d_in <= triton_kernels.MAX_D


@torch.no_grad()
def ddp_variance(x: Tensor, all_reduce: Callable[[Tensor], Tensor], world_size: int) -> Tensor:
    """The FVU denominator a data-parallel rank uses: the *global* batch's total variance
    `sum_b ||x_b - mean||²` (mean over all ranks' rows) divided by `world_size`.

    Each rank's loss is then `world_size` × its rows' share of the global-batch loss, so averaging
    the ranks' gradients (DDP) gives exactly the gradient of one device stepping the global batch.
    """
    x32 = x.to(torch.float32)
    mean = all_reduce(x32.sum(dim=0)) / (x.shape[0] * world_size)
    return all_reduce(((x32 - mean) ** 2).sum()) / world_size
