"""Old-schema activation stores for tests: the prompts of the committed schema-2 fixture, and
`downgrade`, which rewrites a current store into the layout an older writer left.

`tests/activations/data/store_v2/` was written by the schema-2 `ShardWriter` (the code before the
per-prompt table) from `fixture_prompts()`, with `FIXTURE_WRITER` options:

    git archive <schema-2 commit> | tar -x -C /tmp/old && cp tests/helpers/legacy_store.py /tmp/old/tests/helpers/
    cd /tmp/old && python -m tests.helpers.legacy_store /path/to/tests/activations/data/store_v2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

from activations.io import file_sha256

CATS = ("benign", "safety", "humanizing", "contrast")
SPLITS = ("extract", "calibrate", "eval", "")
LAYERS = [1, 3]
D_MODEL = 8
FIXTURE_WRITER = {"layers": LAYERS, "d_model": D_MODEL, "dtype": "float16", "positions": "all",
                  "model_info": {"id": "legacy-test", "weights_fingerprint": "f" * 64},
                  "prompt_info": {"prompt_sources": {"jsonl:x.jsonl": "s1"}, "split_hashes": {"extract": "h1"}},
                  "rows_per_shard": 10}


def fixture_prompts(n: int = 14) -> list[dict]:
    """Deterministic prompts with 1–6 rows each: id, category, split, positions, token ids, kinds,
    per-layer float32 activations (exactly representable in float16)."""
    rng = np.random.default_rng(1234)
    prompts = []
    for i in range(n):
        k = int(rng.integers(1, 7))
        kinds = np.array([0] * (k > 2) + [1] * (k - 1 - (k > 2)) + [3], dtype=np.int8)
        prompts.append({
            "prompt_id": f"legacy-{i:02d}", "category": CATS[i % len(CATS)], "split": SPLITS[i % len(SPLITS)],
            "positions": np.arange(k), "token_ids": rng.integers(0, 50000, size=k), "kinds": kinds,
            "activations": {l: rng.standard_normal((k, D_MODEL)).astype(np.float16).astype(np.float32) for l in LAYERS},
        })
    return prompts


def write_fixture(folder: Path) -> None:
    """Write `fixture_prompts()` with whatever `ShardWriter` is importable (the fixture: the schema-2 one)."""
    from activations.store import ShardWriter

    with ShardWriter(folder, **FIXTURE_WRITER) as writer:
        for p in fixture_prompts():
            writer.add_prompt(p["prompt_id"], p["category"], p["split"], p["positions"], p["token_ids"],
                              p["activations"], position_kinds=p["kinds"])
        writer.finish()


def downgrade(folder: Path, version: int) -> None:
    """Rewrite a schema-3 store in place as schema `version` (2: one string per row for prompt id,
    category and split; 1: that and no `position_kind`), with the manifest's sizes and checksums."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = version
    strings = h5py.string_dtype(encoding="utf-8")
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        with h5py.File(path, "a") as f:
            index = f["prompt_index"][...]
            for name in ("prompt_id", "category", "split"):
                values = np.asarray(f[f"prompts/{name}"].asstr()[...], dtype=object)[index]
                f.create_dataset(name, data=values, dtype=strings)
            del f["prompts"], f["prompt_index"]
            if version == 1:
                del f["position_kind"]
            f.attrs["schema_version"] = version
        entry["bytes"] = path.stat().st_size
        entry["sha256"] = file_sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))


if __name__ == "__main__":
    write_fixture(Path(sys.argv[1]))
