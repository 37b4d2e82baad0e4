"""Read activation rows of one layer straight from the shard files, in their storage dtype.

`LayerReader(store, layer)` maps the store's global row ids (the shards' rows concatenated in
manifest order, as `ActivationStore.row_ids` numbers them) to byte ranges of the `layer_<l>`
datasets. The writer makes those datasets contiguous and uncompressed (docs/shards.md), so a run
of consecutive rows is one `os.preadv` into the caller's buffer (a pinned host tensor, say): no
HDF5 call, no float32 decode, the GIL released, so several threads read at disk speed at once.
A dataset that is chunked or compressed (written by another tool) is read through h5py instead:
slower, same bytes.

Storage dtypes come back as stored: float32, float16, or bfloat16 as its raw uint16 bits
(`as_torch` views them as `torch.bfloat16` without a copy).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from activations.store.format import physical_dtype
from activations.store.read import ActivationStore, open_shard

MAX_PREAD_BYTES = 1 << 30
"""Largest single `preadv` (Linux caps one call near 2 GiB)."""

TORCH_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class _Shard:
    path: Path
    first_row: int
    rows: int
    offset: int | None
    """Byte offset of the contiguous dataset in the file, or None (read through h5py)."""


def as_torch(raw: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A storage-dtype numpy array `(n, d)` as a torch tensor of that dtype, sharing memory."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


_EXPONENT = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}


def nonfinite_rows(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    """Indices of the rows of a storage-dtype array `(n, d)` holding NaN or inf: the exponent bits
    all ones, tested on the integer bits (no float conversion, a few GB/s per thread)."""
    itype, mask = _EXPONENT[dtype_name]
    bits = raw.view(itype)
    return np.flatnonzero(((bits & itype(mask)) == itype(mask)).any(axis=1))


class LayerReader:
    """Rows of `layer` by global row id, read into caller-provided storage-dtype buffers.

    Thread-safe: every read is a positional read on a file descriptor opened once per shard.
    """

    def __init__(self, store: ActivationStore, layer: int) -> None:
        store._check_layer(layer)
        store._verify(range(len(store.manifest["shards"])))  # checksums as every reader (once per process)
        self.store, self.layer = store, layer
        self.dtype_name = store.dtype
        self.np_dtype = physical_dtype(store.dtype)
        self.d_model = store.d_model
        self.row_bytes = self.d_model * self.np_dtype.itemsize
        shards: list[_Shard] = []
        first = 0
        for index, entry in enumerate(store.manifest["shards"]):
            path = store.directory / entry["file"]
            with open_shard(path) as f:
                ds = store._dataset(f, layer, index)
                if ds.dtype != self.np_dtype:
                    raise ValueError(f"activation shard {path}: layer_{layer} is {ds.dtype}, the manifest says {store.dtype}")
                contiguous = ds.chunks is None and ds.compression is None and not ds.dtype.byteorder == ">"
                offset = ds.id.get_offset() if contiguous else None
            shards.append(_Shard(path, first, int(entry["rows"]), None if offset is None else int(offset)))
            first += int(entry["rows"])
        self._shards = shards
        self._starts = np.array([s.first_row for s in shards] + [first], dtype=np.int64)
        self.n_rows = first
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def empty(self, n: int, pin: bool = False) -> np.ndarray:
        """An uninitialised `(n, d_model)` buffer of the storage dtype (page-locked if `pin`)."""
        if not pin:
            return np.empty((n, self.d_model), dtype=self.np_dtype)
        tensor = torch.empty((n, self.d_model), dtype=torch.int16 if self.np_dtype.itemsize == 2 else torch.float32,
                             pin_memory=True)
        return tensor.numpy().view(self.np_dtype)

    def _fd(self, shard: int) -> int:
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(self._shards[shard].path, os.O_RDONLY)
            return self._fds[shard]

    def read(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Rows `ids` (global row ids, any order) into `out[:len(ids)]`; runs of consecutive ids are one read."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if n == 0:
            return
        if out.shape[1:] != (self.d_model,) or out.dtype != self.np_dtype or len(out) < n or not out.flags.c_contiguous:
            raise ValueError(f"read buffer must be a C-contiguous ({n}, {self.d_model}) {self.np_dtype} array")
        if ids.min() < 0 or ids.max() >= self.n_rows:
            raise IndexError(f"row ids must be in [0, {self.n_rows}), got {ids.min()}..{ids.max()}")
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shard_of) != 0)) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [n]])
        for a, b in zip(starts.tolist(), stops.tolist()):
            shard = int(shard_of[a])
            self._read_run(shard, int(ids[a] - self._starts[shard]), out[a:b])

    def read_range(self, start: int, stop: int, out: np.ndarray) -> None:
        """Global rows `[start, stop)` into `out[:stop - start]`."""
        self.read(np.arange(start, stop, dtype=np.int64), out)

    def _read_run(self, shard: int, local_row: int, out: np.ndarray) -> None:
        info = self._shards[shard]
        if info.offset is None:  # chunked / compressed: h5py
            with h5py.File(info.path, "r") as f:
                f[f"layer_{self.layer}"].read_direct(out, np.s_[local_row : local_row + len(out)])
            return
        view = memoryview(out).cast("B")
        fd = self._fd(shard)
        position = info.offset + local_row * self.row_bytes
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done : done + MAX_PREAD_BYTES]], position + done)
            if got <= 0:
                raise ValueError(f"activation shard {info.path} ended early (truncated?)")
            done += got

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
