"""Lightning data module serving activation rows of one layer to the SAE trainer.

The training rows are a sorted array of global store row ids (`training_rows`: today the split and
category filter). Their order is `sae.order.RowOrder`, a pure function of (data_seed, step), the
same in both modes (`in_memory=None` = choose by `memory_budget_gb`):

- in memory: the rows are read once, in their storage dtype, through page-locked buffers with
  asynchronous copies, and cast on the device (`sae.device_rows`); each step's batch is a gather
  on the device.
- streaming: `sae.stream.WindowStream` reads each shuffle window in background threads while the
  previous one is trained on, and gathers each step's batch on the device.

Only the rows `sae.rows.training_rows` keeps are served (position kinds, no attention sink, no exact
duplicates; `self.selection` holds them and how many rows each rule removed).
The DataLoader only yields step ticks; the batch of global step `s` is built in
`on_after_batch_transfer` from `trainer.global_step`, so a resumed run sees exactly the batches an
uninterrupted one would, and DDP ranks take disjoint lanes of the same global batch. Labels are
int64 class ids from the category column (index in `activations.records.CATEGORIES`).
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from activations.store import ActivationStore
from activations.store.raw import LayerReader, as_torch
from sae.config import DataConfig, as_config
from sae.device_rows import load_rows
from sae.order import RowOrder, WindowPlan
from sae.rows import RowSelection, training_rows as select_training_rows
from sae.stream import WindowStream, labels_from_categories, read_rows

DEVICE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StepTicker(IterableDataset):
    """Yields 0, 1, 2, ... forever; the real batch is built on the device from the global step."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class ShardDataModule(pl.LightningDataModule):
    """Activation rows of `layer` from an activation store, for SAE training.

    Args:
        shards_dir: folder with manifest.json and shard-*.h5 (see activations/store/).
        layer: block index whose output to train on.
        data: rows, order and placement (`sae.config.DataConfig`; a dict of its fields works too).
    """

    def __init__(self, shards_dir: str, layer: int, data: DataConfig | dict | None = None) -> None:
        super().__init__()
        cfg = as_config(data, DataConfig)
        self.save_hyperparameters({"shards_dir": str(shards_dir), "layer": int(layer), "data": asdict(cfg)})
        self.shards_dir, self.layer, self.data_cfg = str(shards_dir), int(layer), cfg
        self.split, self.batch_size, self.categories = cfg.split, cfg.batch_size, cfg.categories
        self.in_memory = cfg.in_memory
        self.store: ActivationStore | None = None
        self.selection: RowSelection | None = None
        self.reader: LayerReader | None = None
        self.rows = np.empty(0, dtype=np.int64)
        self.n_rows = 0
        self._labels: np.ndarray | None = None
        self._device_x: torch.Tensor | None = None
        self._device_y: torch.Tensor | None = None
        self._plan: tuple[tuple[int, int, int, int], WindowPlan, torch.Tensor] | None = None
        self._stream: WindowStream | None = None
        self._orders: dict[int, RowOrder] = {}

    # ---- description --------------------------------------------------------------------------
    def _open(self) -> ActivationStore:
        if self.store is None:
            self.store = ActivationStore(self.shards_dir)
            if self.layer not in self.store.layers:
                raise ValueError(
                    f"layer {self.layer} is not in the activation store {self.shards_dir}; available layers: {self.store.layers}"
                )
        return self.store

    @property
    def d_model(self) -> int:
        return self._open().d_model

    @property
    def manifest(self) -> dict[str, Any]:
        return self._open().manifest

    @property
    def manifest_sha256(self) -> str:
        """sha256 of the store's manifest.json bytes (identifies the training data)."""
        return hashlib.sha256((self._open().directory / "manifest.json").read_bytes()).hexdigest()

    def _split_label(self) -> str:
        return "every split" if self.split is None else f"split {self.split!r}"

    def _where(self) -> str:
        return f"{self.shards_dir} layer {self.layer}"

    # ---- setup --------------------------------------------------------------------------------
    def training_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """`(rows (n,) sorted int64 global row ids, labels (n,) int64 class ids)` of the training rows:
        the split / category rows that the row rules keep (`sae.rows.training_rows`, kept in
        `self.selection`)."""
        store = self._open()
        self.selection = select_training_rows(store, self.layer, self.data_cfg)
        keep = self.selection.index
        categories = store.column("category", self.split, self.categories)[keep]
        return store.row_ids(self.split, self.categories)[keep], labels_from_categories(categories)

    def setup(self, stage: str | None = None) -> None:
        """Select the training rows (error if none) and choose the mode; the rows are read later,
        on the training device (`on_fit_start`-time first batch)."""
        if self.n_rows:
            return
        store = self._open()
        if len(store.row_ids(self.split, self.categories)) == 0:
            raise ValueError(
                f"{self._split_label()} of layer {self.layer} has no rows in {self.shards_dir}"
                + (f" (categories {self.categories})" if self.categories else "")
            )
        self.rows, self._labels = self.training_rows()
        self.n_rows = len(self.rows)
        counts = self.selection.to_dict()  # type: ignore[union-attr]
        print(f"SAE training rows: {counts['candidates']} in {self._split_label()}, removed "
              + ", ".join(f"{rule} {n}" for rule, n in counts["removed"].items()) + f"; {counts['kept']} kept", flush=True)
        if self.n_rows == 0:
            raise ValueError(f"no SAE training rows left in {self.shards_dir} after the row rules {counts['removed']} "
                             f"(position_kinds={self.data_cfg.position_kinds})")
        self.reader = LayerReader(store, self.layer)
        if self.in_memory is None:
            itemsize = torch.finfo(DEVICE_DTYPES[self.data_cfg.device_dtype]).bits // 8
            self.in_memory = self.n_rows * store.d_model * itemsize <= self.data_cfg.memory_budget_gb * 2**30

    def _world(self) -> tuple[int, int]:
        """(rank, world size) for slicing the global batch; (0, 1) when every rank takes all of it."""
        trainer = self.trainer
        if trainer is None or getattr(trainer.strategy, "replicates_data", False):
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def order(self, world: int = 1) -> RowOrder:
        """The row order of this data for `world` ranks of `batch_size` rows each."""
        self.setup()
        cfg = self.data_cfg
        if world not in self._orders:
            self._orders[world] = RowOrder(self.n_rows, self.batch_size * world, cfg.lanes, cfg.chunk_rows,
                                           cfg.chunk_rows * cfg.window_chunks, cfg.data_seed)
        return self._orders[world]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_StepTicker(), batch_size=None)

    # ---- batches ------------------------------------------------------------------------------
    def _labels_on(self, device: torch.device) -> torch.Tensor:
        if self._device_y is None or self._device_y.device != device:
            self._device_y = torch.from_numpy(self._labels).to(device)  # type: ignore[arg-type]
        return self._device_y

    def batch_for_step(self, step: int, device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `(batch_size, d_model)` and labels `(batch_size,)` of global step `step` for `rank`."""
        self.setup()
        if self.in_memory:
            return self._memory_batch(step, device, rank, world_size)
        return self._stream_batch(step, device, rank, world_size)

    def _memory_batch(self, step: int, device: torch.device, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = DEVICE_DTYPES[self.data_cfg.device_dtype]
        if self._device_x is None or self._device_x.device != device:
            self._device_x = load_rows(self.reader, self.rows, device, dtype, self.data_cfg.num_workers, self._where())  # type: ignore[arg-type]
            self._plan = None
        order = self.order(world)
        epoch, window, t = order.locate(step)
        key = (epoch, window, rank, world)
        if self._plan is None or self._plan[0] != key:
            plan = order.plan(epoch, window, rank, world)
            steps = torch.from_numpy(plan.rows[plan.gather])
            steps = steps.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else steps
            self._plan = (key, plan, steps)
        rows = self._plan[2][t]
        return self._device_x.index_select(0, rows), self._labels_on(device).index_select(0, rows)

    def _stream_batch(self, step: int, device: torch.device, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self._stream
        if stream is None or stream.device != device or (stream.rank, stream.world) != (rank, world) or stream.next_step != step:
            self.close_stream()
            order = self.order(world)
            order = RowOrder(order.n_rows, order.global_batch, order.lanes, order.chunk_rows, order.window_rows, order.seed)
            stream = self._stream = WindowStream(  # its own RowOrder: the reader thread caches block orders
                self.reader, self.rows, self._labels_on(device), order, rank, world, device,  # type: ignore[arg-type]
                DEVICE_DTYPES[self.data_cfg.device_dtype], start_step=step, workers=self.data_cfg.num_workers,
                where=self._where(),
            )
        return stream.batch(step)

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def teardown(self, stage: str) -> None:
        self.close_stream()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        rank, world = self._world()
        return self.batch_for_step(self.trainer.global_step, self.trainer.strategy.root_device, rank, world)

    # ---- samples for initialisation and evaluation -------------------------------------------
    def sample_rows(self, n: int | None = None) -> torch.Tensor:
        """A seeded random sample `(m, d_model)` float32 on the CPU (m <= n) of the training rows
        (read from the store in both modes, so both initialise identically)."""
        n = self.data_cfg.init_rows if n is None else n
        self.setup()
        rng = np.random.default_rng([self.data_cfg.data_seed, 7])
        pick = np.sort(rng.choice(self.n_rows, size=min(n, self.n_rows), replace=False))
        raw = self.reader.empty(len(pick))  # type: ignore[union-attr]
        read_rows(self.reader, self.rows[pick], raw, None, self._where())  # type: ignore[arg-type]
        return as_torch(raw, self.reader.dtype_name).to(torch.float32)  # type: ignore[union-attr]
