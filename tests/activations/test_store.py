"""Activation shard store: round trip, atomicity, resume, integrity errors, filtering, storage dtypes."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from activations.store import commit as store_commit
from activations.store import ActivationStore, RowMeta, ShardWriter
from activations.store.format import bf16_bits_to_float32, float32_to_bf16_bits

D_MODEL = 8
LAYERS = [1, 3]
MODEL = {"id": "tiny-test", "revision": "abc"}
PROMPTS = {"prompt_sources": {"jsonl:x.jsonl": "s1"}, "split_hashes": {"extract": "h1"}}
CATS = ("benign", "safety", "humanizing", "contrast")
SPLITS = ("extract", "calibrate", "eval")


def make_prompts(n: int, positions: str, seed: int = 0) -> list[dict]:
    """Synthetic prompts with their rows: id, category, split, positions, token ids, per-layer activations."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        k = 1 if positions == "last" else int(rng.integers(1, 6))
        prompts.append(
            {
                "prompt_id": f"p{i:03d}",
                "category": CATS[i % len(CATS)],
                "split": SPLITS[i % len(SPLITS)],
                "positions": np.arange(k) + (7 if positions == "last" else 0),
                "token_ids": rng.integers(0, 1000, size=k),
                "activations": {l: rng.standard_normal((k, D_MODEL)).astype(np.float32) for l in LAYERS},
            }
        )
    return prompts


def writer(tmp: Path, **overrides) -> ShardWriter:
    kwargs = dict(layers=LAYERS, d_model=D_MODEL, dtype="float32", positions="last",
                  model_info=MODEL, prompt_info=PROMPTS, rows_per_shard=4)
    kwargs.update(overrides)
    return ShardWriter(tmp, **kwargs)


def write_all(w: ShardWriter, prompts: list[dict]) -> None:
    for p in prompts:
        w.add_prompt(p["prompt_id"], p["category"], p["split"], p["positions"], p["token_ids"], p["activations"])


def expected_rows(prompts: list[dict], layer: int) -> tuple[np.ndarray, list[str]]:
    x = np.concatenate([p["activations"][layer] for p in prompts])
    ids = [p["prompt_id"] for p in prompts for _ in range(len(p["positions"]))]
    return x, ids


@pytest.mark.parametrize("background", [False, True])
def test_round_trip_last_token(tmp_path: Path, background: bool) -> None:
    prompts = make_prompts(10, "last")
    w = writer(tmp_path, background=background)
    write_all(w, prompts)
    w.finish()
    store = ActivationStore(tmp_path, verify=True)
    assert store.layers == LAYERS and store.d_model == D_MODEL and store.n_rows == 10
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["total_rows"] == 10
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["rows_per_category"] == {"benign": 3, "contrast": 2, "humanizing": 2, "safety": 3}
    assert manifest["rows_per_split"] == {"calibrate": 3, "eval": 3, "extract": 4}
    assert manifest["model"] == MODEL and manifest["prompt_sources"] == PROMPTS["prompt_sources"]
    for layer in LAYERS:
        x, meta = store.load(layer)
        want, ids = expected_rows(prompts, layer)
        assert x.dtype == np.float32 and x.shape == (10, D_MODEL)
        np.testing.assert_array_equal(x, want)
        assert meta.prompt_id.tolist() == ids
        assert meta.position.tolist() == [7] * 10
        assert meta.token_id.tolist() == [int(p["token_ids"][0]) for p in prompts]
        assert meta.category.tolist() == [p["category"] for p in prompts]
    assert store.meta().split.tolist() == [p["split"] for p in prompts]


@pytest.mark.parametrize("background", [False, True])
def test_all_tokens_keeps_each_prompt_in_one_shard(tmp_path: Path, background: bool) -> None:
    prompts = make_prompts(12, "all", seed=1)
    w = writer(tmp_path, positions="all", rows_per_shard=5, background=background)
    write_all(w, prompts)
    w.finish()
    store = ActivationStore(tmp_path)
    x, meta = store.load(3)
    want, ids = expected_rows(prompts, 3)
    np.testing.assert_array_equal(x, want)
    assert meta.prompt_id.tolist() == ids
    owners: dict[str, set[str]] = {}
    for entry in store.manifest["shards"]:
        with h5py.File(tmp_path / entry["file"], "r") as f:
            for pid in f["prompts/prompt_id"].asstr()[...]:  # the shard's prompt table (schema 3)
                owners.setdefault(pid, set()).add(entry["file"])
    assert all(len(files) == 1 for files in owners.values()) and len(owners) == 12
    assert meta.position.tolist() == [int(i) for p in prompts for i in p["positions"]]


