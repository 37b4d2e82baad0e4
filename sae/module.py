"""LightningModule that trains one SAE per seed, all on the same batch each step.

Every seed has its own `SparseAutoencoder` (initialised from its own seed) and `LatentTracker`;
one Adam optimizer (fused on CUDA) holds one parameter group per seed. Because the seeds share no
parameters, minimising the sum of their losses is the same as training each alone.
Each step: forward + loss terms per seed → backward → remove the gradient component parallel to
each decoder row → Adam → renormalise decoder rows. No host syncs except at logging intervals.
On a CUDA device the fused path (`sae/kernels/fused.py`) does the last three in one pass per matrix.
With several devices, Lightning's DDP replicates all seeds on every rank and averages the dense
gradients (b_enc, b_dec); on the fused path the matrices' deferred gradient entries are gathered
from every rank instead (`sae/kernels/ddp.py`). Each rank's FVU-type terms use the global batch's
variance (`sae.step.ddp_variance`), so the update equals one device stepping the global batch; the
data module gives each rank its own lanes of that batch. With the `seed_parallel`
strategy (`sae/seed_parallel.py`) each rank instead trains its own seeds on the whole batch; with
`latent_parallel` (`sae/latent_parallel.py`) each rank trains a slice of every SAE's latents on the
whole batch.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from sae.config import OptimConfig, SAEConfig, as_config, default_lr
from sae.divergence import DivergenceMonitor
from sae.kernels.latent_shard import LatentShard
from sae.latent_parallel import LatentParallelStrategy, gather_sae, shard_checkpoint_, whole_checkpoint_
from sae.losses import TERM_NAMES, NonFiniteMonitor, check_finite
from sae.model import SparseAutoencoder
from sae.seed_parallel import (
    OPTIMIZER_KEY, SeedParallelStrategy, gather_optimizer_states, optimizer_state_for_rank, owned_indices,
    sync_seed_states,
)
from sae.step import ddp_variance, fused_supported, make_optimizer, seed_step_loss
from sae.tracking import LatentTracker, density_histogram, density_summary, l0_norm


DIVERGENCE_KEY = "divergence_monitor"
"""Key of the divergence monitor's state in a checkpoint."""


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over all ranks (a new tensor; no host sync)."""
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out


class SAELightningModule(pl.LightningModule):
    """Trains `len(seeds)` SAEs of the same configuration in one process.

    Args:
        sae: the SAE configuration (shared by every seed; d_in must be set).
        seeds: one SAE per seed; the seed sets its weight initialisation.
        optim: Adam, schedule and training path (`sae.config.OptimConfig`; a dict of its fields works too).
    """

    def __init__(self, sae: SAEConfig | dict, seeds: list[int] | None = None,
                 optim: OptimConfig | dict | None = None) -> None:
        super().__init__()
        cfg = SAEConfig.from_dict(sae) if isinstance(sae, dict) else sae
        opt = as_config(optim, OptimConfig)
        seeds = [0] if seeds is None else [int(s) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
        if not cfg.trainable:
            raise ValueError(f"architecture {cfg.architecture!r} can be loaded but not trained; use topk or batchtopk")
        if cfg.d_in is None:
            raise ValueError("the SAE's d_in is not set (SAEConfig.for_input(store d_model))")
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"sae": cfg.to_dict(), "seeds": seeds,
                                   "optim": {**asdict(opt), "adam_betas": list(opt.adam_betas)}})
        self.cfg, self.seeds, self.optim_cfg = cfg, seeds, opt
        self.lr = opt.lr if opt.lr is not None else default_lr(cfg.num_latents)
        self.lr_warmup_steps, self.lr_decay_frac = opt.lr_warmup_steps, opt.lr_decay_frac
        self.adam_betas, self.adam_eps = opt.adam_betas, opt.adam_eps
        self.init_b_dec, self.check_finite_every_step = opt.init_b_dec, opt.check_finite_every_step
        self.fused_request, self.exp_avg_dtype = opt.fused, getattr(torch, opt.exp_avg_dtype)
        self.fused = False  # decided in setup / configure_optimizers, once the device is known
        self._fused_decided = False
        self.saes = nn.ModuleList([SparseAutoencoder(cfg, seed=s) for s in seeds])
        self.trackers = nn.ModuleList([LatentTracker(cfg.num_latents, cfg.dead_tokens_threshold) for _ in seeds])
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._whole_saes: list[SparseAutoencoder] | None = None  # latent-parallel: gathered at the end
        self.monitor = NonFiniteMonitor(seeds)
        self.divergence = DivergenceMonitor(seeds, opt.diverge_factor, opt.diverge_steps)

    # ---- setup --------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule if datamodule is not None and hasattr(datamodule, "d_model") else None

    def setup(self, stage: str) -> None:
        """Check d_in against the activation store before anything is allocated on the device; choose
        the training path before DDP wraps the module (the fused path's matrices are not DDP's)."""
        datamodule = self._datamodule()
        if datamodule is not None and datamodule.d_model != self.cfg.d_in:
            raise ValueError(
                f"SAE d_in={self.cfg.d_in} does not match the activation store's d_model={datamodule.d_model} "
                f"({datamodule.shards_dir})"
            )
        self._decide_fused(self.trainer.strategy.root_device)
        shard = self.latent_shard()
        if shard is not None and self.saes[0].shard is None:
            for sae, tracker in zip(self.saes, self.trackers):
                sae.shard_latents(shard)
                tracker.shard_range = (shard.lo, shard.hi)

    def _grad_sync(self) -> bool:
        """True under data parallelism (several ranks averaging gradients)."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return world_size > 1 and not self.seed_parallel and not self.latent_parallel

    def _decide_fused(self, device: torch.device) -> None:
        if self._fused_decided:
            return
        supported = fused_supported(device, self.cfg.d_in)
        self.fused = supported if self.fused_request is None else bool(self.fused_request)
        if self.latent_parallel:  # its step exists on the fused path only (torch reference off CUDA)
            if self.fused_request is False:
                raise ValueError("latent_parallel trains on the fused path only; leave optim.fused unset or true")
            self.fused = True
        self._fused_decided = True
        if self.fused and self._grad_sync():  # their gradients are gathered by FusedAdam, not all-reduced by DDP
            self._ddp_params_and_buffers_to_ignore = [
                f"saes.{i}.{name}" for i in range(len(self.saes)) for name in ("W_enc_rows", "W_dec")]

    def on_fit_start(self) -> None:
        """Data-dependent initialisation, once (a resumed run restores it from the checkpoint)."""
        datamodule = self._datamodule()
        if datamodule is not None and not bool(self.initialized):
            self.initialize_from_sample(datamodule.sample_rows().to(self.device))

    @torch.no_grad()
    def initialize_from_sample(self, sample: Tensor) -> None:
        """Input scale and b_dec from a data sample `(n, d_in)` (identical for every seed and rank)."""
        for sae in self.saes:
            sae.init_input_scale(sample)
            if self.init_b_dec == "geometric_median":
                sae.init_b_dec_geometric_median(sample)
            elif self.init_b_dec == "mean":
                sae.b_dec.copy_((sample.to(torch.float64).mean(0) * float(sae.input_scale)).to(sae.b_dec))
            if self._trainer is not None and self.trainer.world_size > 1:  # float reductions may differ by rank
                for tensor in (sae.b_dec, sae.input_scale):
                    tensor.copy_(self.trainer.strategy.broadcast(tensor.detach().clone(), src=0))
        self.initialized.fill_(True)

    # ---- seed parallelism ---------------------------------------------------------------------
    @property
    def seed_parallel(self) -> bool:
        """True under the seed_parallel strategy: this rank trains only `owned()` seeds."""
        return self._trainer is not None and isinstance(self.trainer.strategy, SeedParallelStrategy)

    @property
    def latent_parallel(self) -> bool:
        """True under the latent_parallel strategy: this rank trains a slice of every SAE's latents."""
        return self._trainer is not None and isinstance(self.trainer.strategy, LatentParallelStrategy)

    def latent_shard(self) -> LatentShard | None:
        """This rank's latents under latent_parallel (None otherwise)."""
        if not self.latent_parallel:
            return None
        return LatentShard(self.trainer.global_rank, self.trainer.world_size, self.cfg.num_latents)

    def saes_for_export(self) -> list[Any]:
        """Whole SAEs to score and export (collective: every rank calls it). Latent-parallel: gathered
        from every rank's shard; seed-parallel: each seed copied from its owner; else the SAEs."""
        self.sync_seed_states()
        if self._whole_saes is None:
            self._whole_saes = [gather_sae(sae) for sae in self.saes]
        return self._whole_saes

    def on_train_end(self) -> None:
        """Latent-parallel: hold the whole SAEs from now on (after every callback's end-of-run
        checkpoint and export), so the module's state_dict is a one-device run's (a fork / spawn
        launcher copies rank 0's into the parent process)."""
        if self.saes[0].shard is not None:
            self.saes = nn.ModuleList(self.saes_for_export())
            for tracker in self.trackers:
                tracker.shard_range = None

    def owned(self) -> list[int]:
        """Indices of the seeds this process trains (all of them unless seed-parallel)."""
        if not self.seed_parallel:
            return list(range(len(self.seeds)))
        return owned_indices(len(self.seeds), self.trainer.global_rank, self.trainer.world_size)

    def sync_seed_states(self) -> None:
        """Seed-parallel: copy every seed's weights and statistics from its owner to all ranks."""
        if self.seed_parallel and self.trainer.world_size > 1:
            sync_seed_states(list(self.saes), self.trainer.world_size)
            sync_seed_states(list(self.trackers), self.trainer.world_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The divergence streaks; seed-parallel checkpoints hold every seed's weights and optimizer
        state (all ranks call this)."""
        checkpoint[DIVERGENCE_KEY] = self.divergence.state_dict()
        shard = self.saes[0].shard
        if shard is not None:  # whole weights and moments, as a one-device run writes them
            whole_checkpoint_(checkpoint, list(self.saes), shard)
        if self.seed_parallel and self.trainer.world_size > 1:
            self.sync_seed_states()  # in place: the dumped state_dict shares these tensors
            checkpoint[OPTIMIZER_KEY] = gather_optimizer_states(
                self.trainer.optimizers[0], list(self.saes), self.owned(), self.trainer.world_size
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the divergence streaks; give this rank's optimizer the saved states of the seeds it owns."""
        self.divergence.load_state_dict(checkpoint.get(DIVERGENCE_KEY) or {}, self.device)
        shard = self.saes[0].shard
        if shard is not None:
            shard_checkpoint_(checkpoint, list(self.saes), shard)
        if OPTIMIZER_KEY in checkpoint and checkpoint.get("optimizer_states"):
            checkpoint["optimizer_states"] = [optimizer_state_for_rank(
                checkpoint[OPTIMIZER_KEY], checkpoint["optimizer_states"][0], list(self.saes), self.owned(), self.seeds
            )]

    def configure_optimizers(self) -> dict[str, Any]:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if self.seed_parallel and world_size > len(self.seeds):
            raise ValueError(f"seed_parallel needs at least one seed per device: {len(self.seeds)} seeds, {world_size} devices")
        self._decide_fused(self.device)
        owned = self.owned()
        optimizer = make_optimizer([self.saes[i] for i in owned], self.lr, self.adam_betas, self.adam_eps,  # type: ignore[misc]
                                   self.fused, names=[f"seed{self.seeds[i]}" for i in owned],
                                   exp_avg_dtype=self.exp_avg_dtype, world_size=world_size if self._grad_sync() else 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then optional linear decay to 0."""
        factor = min(1.0, (step + 1) / max(1, self.lr_warmup_steps))
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if self.lr_decay_frac > 0 and max_steps and max_steps > 0:
            decay_start = int(max_steps * (1 - self.lr_decay_frac))
            if step >= decay_start:
                factor *= max(0.0, (max_steps - step) / max(1, max_steps - decay_start))
        return factor

    # ---- the step -----------------------------------------------------------------------------
    def _all_reduce(self) -> Any:
        """Sum over data-parallel ranks, queued on the stream (Lightning's `strategy.reduce` adds a
        barrier, a host sync, before every reduction); None on one rank."""
        if self._trainer is None or self.trainer.world_size == 1 or self.seed_parallel or self.latent_parallel:
            return None
        return all_reduce_sum

    def _is_log_step(self, step: int) -> bool:
        if self._trainer is None or not self.trainer.loggers:
            return False
        return (step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """`batch` = `(x (batch, d_in), labels (batch,))`; returns the summed loss of all seeds."""
        x, labels = batch
        step = self.global_step
        reduce = self._all_reduce()
        log_now = self._is_log_step(step)
        per_seed: dict[int, list[Tensor]] = {}
        total = x.new_zeros((), dtype=torch.float32)
        variance = ddp_variance(x, reduce, self.trainer.world_size) if reduce is not None else None
        for index in self.owned():
            seed, sae, tracker = self.seeds[index], self.saes[index], self.trackers[index]
            terms, out = seed_step_loss(sae, tracker, x, labels, self.cfg, reduce, variance)
            self.monitor.record(index, terms, step)
            l0 = l0_norm(out.latent_values.detach())
            self.divergence.record(index, terms.fvu, l0, step)
            if self.check_finite_every_step:
                check_finite(terms, step, seed)
            total = total + terms.total
            if log_now:
                values = [t.detach().to(torch.float32) for t in terms]
                per_seed[index] = [*values, l0, tracker.dead_fraction()]
        if log_now:
            self.monitor.raise_if_bad()
            self.divergence.raise_if_bad()
            metrics: dict[str, Tensor | float] = self._seed_metrics(per_seed)
            metrics["lr"] = self.lr_schedulers().get_last_lr()[0]  # type: ignore[union-attr]
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=x.shape[0])
            self._log_densities(step)
        return total

    def _seed_metrics(self, per_seed: dict[int, list[Tensor]]) -> dict[str, Tensor | float]:
        """`seed<s>/<name>` scalars; seed-parallel ranks sum their rows so every seed gets logged."""
        names = [*TERM_NAMES, "l0", "auxk_dead_fraction"]
        if self.seed_parallel and self.trainer.world_size > 1:
            table = torch.zeros(len(self.seeds), len(names), device=self.device)
            for index, values in per_seed.items():
                table[index] = torch.stack([v.to(table.device) for v in values])
            table = self.trainer.strategy.reduce(table, reduce_op="sum")
            per_seed = {index: list(table[index]) for index in range(len(self.seeds))}
        return {f"seed{self.seeds[i]}/{name}": value for i, values in per_seed.items() for name, value in zip(names, values)}

    def _log_densities(self, step: int) -> None:
        """Firing-density summaries (CSV) and histograms (wandb, when used) since the last log step.

        Seed-parallel: only the trackers are copied from their owners here (kilobytes); the weights
        (gigabytes at 65,536 latents) only at checkpoints and the export."""
        if self.seed_parallel and self.trainer.world_size > 1:
            sync_seed_states(list(self.trackers), self.trainer.world_size)
        for seed, tracker in zip(self.seeds, self.trackers):
            density = tracker.pop_density()
            self.log_dict({f"seed{seed}/{k}": v for k, v in density_summary(density).items()}, on_step=True, on_epoch=False)
            for logger in self.trainer.loggers:
                if type(logger).__name__ == "WandbLogger" and self.trainer.is_global_zero:
                    import wandb  # imported only when the wandb logger is in use

                    counts, edges = density_histogram(density)
                    logger.experiment.log(
                        {f"seed{seed}/log10_density": wandb.Histogram(np_histogram=(counts, edges))}, step=step
                    )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.fused:  # FusedAdam does both decoder constraints in its own pass
            for index in self.owned():
                self.saes[index].remove_parallel_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Adam, then unit-norm decoder rows, before any callback runs: a checkpoint saved at this step
        holds exactly the weights the next step starts from (the fused path renormalises inside its step)."""
        super().optimizer_step(*args, **kwargs)
        if not self.fused:
            for index in self.owned():
                self.saes[index].normalize_decoder()
