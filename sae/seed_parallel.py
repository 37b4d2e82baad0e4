"""One seed per device: DDP processes that train different seeds instead of averaging gradients.

`--trainer.strategy seed_parallel` (or `seed_parallel_fork` / `seed_parallel_spawn`) launches one
process per device like DDP, but the module is not wrapped in `DistributedDataParallel`: seed i of
`--seeds` is trained by rank `i % world_size` alone, every rank reads the *whole* global batch (so
each seed sees exactly the batches a one-device run gives it), and no gradient is communicated.
Every rank keeps a replica of every seed's weights; replicas of seeds owned elsewhere are stale
until `sync_seed_states` broadcasts them from their owners (at checkpoints and the end-of-run
export; the small latent trackers also at every density log). Checkpoints hold every seed and every seed's optimizer state, so a run
resumes exactly, on any number of devices that gives each rank the same seeds.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor

OPTIMIZER_KEY = "seed_parallel_optimizer"
"""Checkpoint entry: {seed index: {parameter name: {"step", "exp_avg", "exp_avg_sq"}}}."""


class SeedParallelStrategy(DDPStrategy):
    """DDP process launch and collectives without the DistributedDataParallel wrapper."""

    replicates_data = True
    """Read by `ShardDataModule`: every rank takes the whole global batch."""

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped: the ranks train different seeds, nothing is averaged."""


for _name, _start in (("seed_parallel", "popen"), ("seed_parallel_spawn", "spawn"), ("seed_parallel_fork", "fork")):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(
            _name, SeedParallelStrategy, description=f"one seed per device, start_method {_start!r}", start_method=_start
        )


def owned_indices(n_seeds: int, rank: int, world_size: int) -> list[int]:
    """Indices (into the seed list) trained by `rank`: i % world_size == rank."""
    return [i for i in range(n_seeds) if i % world_size == rank]


def _broadcast_(tensor: Tensor, src: int) -> None:
    """In-place broadcast that works for gloo (CPU) and NCCL (CUDA) tensors of any dtype."""
    if tensor.dtype == torch.bool:
        as_int = tensor.to(torch.uint8)
        dist.broadcast(as_int, src=src)
        tensor.copy_(as_int.to(torch.bool))
    else:
        dist.broadcast(tensor, src=src)


@torch.no_grad()
def sync_seed_states(modules: list[torch.nn.Module], world_size: int) -> None:
    """Broadcast every parameter and buffer of `modules[i]` from its owner rank i % world_size."""
    for index, module in enumerate(modules):
        for tensor in [*module.parameters(), *module.buffers()]:
            _broadcast_(tensor.data, src=index % world_size)


def gather_optimizer_states(
    optimizer: torch.optim.Optimizer, saes: list[torch.nn.Module], owned: list[int], world_size: int
) -> dict[int, dict[str, dict[str, Any]]]:
    """Every seed's Adam state, broadcast from its owner (collective: every rank must call it)."""
    param_state = {id(p): optimizer.state.get(p, {}) for group in optimizer.param_groups for p in group["params"]}
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for index, sae in enumerate(saes):
        mine = index in owned
        out[index] = {}
        for name, p in sae.named_parameters():
            state = param_state.get(id(p), {}) if mine else {}
            header = torch.tensor([float(state["step"]) if state else -1.0,
                                   1.0 if state and state["exp_avg"].dtype == torch.bfloat16 else 0.0],
                                  dtype=torch.float64, device=p.device)
            _broadcast_(header, src=index % world_size)
            step, bf16 = float(header[0]), bool(header[1])
            if step < 0:  # never stepped
                continue
            exp_avg = state["exp_avg"] if mine else torch.empty_like(p, dtype=torch.bfloat16 if bf16 else torch.float32)
            exp_avg_sq = state["exp_avg_sq"] if mine else torch.empty_like(p, dtype=torch.float32)
            for tensor in (exp_avg, exp_avg_sq):
                _broadcast_(tensor, src=index % world_size)
            out[index][name] = {"step": step, "exp_avg": exp_avg.cpu(), "exp_avg_sq": exp_avg_sq.cpu()}
    return out


def optimizer_state_for_rank(
    saved: dict[int, dict[str, dict[str, Any]]], template: dict[str, Any], saes: list[torch.nn.Module],
    owned: list[int], seeds: list[int],
) -> dict[str, Any]:
    """A `state_dict` for this rank's optimizer (one group per owned seed) from the saved per-seed states.

    `template` is a saved optimizer `state_dict` whose first group gives the hyperparameters.
    """
    base_group = {k: v for k, v in template["param_groups"][0].items() if k != "params"}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    position = 0
    for index in owned:
        params = []
        for name, _ in saes[index].named_parameters():
            entry = saved.get(index, {}).get(name)
            if entry is not None:
                state[position] = {"step": torch.tensor(entry["step"]), "exp_avg": entry["exp_avg"],
                                   "exp_avg_sq": entry["exp_avg_sq"]}
            params.append(position)
            position += 1
        groups.append({**base_group, "name": f"seed{seeds[index]}", "params": params})
    return {"state": state, "param_groups": groups}
