"""The fused training path: encoder and decoder weight gradients are never materialised.

With k of d_sae latents active per row, the gradients of `W_enc_rows` and `W_dec` are sparse sums of
batch rows: for latent row r, `grad[r] = sum_e coef[e] * source[src[e]]` over the entries e that
selected r (source = the encoder input for the encoder, the reconstruction gradient for the decoder).
Autograd here computes everything *except* those two matrix gradients; the backward passes record
the entries (`RowGradTerm`, sorted by row) in the SAE's `DeferredGrads`, and `sae.kernels.adam.FusedAdam`
builds each row's gradient inside its Adam update (with the decoder-parallel projection and the
decoder renormalisation in the same pass). On CUDA with Triton the row work runs in
`sae.kernels.triton`; elsewhere the torch reference below computes the same function (CPU tests).

AuxK (`sae/auxk.py`) reads the dead latents' rows through `FusedKernels.rows` (`deferred_rows`), whose backward records
their dense gradient rows (`DenseRowsTerm`); the same Adam pass adds them. Other gradients (b_enc,
b_dec, latent values) flow through autograd as usual, so every loss term (FVU, AuxK, L1,
contrastive) works unchanged. The forward reads a low-precision copy of the weights
(`DeferredGrads.compute_weight`), refreshed by the optimizer in the same pass that updates them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sae.kernels import triton as triton_kernels
from sae.kernels.csr import compute_dtype_for, csr_decode, gathered_dots, row_offsets, rows_of_entries
from sae.kernels.topk_filter import filtered_topk


@dataclass
class RowGradTerm:
    """One sparse contribution to a `(rows, d)` weight gradient, entries sorted by row.

    `grad[r] = sum over e in crow[r]:crow[r+1] of coef[e] * source[src[e]]`.
    """

    crow: Tensor
    """`(rows + 1,)` int64 row offsets."""
    src: Tensor
    """`(nnz,)` int64 row of `source` per entry."""
    coef: Tensor
    """`(nnz,)` float32 weight per entry."""
    source: Tensor
    """`(batch, d)` dense rows the gradient is built from."""


@dataclass
class DenseRowsTerm:
    """A dense gradient on a few rows of a `(rows, d)` weight: `grad[rows[i]] += values[i]`."""

    rows: Tensor
    """`(n,)` int64 distinct row ids."""
    values: Tensor
    """`(n, d)` float32 gradient rows."""


@dataclass
class LatentSort:
    """The `(batch, n)` selected latents regrouped by latent (CSR of the transposed code matrix)."""

    crow: Tensor
    """`(d_sae + 1,)` int64 offsets per latent."""
    order: Tensor
    """`(batch * n,)` int64 flat position (b * n + j) of each entry, sorted by latent."""
    src: Tensor
    """`(batch * n,)` int64 batch row of each entry (order // n)."""

    @classmethod
    def of(cls, indices: Tensor, d_sae: int) -> "LatentSort":
        sorted_latents, order = torch.sort(indices.reshape(-1), stable=True)
        return cls(row_offsets(sorted_latents, d_sae), order, torch.div(order, indices.shape[1], rounding_mode="floor"))

    def term(self, coef: Tensor, source: Tensor) -> RowGradTerm:
        """A gradient term with `coef (batch, n)` (in the original layout) on `source (batch, d)`."""
        return RowGradTerm(self.crow, self.src, coef.reshape(-1)[self.order].to(torch.float32), source)


@dataclass
class DeferredGrads:
    """Per-SAE store of deferred matrix gradients and of the low-precision weight copies."""

    terms: dict[str, list[RowGradTerm | DenseRowsTerm]] = field(default_factory=dict)
    shadows: dict[str, tuple[Tensor, int, int]] = field(default_factory=dict)
    """name → (copy, param._version, param.data_ptr()) at the time the copy was made."""
    sorts: list[tuple[Tensor, LatentSort]] = field(default_factory=list)
    """Latent sorts of this step's index tensors (the decoder and encoder backward share one)."""
    shard_ids: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Latent-parallel: this step's (global indices, this shard's row ids) pairs (`sae/kernels/latent_shard.py`)."""

    def latent_sort(self, indices: Tensor, d_sae: int) -> LatentSort:
        """`LatentSort.of(indices, d_sae)`, computed once per index tensor until `clear()`."""
        for known, sort in self.sorts:
            if known is indices:  # the reference held here keeps the tensor (and its memory) alive
                return sort
        sort = LatentSort.of(indices, d_sae)
        self.sorts.append((indices, sort))
        return sort

    def add(self, name: str, term: RowGradTerm | DenseRowsTerm) -> None:
        self.terms.setdefault(name, []).append(term)

    def pop(self, name: str) -> list[RowGradTerm | DenseRowsTerm]:
        return self.terms.pop(name, [])

    def clear(self) -> None:
        self.terms.clear()
        self.sorts.clear()
        self.shard_ids.clear()

    def compute_weight(self, name: str, param: Tensor, dtype: torch.dtype) -> Tensor:
        """`param` in `dtype` for the forward: a cached copy, remade whenever the parameter changed
        outside the fused optimizer (which refreshes the copy itself)."""
        if param.dtype == dtype:
            return param.detach()
        cached = self.shadows.get(name)
        if cached is not None and cached[0].dtype == dtype and cached[1:] == (param._version, param.data_ptr()):
            return cached[0]
        copy = param.detach().to(dtype)
        self.shadows[name] = (copy, param._version, param.data_ptr())
        return copy

    def shadow_for_update(self, name: str, param: Tensor) -> Tensor | None:
        """The cached copy the optimizer should refresh in place, if it is current."""
        cached = self.shadows.get(name)
        if cached is None or cached[1:] != (param._version, param.data_ptr()):
            self.shadows.pop(name, None)
            return None
        return cached[0]


def merge_terms(terms: list[RowGradTerm], rows: int) -> RowGradTerm:
    """Several terms on the same matrix → one (sources stacked, entries re-sorted by row)."""
    if len(terms) == 1:
        return terms[0]
    dtype = terms[0].source.dtype
    sources, srcs, row_ids, offset = [], [], [], 0
    for term in terms:
        row_ids.append(rows_of_entries(term.crow, term.coef.shape[0]))
        srcs.append(term.src + offset)
        sources.append(term.source.to(dtype))
        offset += term.source.shape[0]
    sorted_rows, order = torch.sort(torch.cat(row_ids), stable=True)
    coef = torch.cat([t.coef for t in terms])[order]
    return RowGradTerm(row_offsets(sorted_rows, rows), torch.cat(srcs)[order], coef, torch.cat(sources))


def merge_dense_terms(terms: list[DenseRowsTerm]) -> DenseRowsTerm:
    """Several dense row terms → one over their distinct rows (rows that repeat are summed)."""
    if len(terms) == 1:
        return terms[0]
    rows, inverse = torch.unique(torch.cat([t.rows for t in terms]), return_inverse=True)
    values = torch.zeros(rows.shape[0], terms[0].values.shape[1], device=rows.device, dtype=torch.float32)
    return DenseRowsTerm(rows, values.index_add_(0, inverse, torch.cat([t.values for t in terms])))


def term_gradient(term: RowGradTerm, rows: int) -> Tensor:
    """Reference: the dense float32 `(rows, d)` gradient a term stands for."""
    row_of_entry = rows_of_entries(term.crow, term.coef.shape[0])
    coef = torch.where(row_of_entry < rows, term.coef, 0.0)  # entries past crow[-1] (another shard's) add nothing
    grad = torch.zeros(rows, term.source.shape[1], device=term.source.device, dtype=torch.float32)
    return grad.index_add_(0, row_of_entry.clamp_max(rows - 1), coef[:, None] * term.source.to(torch.float32)[term.src])


def _use_triton(t: Tensor) -> bool:
    return triton_kernels.available(t.device)


class _FusedTopK(torch.autograd.Function):
    """Encoder pre-activations + top-k; backward gives b_enc / b_dec grads and defers W_enc's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_scaled: Tensor, b_dec: Tensor, b_enc: Tensor, w_rows: Tensor, k: int, subtract_b_dec: bool,
        store: DeferredGrads,
    ) -> tuple[Tensor, Tensor]:
        x_in, pre = encoder_pre_acts(x_scaled, b_dec, b_enc, w_rows, subtract_b_dec)
        values, indices = filtered_topk(pre, k)
        del pre
        ctx.save_for_backward(x_in, w_rows, indices)
        ctx.store, ctx.subtract_b_dec = store, subtract_b_dec
        ctx.b_dtypes = (b_dec.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, g_values: Tensor, _g_indices: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x_in, w_rows, indices = ctx.saved_tensors
        grad_b_dec, grad_b_enc = encoder_backward(ctx, x_in, w_rows, indices, g_values.to(torch.float32))
        return None, grad_b_dec, grad_b_enc, None, None, None, None


def encoder_pre_acts(x_scaled: Tensor, b_dec: Tensor, b_enc: Tensor, w_rows: Tensor, subtract_b_dec: bool
                     ) -> tuple[Tensor, Tensor]:
    """`(x_in (batch, d_in), pre (batch, rows))` in `w_rows`' dtype: the encoder input (minus b_dec
    when `subtract_b_dec`) and its pre-activations `x_in @ w_rowsᵀ + b_enc`."""
    x_in = ((x_scaled - b_dec) if subtract_b_dec else x_scaled).to(w_rows.dtype)
    return x_in, torch.addmm(b_enc.to(w_rows.dtype), x_in, w_rows.t())


SPILL = 1024
"""Slots past the last row that sentinel entries' (zero) b_enc gradients are spread over (atomic adds
to one address would serialise)."""


def encoder_backward(ctx: Any, x_in: Tensor, w_rows: Tensor, ids: Tensor, g32: Tensor, sentinels: bool = False
                     ) -> tuple[Tensor | None, Tensor]:
    """The top-k encoder's backward: defers W_enc_rows' gradient to `ctx.store` and returns
    `(grad_b_dec or None, grad_b_enc)` for the selected `(batch, n)` latents `ids` with float32 value
    grads `g32`. With `sentinels`, an id equal to the row count (latent-parallel: another shard's
    entry, its g32 zero) is sorted past the last row and adds nothing."""
    rows = w_rows.shape[0]
    flat = ids.reshape(-1)
    if sentinels:  # spread over spill slots, not one hot address
        spill = rows + torch.arange(flat.shape[0], device=flat.device) % SPILL
        flat = torch.where(flat < rows, flat, spill)
    grad_b_enc = torch.zeros(rows + (SPILL if sentinels else 0), device=x_in.device, dtype=torch.float32)
    grad_b_enc = grad_b_enc.index_add_(0, flat, g32.reshape(-1))[:rows]
    ctx.store.add("W_enc_rows", ctx.store.latent_sort(ids, rows).term(g32, x_in))
    grad_b_dec = None
    if ctx.subtract_b_dec and ctx.needs_input_grad[1]:  # d(x - b_dec)/d b_dec: minus the summed input grads
        grad_b_dec = -(grad_b_enc.to(w_rows.dtype) @ w_rows).to(ctx.b_dtypes[0])
    return grad_b_dec, grad_b_enc.to(ctx.b_dtypes[1])


class _DeferredRows(torch.autograd.Function):
    """`param[rows]` whose gradient goes to the deferred store as a `DenseRowsTerm` (param gets none)."""

    @staticmethod
    def forward(ctx: Any, param: Tensor, rows: Tensor, name: str, store: DeferredGrads) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.name, ctx.store = name, store
        return param.detach()[rows]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        ctx.store.add(ctx.name, DenseRowsTerm(rows, grad.to(torch.float32)))
        return None, None, None, None


def deferred_rows(param: Tensor, rows: Tensor, name: str, store: DeferredGrads) -> Tensor:
    """`(n, d)` rows `rows` (distinct ids) of a deferred matrix; their gradient is stored under `name`."""
    return _DeferredRows.apply(param, rows, name, store)


class _FusedDecode(torch.autograd.Function):
    """`b_dec + sum_j values[b, j] * W_dec[indices[b, j]]`; backward gives the values' and b_dec's
    grads and defers W_dec's.

    The values are post-ReLU codes: on CUDA the gradient of a zero value is left 0 (its ReLU cuts it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: Tensor, indices: Tensor, w_dec: Tensor, b_dec: Tensor, store: DeferredGrads
    ) -> Tensor:
        if _use_triton(w_dec):
            out = triton_kernels.gather_decode(values, indices, w_dec, b_dec.detach().contiguous())
        else:
            out = csr_decode(values, indices, w_dec) + b_dec.detach().to(torch.float32)
        ctx.save_for_backward(values, indices, w_dec)
        ctx.store, ctx.b_dtype = store, b_dec.dtype
        ctx.mark_non_differentiable(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        values, indices, w_dec = ctx.saved_tensors
        sort = ctx.store.latent_sort(indices, w_dec.shape[0])
        source = grad_out.to(w_dec.dtype).contiguous()  # the compute dtype: bf16 halves the gathered bytes
        term = sort.term(values.to(torch.float32), source)
        if _use_triton(w_dec):
            dots = triton_kernels.row_dots(w_dec, sort.crow, sort.src, term.coef, source)
            grad_values = torch.empty(values.numel(), device=values.device, dtype=torch.float32)
            grad_values[sort.order] = dots
            grad_values = grad_values.view_as(values)
        else:
            grad_values = gathered_dots(indices, source, w_dec)
        ctx.store.add("W_dec", term)
        grad_b_dec = grad_out.sum(dim=0).to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
        return grad_values.to(values.dtype), None, None, grad_b_dec, None


def fused_topk(
    x_scaled: Tensor, b_dec: Tensor, b_enc: Tensor, w_rows: Tensor, k: int, store: DeferredGrads,
    subtract_b_dec: bool = True,
) -> tuple[Tensor, Tensor]:
    """Top-k pre-activations of `x_scaled (batch, d_in)` (the scaled input, no gradient).

    `w_rows (d_sae, d_in)` is the encoder in compute dtype (from `store.compute_weight`); its
    gradient goes to `store` under "W_enc_rows". Returns values `(batch, k)` (raw pre-activations,
    apply ReLU yourself) and indices `(batch, k)` int64, as `sae.kernels.csr.topk_pre_acts`.
    """
    return _FusedTopK.apply(x_scaled, b_dec, b_enc, w_rows, int(k), subtract_b_dec, store)


def fused_decode(values: Tensor, indices: Tensor, w_dec: Tensor, b_dec: Tensor, store: DeferredGrads) -> Tensor:
    """`(batch, n)` codes → `(batch, d_in)` float32 decode plus `b_dec`; the W_dec gradient goes to `store`."""
    return _FusedDecode.apply(values, indices, w_dec, b_dec, store)


class FusedKernels:
    """The fused path's primitives (same methods as `sae.kernels.csr.SparseKernels`): the two matrix
    gradients go to `deferred` instead of autograd, for `sae.kernels.adam.FusedAdam` to apply."""

    name = "fused"

    def __init__(self, deferred: DeferredGrads) -> None:
        self.deferred = deferred

    def topk(self, sae: Any, x: Tensor, per_row: int) -> tuple[Tensor, Tensor]:
        sae.check_input(x)
        w_rows = self.deferred.compute_weight("W_enc_rows", sae.W_enc_rows, compute_dtype_for(x, sae.dtype))
        return fused_topk(sae.scale_input(x), sae.b_dec, sae.b_enc, w_rows, per_row, self.deferred,
                          sae.cfg.apply_b_dec_to_input)

    def decode(self, sae: Any, values: Tensor, indices: Tensor) -> Tensor:
        w_dec = self.deferred.compute_weight("W_dec", sae.W_dec, compute_dtype_for(values, sae.dtype))
        return fused_decode(values, indices, w_dec, sae.b_dec, self.deferred)  # b_dec added in the gather

    def rows(self, sae: Any, name: str, ids: Tensor) -> Tensor:
        return deferred_rows(getattr(sae, name), ids, name, self.deferred)


def adam_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, beta1: float, beta2: float,
    eps: float, step: int,
) -> None:
    """One Adam step in place, torch.optim.Adam's formula (`exp_avg` may be bfloat16; math in float32)."""
    m = exp_avg.lerp_(grad, 1 - beta1) if exp_avg.dtype == torch.float32 else exp_avg.float().lerp_(grad, 1 - beta1)
    if m is not exp_avg:
        exp_avg.copy_(m)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def reference_row_grad_adam(
    weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, term: RowGradTerm | None, *, lr: float, beta1: float,
    beta2: float, eps: float, step: int, remove_parallel: bool, renorm: bool, dense: DenseRowsTerm | None = None,
) -> None:
    """Torch version of `triton_kernels.row_grad_adam` (the same update; `term` None = zero gradient,
    `dense`: rows added to the gradient)."""
    grad = term_gradient(term, weight.shape[0]) if term is not None else torch.zeros_like(weight)
    if dense is not None:
        grad.index_add_(0, dense.rows, dense.values)
    if remove_parallel:
        grad -= (grad * weight).sum(dim=1, keepdim=True) * weight
    adam_update_(weight, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step)
    if renorm:
        weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps))
