"""Training data: one row order for both modes, streaming == in memory, exact resume, disjoint DDP reads,
start-up reads in the storage dtype, bad rows stopped with one error (CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import activations.store.format as store_format
import activations.store.read as store_read
from activations.store import ActivationStore
from activations.store.raw import LayerReader
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.data import ShardDataModule
from sae.device_rows import load_rows
from sae.export import load_sae_run
from sae.order import RowOrder
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, sparse_dictionary_data, write_store  # noqa: F401

LAYER = 3
CPU = torch.device("cpu")
SPLITS = ["extract"] * 250 + ["calibrate"] * 60 + ["extract"] * 310 + ["eval"] * 80  # 560 training rows, with gaps
CATS = ["benign" if i % 3 else "safety" for i in range(700)]
KW = dict(batch_size=64, chunk_rows=50, window_chunks=4, lanes=8)


def make_store(directory: Path, dtype: str) -> Path:
    x, _ = sparse_dictionary_data(700, 16, 32, 2, seed=1)
    return write_store(directory, x, LAYER, CATS, SPLITS, rows_per_shard=130, dtype=dtype)


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store(request, tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp(f"data_{request.param}") / "store", request.param)


@pytest.fixture(scope="module")
def f16_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("data_train") / "store", "float16")


def module(store: Path, **overrides) -> ShardDataModule:
    dm = ShardDataModule(str(store), LAYER, DataConfig(**{**KW, **overrides}))
    dm.setup()
    return dm


def test_streamed_batches_equal_in_memory_batches_and_ranks_split_the_global_batch(store: Path) -> None:
    memory, streamed, wide = module(store, in_memory=True), module(store, in_memory=False), module(store, in_memory=True, batch_size=128)
    assert memory.n_rows == 560 and memory.order().steps_per_epoch == 9
    for step in range(30):  # several windows and epochs
        xm, ym = memory.batch_for_step(step, CPU)
        xs, ys = streamed.batch_for_step(step, CPU)
        assert torch.equal(xm, xs) and torch.equal(ym, ys), step
        xw, yw = wide.batch_for_step(step, CPU)
        parts = [memory.batch_for_step(step, CPU, rank, 2) for rank in (0, 1)]
        assert torch.equal(torch.cat([p[0] for p in parts]), xw) and torch.equal(torch.cat([p[1] for p in parts]), yw)
    streamed.close_stream()
    store_x, meta = ActivationStore(store).load(LAYER, "extract")
    epoch = torch.cat([memory.batch_for_step(s, CPU)[0] for s in range(9)]).float().numpy()
    assert len(np.unique(epoch, axis=0)) == 560  # an epoch holds every training row
    labels = torch.cat([memory.batch_for_step(s, CPU)[1] for s in range(9)])
    assert set(labels.tolist()) == {0, 4}  # benign and safety class ids


def test_stream_started_at_a_step_equals_the_uninterrupted_stream(store: Path) -> None:
    """A killed run restarts its stream at the checkpoint's step: the same batches follow."""
    straight, resumed = module(store, in_memory=False), module(store, in_memory=False)
    expected = [straight.batch_for_step(step, CPU)[0] for step in range(25)]
    got = [resumed.batch_for_step(step, CPU)[0] for step in range(17, 25)]
    assert all(torch.equal(a, b) for a, b in zip(expected[17:], got))
    with pytest.raises(RuntimeError, match="serves steps in order"):
        resumed._stream.batch(3)  # type: ignore[union-attr]
    straight.close_stream()
    resumed.close_stream()


