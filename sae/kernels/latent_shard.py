"""Latent-sharded training on the fused path: each rank owns a contiguous slice of the latents.

With R ranks, rank r holds rows `[lo, hi)` of `W_enc_rows`, `b_enc` and `W_dec` (d_sae / R latents)
and replicas of `b_dec` and the input scale; every rank reads the *whole* global batch. One step:

1. encoder: `pre = (x - b_dec) @ W_enc_rows[lo:hi]ᵀ + b_enc[lo:hi]` `(batch, d_sae / R)`, and the
   shard's own top-k candidates `(batch, k)`;
2. the candidates (values and global latent ids) are all-gathered and each row keeps the top k of
   its R·k candidates — the global top-k, exactly (the k largest of a union are among the k largest
   of each part);
3. decoder: each rank decodes the selected entries it owns (`(batch, d_in)` float32 partial sums)
   and the partials are all-reduced, so every rank holds the same reconstruction and the same loss;
4. backward: each rank's deferred gradient terms hold only its own entries (the others get the
   sentinel row id `d_sae / R`, which sorts past the last row and is never read), so `FusedAdam`
   updates the rank's rows from the rank's entries alone; no weight or gradient of a matrix
   crosses ranks. `b_dec` enters the sharded region through `copy_to_shards`, whose backward sums
   the ranks' partial gradients, so its update is the same on every rank.

Per step a rank sends batch·k values + ids (the candidates) and batch·d_in float32 (the partial
reconstruction), instead of DDP's gathered entries and source rows, and it runs the encoder matmul,
top-k and Adam over 1/R of the latents: docs/sae.md has the arithmetic. The result equals one
device stepping the same global batch, to float tolerance (tests/sae/test_sae_latent_parallel.py).
On CUDA the row work runs in `sae.kernels.triton`; elsewhere a torch reference (CPU tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sae.kernels import triton as triton_kernels
from sae.kernels.csr import compute_dtype_for
from sae.kernels.ddp import _gather_into
from sae.kernels.fused import DeferredGrads, deferred_rows, encoder_backward, encoder_pre_acts
from sae.kernels.topk_filter import filtered_topk


@dataclass(frozen=True)
class LatentShard:
    """Rank `rank` of `world` owns latents `[lo, hi)` of `total` (contiguous, equal slices)."""

    rank: int
    world: int
    total: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad latent shard: rank {self.rank} of {self.world}")
        if self.total % self.world:
            raise ValueError(f"latent_parallel needs d_sae divisible by the number of devices: "
                             f"{self.total} latents on {self.world} devices")

    @property
    def size(self) -> int:
        return self.total // self.world

    @property
    def lo(self) -> int:
        return self.rank * self.size

    @property
    def hi(self) -> int:
        return self.lo + self.size

    def local_ids(self, ids: Tensor) -> Tensor:
        """Global latent ids → this shard's row ids, or `size` (the sentinel) for another shard's."""
        mine = (ids >= self.lo) & (ids < self.hi)
        return torch.where(mine, ids - self.lo, torch.full_like(ids, self.size))


def all_reduce_sum_(t: Tensor) -> Tensor:
    """In-place sum over ranks (queued on the stream; no host sync on NCCL)."""
    dist.all_reduce(t)
    return t


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (a replicated input of a sharded computation)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return all_reduce_sum_(grad.contiguous().clone())


class _ReduceFromShards(torch.autograd.Function):
    """Forward sums partial results over ranks; backward is the identity (every rank's loss is the same)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return all_reduce_sum_(t.contiguous().clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def copy_to_shards(t: Tensor) -> Tensor:
    return _CopyToShards.apply(t)


def reduce_from_shards(t: Tensor) -> Tensor:
    return _ReduceFromShards.apply(t)


def gather_rows(t: Tensor, world: int) -> Tensor:
    """Every rank's `(n, ...)` → `(world * n, ...)` in rank order (a blocking all-gather; every rank calls it)."""
    out, wait = _gather_into(t.detach().contiguous(), world)
    wait()
    return out


def gather_columns(t: Tensor, world: int) -> Tensor:
    """Every rank's `(batch, n)` → `(batch, world * n)`, rank-major along dim 1 (a blocking all-gather)."""
    out = gather_rows(t, world)
    batch = t.shape[0]
    return out.view(world, batch, *t.shape[1:]).transpose(0, 1).reshape(batch, world * t.shape[1])


def merge_candidates(values: Tensor, ids: Tensor, k: int, world: int) -> tuple[Tensor, Tensor]:
    """Every rank's top candidates `values, ids (batch, n)` (global ids) → the global top-k of each row."""
    all_values = gather_columns(values, world)
    all_ids = gather_columns(ids.to(torch.int32), world)
    top, position = all_values.topk(k, dim=1, sorted=False)
    return top, all_ids.gather(1, position).to(torch.int64)


class _ShardTopK(torch.autograd.Function):
    """The shard's pre-activations → the global top-k (values with gradient to the owning rank's
    entries only; W_enc's gradient deferred as this shard's entries; b_enc / b_dec partial grads)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_scaled: Tensor, b_dec: Tensor, b_enc: Tensor, w_rows: Tensor, k: int, subtract_b_dec: bool,
        store: DeferredGrads, shard: LatentShard,
    ) -> tuple[Tensor, Tensor]:
        x_in, pre = encoder_pre_acts(x_scaled, b_dec, b_enc, w_rows, subtract_b_dec)  # pre: (batch, d_sae / R)
        k_local = min(k, shard.size)
        values, local = filtered_topk(pre, k_local)
        del pre
        values, indices = merge_candidates(values, local + shard.lo, k, shard.world)
        local = shard.local_ids(indices)
        store.shard_ids.append((indices, local))  # the decode of these indices reuses the mapping
        ctx.save_for_backward(x_in, w_rows, local)
        ctx.store, ctx.subtract_b_dec, ctx.size = store, subtract_b_dec, shard.size
        ctx.b_dtypes = (b_dec.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, g_values: Tensor, _g_indices: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x_in, w_rows, local = ctx.saved_tensors
        g32 = torch.where(local < ctx.size, g_values.to(torch.float32), 0.0)  # other ranks' entries are theirs
        # grad_b_dec is this shard's part; copy_to_shards sums the parts
        grad_b_dec, grad_b_enc = encoder_backward(ctx, x_in, w_rows, local, g32, sentinels=True)
        return None, grad_b_dec, grad_b_enc, None, None, None, None, None


def _reference_decode(values: Tensor, rows: Tensor, w_dec: Tensor) -> Tensor:
    """`sum_j values[b, j] * w_dec[rows[b, j]]` `(batch, d)` float32 (CPU reference; (batch, n, d) memory)."""
    return torch.einsum("bn,bnd->bd", values.to(torch.float32), w_dec.to(torch.float32)[rows])


class _ShardDecode(torch.autograd.Function):
    """This shard's part of `sum_j values[b, j] * W_dec[indices[b, j]]` (+ `bias` where `add_bias`);
    backward gives the owned values' grads and defers this shard's W_dec gradient.

    The bias (b_dec, replicated) is added by one rank only, but every rank returns its whole
    gradient `grad_out.sum(0)` (the same on every rank), so the replicas get the same update."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: Tensor, local: Tensor, w_dec: Tensor, bias: Tensor, add_bias: bool, store: DeferredGrads,
        size: int,
    ) -> Tensor:
        mine = local < size
        owned = torch.where(mine, values, torch.zeros_like(values))
        rows = torch.where(mine, local, torch.zeros_like(local))  # value 0: the row read adds nothing
        if triton_kernels.available(w_dec.device):
            out = triton_kernels.gather_decode(owned, rows, w_dec, bias.detach().contiguous() if add_bias else None)
        else:
            out = _reference_decode(owned, rows, w_dec)
            if add_bias:
                out = out + bias.detach().to(torch.float32)
        ctx.save_for_backward(owned, local, rows, w_dec)
        ctx.store, ctx.size, ctx.b_dtype = store, size, bias.dtype
        ctx.mark_non_differentiable(local)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        owned, local, rows, w_dec = ctx.saved_tensors
        size, store = ctx.size, ctx.store
        mine = local < size
        sort = store.latent_sort(local, size)
        source = grad_out.to(w_dec.dtype).contiguous()
        term = sort.term(owned.to(torch.float32), source)
        if triton_kernels.available(w_dec.device):
            dots = triton_kernels.row_dots(w_dec, sort.crow, sort.src, term.coef, source)  # past crow[-1]: unset
            grad_values = torch.empty(owned.numel(), device=owned.device, dtype=torch.float32)
            grad_values[sort.order] = dots
            grad_values = grad_values.view_as(owned)
        else:
            grad_values = torch.einsum("bd,bnd->bn", grad_out.to(torch.float32), w_dec.to(torch.float32)[rows])
        store.add("W_dec", term)
        grad_values = torch.where(mine, grad_values, 0.0)
        grad_bias = grad_out.sum(dim=0).to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
        return grad_values.to(owned.dtype), None, None, grad_bias, None, None, None


