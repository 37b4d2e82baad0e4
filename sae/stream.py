"""Batches for data that does not fit on the device: chunk-contiguous reads + a shuffle buffer.

The row order is a pure function of (seed, step): epoch `e` reads the store in chunks of
`chunk_rows`, groups `window_chunks` consecutive chunks into a window, and permutes the rows of
window `w` with `numpy.random.default_rng([seed, e, w])`. The stream is the concatenation of the
windows, epoch after epoch; global batch `s` is stream rows `[s*B*world, (s+1)*B*world)` and rank
`r` takes its `r`-th slice. A resumed run starts at its step and sees exactly the same batches
(skipping costs reading the skipped part of the current epoch once).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from activations.store import ActivationStore
from activations.records import CATEGORIES

CATEGORY_IDS: dict[str, int] = {name: index for index, name in enumerate(CATEGORIES)}


def labels_from_categories(categories: np.ndarray) -> np.ndarray:
    """Category strings → int64 class ids (index in CATEGORIES, -1 for anything else)."""
    return np.fromiter((CATEGORY_IDS.get(str(c), -1) for c in categories), dtype=np.int64, count=len(categories))


def check_finite_rows(x: np.ndarray, where: str) -> None:
    """Raise ValueError naming the first row holding NaN or inf."""
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise ValueError(f"{where}: activation row {int(np.flatnonzero(~finite)[0])} holds NaN or inf")


class ShuffledStream(IterableDataset):
    """Yields `(x float32 (batch_size, d_model), labels int64 (batch_size,))` forever from step `start_step`.

    Args:
        store, layer, split, categories: what to read.
        n_rows: number of selected rows (one epoch).
        row_mask: `(rows of split/categories,)` bool: only these rows are served (None = all);
            `n_rows` must equal its count.
        batch_size: rows per rank per step; rank, world_size: this process and the number of ranks.
    """

    def __init__(
        self,
        store: ActivationStore,
        layer: int,
        split: str | list[str] | None,
        categories: list[str] | None,
        n_rows: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk_rows: int = 65536,
        window_chunks: int = 8,
        row_mask: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.row_mask = row_mask
        self.store, self.layer, self.split, self.categories = store, layer, split, categories
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.chunk_rows, self.window_chunks = chunk_rows, window_chunks

    def windows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled windows `(x (m, d), labels (m,))` of one epoch, in stream order."""
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        window = 0
        chunks = self.store.iter_chunks(self.layer, self.split, self.categories, chunk_rows=self.chunk_rows)
        at = 0
        for x, meta in chunks:
            if self.row_mask is not None:
                keep, at = self.row_mask[at: at + len(x)], at + len(x)
                x, meta = x[keep], meta.select(keep)
            check_finite_rows(x, f"{self.store.directory} layer {self.layer}")
            pending_x.append(x)
            pending_y.append(labels_from_categories(meta.category))
            if len(pending_x) == self.window_chunks:
                yield self._shuffle(pending_x, pending_y, epoch, window)
                pending_x, pending_y, window = [], [], window + 1
        if pending_x:
            yield self._shuffle(pending_x, pending_y, epoch, window)

    def _shuffle(self, xs: list[np.ndarray], ys: list[np.ndarray], epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.concatenate(xs), np.concatenate(ys)
        order = np.random.default_rng([self.seed, epoch, window]).permutation(len(x))
        return x[order], y[order]

    def rows_from(self, position: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream pieces starting at global stream row `position`."""
        epoch, skip = divmod(position, self.n_rows)
        while True:
            for x, y in self.windows(epoch):
                if skip >= len(x):
                    skip -= len(x)
                    continue
                yield x[skip:], y[skip:]
                skip = 0
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        global_batch = self.batch_size * self.world_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        buf_x: list[np.ndarray] = []
        buf_y: list[np.ndarray] = []
        buffered = 0
        for x, y in self.rows_from(self.start_step * global_batch):
            buf_x.append(x)
            buf_y.append(y)
            buffered += len(x)
            if buffered < global_batch:
                continue
            all_x, all_y = np.concatenate(buf_x), np.concatenate(buf_y)
            n_full = len(all_x) // global_batch
            for b in range(n_full):
                start = b * global_batch
                yield torch.from_numpy(all_x[start + lo : start + hi].copy()), torch.from_numpy(all_y[start + lo : start + hi].copy())
            rest = n_full * global_batch
            buf_x, buf_y, buffered = [all_x[rest:]], [all_y[rest:]], len(all_x) - rest