@pytest.mark.parametrize("background", [False, True])
def test_failed_shard_write_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool) -> None:
    prompts = make_prompts(8, "last")
    w = writer(tmp_path, background=background)
    write_all(w, prompts[:4])  # first shard written normally
    w.wait()

    def half_write(path: Path, columns, layers, dtype) -> None:
        with h5py.File(path, "w") as f:
            f.create_dataset("layer_1", data=columns["layer_1"][:1])
        raise OSError("disk full")

    monkeypatch.setattr(store_commit, "write_shard_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_all(w, prompts[4:8])
        w.close()  # a background write reports its error here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.h5"]
    store = ActivationStore(tmp_path, verify=True)
    assert store.n_rows == 4 and store.load(1)[1].prompt_id.tolist() == ["p000", "p001", "p002", "p003"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shard_checksum_computed_while_writing_equals_the_files(tmp_path: Path, dtype: str) -> None:
    """The sha256 taken from the blocks in memory (while they are written) is the file's sha256."""
    from activations.io import file_sha256
    from activations.store.format import encode_rows

    rng = np.random.default_rng(3)
    blocks = {l: [encode_rows(rng.standard_normal((k, 64)).astype(np.float32), dtype) for k in (5, 1, 9)] for l in LAYERS}
    n = 15
    columns = {"prompt_id": np.array(["a", "b", "c"], dtype=object), "category": np.full(3, "benign", dtype=object),
               "split": np.full(3, "extract", dtype=object), "prompt_index": np.repeat(np.arange(3), [5, 1, 9]),
               "position": np.arange(n), "token_id": np.arange(n), "position_kind": np.ones(n, dtype=np.int8), **{f"layer_{l}": blocks[l] for l in LAYERS}}
    sha = store_commit.write_shard_file(tmp_path / "s.h5", columns, LAYERS, dtype)
    assert sha == file_sha256(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5") as f:
        assert np.array_equal(f["layer_3"][...].view(np.uint16), np.concatenate(blocks[3]).view(np.uint16))


def test_a_failed_activation_write_is_raised_after_the_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = make_prompts(8, "last")
    w = writer(tmp_path)
    monkeypatch.setattr(store_commit.os, "pwritev", lambda *a: (_ for _ in ()).throw(OSError("no space left")))
    with pytest.raises(OSError, match="no space left"):
        write_all(w, prompts[:4])
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_kill_between_shard_rename_and_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = make_prompts(8, "last")
    w = writer(tmp_path)
    write_all(w, prompts[:4])
    monkeypatch.setattr(store_commit, "write_json", lambda path, payload: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_all(w, prompts[4:8])
    monkeypatch.undo()
    assert (tmp_path / "shard-00001.h5").exists()  # renamed into place, never listed
    (tmp_path / ".tmp-shard-00002.h5").write_bytes(b"half a shard")  # a kill in the middle of a write
    assert ActivationStore(tmp_path).n_rows == 4  # readers see only listed shards
    resumed = writer(tmp_path)
    assert resumed.stored_prompt_ids == {"p000", "p001", "p002", "p003"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.h5"]
    write_all(resumed, [p for p in prompts if p["prompt_id"] not in resumed.stored_prompt_ids])
    resumed.finish()
    store = ActivationStore(tmp_path, verify=True)
    assert store.meta().prompt_id.tolist() == [p["prompt_id"] for p in prompts]


def test_resume_returns_stored_ids_and_rejects_duplicates(tmp_path: Path) -> None:
    prompts = make_prompts(7, "last")
    with writer(tmp_path) as w:
        write_all(w, prompts[:5])
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    w2 = writer(tmp_path, layers=list(reversed(LAYERS)))  # same layers, other order
    assert w2.stored_prompt_ids == {p["prompt_id"] for p in prompts[:5]}
    with pytest.raises(ValueError, match="p002"):
        write_all(w2, prompts[2:3])
    write_all(w2, prompts[5:])
    w2.finish()
    assert ActivationStore(tmp_path).n_rows == 7


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"model_info": {"id": "other-model", "revision": "abc"}}, "model"),
        ({"layers": [1]}, "layers"),
        ({"dtype": "float16"}, "dtype"),
        ({"positions": "all"}, "positions"),
        ({"prompt_info": {"prompt_sources": {"jsonl:y.jsonl": "s2"}}}, "prompt_sources"),
        ({"max_length": 64}, "max_length"),
    ],
)
def test_resume_with_other_harvest_is_refused(tmp_path: Path, override: dict, key: str) -> None:
    with writer(tmp_path) as w:
        write_all(w, make_prompts(3, "last"))
    with pytest.raises(ValueError, match=f"its {key} is") as info:
        writer(tmp_path, **override)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_truncated_and_corrupt_shards_name_the_file(tmp_path: Path) -> None:
    with writer(tmp_path) as w:
        write_all(w, make_prompts(8, "last"))
    shard0, shard1 = tmp_path / "shard-00000.h5", tmp_path / "shard-00001.h5"
    data = bytearray(shard1.read_bytes())
    data[-20] ^= 0xFF  # same size, different bytes
    shard1.write_bytes(bytes(data))
    ActivationStore(tmp_path)  # the cheap size check passes
    with pytest.raises(ValueError, match="shard-00001.h5 fails its sha256"):
        ActivationStore(tmp_path, verify=True)
    shard0.write_bytes(shard0.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard-00000.h5 is .* bytes"):
        ActivationStore(tmp_path)
    shard0.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000.h5"):
        ActivationStore(tmp_path)


def test_garbled_header_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    with writer(tmp_path) as w:
        write_all(w, make_prompts(4, "last"))
    shard = tmp_path / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[:8] = b"garbage!"
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00000.h5 is corrupt"):
        ActivationStore(tmp_path).load(1)


def test_filters_and_errors(tmp_path: Path) -> None:
    prompts = make_prompts(13, "last")
    with writer(tmp_path) as w:
        write_all(w, prompts)
    store = ActivationStore(tmp_path)
    x, meta = store.load(1, split="eval", categories=["safety", "benign"])
    chosen = [p for p in prompts if p["split"] == "eval" and p["category"] in ("safety", "benign")]
    assert meta.prompt_id.tolist() == [p["prompt_id"] for p in chosen] and len(chosen) > 0
    np.testing.assert_array_equal(x, np.concatenate([p["activations"][1] for p in chosen]))
    assert store.load(1, split=["extract", "calibrate"])[0].shape[0] == sum(p["split"] != "eval" for p in prompts)
    empty_x, empty_meta = store.load(3, categories=["unsupported"])
    assert empty_x.shape == (0, D_MODEL) and len(empty_meta) == 0
    with pytest.raises(ValueError, match=r"layer 2 .*available layers: \[1, 3\]"):
        store.load(2)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        store.load(1, split="train")
    with pytest.raises(ValueError, match="unknown category"):
        store.meta(categories=["violence"])


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 5, 100])
def test_iter_chunks_equals_load(tmp_path: Path, chunk_rows: int) -> None:
    prompts = make_prompts(9, "all", seed=2)
    with writer(tmp_path, positions="all", rows_per_shard=6, background=True) as w:
        write_all(w, prompts)
    store = ActivationStore(tmp_path)
    for split, cats in [(None, None), ("extract", None), (None, ["safety", "contrast"])]:
        x, meta = store.load(3, split=split, categories=cats)
        chunks = list(store.iter_chunks(3, split=split, categories=cats, chunk_rows=chunk_rows))
        assert all(len(c) == chunk_rows for c, _ in chunks[:-1]) and 0 < len(chunks[-1][0]) <= chunk_rows
        np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), x)
        joined = RowMeta.concat([m for _, m in chunks])
        for name in ("prompt_id", "category", "split", "position", "token_id"):
            np.testing.assert_array_equal(getattr(joined, name), getattr(meta, name))


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_storage(tmp_path: Path, dtype: str, atol: float) -> None:
    prompts = make_prompts(5, "last")
    with writer(tmp_path, dtype=dtype) as w:
        write_all(w, prompts)
    store = ActivationStore(tmp_path)
    x, _ = store.load(1)
    want, _ = expected_rows(prompts, 1)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=atol, rtol=atol)
    torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
    np.testing.assert_array_equal(x, torch.from_numpy(want).to(torch_dtype).float().numpy())
    with h5py.File(tmp_path / "shard-00000.h5", "r") as f:
        assert f["layer_1"].dtype == (np.float16 if dtype == "float16" else np.uint16)
        assert (f["layer_1"].attrs.get("encoding") == "bfloat16-as-uint16") == (dtype == "bfloat16")


