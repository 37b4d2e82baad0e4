"""Diagnostics of `bench/harvest.py`: timing helpers, A/B variants of the harvest, and where a
harvest's time goes (`--breakdown`, `--diagnose`, `--profile`)."""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from activations.adapter import ModelAdapter
from activations.harvest import _capture_batch, harvest
from activations.harvest_batches import prefetched_batches


def timed(fn: Callable, record: Callable[[float], None]) -> Callable:
    """`fn` that passes its wall seconds to `record` after every call."""
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record(time.perf_counter() - start)
    return wrapper


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1,
                prepare: Callable[[], None] | None = None) -> float:
    """Median wall seconds of `fn` over `repeats` runs after `warmup` runs; `prepare` runs untimed
    before each (removing the previous run's store: deleting 0.4 GB of shards is not harvesting)."""
    for _ in range(warmup):
        if prepare is not None:
            prepare()
        fn()
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def batches_made(settings: dict) -> Iterator[None]:
    """Within the block the harvest's `prefetched_batches` gets `settings`."""
    import activations.harvest as harvest_module

    original = harvest_module.prefetched_batches
    harvest_module.prefetched_batches = lambda *a, **k: original(*a, **{**k, **settings})
    try:
        yield
    finally:
        harvest_module.prefetched_batches = original


@contextmanager
def transformers_mask() -> Iterator[None]:
    """Within the block forwards get the 2D padding mask, from which transformers builds the 4D mask
    itself (reading back whether the batch is padded) instead of the device-built 4D mask."""
    import activations.hooks as hooks_module

    original = hooks_module.forward_attention_mask
    hooks_module.forward_attention_mask = lambda adapter, attention_mask: attention_mask
    try:
        yield
    finally:
        hooks_module.forward_attention_mask = original


VARIANTS: dict[str, Callable[[], Any]] = {
    "pageable": lambda: batches_made({"pin_memory": False}),
    "mask2d": transformers_mask,
}
"""--compare: the harvest with one thing changed (pageable, not page-locked, batches; transformers
building the attention mask from the 2D one)."""


def read_backs_per_forward(adapter: ModelAdapter, batch: Any, layer: int, args: argparse.Namespace) -> int:
    """Device→host synchronisations in one truncated forward (`torch.cuda.set_sync_debug_mode`)."""
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _capture_batch(adapter, batch, [layer], args.positions, args.dtype)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def breakdown(model, tokenizer, records, layer: int, args: argparse.Namespace, scratch: Path) -> dict:
    """Harvest seconds at `layer` with parts of the work removed: where the time over the truncated
    forward goes (the device→host copies and hand-off; the shard files; fsync + checksums), and the
    phases of the whole harvest (set-up, the forward loop with its hand-off, the final flush)."""
    import activations.harvest as harvest_module
    import activations.store.commit as commit_module
    from activations.store.write import ShardWriter

    device = ModelAdapter(model).device
    phases: dict[str, list[float]] = {"loop": [], "finish": []}

    def run(tag: str) -> float:
        out = scratch / f"breakdown-{tag}"

        def once() -> None:
            harvest(model, tokenizer, records, [layer], out, positions=args.positions, batch_size=args.batch_size,
                    max_length=args.max_length, dtype=args.dtype, progress=False, rows_per_shard=args.rows_per_shard)
        return median_time(once, device, args.repeats, prepare=lambda: shutil.rmtree(out, ignore_errors=True))

    run_batches, finish = harvest_module._run_batches, ShardWriter.finish
    harvest_module._run_batches, ShardWriter.finish = timed(run_batches, phases["loop"].append), timed(finish, phases["finish"].append)
    try:
        times = {"full": run("full")}
    finally:
        harvest_module._run_batches, ShardWriter.finish = run_batches, finish
    times.update({f"phase {k}": statistics.median(v[1:] or v) for k, v in phases.items() if v})
    fsync, sha = commit_module.os.fsync, commit_module.shard_sha256
    commit_module.os.fsync, commit_module.shard_sha256 = (lambda fd: None), (lambda *a, **k: "0" * 64)
    try:
        times["no fsync/sha256"] = run("nodur")
    finally:
        commit_module.os.fsync, commit_module.shard_sha256 = fsync, sha
    commit = ShardWriter._commit
    ShardWriter._commit = lambda self, index, rows, ids, previous: None
    try:
        times["no shard files"] = run("nofiles")
    finally:
        ShardWriter._commit = commit
    store_batch = harvest_module._store_batch
    harvest_module._store_batch = lambda *a, **k: None
    try:
        times["no store"] = run("nostore")
    finally:
        harvest_module._store_batch = store_batch
    return times


