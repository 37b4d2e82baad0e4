"""Schema 3 (prompt table + per-row prompt index): the same rows and metadata as the schema-2 writer,
old stores still read, batches written whole equal prompts written one at a time, resume exact."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from activations.harvest import harvest
from activations.records import PromptRecord
from activations.store import SCHEMA_VERSION, ActivationStore, ShardWriter
from activations.store.format import prompt_ids_digest
from activations.store.write import HarvestMismatch
from tests.helpers.legacy_store import FIXTURE_WRITER, LAYERS, downgrade, fixture_prompts

FIXTURE = Path(__file__).parent / "data" / "store_v2"
"""Written by the schema-2 ShardWriter (tests/helpers/legacy_store.py says how)."""


def write_v3(folder: Path, batch: int = 1) -> Path:
    """`fixture_prompts()` through the current writer, `batch` prompts per `add_prompts` call."""
    prompts = fixture_prompts()
    with ShardWriter(folder, **FIXTURE_WRITER) as writer:
        for a in range(0, len(prompts), batch):
            part = prompts[a: a + batch]
            writer.add_prompts([p["prompt_id"] for p in part], [p["category"] for p in part], [p["split"] for p in part],
                               [len(p["positions"]) for p in part], np.concatenate([p["positions"] for p in part]),
                               np.concatenate([p["token_ids"] for p in part]),
                               {l: np.concatenate([p["activations"][l] for p in part]) for l in LAYERS},
                               position_kinds=np.concatenate([p["kinds"] for p in part]))
        writer.finish()
    return folder


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    """Every row, every metadata column, with and without filters, and the manifests' row accounting."""
    for key in ("total_rows", "rows_per_split", "rows_per_category", "complete", "layers", "dtype", "positions"):
        assert a.manifest[key] == b.manifest[key], key
    for key in ("file", "rows", "prompt_ids_sha256"):
        assert [s[key] for s in a.manifest["shards"]] == [s[key] for s in b.manifest["shards"]], key
    for split, cats in ((None, None), ("calibrate", None), (["extract", "eval"], ["safety", "contrast"])):
        for layer in LAYERS:
            (xa, ma), (xb, mb) = a.load(layer, split, cats), b.load(layer, split, cats)
            np.testing.assert_array_equal(xa, xb)
            for name in ("prompt_id", "category", "split", "position", "token_id", "position_kind"):
                assert getattr(ma, name).tolist() == getattr(mb, name).tolist(), name
                assert a.column(name, split, cats).tolist() == b.column(name, split, cats).tolist(), name
        np.testing.assert_array_equal(a.row_ids(split, cats), b.row_ids(split, cats))
    chunks = [(x, m.prompt_id.tolist()) for x, m in b.iter_chunks(3, chunk_rows=7)]
    assert [m for _, m in chunks] == [m.prompt_id.tolist() for _, m in a.iter_chunks(3, chunk_rows=7)]


def test_schema_2_store_reads_exactly_what_was_written() -> None:
    store = ActivationStore(FIXTURE, verify=True)
    prompts = fixture_prompts()
    assert store.schema_version == 2 and store.complete and len(store.manifest["shards"]) > 1
    for layer in LAYERS:
        x, meta = store.load(layer)
        np.testing.assert_array_equal(x, np.concatenate([p["activations"][layer] for p in prompts]))
    assert meta.prompt_id.tolist() == [p["prompt_id"] for p in prompts for _ in p["positions"]]
    assert meta.split.tolist() == [p["split"] for p in prompts for _ in p["positions"]]
    assert meta.token_id.tolist() == np.concatenate([p["token_ids"] for p in prompts]).tolist()
    assert meta.position_kind.tolist() == np.concatenate([p["kinds"] for p in prompts]).tolist()


@pytest.mark.parametrize("batch", [1, 3, 14])
def test_new_writer_gives_the_schema_2_writers_rows_and_shards(tmp_path: Path, batch: int) -> None:
    """Prompt by prompt or a batch at a time, the schema-3 store holds the same rows, metadata, shard
    boundaries and manifest accounting as the store the schema-2 writer made of the same prompts."""
    new = ActivationStore(write_v3(tmp_path / "v3", batch), verify=True)
    assert new.schema_version == SCHEMA_VERSION == 3
    assert_same_store(ActivationStore(FIXTURE), new)


