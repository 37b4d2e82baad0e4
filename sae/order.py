"""The order of training rows: which rows global batch `s` holds, a pure function of (seed, step).

Both data modes (rows on the device, rows streamed from disk) use this one order, so they give the
same batches, a killed run resumes exactly, and the global batch does not depend on the number of
ranks. With `n` selected rows, global batch `G` (= per-rank batch × ranks), `L` lanes, blocks of
`C` rows and windows of about `R` rows:

1. Epoch `e` lays the rows out as blocks of `C` consecutive selected rows in a random order
   (`default_rng([seed, e])`; a short last block stays last). That sequence, extended cyclically to
   `ceil(n / G) * G` positions, is the epoch: every row at least once per epoch, no batch dropped.
2. The epoch is cut into windows of `max(1, R // G)` steps. A window's positions are split into `L`
   contiguous lane segments; each lane's positions are permuted (`default_rng([seed, e, w, lane])`).
3. Step `t` of the window takes the next `G / L` positions of every lane; the global batch is the
   lanes' pieces in lane order, and rank `r` of `world` takes lanes `[r L / world, (r+1) L / world)`.

A lane segment is a few contiguous runs of rows, so streaming reads a window chunk-aligned and each
DDP rank reads only its own lanes (1 / world of the data). Rows of a batch come from the whole
window (random blocks of the store), which is the shuffle quality a streaming buffer gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    """One rank's part of one window.

    rows: `(m,)` int64 indices into the selected rows, in buffer order (the rank's lane segments,
        each in sequence order: a few contiguous runs, what a streaming reader reads).
    gather: `(steps, batch)` int64 positions in `rows` of each step's batch rows.
    """

    epoch: int
    window: int
    rows: np.ndarray
    gather: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.gather.shape[0])

    def step_rows(self, t: int) -> np.ndarray:
        """Selected-row indices `(batch,)` of local step `t`."""
        return self.rows[self.gather[t]]


@dataclass(frozen=True)
class RowOrder:
    """The row order of one training job (see the module docstring).

    Args:
        n_rows: selected rows (one epoch). global_batch: rows per step over all ranks.
        lanes: independent shuffle lanes (DDP ranks own whole lanes). chunk_rows: block size.
        window_rows: rows per shuffle window (rounded down to whole steps, at least one). seed: data seed.
    """

    n_rows: int
    global_batch: int
    lanes: int
    chunk_rows: int
    window_rows: int
    seed: int
    _blocks: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_rows < 1:
            raise ValueError("the row order needs at least one row")
        if self.global_batch % self.lanes:
            raise ValueError(f"the global batch ({self.global_batch} rows) must be a multiple of data.lanes ({self.lanes})")
        if min(self.chunk_rows, self.window_rows, self.lanes) < 1:
            raise ValueError("chunk_rows, window rows and lanes must be >= 1")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_rows // self.global_batch)

    @property
    def steps_per_window(self) -> int:
        return max(1, min(self.window_rows // self.global_batch, self.steps_per_epoch))

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.steps_per_window)

    def locate(self, step: int) -> tuple[int, int, int]:
        """`(epoch, window, local step)` of global step `step`."""
        epoch, within = divmod(int(step), self.steps_per_epoch)
        window, t = divmod(within, self.steps_per_window)
        return epoch, window, t

    def next_window(self, epoch: int, window: int) -> tuple[int, int]:
        return (epoch, window + 1) if window + 1 < self.windows_per_epoch else (epoch + 1, 0)

    def window_steps(self, window: int) -> int:
        return min(self.steps_per_window, self.steps_per_epoch - window * self.steps_per_window)

    def _block_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._blocks:
            full = self.n_rows // self.chunk_rows
            self._blocks.clear()
            self._blocks[epoch] = np.random.default_rng([self.seed, epoch]).permutation(full)
        return self._blocks[epoch]

    def positions_to_rows(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Selected-row indices at epoch-sequence `positions` (cyclic beyond n_rows)."""
        p = np.asarray(positions, dtype=np.int64) % self.n_rows
        order = self._block_order(epoch)
        if len(order) == 0:
            return p
        slot, offset = np.divmod(p, self.chunk_rows)
        in_full = slot < len(order)  # the short last block stays at the end of the sequence
        return np.where(in_full, order[np.minimum(slot, len(order) - 1)] * self.chunk_rows + offset, p)

    def plan(self, epoch: int, window: int, rank: int = 0, world: int = 1) -> WindowPlan:
        """Rank `rank`'s rows of window `window` of epoch `epoch` and each step's batch positions."""
        if self.lanes % world:
            raise ValueError(f"data.lanes ({self.lanes}) must be a multiple of the number of ranks ({world})")
        steps = self.window_steps(window)
        share = self.global_batch // self.lanes  # rows per lane per step
        segment = steps * share
        start = window * self.steps_per_window * self.global_batch
        own = range(rank * self.lanes // world, (rank + 1) * self.lanes // world)
        rows, gather = [], []
        for j, lane in enumerate(own):
            first = start + lane * segment
            rows.append(self.positions_to_rows(epoch, np.arange(first, first + segment)))
            perm = np.random.default_rng([self.seed, epoch, window, lane]).permutation(segment)
            gather.append(perm.reshape(steps, share) + j * segment)
        return WindowPlan(epoch, window, np.concatenate(rows), np.concatenate(gather, axis=1))

    def rows_for_step(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Selected-row indices `(global_batch / world,)` of rank `rank`'s part of global batch `step`."""
        epoch, window, t = self.locate(step)
        return self.plan(epoch, window, rank, world).step_rows(t)
