"""Latent statistics during and after training: dead latents, firing density, L0, FVU.

`LatentTracker` lives on the device as buffers (so it is checkpointed and restored with the model)
and is updated every step without host syncs. `evaluate_sae` scores a trained SAE over batches with
float64 accumulators.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from sae.model import SparseAutoencoder


def l0_norm(latent_values: Tensor) -> Tensor:
    """Mean number of non-zero latents per row of `(batch, n)` sparse values (device scalar)."""
    return (latent_values != 0).sum(dim=-1).to(torch.float32).mean()


class LatentTracker(nn.Module):
    """Per-latent firing statistics of one SAE.

    Buffers: `tokens_since_fired (d_sae,)` rows seen since each latent last fired;
    `window_fires (d_sae,)` and `window_tokens ()` firing counts since the last `pop_density`.
    """

    def __init__(self, d_sae: int, dead_tokens_threshold: int) -> None:
        super().__init__()
        self.dead_tokens_threshold = int(dead_tokens_threshold)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("window_fires", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.int64))
        self._dead_count: tuple[Tensor, torch.cuda.Event | None, int] | None = None  # see dead_ids()
        self._count_dead = False  # set by the first dead_ids() call: updates then count the dead latents
        self.shard_range: tuple[int, int] | None = None
        """Latent-parallel: the latents `[lo, hi)` this rank owns (`shard_dead_ids` counts them too)."""

    @torch.no_grad()
    def update(
        self, latent_values: Tensor, latent_indices: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Count which latents fired in a batch `(batch, n)`.

        Args:
            all_reduce: sums a tensor over data-parallel ranks (None on one device), so every rank
                holds the same statistics and the same dead mask.
        """
        fired = (latent_values != 0).to(torch.int64).reshape(-1)
        counts = torch.zeros_like(self.window_fires).index_add_(0, latent_indices.reshape(-1), fired)
        n_tokens: Tensor | int = latent_values.shape[0]  # a Python int: a host-to-device tensor would sync
        if all_reduce is not None:
            counts = all_reduce(counts)
            n_tokens = all_reduce(counts.new_full((), n_tokens))  # filled on the device: no host copy
        self.window_fires += counts
        self.window_tokens += n_tokens
        since = self.tokens_since_fired + n_tokens
        self.tokens_since_fired.copy_(torch.where(counts > 0, torch.zeros_like(since), since))
        if self._count_dead:  # only while someone reads dead_ids() (AuxK on)
            self._start_dead_count()

    def _start_dead_count(self) -> None:
        """Count the dead latents and start copying the count to the host (asynchronous on CUDA)."""
        mask = self.dead_mask()
        count = mask.sum()
        if self.shard_range is not None:  # (all, this shard's): both sized without a sync
            count = torch.stack([count, mask[self.shard_range[0]:self.shard_range[1]].sum()])
        event = None
        if count.device.type == "cuda":
            host = torch.empty(count.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = count
        self._dead_count = (host, event, self.tokens_since_fired._version)

    @torch.no_grad()
    def dead_ids(self) -> Tensor:
        """`(n_dead,)` int64 ids of the dead latents, without a host sync on CUDA.

        `update()` counts the dead latents and starts copying the count to the host; it is read at
        the next step (so the copy has long finished, while the GPU still has that step's backward
        and optimizer queued) and sizes the ids. On the first call, and after a checkpoint load, the
        count is read once with a sync.
        """
        counts = self._host_dead_counts()
        return torch.nonzero_static(self.dead_mask(), size=counts[0]).squeeze(1)

    @torch.no_grad()
    def shard_dead_ids(self) -> tuple[Tensor, int]:
        """Latent-parallel (`shard_range` set): `(this shard's dead latents as local row ids (n,),
        the number dead over all shards)`, without a host sync on CUDA (as `dead_ids`)."""
        if self.shard_range is None:
            raise RuntimeError("shard_dead_ids needs the tracker's shard_range")
        counts = self._host_dead_counts()
        lo, hi = self.shard_range
        return torch.nonzero_static(self.dead_mask()[lo:hi], size=counts[1]).squeeze(1), counts[0]

    def _host_dead_counts(self) -> list[int]:
        """The dead counts `update()` started copying to the host ([all] or [all, this shard's])."""
        self._count_dead = True
        known = self._dead_count
        if known is None or known[2] != self.tokens_since_fired._version:  # first call, or loaded
            self._start_dead_count()
            known = self._dead_count
        assert known is not None
        host, event, _ = known
        if event is not None:
            event.synchronize()
        return [int(c) for c in host.reshape(-1).tolist()]

    def dead_mask(self) -> Tensor:
        """`(d_sae,)` bool: latents that have not fired for `dead_tokens_threshold` rows."""
        return self.tokens_since_fired >= self.dead_tokens_threshold

    def dead_fraction(self) -> Tensor:
        return self.dead_mask().to(torch.float32).mean()

    @torch.no_grad()
    def pop_density(self) -> np.ndarray:
        """Firing frequency `(d_sae,)` float64 over the window since the last call, then reset it."""
        tokens = int(self.window_tokens)
        counts = self.window_fires.to(torch.float64).cpu().numpy()
        self.window_fires.zero_()
        self.window_tokens.zero_()
        return counts / max(tokens, 1)


def density_summary(density: np.ndarray) -> dict[str, float]:
    """Scalars describing a firing-density vector: share never firing, median log10 density, share dense."""
    fired = density[density > 0]
    return {
        "never_fired_fraction": float(np.mean(density == 0)),
        "log10_density_median": float(np.median(np.log10(fired))) if fired.size else float("-inf"),
        "dense_fraction": float(np.mean(density > 0.1)),
    }


def density_histogram(density: np.ndarray, bins: int = 40, floor: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10 firing density (latents that never fired are put at `floor`)."""
    logs = np.log10(np.maximum(density, floor))
    return np.histogram(logs, bins=bins, range=(math.log10(floor), 0.0))


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    """Inference-mode metrics over batches `(batch, d_in)`, accumulated in float64.

    Returns `fvu` (pooled: summed squared error / summed variance about the pooled mean), `l0`
    (mean non-zeros per row), `never_fired_fraction` (latents silent on every row), `n_rows` and
    `firing_density`: a `(d_sae,)` float64 array, the fraction of rows each latent fired on.
    """
    was_training = sae.training
    sae.eval()
    sq_err = sum_x = sum_sq = l0_sum = 0.0
    fires = torch.zeros(sae.d_sae, dtype=torch.int64, device=sae.device)
    n = 0
    try:
        for x in batches:
            out = sae(x.to(sae.device))
            target = x.to(sae.device, torch.float64)
            sq_err += float((target - out.x_hat.to(torch.float64)).pow(2).sum())
            sum_x = sum_x + target.sum(dim=0)
            sum_sq += float(target.pow(2).sum())
            active = out.latent_values != 0
            l0_sum += float(active.sum())
            fires.index_add_(0, out.latent_indices[active], torch.ones_like(out.latent_indices[active]))
            n += x.shape[0]
    finally:
        sae.train(was_training)
    if n == 0:
        raise ValueError("evaluate_sae got no rows")
    variance = sum_sq - float((sum_x * sum_x).sum()) / n  # type: ignore[union-attr]
    return {
        "fvu": sq_err / variance if variance > 0 else float("nan"),
        "l0": l0_sum / n,
        "never_fired_fraction": float((fires == 0).to(torch.float64).mean()),
        "n_rows": n,
        "firing_density": fires.double().cpu().numpy() / n,
    }
