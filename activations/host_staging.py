"""Reusable host buffers for the harvest's device→host copies.

Copying captured rows with `tensor.to("cpu", non_blocking=True)` allocates a fresh page-locked
buffer per batch. The writer keeps each batch's rows until their shard is written (several batches
later), so PyTorch's pinned-memory cache rarely has a free block of the right size and most batches
pay for a new `cudaHostAlloc` — milliseconds per batch on an 8B-shaped model, in the forward loop.

`HostStaging` instead keeps a few page-locked slots, reused round-robin: the forward loop copies a
batch's rows into a free slot asynchronously (and records an event), the writer thread waits for the
event, copies the rows out into ordinary memory (off the forward loop; the copy releases the GIL)
and gives the slot back. When every slot is taken the forward loop waits for the writer, which
bounds the host memory held in flight. Slots grow to the largest batch seen (length-bucketed batches
come longest first, so a slot is usually allocated once). The copies are queued on the current
stream (a side stream for them measured slower on an H200, docs/shards.md).
"""
from __future__ import annotations

import queue
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StagedRows:
    """One batch's rows in a staging slot: `rows` layer → `(n, d)` views of the slot, valid until
    `release()`; `ready` is the copy's CUDA event (None on the CPU)."""

    slot: int
    rows: dict[int, Tensor]
    ready: torch.cuda.Event | None


class HostStaging:
    """`slots` reusable host buffers (page-locked when `pin`) for device→host copies.

    Args:
        slots: buffers in rotation (the forward loop blocks in `stage` while all are in use).
        pin: page-locked memory (for asynchronous copies from a CUDA device).
    """

    def __init__(self, slots: int, pin: bool) -> None:
        if slots < 1:
            raise ValueError(f"HostStaging needs at least one slot, got {slots}")
        self.pin = pin
        self._buffers: list[Tensor | None] = [None] * slots
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self.allocations = 0
        """How many buffers were allocated (grown) so far."""

    def _buffer(self, slot: int, nbytes: int) -> Tensor:
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[slot] = buffer
            self.allocations += 1
        return buffer

    def stage(self, tensors: Mapping[int, Tensor]) -> StagedRows:
        """Copy `tensors` (layer → `(n, d)` rows, on any device) into a free slot; asynchronous from
        CUDA (the returned event marks the end of the copies, queued on the current stream)."""
        slot = self._free.get()
        sizes = {layer: t.numel() * t.element_size() for layer, t in tensors.items()}
        buffer = self._buffer(slot, sum(sizes.values()))
        rows, offset, on_cuda = {}, 0, False
        for layer, t in tensors.items():
            view = buffer[offset:offset + sizes[layer]].view(t.dtype).view(t.shape)
            view.copy_(t, non_blocking=t.is_cuda)
            on_cuda |= t.is_cuda
            rows[layer] = view
            offset += sizes[layer]
        ready = None
        if on_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return StagedRows(slot, rows, ready)

    def take(self, staged: StagedRows) -> dict[int, Tensor]:
        """Wait for `staged`'s copies, copy its rows out to ordinary host memory and free its slot."""
        try:
            if staged.ready is not None:
                staged.ready.synchronize()
            return {layer: view.clone() for layer, view in staged.rows.items()}
        finally:
            self.release(staged)

    def release(self, staged: StagedRows) -> None:
        """Give `staged`'s slot back (its views must not be used afterwards)."""
        self._free.put(staged.slot)
