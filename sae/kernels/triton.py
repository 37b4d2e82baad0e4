"""Triton kernels of the fused SAE training path (CUDA only; `sae/kernels/fused.py` holds the torch reference).

Three row-parallel kernels over a `(rows, d)` weight matrix, one program per row (the whole row in
registers, so d <= MAX_D):

- `gather_decode`: `out[b] = bias + sum_j values[b, j] * W[indices[b, j]]` (the sparse decode, batch-major).
- `row_dots`: for the entries of a latent-sorted sparse matrix, `out[e] = <source[src[e]], W[row(e)]>`
  (the gradient of the decoded latent values): each weight row is read once and dotted with the
  few source rows that use it (those stay in L2).
- `row_grad_adam`: the fused optimizer update of one weight row. The row's gradient
  `g = sum_e coef[e] * source[src[e]]` is built in registers from the sparse entries (never written
  to memory), plus a dense gradient row where one is given (AuxK's dead latents), then optionally the component parallel to the row is removed, Adam is applied to the
  float32 master row with its moments, the row is optionally renormalised to unit norm, and the
  master row, the moments and a low-precision copy for the next forward are written back.

Every launcher checks shapes and dtypes; `available()` says whether Triton can run here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

MAX_D = 16384
"""Largest row width the kernels keep in registers."""

ENABLED = True
"""Set False to run the fused path's torch reference on CUDA too (for checks against the kernels)."""


def available(device: torch.device) -> bool:
    """True when the Triton kernels can run on `device` (a CUDA device with Triton installed)."""
    return ENABLED and triton is not None and device.type == "cuda"