class ShardedKernels:
    """The fused path's primitives (as `sae.kernels.fused.FusedKernels`) for a latent-sharded SAE."""

    name = "latent_parallel"

    def __init__(self, deferred: DeferredGrads, shard: LatentShard) -> None:
        self.deferred, self.shard = deferred, shard

    def topk(self, sae: Any, x: Tensor, per_row: int) -> tuple[Tensor, Tensor]:
        """Global top-k `(values, indices)` `(batch, per_row)`; indices are global latent ids."""
        sae.check_input(x)
        w_rows = self.deferred.compute_weight("W_enc_rows", sae.W_enc_rows, compute_dtype_for(x, sae.dtype))
        return _ShardTopK.apply(sae.scale_input(x), copy_to_shards(sae.b_dec), sae.b_enc, w_rows, int(per_row),
                                sae.cfg.apply_b_dec_to_input, self.deferred, self.shard)

    def _local(self, indices: Tensor) -> Tensor:
        for known, local in self.deferred.shard_ids:
            if known is indices:
                return local
        return self.shard.local_ids(indices)

    def decode(self, sae: Any, values: Tensor, indices: Tensor) -> Tensor:
        """`(batch, d_in)` float32 reconstruction (plus b_dec), the same on every rank."""
        w_dec = self.deferred.compute_weight("W_dec", sae.W_dec, compute_dtype_for(values, sae.dtype))
        partial = _ShardDecode.apply(values, self._local(indices), w_dec, sae.b_dec, self.shard.rank == 0,
                                     self.deferred, self.shard.size)
        return reduce_from_shards(partial)

    def rows(self, sae: Any, name: str, ids: Tensor) -> Tensor:
        """Rows of this shard by *local* ids (AuxK's dead latents of this shard)."""
        return deferred_rows(getattr(sae, name), ids, name, self.deferred)
