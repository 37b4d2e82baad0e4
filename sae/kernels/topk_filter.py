"""Exact row top-k of a wide bf16/fp16 matrix by threshold filtering (CUDA + Triton; torch.topk elsewhere).

`torch.topk` on a `(batch, d_sae)` pre-activation matrix makes several passes of radix selection.
Here, for k much smaller than d_sae:

1. `_chunk_max_kernel`: the maximum of every chunk of CHUNK columns (batch, n / CHUNK).
2. `t` = the k-th largest of those maxima. They are k distinct entries of the row, so at least k
   entries are >= t: t is a lower bound of the row's k-th largest value (close to it: only chunks
   holding two or more of the top k let it slip below).
3. `_select_kernel`, one program per row: only the chunks whose maximum is >= t (about k of them)
   are read again, and their entries >= t are copied into a per-row buffer of `capacity` slots.
4. `torch.topk` of the small buffer gives the answer; rows whose buffer overflowed (many ties at t)
   are redone exactly by `_repair_kernel` (radix selection on 16-bit keys), launched for every row
   but returning at once where nothing overflowed: no device-to-host read, so no sync.

Ties at the k-th value may select different (equal-valued) entries than torch.topk; NaN entries are
never selected (torch.topk ranks NaN highest).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sae.kernels.triton import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _chunk_max_kernel(x_ptr, out_ptr, n, n_chunks, CHUNK: tl.constexpr, ROWS: tl.constexpr):
        """Maxima of ROWS consecutive chunks of CHUNK columns (a (ROWS, CHUNK) tile per program)."""
        row = tl.program_id(0).to(tl.int64)
        first = tl.program_id(1) * ROWS
        chunks = first + tl.arange(0, ROWS)
        cols = chunks[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        values = tl.load(x_ptr + row * n + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        values = tl.where(values == values, values, float("-inf"))  # NaN never counts
        tl.store(out_ptr + row * n_chunks + chunks, tl.max(values, axis=1), mask=chunks < n_chunks)

    @triton.jit
    def _select_kernel(x_ptr, cmax_ptr, t_ptr, list_ptr, val_ptr, idx_ptr, count_ptr, n, n_chunks, capacity,
                       CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
        """One program per row: list the chunks whose maximum is >= t, then copy their entries >= t
        into the row's buffer (only those chunks are read again; a row's count may exceed capacity)."""
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr + row)
        chunk_ids = tl.arange(0, N_CHUNKS)
        maxima = tl.load(cmax_ptr + row * n_chunks + chunk_ids, mask=chunk_ids < n_chunks, other=float("-inf"))
        qualifies = (maxima >= t).to(tl.int32)
        position = tl.cumsum(qualifies, axis=0) - 1
        tl.store(list_ptr + row * N_CHUNKS + position, chunk_ids, mask=qualifies != 0)
        n_listed = tl.sum(qualifies, axis=0)
        tl.debug_barrier()  # the list is read back by other threads of this program
        taken = 0
        for q in range(n_listed):
            offs = tl.load(list_ptr + row * N_CHUNKS + q) * CHUNK + tl.arange(0, CHUNK)
            values = tl.load(x_ptr + row * n + offs, mask=offs < n, other=float("-inf"))
            keep = ((offs < n) & (values.to(tl.float32) >= t)).to(tl.int32)
            slot = taken + tl.cumsum(keep, axis=0) - 1
            ok = (keep != 0) & (slot < capacity)
            tl.store(val_ptr + row * capacity + slot, values, mask=ok)
            tl.store(idx_ptr + row * capacity + slot, offs.to(tl.int64), mask=ok)
            taken += tl.sum(keep, axis=0)
        tl.store(count_ptr + row, taken)

    @triton.jit
    def _keys16(ptr, offs, mask):
        """16-bit floats → unsigned keys in [0, 65535] with the same order (int32)."""
        bits = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.where((bits & 0x8000) != 0, bits ^ 0xFFFF, bits | 0x8000)

    @triton.jit
    def _repair_kernel(x_ptr, count_ptr, capacity, val_ptr, idx_ptr, n, K: tl.constexpr, CHUNK: tl.constexpr):
        """Exact top-k of the rows whose buffer overflowed (others return at once), by radix selection
        on 16-bit keys: two 8-bit histogram passes find the k-th largest key, a third writes the entries."""
        row = tl.program_id(0).to(tl.int64)
        if tl.load(count_ptr + row) > capacity:
            base = x_ptr + row * n
            bins = tl.arange(0, 256)
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                hist += tl.histogram(_keys16(base, offs, offs < n) >> 8, 256, mask=offs < n)
            high = tl.sum((tl.cumsum(hist, 0, reverse=True) >= K).to(tl.int32), axis=0) - 1
            above_high = tl.sum(tl.where(bins > high, hist, 0), axis=0)
            hist = tl.zeros([256], dtype=tl.int32)
            for start in range(0, n, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                keys = _keys16(base, offs, offs < n)
                hist += tl.histogram(keys & 0xFF, 256, mask=(offs < n) & ((keys >> 8) == high))
            low = tl.sum((tl.cumsum(hist, 0, reverse=True) >= K - above_high).to(tl.int32), axis=0) - 1
            threshold = high * 256 + low  # the k-th largest key
            n_greater = above_high + tl.sum(tl.where(bins > low, hist, 0), axis=0)
            taken_greater = 0
            taken_equal = 0
            for start in range(0, n, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                keys = _keys16(base, offs, offs < n)
                greater = (offs < n) & (keys > threshold)
                equal = (offs < n) & (keys == threshold)
                rank_e = taken_equal + tl.cumsum(equal.to(tl.int32), 0) - 1
                slot = tl.where(greater, taken_greater + tl.cumsum(greater.to(tl.int32), 0) - 1, n_greater + rank_e)
                keep = greater | (equal & (rank_e < K - n_greater))
                tl.store(val_ptr + row * K + slot, tl.load(base + offs, mask=keep), mask=keep)
                tl.store(idx_ptr + row * K + slot, offs.to(tl.int64), mask=keep)
                taken_greater += tl.sum(greater.to(tl.int32), axis=0)
                taken_equal += tl.sum(equal.to(tl.int32), axis=0)

CHUNK = 128
"""Columns per chunk whose maximum is a candidate (halved, down to MIN_CHUNK, for narrower rows)."""
MIN_CHUNK = 32
TILE_CHUNKS = 64
"""Chunks per program of the maxima pass."""


def chunk_for(n: int, k: int) -> int | None:
    """The widest chunk (CHUNK, halved down to MIN_CHUNK) giving at least 8k chunk maxima per row,
    which keeps the threshold close to the k-th value; None when even MIN_CHUNK gives fewer (e.g. a
    latent-parallel shard of 32,768 latents with k 64 takes chunks of 64)."""
    chunk = CHUNK
    while n // chunk < 8 * k and chunk > MIN_CHUNK:
        chunk //= 2
    return chunk if n // chunk >= 8 * k else None


def supported(x: Tensor, k: int) -> bool:
    """Whether `filtered_topk` takes the filter path for `x (batch, n)` (else it calls torch.topk)."""
    return (available(x.device) and x.ndim == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and chunk_for(x.shape[-1], k) is not None)


def filtered_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row top-k of `x (batch, n)` in no particular order: `values (batch, k)`, `indices (batch, k)` int64."""
    if not supported(x, k):
        return x.topk(k, dim=-1, sorted=False)
    x = x.contiguous()
    batch, n = x.shape
    chunk = chunk_for(n, k)
    n_chunks = triton.cdiv(n, chunk)
    candidates = torch.empty(batch, n_chunks, device=x.device, dtype=torch.float32)
    grid = (batch, triton.cdiv(n_chunks, TILE_CHUNKS))
    _chunk_max_kernel[grid](x, candidates, n, n_chunks, CHUNK=chunk, ROWS=TILE_CHUNKS, num_warps=8)
    threshold = candidates.topk(k, dim=-1, sorted=False).values.amin(dim=-1)  # (batch,)
    capacity = 4 * k
    buf_values = torch.full((batch, capacity), float("-inf"), device=x.device, dtype=x.dtype)
    buf_indices = torch.zeros(batch, capacity, device=x.device, dtype=torch.int64)
    counts = torch.empty(batch, device=x.device, dtype=torch.int32)
    n_chunks_pow2 = triton.next_power_of_2(n_chunks)
    chunk_list = torch.empty(batch, n_chunks_pow2, device=x.device, dtype=torch.int32)
    _select_kernel[(batch,)](x, candidates, threshold, chunk_list, buf_values, buf_indices, counts, n, n_chunks,
                             capacity, CHUNK=chunk, N_CHUNKS=n_chunks_pow2, num_warps=4)
    values, slots = buf_values.topk(k, dim=-1, sorted=False)
    indices = buf_indices.gather(1, slots)
    # rows with more than `capacity` entries at or above t (many ties): redone exactly on the device,
    # by programs that return at once for every other row (no host read-back, so no sync)
    _repair_kernel[(batch,)](x, counts, capacity, values, indices, n, K=k, CHUNK=4096, num_warps=8)
    return values, indices
