"""Benchmark: SAE training at scale through the real entry point, in-memory vs streaming vs the bare step.

In one process: writes a synthetic store (default 1,081,344 rows, d 4096, float16) with the project's
own `ShardWriter`, reads it once to the device (`sae.device_rows.load_rows`: the start-up read,
GB/s), then times `sae.train.train_saes` (Lightning, fused path, bf16) with the rows held on the
device and streamed from the store, and the bare fused step (`BareTrainer`) on one batch, and
prints each one's ms/step, activations/s, ratios to in-memory and to the bare step, start-up time
and GPU utilisation (`nvidia-smi dmon`) during the timed steps.

    python bench/train_scale.py                     # GPU: 8B shape (d 4096, 65,536 latents, k 64, batch 4096)
    python bench/train_scale.py --cpu-smoke         # seconds on the CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from activations.store import ActivationStore  # noqa: E402
from activations.store.raw import LayerReader  # noqa: E402
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig  # noqa: E402
from sae.device_rows import load_rows  # noqa: E402
from sae.step import BareTrainer  # noqa: E402
from scale_common import timed_train, write_store  # noqa: E402


def drop_page_cache(store: Path) -> None:
    """Ask the kernel to forget the store's cached pages (the next read comes from the disk)."""
    for path in store.glob("shard-*.h5"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_read(store: Path, layer: int, device: torch.device, cold: bool) -> dict:
    """Seconds and GB/s of reading every row to the device in bfloat16 (the in-memory start-up read)."""
    if cold:
        drop_page_cache(store)
    reader = LayerReader(ActivationStore(store), layer)
    ids = np.arange(reader.n_rows, dtype=np.int64)
    start = time.perf_counter()
    out = load_rows(reader, ids, device, torch.bfloat16 if device.type == "cuda" else torch.float32, workers=8)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del out
    nbytes = reader.n_rows * reader.row_bytes
    return {"cold": cold, "seconds": seconds, "gb": nbytes / 1e9, "gb_per_s": nbytes / 1e9 / seconds}


def bare_step(cfg: SAEConfig, batch: int, device: torch.device, warmup: int, steps: int) -> float:
    """ms per fused step of `BareTrainer` on one fixed random batch (bf16 autocast on a GPU)."""
    fused = device.type == "cuda"
    trainer = BareTrainer(cfg, [0], device=device, autocast_dtype=torch.bfloat16 if fused else None, fused=fused)
    x = torch.randn(batch, cfg.d_in, device=device, generator=torch.Generator(device).manual_seed(0))
    for _ in range(warmup):
        trainer.step(x)
    if fused:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(x)
    if fused:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_081_344)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--store", type=Path, help="reuse (or create) the store here instead of a temp folder")
    parser.add_argument("--cold", action="store_true", help="also time the start-up read with the page cache dropped")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.rows, args.d, args.d_sae, args.k, args.batch, args.warmup, args.steps = 20000, 64, 256, 8, 256, 3, 20
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-scale-"))
    store = args.store or scratch / "store"
    results: dict = {"rows": args.rows, "d": args.d, "d_sae": args.d_sae, "k": args.k, "batch": args.batch}
    try:
        if not (store / "manifest.json").exists():
            start = time.perf_counter()
            write_store(store, args.rows, args.d)
            seconds = time.perf_counter() - start
            results["write"] = {"seconds": seconds, "gb_per_s": args.rows * args.d * 2 / 1e9 / seconds}
            print(f"wrote {args.rows} rows ({args.rows * args.d * 2 / 1e9:.1f} GB float16) in {seconds:.1f} s", flush=True)
        results["read"] = [timed_read(store, 0, device, cold=False)]
        if args.cold:
            results["read"].append(timed_read(store, 0, device, cold=True))
        sae = SAEConfig(d_in=args.d, d_sae=args.d_sae, k=args.k, auxk_coeff=1 / 32, normalize_input=True)
        gpu = device.type == "cuda"
        trainer = {"accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true"}
        for mode, in_memory in (("in-memory", True), ("streaming", False)):
            cfg = TrainConfig(seeds=[0], steps=args.warmup + args.steps, sae=sae, optim=OptimConfig(lr_warmup_steps=10),
                              data=DataConfig(batch_size=args.batch, in_memory=in_memory, memory_budget_gb=1e6,
                                              device_dtype="bfloat16" if gpu else "float32", metrics_rows=4096,
                                              init_rows=8192, num_workers=8),
                              ckpt_every=10**9, log_every_n_steps=50)
            results[mode] = timed_train(store, 0, scratch / mode, cfg, trainer, args.warmup, args.steps, args.batch,
                                        dmon_gpus=[torch.cuda.current_device()] if gpu else None)
            print(f"{mode}: {results[mode]['ms_per_step']:.2f} ms/step", flush=True)
        results["bare_ms"] = bare_step(sae, args.batch, device, 10, args.steps // 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(results, device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(r: dict, device: torch.device) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{name} | {r['rows']:,} rows, d {r['d']}, {r['d_sae']:,} latents, k {r['k']}, batch {r['batch']} | "
          f"train_saes (Lightning, fused, bf16) vs the bare fused step")
    for read in r["read"]:
        print(f"start-up read to the device ({'cold' if read['cold'] else 'page cache'}): {read['gb']:.1f} GB "
              f"in {read['seconds']:.2f} s = {read['gb_per_s']:.2f} GB/s")
    mem = r["in-memory"]["ms_per_step"]
    head = f"{'mode':<11} {'ms/step':>8} {'act/s':>9} {'x in-memory':>11} {'x bare':>7} {'start-up s':>10} {'GPU util %':>10}"
    print(head + "\n" + "-" * len(head))
    for mode in ("in-memory", "streaming"):
        m = r[mode]
        util = ",".join(f"{v:.0f}" for v in m["gpu_util"].values()) or "-"
        print(f"{mode:<11} {m['ms_per_step']:>8.2f} {m['act_per_s']:>9.3g} {mem / m['ms_per_step']:>11.3f} "
              f"{r['bare_ms'] / m['ms_per_step']:>7.3f} {m['startup_s']:>10.1f} {util:>10}")
    print(f"{'bare step':<11} {r['bare_ms']:>8.2f} {r['batch'] * 1000 / r['bare_ms']:>9.3g}")
    print("x in-memory: speed relative to the in-memory run (goal for streaming >= 0.9); x bare: relative to the bare step")


if __name__ == "__main__":
    sys.exit(main())
