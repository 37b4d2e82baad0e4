"""Lightning data module serving activation rows of one layer to the SAE trainer.

Two modes, chosen by size (`in_memory=None` = auto, using `memory_budget_gb`):

- in memory: the selected rows are moved to the device ONCE; each step's batch is gathered on the
  device from a per-epoch permutation (computed on the CPU from (seed, epoch), so the order is the
  same on any device). The DataLoader only yields the step number; the rows are produced in
  `on_after_batch_transfer` from `trainer.global_step`, so batch `s` is a function of (seed, s).
- streaming: `sae.stream.ShuffledStream` reads chunk-contiguous blocks through a shuffle buffer.

Only the rows `sae.rows.training_rows` keeps are served (position kinds, no attention sink, no exact
duplicates; `self.selection` holds them and how many rows each rule removed).
In both modes global batch `s` covers rows `[s*B*world, (s+1)*B*world)` of the shuffled stream and
rank `r` takes slice `r`, so a resumed run sees exactly the batches an uninterrupted run would.
Labels are int64 class ids from the category column (index in `activations.records.CATEGORIES`).
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
from sae.config import DataConfig, as_config
from sae.rows import RowSelection, training_rows
from sae.stream import ShuffledStream, check_finite_rows, labels_from_categories

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
        self.in_memory, self.memory_budget_gb, self.device_dtype = cfg.in_memory, cfg.memory_budget_gb, cfg.device_dtype
        self.chunk_rows, self.window_chunks, self.data_seed = cfg.chunk_rows, cfg.window_chunks, cfg.data_seed
        self.metrics_split, self.metrics_rows, self.init_rows = cfg.metrics_split, cfg.metrics_rows, cfg.init_rows
        self.num_workers = cfg.num_workers
        self.store: ActivationStore | None = None
        self.selection: RowSelection | None = None
        self.n_rows = 0
        self._host_x: np.ndarray | None = None
        self._host_y: np.ndarray | None = None
        self._device_x: torch.Tensor | None = None
        self._device_y: torch.Tensor | None = None
        self._perms: dict[int, torch.Tensor] = {}

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

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Count the selected rows (error if none); load them to host memory when they fit."""
        if self.n_rows:
            return
        store = self._open()
        if len(store.meta(self.split, self.categories)) == 0:
            raise ValueError(
                f"{self._split_label()} of layer {self.layer} has no rows in {self.shards_dir}"
                + (f" (categories {self.categories})" if self.categories else "")
            )
        self.selection = training_rows(store, self.layer, self.data_cfg)
        self.n_rows = self.selection.n_rows
        counts = self.selection.to_dict()
        print(f"SAE training rows: {counts['candidates']} in {self._split_label()}, removed "
              + ", ".join(f"{rule} {n}" for rule, n in counts["removed"].items()) + f"; {counts['kept']} kept", flush=True)
        if self.n_rows == 0:
            raise ValueError(f"no SAE training rows left in {self.shards_dir} after the row rules {counts['removed']} "
                             f"(position_kinds={self.data_cfg.position_kinds})")
        if self.in_memory is None:
            itemsize = torch.finfo(DEVICE_DTYPES[self.device_dtype]).bits // 8
            self.in_memory = self.n_rows * store.d_model * itemsize <= self.memory_budget_gb * 2**30
        if self.in_memory:
            x, meta = store.load(self.layer, self.split, self.categories)
            x, categories = x[self.selection.index], meta.category[self.selection.index]
            check_finite_rows(x, f"{self.shards_dir} layer {self.layer}")
            self._host_x, self._host_y = x, labels_from_categories(categories)

    def _world(self) -> tuple[int, int]:
        """(rank, world size) for slicing the global batch; (0, 1) when every rank takes all of it."""
        trainer = self.trainer
        if trainer is None or getattr(trainer.strategy, "replicates_data", False):
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        if self.in_memory:
            return DataLoader(_StepTicker(), batch_size=None)
        rank, world = self._world()
        start = self.trainer.global_step if self.trainer is not None else 0
        stream = ShuffledStream(
            self._open(), self.layer, self.split, self.categories, self.n_rows, self.batch_size, self.data_seed,
            start_step=start, rank=rank, world_size=world, chunk_rows=self.chunk_rows, window_chunks=self.window_chunks,
            row_mask=self.selection.mask(),
        )
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin)

    # ---- in-memory batches ------------------------------------------------------------------
    def _permutation(self, epoch: int, device: torch.device) -> torch.Tensor:
        if epoch not in self._perms:
            seed = int(np.random.SeedSequence([self.data_seed, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))
            generator = torch.Generator().manual_seed(seed)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n_rows, generator=generator).to(device)
        return self._perms[epoch]

    def batch_for_step(self, step: int, device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `(batch_size, d_model)` and labels `(batch_size,)` of global step `step` for `rank`."""
        if self._host_x is None and self._device_x is None:
            raise RuntimeError("batch_for_step needs the in-memory mode; call setup() first")
        if self._device_x is None or self._device_x.device != device:
            self._device_x = torch.from_numpy(self._host_x).to(device=device, dtype=DEVICE_DTYPES[self.device_dtype])
            self._device_y = torch.from_numpy(self._host_y).to(device)
            self._perms = {}
        start = (step * world_size + rank) * self.batch_size
        positions = torch.arange(start, start + self.batch_size, device=device)
        first_epoch, last_epoch = start // self.n_rows, (start + self.batch_size - 1) // self.n_rows
        offsets = positions % self.n_rows
        rows = self._permutation(first_epoch, device)[offsets]
        for epoch in range(first_epoch + 1, last_epoch + 1):  # the batch crosses an epoch boundary
            rows = torch.where(positions // self.n_rows == epoch, self._permutation(epoch, device)[offsets], rows)
        return self._device_x.index_select(0, rows), self._device_y.index_select(0, rows)  # type: ignore[union-attr]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.in_memory:
            return batch
        rank, world = self._world()
        return self.batch_for_step(self.trainer.global_step, self.trainer.strategy.root_device, rank, world)

    # ---- samples for initialisation and evaluation -------------------------------------------
    def sample_rows(self, n: int | None = None) -> torch.Tensor:
        """A seeded random sample `(m, d_model)` float32 on the CPU (m <= n) for initialisation.

        In memory: drawn from every selected row; streaming: from the first `chunk_rows` rows read.
        """
        n = self.init_rows if n is None else n
        self.setup()
        if self._host_x is not None:
            pool = self._host_x
        else:
            stream = ShuffledStream(  # the first chunk of the stream only: bounded memory
                self._open(), self.layer, self.split, self.categories, self.n_rows, 1, self.data_seed,
                chunk_rows=self.chunk_rows, window_chunks=1, row_mask=self.selection.mask(),
            )
            pool = next(stream.windows(0))[0]
        rng = np.random.default_rng([self.data_seed, 7])
        pick = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
        return torch.from_numpy(np.ascontiguousarray(pool[pick]))

    def metrics_batches(self, batch_rows: int = 4096) -> tuple[str, Iterator[torch.Tensor]]:
        """(split used, iterator of CPU float32 batches) for the final metrics, at most `metrics_rows` rows."""
        store = self._open()
        split: str | list[str] | None = self.split
        if self.metrics_split is not None and len(store.meta(self.metrics_split, self.categories)) > 0:
            split = self.metrics_split
        label = split if isinstance(split, str) else ("all" if split is None else "+".join(split))

        def batches() -> Iterator[torch.Tensor]:
            seen = 0
            for x, _ in store.iter_chunks(self.layer, split, self.categories, chunk_rows=batch_rows):
                take = min(len(x), self.metrics_rows - seen)
                yield torch.from_numpy(x[:take])
                seen += take
                if seen >= self.metrics_rows:
                    return

        return label, batches()