def test_bf16_bits_pass_through_and_rounding_matches_torch() -> None:
    values = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.3e-5, 6.5e4, 3e38, float("inf"), float("nan")])
    bits = float32_to_bf16_bits(values.numpy())
    torch_bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits[:-1], torch_bits[:-1])
    assert np.isnan(bf16_bits_to_float32(bits)[-1])


def test_bad_rows_are_rejected(tmp_path: Path) -> None:
    w = writer(tmp_path)
    p = make_prompts(1, "last")[0]
    with pytest.raises(ValueError, match="layer 3 activations have shape"):
        w.add_prompt("a", "benign", "eval", [0], [1], {1: np.zeros((1, D_MODEL)), 3: np.zeros((1, D_MODEL + 1))})
    with pytest.raises(ValueError, match="lack layer 3"):
        w.add_prompt("a", "benign", "eval", [0], [1], {1: np.zeros((1, D_MODEL))})
    with pytest.raises(ValueError, match="2 positions"):
        w.add_prompt("a", "benign", "eval", [0, 1], [1, 2], p["activations"])
    with pytest.raises(ValueError, match="unknown category"):
        w.add_prompt("a", "violence", "eval", [0], [1], p["activations"])
    with pytest.raises(ValueError, match="d_model"):
        ShardWriter(tmp_path / "x", layers=[0], d_model=0)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "shard-00000.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest.json"):
        ShardWriter(tmp_path / "y", layers=[0], d_model=4)
    with pytest.raises(FileNotFoundError, match="manifest.json missing"):
        ActivationStore(tmp_path / "y")


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    with writer(tmp_path) as w:
        write_all(w, make_prompts(2, "last"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema_version 99"):
        ActivationStore(tmp_path)
