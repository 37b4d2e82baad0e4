"""Start-up load of the training rows onto the device, at disk / PCIe speed.

The rows are read in their storage dtype (float16 or bfloat16 bits: half the bytes of float32) by
several threads straight into page-locked buffers (`activations.store.raw`), each buffer is copied
to the device asynchronously while the next ones are read, and the cast to the training dtype runs
on the device. No float32 copy of the data is ever made on the host, and the NaN/inf check runs on
the storage bits in the reader threads.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from activations.store.raw import LayerReader, as_torch
from sae.stream import read_rows

LOAD_PIECE_BYTES = 64 << 20
"""Rows per page-locked staging buffer (bytes)."""
STAGING_BUFFERS = 4


def load_rows(reader: LayerReader, ids: np.ndarray, device: torch.device, dtype: torch.dtype, workers: int = 4,
              where: str = "activation store") -> torch.Tensor:
    """Global rows `ids` as one `(len(ids), d_model)` tensor of `dtype` on `device`."""
    n = len(ids)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="sae-load") as pool:
        if device.type != "cuda":
            raw = reader.empty(n)
            read_rows(reader, ids, raw, pool, where)
            return as_torch(raw, reader.dtype_name).to(device=device, dtype=dtype)
        return _load_cuda(reader, ids, device, dtype, pool, where)


def _load_cuda(reader: LayerReader, ids: np.ndarray, device: torch.device, dtype: torch.dtype,
               pool: ThreadPoolExecutor, where: str) -> torch.Tensor:
    n = len(ids)
    piece = max(1, LOAD_PIECE_BYTES // reader.row_bytes)
    n_pieces = -(-n // piece)
    slots = min(STAGING_BUFFERS, max(n_pieces, 1))
    staging = [reader.empty(min(piece, n), pin=True) for _ in range(slots)]
    copied: list[torch.cuda.Event | None] = [None] * slots
    out = torch.empty((n, reader.d_model), dtype=dtype, device=device)
    stream = torch.cuda.Stream(device)

    def read_piece(i: int) -> None:
        slot = i % slots
        event = copied[slot]
        if event is not None:
            event.synchronize()  # the staging buffer's previous piece is on the device
        a, b = i * piece, min(n, (i + 1) * piece)
        read_rows(reader, ids[a:b], staging[slot], None, where)

    futures: dict[int, Future[None]] = {i: pool.submit(read_piece, i) for i in range(min(slots, n_pieces))}
    try:
        for i in range(n_pieces):
            futures.pop(i).result()
            slot, a, b = i % slots, i * piece, min(n, (i + 1) * piece)
            with torch.cuda.stream(stream):
                chunk = as_torch(staging[slot][: b - a], reader.dtype_name).to(device, non_blocking=True)
                out[a:b].copy_(chunk)  # the cast to the training dtype, on the device
                event = torch.cuda.Event()
                event.record(stream)
                copied[slot] = event
            if i + slots < n_pieces:
                futures[i + slots] = pool.submit(read_piece, i + slots)
    finally:
        for future in futures.values():
            future.cancel()
    torch.cuda.current_stream(device).wait_stream(stream)
    return out
