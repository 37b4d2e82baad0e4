"""Latent parallelism: each device trains a slice of every SAE's latents (`--trainer.strategy latent_parallel`).

The step itself is in `sae/kernels/latent_shard.py`. This module holds the strategy (one process
per device, like DDP, but the module is not wrapped in `DistributedDataParallel`: no gradient is
averaged, and every rank reads the whole global batch) and the whole-SAE views of the shards:

- checkpoints hold whole SAEs and whole optimizer states (every rank's rows gathered when saving,
  this rank's rows sliced out when loading), so a checkpoint looks like a one-device run's;
- the end-of-run export gathers each SAE (`gather_sae`).

Latent trackers are kept whole on every rank: every rank sees the same global top-k indices, so
their statistics agree without communication.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from sae.kernels.latent_shard import LatentShard, gather_rows
from sae.model import SparseAutoencoder

SHARDED: tuple[str, ...] = ("W_enc_rows", "b_enc", "W_dec")
"""Parameters split by latent; the others (b_dec) and the buffers are replicated."""


class LatentParallelStrategy(DDPStrategy):
    """DDP process launch and collectives without the DistributedDataParallel wrapper."""

    replicates_data = True
    """Read by `ShardDataModule`: every rank takes the whole global batch."""

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped: the ranks hold different latents, nothing is averaged."""


for _name, _start in (("latent_parallel", "popen"), ("latent_parallel_spawn", "spawn"),
                      ("latent_parallel_fork", "fork")):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, LatentParallelStrategy, start_method=_start,
                                  description=f"latents split across devices, start_method {_start!r}")


@torch.no_grad()
def gather_sae(sae: SparseAutoencoder) -> SparseAutoencoder:
    """The whole SAE from every rank's shard (collective), on this rank's device."""
    shard = sae.shard
    if shard is None:
        return sae
    whole = SparseAutoencoder(sae.cfg, device=sae.device, dtype=sae.dtype, init_weights=False)
    state = {k: v for k, v in sae.state_dict().items() if k not in SHARDED and k != "threshold"}
    state.update({name: gather_rows(getattr(sae, name), shard.world) for name in SHARDED})
    whole.load_state_dict(state, strict=False)
    return whole


def _sharded_slots(checkpoint: dict[str, Any], saes: list[SparseAutoencoder]) -> list[tuple[str, int | None]]:
    """(state_dict key, optimizer state position or None) of every sharded parameter, in a fixed order."""
    groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups", [])
    slots = []
    for index, sae in enumerate(saes):
        positions = groups[index]["params"] if index < len(groups) else []
        for j, (name, _) in enumerate(sae.named_parameters()):
            if name in SHARDED:
                slots.append((f"saes.{index}.{name}", positions[j] if j < len(positions) else None))
    return slots


@torch.no_grad()
def whole_checkpoint_(checkpoint: dict[str, Any], saes: list[SparseAutoencoder], shard: LatentShard) -> None:
    """Replace the sharded weights and Adam moments in `checkpoint` by whole ones (collective)."""
    optimizer = (checkpoint.get("optimizer_states") or [{}])[0].get("state", {})
    for key, position in _sharded_slots(checkpoint, saes):
        checkpoint["state_dict"][key] = gather_rows(checkpoint["state_dict"][key], shard.world).cpu()
        if position is not None and position in optimizer:
            entry = dict(optimizer[position])  # a new dict: the live optimizer's state stays this rank's
            for moment in ("exp_avg", "exp_avg_sq"):
                entry[moment] = gather_rows(entry[moment], shard.world).cpu()
            optimizer[position] = entry


def shard_checkpoint_(checkpoint: dict[str, Any], saes: list[SparseAutoencoder], shard: LatentShard) -> None:
    """Slice this rank's latents out of a whole checkpoint's sharded weights and Adam moments."""
    optimizer = (checkpoint.get("optimizer_states") or [{}])[0].get("state", {})
    for key, position in _sharded_slots(checkpoint, saes):
        weight = checkpoint["state_dict"][key]
        if weight.shape[0] != shard.total:
            raise ValueError(f"checkpoint entry {key} has {weight.shape[0]} latents, expected {shard.total}")
        checkpoint["state_dict"][key] = weight[shard.lo:shard.hi].clone()
        if position is not None and position in optimizer:
            entry = dict(optimizer[position])
            for moment in ("exp_avg", "exp_avg_sq"):
                entry[moment] = entry[moment][shard.lo:shard.hi].clone()
            optimizer[position] = entry