def test_shard_keeps_strings_once_per_prompt(tmp_path: Path) -> None:
    store = ActivationStore(write_v3(tmp_path / "v3", batch=5))
    entry = store.manifest["shards"][0]
    with h5py.File(tmp_path / "v3" / entry["file"], "r") as f:
        assert int(f.attrs["schema_version"]) == 3
        assert not {"prompt_id", "category", "split"} & set(f.keys())  # no per-row strings
        ids = f["prompts/prompt_id"].asstr()[...].tolist()
        index = f["prompt_index"][...]
        assert len(ids) == len(set(ids)) == index.max() + 1 < entry["rows"] == len(index)
        assert f["prompt_index"].dtype == np.int32 and (np.diff(index) >= 0).all()
    assert store.meta().prompt_id[: entry["rows"]].tolist() == [ids[i] for i in index]


@pytest.mark.parametrize("version", [2, 1])
def test_downgraded_store_reads_the_same(tmp_path: Path, version: int) -> None:
    write_v3(tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    downgrade(tmp_path / "old", version)
    old, new = ActivationStore(tmp_path / "old", verify=True), ActivationStore(tmp_path / "new")
    assert old.schema_version == version
    a, b = old.meta(), new.meta()
    for name in ("prompt_id", "category", "split", "position", "token_id"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist()
        assert old.column(name, "eval").tolist() == new.column(name, "eval").tolist()
    assert (a.position_kind == b.position_kind).all() if version == 2 else set(a.position_kind.tolist()) == {-1, 3}


def test_resuming_a_schema_2_folder_is_one_error(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "old")
    with pytest.raises(HarvestMismatch, match="its schema_version is 2, this run's is 3; use another output folder"):
        ShardWriter(tmp_path / "old", **FIXTURE_WRITER)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted(p.name for p in FIXTURE.iterdir())


def test_prompt_index_outside_the_table_names_the_file(tmp_path: Path) -> None:
    write_v3(tmp_path / "v3")
    path = tmp_path / "v3" / "shard-00001.h5"
    with h5py.File(path, "a") as f:
        f["prompt_index"][-1] = 99
    with pytest.raises(ValueError, match="shard-00001.h5: prompt_index points outside its table"):
        ActivationStore(tmp_path / "v3", verify=False).meta()


def test_run_length_digest_equals_the_per_row_digest() -> None:
    ids, rows = ["a", "bb", "ccc"], [2, 1, 3]
    per_row = [i for i, k in zip(ids, rows) for _ in range(k)]
    assert prompt_ids_digest(ids, rows) == prompt_ids_digest(per_row)
    assert prompt_ids_digest(["x"], [1]) == prompt_ids_digest(["x"])


def test_add_prompts_refuses_inconsistent_batches(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, **FIXTURE_WRITER)
    x = {l: np.zeros((3, 8), np.float32) for l in LAYERS}
    with pytest.raises(ValueError, match="occurs twice"):
        w.add_prompts(["a", "a"], ["benign"] * 2, ["eval"] * 2, [1, 2], np.arange(3), np.arange(3), x)
    with pytest.raises(ValueError, match="got 3 positions and 3 token ids for rows \\[1, 1\\]"):
        w.add_prompts(["a", "b"], ["benign"] * 2, ["eval"] * 2, [1, 1], np.arange(3), np.arange(3), x)
    with pytest.raises(ValueError, match="one category, split and row count per prompt"):
        w.add_prompts(["a", "b"], ["benign"], ["eval"] * 2, [1, 2], np.arange(3), np.arange(3), x)
    w.add_prompts(["a", "b"], ["benign"] * 2, ["eval"] * 2, [1, 2], np.arange(3), np.arange(3), x)
    with pytest.raises(ValueError, match="'b' is already in the store"):
        w.add_prompt("b", "benign", "eval", [0], [0], {l: np.zeros((1, 8)) for l in LAYERS})
    w.close()


def test_harvest_batches_equal_prompt_by_prompt_writes(tiny_llama, tmp_path: Path) -> None:
    """An all-token harvest (whole batches handed to the writer) gives the shards that writing its
    rows one prompt at a time gives: same boundaries, rows and metadata."""
    model, tokenizer = tiny_llama
    records = [PromptRecord(id=f"h{i:02d}", text="word " * (1 + (5 * i) % 17), category=("benign", "safety")[i % 2],
                            split=("extract", "eval")[i % 2], source="test") for i in range(11)]
    out = harvest(model, tokenizer, records, [1, 3], tmp_path / "batched", positions="all", batch_size=4,
                  dtype="float16", rows_per_shard=23, progress=False, max_length=64)
    batched = ActivationStore(out, verify=True)
    x1, meta = batched.load(1)
    x3, _ = batched.load(3)
    starts = np.flatnonzero(np.r_[True, meta.prompt_id[1:] != meta.prompt_id[:-1]])
    info = {key: batched.manifest[key] for key in ("prompt_sources", "split_hashes")}
    with ShardWriter(tmp_path / "single", [1, 3], batched.d_model, "float16", "all", batched.manifest["model"], info,
                     rows_per_shard=23, chat_template=True, max_length=64) as w:
        for a, b in zip(starts, np.r_[starts[1:], len(meta)]):
            w.add_prompt(meta.prompt_id[a], meta.category[a], meta.split[a], meta.position[a:b], meta.token_id[a:b],
                         {1: x1[a:b], 3: x3[a:b]}, position_kinds=meta.position_kind[a:b])
        w.finish()
    assert len(batched.manifest["shards"]) > 2
    assert_same_store(ActivationStore(tmp_path / "single"), batched)


def test_killed_harvest_resumes_exactly_with_batches(tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A harvest stopped after its first shards resumes to the store an uninterrupted one writes."""
    import activations.store.commit as commit

    model, tokenizer = tiny_llama
    records = [PromptRecord(id=f"r{i:02d}", text="alpha beta " * (1 + i % 6), category="benign", split="extract",
                            source="test") for i in range(13)]
    kwargs = dict(positions="all", batch_size=3, dtype="float16", rows_per_shard=20, progress=False, max_length=64)
    harvest(model, tokenizer, records, [2], tmp_path / "whole", **kwargs)
    publish, published = commit.publish_shard, []

    def publish_two(directory, manifest, shard):
        if len(published) == 2:
            raise KeyboardInterrupt  # killed: later shards never listed
        publish(directory, manifest, shard)
        published.append(shard.entry["file"])

    monkeypatch.setattr(commit, "publish_shard", publish_two)
    monkeypatch.setattr("activations.store.write.publish_shard", publish_two)
    with pytest.raises(KeyboardInterrupt):
        harvest(model, tokenizer, records, [2], tmp_path / "resumed", **kwargs)
    killed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert killed["complete"] is False and [s["file"] for s in killed["shards"]] == published == ["shard-00000.h5", "shard-00001.h5"]
    monkeypatch.undo()
    harvest(model, tokenizer, records, [2], tmp_path / "resumed", **kwargs)
    whole, resumed = ActivationStore(tmp_path / "whole"), ActivationStore(tmp_path / "resumed", verify=True)
    (xw, mw), (xr, mr) = whole.load(2), resumed.load(2)
    order_w, order_r = np.lexsort((mw.position, mw.prompt_id)), np.lexsort((mr.position, mr.prompt_id))
    # the resumed prompts run in other batches (other padding): a float16 ulp may differ, no more
    np.testing.assert_allclose(xw[order_w], xr[order_r], rtol=0, atol=1e-3)
    for name in ("prompt_id", "position", "token_id", "position_kind"):
        assert getattr(mw, name)[order_w].tolist() == getattr(mr, name)[order_r].tolist()
    assert resumed.complete and resumed.n_rows == whole.n_rows == len(set(zip(mr.prompt_id, mr.position)))