def diagnose(model, tokenizer, records, layer: int, args: argparse.Namespace, scratch: Path) -> None:
    """Where a harvest's wall time goes at `layer`: the forward loop's own time split (waiting for the
    next batch from the tokenizer thread, launching the truncated forward and the capture, staging the
    rows, the rest: hand-off and waiting for the writer), and the GPU's busy time (union of kernel and
    copy intervals, torch.profiler) against the wall time, for the truncated forward and the harvest."""
    import activations.harvest as harvest_module
    from activations.host_staging import HostStaging

    device = ModelAdapter(model).device
    spent = {"next batch": 0.0, "forward + capture": 0.0, "staging": 0.0}

    def add_to(name: str) -> Callable[[float], None]:
        return lambda seconds: spent.__setitem__(name, spent[name] + seconds)

    def timed_batches(*a, **k) -> Iterator:
        batches = original_batches(*a, **k)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                finally:
                    spent["next batch"] += time.perf_counter() - start
                yield batch
        finally:
            batches.close()

    out = scratch / "diagnose"

    def run() -> None:
        harvest(model, tokenizer, records, [layer], out, positions=args.positions, batch_size=args.batch_size,
                max_length=args.max_length, dtype=args.dtype, progress=False, rows_per_shard=args.rows_per_shard)

    original_batches, capture, stage, loop = (harvest_module.prefetched_batches, harvest_module._capture_batch,
                                              HostStaging.stage, harvest_module._run_batches)
    loop_time: list[float] = []
    harvest_module.prefetched_batches = timed_batches
    harvest_module._capture_batch = timed(capture, add_to("forward + capture"))
    HostStaging.stage = timed(stage, add_to("staging"))
    harvest_module._run_batches = timed(loop, loop_time.append)
    try:
        shutil.rmtree(out, ignore_errors=True)
        run()  # warm
        shutil.rmtree(out, ignore_errors=True)
        spent.update({k: 0.0 for k in spent})
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - start
    finally:
        harvest_module.prefetched_batches, harvest_module._capture_batch = original_batches, capture
        HostStaging.stage, harvest_module._run_batches = stage, loop
    rest = loop_time[-1] - sum(spent.values())
    print(f"\nlayer {layer} harvest {wall:.3f} s, forward loop {loop_time[-1]:.3f} s: "
          + " | ".join(f"{k} {v:.3f}" for k, v in spent.items()) + f" | hand-off and the rest {rest:.3f}")
    if device.type != "cuda":
        return
    batches = list(prefetched_batches(tokenizer, records, args.batch_size, True, args.max_length, pin_memory=True))
    padded = next(b for b in batches if min(b.lengths) < b.input_ids.shape[1])
    with transformers_mask():
        before = read_backs_per_forward(ModelAdapter(model), padded, layer, args)
    print(f"read-backs in one padded truncated forward: {read_backs_per_forward(ModelAdapter(model), padded, layer, args)}"
          f" (transformers building the mask: {before})")

    @torch.inference_mode()
    def truncated() -> None:
        for b in batches:
            _capture_batch(ModelAdapter(model), b, [layer], args.positions, args.dtype)

    def truncated_2d() -> None:
        with transformers_mask():
            truncated()

    for name, fn in (("truncated", truncated), ("truncated, transformers' mask", truncated_2d), ("harvest", run)):
        shutil.rmtree(out, ignore_errors=True)
        sync(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - start
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
        busy, end = 0.0, float("-inf")
        for a, b in spans:  # union of the intervals (us)
            if b > end:
                busy += b - max(a, end)
                end = b
        print(f"{name}: wall {wall:.3f} s, GPU busy {busy / 1e6:.3f} s (idle {wall - busy / 1e6:.3f} s)")


def profile_harvest(model, tokenizer, records, args: argparse.Namespace, scratch: Path) -> None:
    """cProfile one warm harvest at the first layer; print the 25 costliest calls (cumulative)."""
    import cProfile
    import pstats

    def run(out: Path) -> None:
        harvest(model, tokenizer, records, [args.layers[0]], out, positions=args.positions,
                batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype, progress=False,
                rows_per_shard=args.rows_per_shard)

    run(scratch / "warm")
    profiler = cProfile.Profile()
    profiler.runcall(run, scratch / "profiled")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
