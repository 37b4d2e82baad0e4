"""One timed SAE training run (`sae.train.train_saes`), for `multi_gpu.py`; every rank writes its timings.

Lightning's DDP and seed_parallel strategies start the other ranks by running this same command
again, so the script does nothing but the one run. Each rank writes `JSON.rank<r>.json`.

    python bench/train_run.py --store S --out O --json J --devices 2 --strategy ddp --batch 4096
"""
from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: start-up is measured from here

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig  # noqa: E402
from scale_common import timed_train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True, help="prefix of the per-rank result files")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=4096,
                        help="rows per rank per step (seed_parallel / latent_parallel: the global batch, every rank reads it)")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision on a GPU")
    parser.add_argument("--cpu", action="store_true", help="gloo ranks on the CPU (tests of this script)")
    parser.add_argument("--profile", type=Path, help="profile 5 steps after the warm-up; per-rank tables here")
    parser.add_argument("--init-out", type=Path, help="rank 0 saves the initial weights of seed 0 here")
    args = parser.parse_args(argv)
    from activations.store import ActivationStore

    d = ActivationStore(args.store).d_model
    gpu = not args.cpu
    sae = SAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, auxk_coeff=1 / 32, normalize_input=True)
    cfg = TrainConfig(seeds=args.seeds, steps=args.warmup + args.steps, sae=sae, optim=OptimConfig(lr_warmup_steps=10),
                      data=DataConfig(batch_size=args.batch, in_memory=not args.streaming, memory_budget_gb=1e6,
                                      device_dtype="bfloat16" if gpu and args.precision != "32-true" else "float32",
                                      metrics_rows=4096, init_rows=8192,
                                      num_workers=8),
                      ckpt_every=10**9, log_every_n_steps=50)
    trainer = {"accelerator": "gpu" if gpu else "cpu", "devices": args.devices, "strategy": args.strategy,
               "precision": args.precision if gpu else "32-true"}
    replicated = args.strategy.startswith(("seed_parallel", "latent_parallel"))  # every rank reads the whole batch
    rows_per_step = args.batch * (1 if replicated else args.devices)
    result = timed_train(args.store, 0, args.out, cfg, trainer, args.warmup, args.steps, rows_per_step,
                         dmon_gpus=list(range(args.devices)) if gpu else None, process_start=PROCESS_START,
                         profile_dir=args.profile, init_out=args.init_out)
    result.update({"devices": args.devices, "strategy": args.strategy, "seeds": args.seeds, "batch": args.batch,
                   "streaming": args.streaming})
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        result["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    Path(f"{args.json}.rank{rank}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
