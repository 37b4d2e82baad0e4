"""Sparse-gradient building blocks of the SAE training step (CSR sparse × dense matmuls).

A batch of top-k codes is a sparse `(batch, d_sae)` matrix S with k entries per row, stored as
(values, indices) `(batch, k)`. Everything below works on S in CSR form, never on a dense
`(batch, d_sae)` gradient or decode:

    decode           x_hat      = S @ W_dec                       (CSR @ dense)
    decode backward  grad_S     = (grad_out @ W_decᵀ) sampled at S (sampled dense-dense matmul)
                     grad_W_dec = Sᵀ @ grad_out                   (CSR of Sᵀ @ dense)
    encoder backward grad_x     = G @ W_enc_rows,  grad_W_enc_rows = Gᵀ @ x,  grad_b_enc = scatter-add of G
                     with G the sparse gradient at the selected (row, latent) pairs only.

`topk_pre_acts` computes the encoder pre-activations once (one dense matmul in the compute dtype,
e.g. bfloat16) and keeps the top-k. Sparse products run in float32 (the compute dtype for grad_x
on CUDA); parameter gradients come back in the parameters' dtype. Checked against plain autograd in tests/test_sae_model.py.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


def compute_dtype_for(x: Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls should run in: the autocast dtype when autocast is on, else the params'."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


def _sparse_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """CSR matmuls in low precision exist on CUDA only; the CPU uses float32."""
    return compute_dtype if device.type == "cuda" else torch.float32


def rows_csr(indices: Tensor, values: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """`(batch, n)` codes → (CSR `(batch, n_cols)`, per-row sort permutation `(batch, n)`).

    Columns are sorted within each row; `perm` maps CSR order back: csr_values[b, j] = values[b, perm[b, j]].
    Indices must be distinct within a row.
    """
    batch, n = indices.shape
    cols, perm = indices.sort(dim=1)
    crow = torch.arange(0, batch * n + 1, n, device=indices.device)
    return _csr(crow, cols.reshape(-1), values.gather(1, perm).reshape(-1), (batch, n_cols)), perm


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor without PyTorch's beta-state warning (the format is used as documented)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def row_offsets(sorted_rows: Tensor, n_rows: int) -> Tensor:
    """CSR offsets `(n_rows + 1,)` int64 of entries whose row ids `(nnz,)` are sorted ascending.

    A binary search, not `bincount`: bincount on CUDA reads its result size back to the host, a sync.
    """
    bounds = torch.arange(n_rows + 1, device=sorted_rows.device, dtype=sorted_rows.dtype)
    return torch.searchsorted(sorted_rows, bounds)


def rows_of_entries(crow: Tensor, nnz: int) -> Tensor:
    """The row id `(nnz,)` of every entry of a CSR matrix with offsets `crow` (inverse of row_offsets)."""
    entries = torch.arange(nnz, device=crow.device, dtype=crow.dtype)
    return torch.searchsorted(crow, entries, right=True) - 1


def scatter_rows_matmul(indices: Tensor, weights: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """Sᵀ @ dense in float32: `out[i] = sum of weights[b, j] * dense[b] over indices[b, j] == i`.

    Args:
        indices, weights: `(batch, n)`; dense: `(batch, d)`. Returns `(n_rows, d)`.
    """
    batch, n = indices.shape
    sorted_rows, order = torch.sort(indices.reshape(-1), stable=True)  # by latent, then by batch row
    rows = torch.div(order, n, rounding_mode="floor")
    crow = row_offsets(sorted_rows, n_rows)
    csr_t = _csr(crow, rows, weights.reshape(-1)[order].to(torch.float32), (n_rows, batch))
    return csr_t @ dense.to(torch.float32)


class _TopKPreActs(torch.autograd.Function):
    """See `topk_pre_acts`. Saved for backward: the cast input, the encoder rows in compute dtype, the indices."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, W_enc_rows: Tensor, b_enc: Tensor, k: int, compute_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(compute_dtype)
            w_rows = W_enc_rows.to(compute_dtype)  # (d_sae, d_in); no copy when already in compute dtype
            pre = torch.addmm(b_enc.to(compute_dtype), xc, w_rows.t())  # (batch, d_sae)
            values, indices = pre.topk(k, dim=-1, sorted=False)
        del pre
        ctx.save_for_backward(xc, w_rows, indices)
        ctx.x_dtype, ctx.w_dtype, ctx.b_dtype = x.dtype, W_enc_rows.dtype, b_enc.dtype
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx: Any, g_values: Tensor, _g_idx: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xc, w_rows, idx = ctx.saved_tensors
        d_sae = w_rows.shape[0]
        g = g_values.to(torch.float32)
        grad_x = grad_W = grad_b = None
        with torch.autocast(device_type=xc.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dtype = _sparse_dtype(xc.device, xc.dtype)
                grad_x = (rows_csr(idx, g.to(dtype), d_sae)[0] @ w_rows.to(dtype)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_W = scatter_rows_matmul(idx, g, xc, d_sae).to(ctx.w_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(d_sae, device=xc.device, dtype=torch.float32)
                grad_b = grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1)).to(ctx.b_dtype)
        return grad_x, grad_W, grad_b, None, None


def topk_pre_acts(
    x: Tensor, W_enc_rows: Tensor, b_enc: Tensor, k: int, compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k encoder pre-activations with a sparse backward.

    Args:
        x: `(batch, d_in)` encoder input (already centred by b_dec and scaled).
        W_enc_rows: `(d_sae, d_in)` encoder directions by latent (= W_encᵀ); b_enc: `(d_sae,)`.
        k: latents kept per row.
        compute_dtype: matmul dtype (default: autocast dtype if autocast is on, else the weights').

    Returns:
        `values (batch, k)` (raw pre-activations: apply ReLU yourself, in compute dtype) and
        `indices (batch, k)` int64. (AuxK's dead-latent selection is `sae.auxk`.)
    """
    dtype = compute_dtype or compute_dtype_for(x, W_enc_rows.dtype)
    return _TopKPreActs.apply(x, W_enc_rows, b_enc, int(k), dtype)


def csr_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """`sum_j values[b, j] * weight[indices[b, j]]` as one CSR × dense matmul → `(batch, d)` float32."""
    csr, _ = rows_csr(indices, values.to(torch.float32), weight.shape[0])
    return csr @ weight.to(torch.float32)


def gathered_dots(indices: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
    """`out[b, j] = <grad[b], weight[indices[b, j]]>` `(batch, n)` float32, by a sampled dense-dense matmul."""
    pattern, perm = rows_csr(indices, torch.ones(indices.shape, device=indices.device), weight.shape[0])
    sampled = torch.sparse.sampled_addmm(pattern, grad.to(torch.float32), weight.to(torch.float32).t(), beta=0.0)
    return torch.empty(indices.shape, device=grad.device).scatter_(1, perm, sampled.values().view(perm.shape))


class _SparseDecode(torch.autograd.Function):
    """See `sparse_decode`; float32 throughout (the decoder weights are used as stored, no cast)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        with torch.autocast(device_type=values.device.type, enabled=False):
            v32 = values.to(torch.float32)
            out = csr_decode(v32, indices, W_dec)
        ctx.save_for_backward(v32, indices, W_dec)
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(indices)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        v32, indices, W_dec = ctx.saved_tensors
        grad_values = grad_w = None
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            g32 = grad_out.to(torch.float32)
            if ctx.needs_input_grad[0]:
                grad_values = gathered_dots(indices, g32, W_dec).to(ctx.values_dtype)
            if ctx.needs_input_grad[2]:
                grad_w = scatter_rows_matmul(indices, v32, g32, W_dec.shape[0]).to(W_dec.dtype)
        return grad_values, None, grad_w


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """`sum_j values[b, j] * W_dec[indices[b, j]]` → `(batch, d_in)` float32, without a dense code.

    Args:
        values: `(batch, n)` latent activations; indices: `(batch, n)` int64 latent ids, distinct
            within a row. W_dec: `(d_sae, d_in)`.
    """
    return _SparseDecode.apply(values, indices, W_dec)


class SparseKernels:
    """The standard training path's three primitives, each differentiable through autograd.

    `sae` is a `sae.model.SparseAutoencoder`; `sae.kernels.fused.FusedKernels` has the same methods.
    """

    name = "sparse"

    def topk(self, sae: Any, x: Tensor, per_row: int) -> tuple[Tensor, Tensor]:
        """Top-`per_row` encoder pre-activations of raw `x (batch, d_in)`: values and int64 indices."""
        return topk_pre_acts(sae.encoder_input(x), sae.W_enc_rows, sae.b_enc, per_row)

    def decode(self, sae: Any, values: Tensor, indices: Tensor) -> Tensor:
        """`(batch, n)` codes → `(batch, d_in)` float32 decode plus b_dec, in scaled units."""
        decoded = sparse_decode(values, indices, sae.W_dec)
        return decoded + sae.b_dec.to(decoded.dtype)

    def rows(self, sae: Any, name: str, ids: Tensor) -> Tensor:
        """`(n, d_in)` rows `ids` of the weight matrix `name` ("W_enc_rows" or "W_dec")."""
        return getattr(sae, name)[ids]


SPARSE_KERNELS = SparseKernels()


def dense_topk_reference(x: Tensor, W_enc_rows: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd reference of the main path of `topk_pre_acts` (tests only)."""
    pre = x @ W_enc_rows.t() + b_enc
    return pre.topk(k, dim=-1, sorted=False)
