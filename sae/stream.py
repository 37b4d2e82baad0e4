"""Streaming training rows from the activation store: background reads, pinned buffers, async copies.

`WindowStream` serves the batches of `sae.order.RowOrder` for one rank, step after step, from data
that need not fit on the device. A producer thread walks the rank's windows in order; for each it
reads the rank's lane segments (a few contiguous row runs, `activations.store.raw.LayerReader`,
`workers` reads at once) into a free host buffer (page-locked on CUDA), in the storage dtype, and
checks them for NaN/inf without a float32 copy. The training thread copies a ready window to one of
two device buffers on a side stream while the previous window is still being trained on, and each
step gathers its rows from the device buffer and casts them to the training dtype there. Nothing
on the training thread waits for the disk unless the disk is slower than the GPU.

The batches equal the in-memory mode's (same `RowOrder`, same storage → device cast), so either
mode resumes the other's checkpoints exactly.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from activations.records import CATEGORIES
from activations.store.raw import TORCH_STORAGE_DTYPES, LayerReader, as_torch, nonfinite_rows
from sae.order import RowOrder, WindowPlan

CATEGORY_IDS: dict[str, int] = {name: index for index, name in enumerate(CATEGORIES)}
READ_PIECE_BYTES = 32 << 20
"""Rows are read in pieces of about this many bytes (one task of the reader pool each)."""


def labels_from_categories(categories: np.ndarray) -> np.ndarray:
    """Category names (str, or bytes as `ActivationStore.column` gives them) → int64 class ids
    (index in CATEGORIES, -1 for anything else); one vectorised comparison per known category."""
    values = np.asarray(categories)
    out = np.full(len(values), -1, dtype=np.int64)
    for name, index in CATEGORY_IDS.items():
        out[values == (name.encode() if values.dtype.kind == "S" else name)] = index
    return out


def read_rows(reader: LayerReader, ids: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor | None, where: str) -> None:
    """Global rows `ids` into `out[:len(ids)]` in pieces on `pool`; ValueError naming a NaN/inf row."""
    piece = max(1, READ_PIECE_BYTES // reader.row_bytes)

    def one(a: int) -> None:
        b = min(a + piece, len(ids))
        reader.read(ids[a:b], out[a:b])
        bad = nonfinite_rows(out[a:b], reader.dtype_name)
        if len(bad):
            raise ValueError(f"{where}: activation row {int(ids[a + bad[0]])} of the store holds NaN or inf")

    starts = range(0, len(ids), piece)
    if pool is None:
        for a in starts:
            one(a)
    else:
        for future in [pool.submit(one, a) for a in starts]:
            future.result()


@dataclass
class _Ready:
    plan: WindowPlan
    host: np.ndarray
    slot: int
    """Index of the host buffer (returned to the free list once copied)."""


class WindowStream:
    """Batches `(x (batch, d) device_dtype, labels (batch,) int64)` of one rank, on `device`, in step order.

    Args:
        reader: the layer's rows. rows: `(n,)` sorted global row ids of the training rows.
        labels: `(n,)` int64 class ids on `device`. order: the row order. rank, world: this rank.
        start_step: first step served (a resumed run starts at its step).
        workers: parallel reads. where: names the store in errors.
    """

    def __init__(self, reader: LayerReader, rows: np.ndarray, labels: torch.Tensor, order: RowOrder, rank: int,
                 world: int, device: torch.device, device_dtype: torch.dtype, start_step: int = 0, workers: int = 4,
                 where: str = "activation store") -> None:
        self.reader, self.rows, self.labels, self.order = reader, rows, labels, order
        self.rank, self.world, self.device, self.device_dtype = rank, world, device, device_dtype
        self.where = where
        self.cuda = device.type == "cuda"
        capacity = order.steps_per_window * order.global_batch // world
        self._host = [reader.empty(capacity, pin=self.cuda) for _ in range(2)]
        self._free: queue.Queue[tuple[int, Any]] = queue.Queue()
        for slot in range(2):
            self._free.put((slot, None))
        self._ready: queue.Queue[_Ready | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="sae-read")
        self._current: tuple[int, int] | None = None
        self._next_step = int(start_step)
        self._window: dict[str, Any] = {}
        self._staged: dict[str, Any] | None = None  # the next window, copied ahead
        if self.cuda:
            storage = TORCH_STORAGE_DTYPES[reader.dtype_name]
            self._device_bufs = [torch.empty((capacity, reader.d_model), dtype=storage, device=device) for _ in range(2)]
            self._copy_stream = torch.cuda.Stream(device)
            self._buf_free = [None, None]  # main-stream events after the last read of each device buffer
            self._use = 0
        epoch, window, _ = order.locate(start_step)
        self._thread = threading.Thread(target=self._produce, args=(epoch, window), daemon=True, name="sae-stream")
        self._thread.start()

    # ---- producer (background thread) ----------------------------------------------------------
    def _produce(self, epoch: int, window: int) -> None:
        try:
            while not self._stop.is_set():
                plan = self.order.plan(epoch, window, self.rank, self.world)
                slot = self._take_free()
                if slot is None:
                    return
                read_rows(self.reader, self.rows[plan.rows], self._host[slot], self._pool, self.where)
                self._ready.put(_Ready(plan, self._host[slot], slot))
                epoch, window = self.order.next_window(epoch, window)
        except BaseException as error:  # raised on the training thread by the next batch()
            self._ready.put(error)

    def _take_free(self) -> int | None:
        while not self._stop.is_set():
            try:
                slot, event = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()  # its copy to the device has finished
            return slot
        return None

    # ---- consumer (training thread) ------------------------------------------------------------
    def _get_ready(self, block: bool) -> _Ready | None:
        try:
            item = self._ready.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def _stage(self, item: _Ready) -> dict[str, Any]:
        """Make a ready window usable on the device: an async copy on CUDA, the host buffer on the CPU."""
        plan = item.plan
        m = len(plan.rows)
        step_rows = torch.from_numpy(plan.rows[plan.gather])  # selected-row ids per step (labels)
        gather = torch.from_numpy(plan.gather)
        if not self.cuda:  # the host buffer is the window; released when the window is left
            return {"plan": plan, "x": as_torch(item.host[:m], self.reader.dtype_name), "gather": gather,
                    "labels": step_rows, "slot": item.slot}
        use = self._use
        self._use ^= 1
        with torch.cuda.stream(self._copy_stream):
            if self._buf_free[use] is not None:
                self._copy_stream.wait_event(self._buf_free[use])
            buf = self._device_bufs[use][:m]
            buf.copy_(as_torch(item.host[:m], self.reader.dtype_name), non_blocking=True)
            gather_d = gather.pin_memory().to(self.device, non_blocking=True)
            labels_d = step_rows.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        self._free.put((item.slot, done))  # the producer reuses the host buffer after the copy
        return {"plan": plan, "x": buf, "gather": gather_d, "labels": labels_d, "done": done, "use": use}

    def _switch(self, key: tuple[int, int]) -> None:
        previous = self._window
        staged = self._staged
        self._staged = None
        if staged is None or (staged["plan"].epoch, staged["plan"].window) != key:
            item = self._get_ready(block=True)
            assert item is not None and (item.plan.epoch, item.plan.window) == key, "windows out of order"
            staged = self._stage(item)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(staged["done"])
            if previous:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self._buf_free[previous["use"]] = event
        elif previous:
            self._free.put((previous["slot"], None))
        self._window = staged
        self._current = key

    @property
    def next_step(self) -> int:
        """The step `batch` expects next."""
        return self._next_step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and labels of global step `step` for this rank (steps must come in order)."""
        if step != self._next_step:
            raise RuntimeError(f"WindowStream serves steps in order: expected step {self._next_step}, got {step}")
        self._next_step += 1
        epoch, window, t = self.order.locate(step)
        if self._current != (epoch, window):
            self._switch((epoch, window))
        if self.cuda and self._staged is None:  # copy the next window ahead, once it is read
            item = self._get_ready(block=False)
            if item is not None:
                self._staged = self._stage(item)
        win = self._window
        positions = win["gather"][t]
        x = win["x"].index_select(0, positions).to(self.device_dtype)
        return x, self.labels.index_select(0, win["labels"][t])

    def close(self) -> None:
        """Stop the reader thread and release the file handles."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