def _block(d: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of width d."""
    if d > MAX_D:
        raise ValueError(f"fused SAE kernels keep a row in registers and support d_in <= {MAX_D}, got {d}")
    block = triton.next_power_of_2(d)
    return block, max(4, min(16, block // 256))


if triton is not None:

    @triton.jit
    def _gather_decode_kernel(idx_ptr, val_ptr, w_ptr, bias_ptr, out_ptr, d, n: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < d
        if HAS_BIAS:
            acc = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(n):
            coef = tl.load(val_ptr + b * n + j).to(tl.float32)
            if coef != 0:  # zero codes (ReLU'd, or AuxK slots of live latents) read nothing
                row = tl.load(idx_ptr + b * n + j).to(tl.int64)
                acc += coef * tl.load(w_ptr + row * d + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * d + offs, acc, mask=mask)

    @triton.jit
    def _row_dots_kernel(w_ptr, crow_ptr, src_ptr, coef_ptr, s_ptr, out_ptr, d, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < d
        start = tl.load(crow_ptr + r)
        end = tl.load(crow_ptr + r + 1)
        if end > start:
            w = tl.load(w_ptr + r * d + offs, mask=mask, other=0.0).to(tl.float32)
            for e in range(start, end):
                dot = 0.0
                if tl.load(coef_ptr + e) != 0:  # a zero code's gradient is cut by its ReLU: skip the read
                    s = tl.load(src_ptr + e).to(tl.int64)
                    g = tl.load(s_ptr + s * d + offs, mask=mask, other=0.0).to(tl.float32)
                    dot = tl.sum(g * w, axis=0)
                tl.store(out_ptr + e, dot)

    @triton.jit
    def _row_grad_adam_kernel(
        w_ptr, shadow_ptr, m_ptr, v_ptr, crow_ptr, src_ptr, coef_ptr, s_ptr, dense_pos_ptr, dense_ptr,
        d, step_size, beta1, beta2, eps, bias_correction2_sqrt, norm_eps,
        REMOVE_PARALLEL: tl.constexpr, RENORM: tl.constexpr, WRITE_SHADOW: tl.constexpr, HAS_DENSE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # a column block (the whole row if RENORM)
        mask = offs < d
        base = r * d + offs
        start = tl.load(crow_ptr + r)
        end = tl.load(crow_ptr + r + 1)
        w = tl.load(w_ptr + base, mask=mask, other=0.0)  # issued before the gathers: more bytes in flight
        m = tl.load(m_ptr + base, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base, mask=mask, other=0.0)
        g = tl.zeros([BLOCK_D], dtype=tl.float32)
        for e in range(start, end):
            coef = tl.load(coef_ptr + e)
            if coef != 0:
                s = tl.load(src_ptr + e).to(tl.int64)
                g += coef * tl.load(s_ptr + s * d + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DENSE:  # a dense gradient row for this row (AuxK's dead latents), if any
            pos = tl.load(dense_pos_ptr + r)
            if pos >= 0:
                g += tl.load(dense_ptr + pos * d + offs, mask=mask, other=0.0)
        if REMOVE_PARALLEL:
            g -= tl.sum(g * w, axis=0) * w
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        if RENORM:
            w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=0)), norm_eps)
        tl.store(w_ptr + base, w, mask=mask)
        tl.store(m_ptr + base, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + base, v, mask=mask)
        if WRITE_SHADOW:
            tl.store(shadow_ptr + base, w.to(shadow_ptr.dtype.element_ty), mask=mask)


def _check_rows(name: str, t: Tensor, d: int) -> None:
    if t.ndim != 2 or t.shape[1] != d or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (rows, {d}) matrix, got shape {tuple(t.shape)}")


def gather_decode(values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`(batch, n)` values / indices, `(rows, d)` weight → `(batch, d)` float32 sum of weighted rows
    (plus `bias (d,)` when given)."""
    batch, n = indices.shape
    d = weight.shape[1]
    _check_rows("weight", weight, d)
    if bias is not None and (bias.shape != (d,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({d},) vector, got shape {tuple(bias.shape)}")
    out = torch.empty(batch, d, device=weight.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(d))
    grid = (batch, triton.cdiv(d, block))
    _gather_decode_kernel[grid](indices.contiguous(), values.contiguous(), weight, bias if bias is not None else weight,
                                out, d, n=n, HAS_BIAS=bias is not None, BLOCK_D=block, num_warps=4)
    return out


def row_dots(weight: Tensor, crow: Tensor, src: Tensor, coef: Tensor, source: Tensor) -> Tensor:
    """`(nnz,)` float32: entry e of row r gets `<source[src[e]], weight[r]>` (crow: `(rows + 1,)`),
    or 0 where `coef[e]` (the entry's code value) is 0 — its gradient does not pass the ReLU."""
    d = weight.shape[1]
    _check_rows("weight", weight, d)
    _check_rows("source", source, d)
    out = torch.empty(src.shape[0], device=weight.device, dtype=torch.float32)
    block, warps = _block(d)
    _row_dots_kernel[(weight.shape[0],)](weight, crow, src, coef, source, out, d, BLOCK_D=block, num_warps=warps)
    return out


def row_grad_adam(
    weight: Tensor,
    shadow: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    crow: Tensor,
    src: Tensor,
    coef: Tensor,
    source: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    remove_parallel: bool,
    renorm: bool,
    num_warps: int | None = None,
    column_block: int = 512,
    dense_pos: Tensor | None = None,
    dense: Tensor | None = None,
) -> None:
    """In-place fused Adam update of every row of `weight (rows, d)` float32 (see module docstring).

    Args:
        shadow: `(rows, d)` low-precision copy to refresh (or None); exp_avg: float32 or bfloat16;
            exp_avg_sq: float32. crow `(rows + 1,)`, src `(nnz,)`, coef `(nnz,)` float32: the
            gradient's sparse entries sorted by row; source `(batch, d)`.
        step: the Adam step count after this update (1 on the first update).
        column_block: without the decoder constraint, each program updates this many columns of a row.
        dense_pos, dense: optional extra gradient rows: `dense (n, d)` float32 and `dense_pos (rows,)`
            int64, the row of `dense` added to each weight row (-1 for none).
    """
    rows, d = weight.shape
    for name, t in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("source", source)):
        _check_rows(name, t, d)
    if weight.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32 or coef.dtype != torch.float32:
        raise ValueError("row_grad_adam needs float32 weight, exp_avg_sq and coef")
    if shadow is not None:
        _check_rows("shadow", shadow, d)
    if (dense is None) != (dense_pos is None):
        raise ValueError("row_grad_adam needs dense and dense_pos together")
    if dense is not None and dense_pos is not None:
        _check_rows("dense", dense, d)
        if dense.dtype != torch.float32 or dense_pos.shape != (rows,) or dense_pos.dtype != torch.int64:
            raise ValueError(f"row_grad_adam needs float32 dense rows and a ({rows},) int64 dense_pos")
    block, warps = _block(d)
    if not (remove_parallel or renorm):  # no row reductions: column blocks give more programs in flight
        block, warps = min(block, column_block), 4
    _row_grad_adam_kernel[(rows, triton.cdiv(d, block))](
        weight, shadow if shadow is not None else weight, exp_avg, exp_avg_sq, crow, src, coef, source,
        dense_pos if dense_pos is not None else crow, dense if dense is not None else weight, d, lr / (1 - beta1**step), beta1, beta2, eps, math.sqrt(1 - beta2**step), torch.finfo(torch.float32).eps,
        REMOVE_PARALLEL=remove_parallel, RENORM=renorm, WRITE_SHADOW=shadow is not None,
        HAS_DENSE=dense is not None, BLOCK_D=block,
        num_warps=num_warps or warps,
    )
