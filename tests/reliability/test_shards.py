"""Item 2: a corrupted shard is never trained or selected on; checksums cost one read per shard per process."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest

import activations.store.read as store_read
from activations.store import ActivationStore
from analysis.cli import main as cli_main
from tests.reliability.conftest import LAYER, one_error_line


def flip_byte_in_layer(shard: Path, layer: int) -> None:
    """Flip one bit of one activation value inside the `layer_<l>` dataset (file size unchanged)."""
    with h5py.File(shard, "r") as f:
        offset = f[f"layer_{layer}"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[offset + 101] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.fixture
def corrupted_store(sae_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(sae_store, store)
    flip_byte_in_layer(store / "shard-00001.h5", LAYER)
    return store


def test_train_refuses_a_shard_with_one_flipped_byte(corrupted_store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--acts", str(corrupted_store), "--layer", str(LAYER), "--out", str(out), "--train.seeds", "0",
            "--train.steps", "3", "--train.sae.expansion_factor", "2", "--train.sae.k", "2"]
    assert cli_main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "shard-00001.h5 fails its sha256 checksum" in line and "corrupt" in line
    assert not out.exists()


def test_select_refuses_a_shard_with_one_flipped_byte(corrupted_store, tmp_path, capsys):
    args = ["select", "--space", "residual", "--acts", str(corrupted_store), "--layer", str(LAYER),
            "--out", str(tmp_path / "select")]
    assert cli_main(args) == 2
    assert "shard-00001.h5 fails its sha256 checksum" in one_error_line(capsys.readouterr().err)


def test_each_shard_is_hashed_once_per_process(sae_store, monkeypatch):
    calls: list[str] = []
    real = store_read.file_sha256
    monkeypatch.setattr(store_read, "file_sha256", lambda path: calls.append(Path(path).name) or real(path))
    store_read.forget_verified()
    n_shards = len(ActivationStore(sae_store, verify=False).manifest["shards"])
    ActivationStore(sae_store, verify=False).load(LAYER)
    assert calls == []  # sizes only
    ActivationStore(sae_store).load(LAYER, split="extract")
    ActivationStore(sae_store).load(LAYER)
    list(ActivationStore(sae_store).iter_chunks(LAYER, chunk_rows=50))
    assert sorted(calls) == sorted(f"shard-{i:05d}.h5" for i in range(n_shards))  # each once, whatever the reads
    ActivationStore(sae_store, verify=True)
    assert len(calls) == 2 * n_shards  # on request: all again


def test_a_rewritten_shard_is_verified_again(sae_store, tmp_path):
    """The once-per-process cache is keyed by size, mtime and inode: a shard changed after it was
    verified is checked again."""
    store = tmp_path / "store"
    shutil.copytree(sae_store, store)
    ActivationStore(store).load(LAYER)  # verified
    flip_byte_in_layer(store / "shard-00000.h5", LAYER)
    with pytest.raises(ValueError, match="shard-00000.h5 fails its sha256"):
        ActivationStore(store).load(LAYER)
