"""Benchmark: the harvest's host work beside the forward loop, without a model (CPU seconds).

In an all-token harvest two pieces of host work run on other threads while the forward loop runs,
and hold the GIL it needs: the hand-over (the writer thread turning each batch's host rows into
buffered prompts: `activations.harvest._store_batch`) and the shard building (h5py layout and row
metadata of each shard: `commit.write_shard_file` minus the activation bytes, which go out with
`os.pwritev` on another thread and release the GIL). This times both on the calling thread with
`time.thread_time` (CPU seconds of that thread: the part that can hold the GIL), on the real
length-bucketed batches of synthetic prompts and random float16 rows of the H200 benchmark's shape
(d_model 4096, 8192 rows per shard); fsync and the sha256 are switched off (they release the GIL
and are measured by `bench/harvest.py --breakdown`). Run it on two checkouts to compare them:

    python bench/harvest_host.py [--prompts 256] [--d-model 4096] [--repeats 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import activations.store.commit as commit  # noqa: E402
from activations.harvest import _store_batch  # noqa: E402
from activations.harvest_batches import prefetched_batches  # noqa: E402
from activations.model_loading import load_embedded_tokenizer  # noqa: E402
from activations.store.write import ShardWriter  # noqa: E402
from bench.harvest import synthetic_records  # noqa: E402


def one_run(batches: list, rows: list[dict], out: Path, d_model: int, rows_per_shard: int) -> tuple[float, float]:
    """(hand-over CPU s, shard-building CPU s) of one harvest's store work, both on this thread."""
    shutil.rmtree(out, ignore_errors=True)
    writer = ShardWriter(out, [9], d_model, "float16", "all", {"id": "bench"}, {}, rows_per_shard=rows_per_shard)
    pending: list = []
    commit_shard = ShardWriter._commit
    ShardWriter._commit = lambda self, index, buffered, ids, previous: pending.append((self, index, buffered, ids))
    try:
        start = time.thread_time()
        for batch, host in zip(batches, rows):
            _store_batch(writer, batch, host, "all")
        writer.flush()
        handover = time.thread_time() - start
    finally:
        ShardWriter._commit = commit_shard
    start = time.thread_time()
    for self, index, buffered, ids in pending:
        commit_shard(self, index, buffered, ids, None)
    building = time.thread_time() - start
    writer.close()
    return handover, building


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--rows-per-shard", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = load_embedded_tokenizer()
    records = synthetic_records(args.prompts, 10, 120)
    batches = list(prefetched_batches(tokenizer, records, args.batch_size, True, 512))
    rows = [{9: torch.randn(b.n_tokens, args.d_model).to(torch.float16)} for b in batches]
    n_rows = sum(b.n_tokens for b in batches)
    scratch = Path(tempfile.mkdtemp(prefix="bench-harvest-host-"))
    fsync, sha = commit.os.fsync, commit.shard_sha256
    commit.os.fsync, commit.shard_sha256 = (lambda fd: None), (lambda *a, **k: "0" * 64)
    try:
        one_run(batches, rows, scratch / "warm", args.d_model, args.rows_per_shard)
        runs = [one_run(batches, rows, scratch / "s", args.d_model, args.rows_per_shard) for _ in range(args.repeats)]
    finally:
        commit.os.fsync, commit.shard_sha256 = fsync, sha
        shutil.rmtree(scratch, ignore_errors=True)
    handover = statistics.median(r[0] for r in runs)
    building = statistics.median(r[1] for r in runs)
    print(f"{args.prompts} prompts, {len(batches)} batches, {n_rows} rows, d_model {args.d_model}, "
          f"{args.rows_per_shard} rows per shard; CPU seconds on the calling thread, median of {args.repeats}:")
    print(f"  hand-over (split/buffer the batches' rows): {handover:.4f} s  ({1e6 * handover / n_rows:.2f} µs/row)")
    print(f"  shard building (h5py layout + row metadata): {building:.4f} s  ({1e6 * building / n_rows:.2f} µs/row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
