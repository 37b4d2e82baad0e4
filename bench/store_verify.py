"""Benchmark: the cost of shard checksums when reading an activation store.

Writes a synthetic store with the project's own writer (default 1,048,576 rows, d_model 256,
float16: 512 MiB in 8 shards), then in this one process reads every row of the layer in chunks
(`iter_chunks`, as streaming training does) with

  unverified   `ActivationStore(dir, verify=False)`: sizes only (the baseline);
  verify=True  every shard's sha256 recomputed when the store is opened, then the read;
  once, first  the default: each shard hashed the first time this process reads it;
  once, again  the default on a second read in the same process (nothing hashed again).

Every read is preceded by a warm-up read, so all of them come from the page cache (the ratio is
the CPU cost of hashing; from a cold disk, hashing reads the bytes a second time). Prints each
time's median over `--repeats` and its ratio to the unverified read.

    python bench/store_verify.py                 # 1M rows, d_model 256 (~1-2 min on 2 CPU cores)
    python bench/store_verify.py --rows 65536    # seconds
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.store import ActivationStore, ShardWriter
from activations.store.read import forget_verified

LAYER = 0


def write_store(directory: Path, rows: int, d_model: int, rows_per_prompt: int = 1024) -> Path:
    """`rows` random rows, `rows_per_prompt` token rows per prompt ("all" positions), float16."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows_per_prompt, d_model)).astype(np.float32)
    rows_per_shard = max(rows_per_prompt, (64 << 20) // (2 * d_model))
    with ShardWriter(directory, [LAYER], d_model, "float16", "all", model_info={"id": "synthetic"},
                     rows_per_shard=rows_per_shard, background=True) as writer:
        for p in range(rows // rows_per_prompt):
            writer.add_prompt(f"p{p}", "benign", "extract", np.arange(rows_per_prompt), np.zeros(rows_per_prompt),
                              {LAYER: block + np.float32(p)})
        writer.finish()
    return directory


def read_all(store: ActivationStore) -> int:
    return sum(len(x) for x, _ in store.iter_chunks(LAYER, chunk_rows=65536))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="store-verify-"))
    try:
        start = time.perf_counter()
        directory = write_store(root / "store", args.rows, args.d_model)
        n_shards = len(ActivationStore(directory, verify=False).manifest["shards"])
        print(f"wrote {args.rows} rows x d_model {args.d_model} (float16, {n_shards} shards) "
              f"in {time.perf_counter() - start:.1f} s")
        read_all(ActivationStore(directory, verify=False))  # warm the page cache

        def once_first() -> None:
            forget_verified()
            read_all(ActivationStore(directory))

        read_all(ActivationStore(directory))  # this process has now verified every shard
        cases = {  # each opens a new store, as a new stage or command does
            "unverified": lambda: read_all(ActivationStore(directory, verify=False)),
            "verify=True": lambda: read_all(ActivationStore(directory, verify=True)),
            "once, first": once_first,
            "once, again": lambda: read_all(ActivationStore(directory)),
        }
        times = {name: timed(fn, args.repeats) for name, fn in cases.items()}
        base = times["unverified"]
        print(f"{'read':<14} {'median s':>9} {'x unverified':>13}")
        for name, seconds in times.items():
            print(f"{name:<14} {seconds:>9.3f} {seconds / base:>13.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