def test_ddp_ranks_read_disjoint_rows(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: dict[int, list[np.ndarray]] = {0: [], 1: []}
    original = LayerReader.read
    for rank in (0, 1):
        # set-up (the duplicate-row pass of `sae.rows` reads every candidate row once) comes first;
        # what is checked is the training stream
        monkeypatch.setattr(LayerReader, "read", original)
        dm = module(store, in_memory=False, batch_size=40)  # global batch 80 divides 560: no cyclic tail
        monkeypatch.setattr(LayerReader, "read", lambda self, ids, out, r=rank: (read[r].append(np.array(ids)), original(self, ids, out))[1])
        for step in range(4):  # windows of 2 steps; the reader runs at most 2 windows ahead, all in epoch 0
            dm.batch_for_step(step, CPU, rank, 2)
        dm.close_stream()
    ours = [np.concatenate(read[r]) for r in (0, 1)]
    assert len(np.intersect1d(ours[0], ours[1])) == 0  # neither rank read a row of the other's lanes
    order = RowOrder(560, 80, 8, 50, 200, 0)
    everyone = np.concatenate([order.plan(e, w).rows for e, w in [order.locate(s)[:2] for s in range(4)]])
    rows = ActivationStore(store).row_ids("extract")
    assert set(rows[everyone].tolist()) <= set(np.concatenate(ours).tolist())


def test_row_order_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="must be a multiple of data.lanes"):
        RowOrder(100, 60, 8, 10, 100, 0)
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        RowOrder(100, 64, 8, 10, 100, 0).plan(0, 0, rank=0, world=3)
    small = RowOrder(5, 16, 8, 4, 64, 3)  # fewer rows than one batch: rows repeat, every row present
    assert sorted(set(small.rows_for_step(0).tolist())) == [0, 1, 2, 3, 4]


def test_start_up_reads_the_storage_dtype_and_never_decodes_to_float32(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected, _ = ActivationStore(store).load(LAYER, "extract")  # before the float32 decoder is removed

    def no_decode(*_args, **_kwargs):
        raise AssertionError("the training data path decoded rows to float32 on the host")

    monkeypatch.setattr(store_format, "decode_rows", no_decode)
    monkeypatch.setattr(store_read, "decode_rows", no_decode)
    dm = module(store, in_memory=True, device_dtype="float32")
    rows = load_rows(dm.reader, dm.rows, CPU, torch.float32, workers=3)  # type: ignore[arg-type]
    np.testing.assert_array_equal(rows.numpy(), expected)
    assert dm.batch_for_step(0, CPU)[0].dtype == torch.float32
    streamed = module(store, in_memory=False)
    assert streamed.batch_for_step(0, CPU)[0].shape == (64, 16)
    streamed.close_stream()


def test_training_from_a_stream_equals_training_in_memory_and_resumes_across_modes(f16_store: Path, tmp_path: Path) -> None:
    store = f16_store
    sae = SAEConfig(d_in=16, d_sae=64, k=2, auxk_coeff=1 / 32, dead_tokens_threshold=256)

    def job(steps: int, in_memory: bool) -> TrainConfig:
        return TrainConfig(seeds=[0], steps=steps, sae=sae, optim=OptimConfig(lr=3e-3), data=DataConfig(in_memory=in_memory, **KW),
                           ckpt_every=4, log_every_n_steps=4)

    kw = dict(enable_progress_bar=False, print_table=False)
    memory = train_saes(store, LAYER, tmp_path / "memory", job(12, True), **kw)
    killed = train_saes(store, LAYER, tmp_path / "mixed", job(6, True), **kw)  # killed after step 6 ...
    resumed = train_saes(store, LAYER, killed, job(12, False), ckpt_path="last", **kw)  # ... resumed streaming
    a, b = load_sae_run(memory)[0], load_sae_run(resumed)[0]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_nonfinite_row_stops_either_mode_with_one_error(tmp_path: Path) -> None:
    x, _ = sparse_dictionary_data(300, 16, 32, 2, seed=2)
    x[123, 5] = np.nan
    bad = write_store(tmp_path / "bad", x, LAYER, rows_per_shard=100, dtype="float16")
    for in_memory in (True, False):
        dm = ShardDataModule(str(bad), LAYER, DataConfig(**{**KW, "in_memory": in_memory}))
        with pytest.raises(ValueError, match=r"activation row 123 of the store holds NaN or inf"):
            for step in range(8):
                dm.batch_for_step(step, CPU)
        dm.close_stream()


def test_reader_falls_back_to_h5py_for_datasets_it_cannot_read_directly(store: Path) -> None:
    reader = LayerReader(ActivationStore(store), LAYER)
    ids = np.array([0, 1, 2, 140, 141, 600, 3], dtype=np.int64)
    direct = reader.empty(len(ids))
    reader.read(ids, direct)
    reader._shards = [s.__class__(s.path, s.first_row, s.rows, None) for s in reader._shards]  # as if chunked
    via_h5py = reader.empty(len(ids))
    reader.read(ids, via_h5py)
    np.testing.assert_array_equal(direct, via_h5py)
    with pytest.raises(IndexError):
        reader.read(np.array([700]), reader.empty(1))
