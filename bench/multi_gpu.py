"""Benchmark (issue 19): one SAE on two GPUs (DDP, fused path) and seeds on separate GPUs (seed_parallel).

Writes a synthetic store (default 4,194,304 rows, d 4096, float16) and runs `bench/train_run.py`
(the real `train_saes`, each run its own process, as a user runs them) for:

(a) DDP of one SAE, in memory and streaming: activations/s on 2 GPUs vs 1 GPU at the same per-rank
    batch (goal >= 1.8x), and the weights after a short run vs a one-GPU run with the same global
    batch (and vs a repeat of that one-GPU run: GPU runs are reproducible only up to float rounding);
(b) seed_parallel with 2 and 4 seeds vs the same seeds on one GPU: step-time speed-up (goal >= 1.9x)
    and every seed's export vs the one-GPU run;
(c) start-up time per rank (from its process's start to the end of its first step) and GPU
    utilisation (`nvidia-smi dmon`, SM %) in the timed window.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python bench/multi_gpu.py
    python bench/multi_gpu.py --cpu-smoke        # two gloo ranks on the CPU, tiny sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_common import write_store  # noqa: E402

HERE = Path(__file__).resolve().parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run(name: str, args: argparse.Namespace, scratch: Path, extra: list[str]) -> dict:
    """One `train_run.py` process; returns {"ranks": [per-rank results], "out": run folder, "wall_s"}."""
    out, prefix = scratch / name, scratch / f"{name}-timing"
    cmd = [sys.executable, str(HERE / "train_run.py"), "--store", str(args.store), "--out", str(out), "--json", str(prefix),
           "--d-sae", str(args.d_sae), "--k", str(args.k), *extra]
    if args.cpu_smoke:
        cmd.append("--cpu")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **NO_MULTICAST}, capture_output=True, text=True, timeout=args.run_timeout)
    wall = time.perf_counter() - start
    log = args.logs or scratch.parent / "logs"
    log.mkdir(parents=True, exist_ok=True)
    (log / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
        return {"ranks": [], "out": out, "wall_s": wall, "failed": True}
    ranks = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{name}-timing.rank*.json"))]
    print(f"{name}: {ranks[0]['ms_per_step']:.2f} ms/step, {ranks[0]['act_per_s']:.3g} act/s, "
          f"start-up {[round(r['process_startup_s'], 1) for r in ranks]} s, wall {wall:.0f} s", flush=True)
    return {"ranks": ranks, "out": out, "wall_s": wall}


def weight_diff(a: Path, b: Path, seeds: list[int], init: Path | None = None) -> float:
    """Largest relative difference ‖a − b‖ / ‖b‖ over the seeds' exported tensors; with `init` (the
    weights before step 0, seed 0), ‖a − b‖ / ‖b − init‖: the difference relative to the update."""
    from safetensors.torch import load_file

    worst = 0.0
    start = load_file(str(init)) if init is not None else None
    for seed in seeds:
        ta, tb = load_file(str(a / f"seed_{seed}" / "sae.safetensors")), load_file(str(b / f"seed_{seed}" / "sae.safetensors"))
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            x, y = ta[name].double(), tb[name].double()
            scale = y if start is None else y - start[name].double()
            worst = max(worst, float((x - y).norm() / scale.norm().clamp_min(1e-30)))
    return worst


def scratch_of(result: dict) -> Path:
    """The scratch folder of a run (its run folder's parent)."""
    return Path(result["out"]).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4_194_304)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed-steps", type=int, default=120)
    parser.add_argument("--short-steps", type=int, default=40)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--parts", nargs="+", default=["speed", "equal", "seeds"],
                        choices=["speed", "equal", "seeds", "profile", "lp"],
                        help="speed: (a) act/s; equal: (a) short runs' weights (bf16 and float32); seeds: (b); "
                             "lp: latent_parallel (global batch 2 x --batch) act/s in memory and streaming, and a short "
                             "float32 run's weights against one GPU; "
                             "profile: 5 profiled steps of one GPU and of DDP (tables under --logs)")
    parser.add_argument("--seed-counts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--profile-runs", nargs="+", default=["one", "ddp"], choices=["one", "ddp", "sp"])
    parser.add_argument("--run-timeout", type=int, default=420)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="keep each run's output here")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.rows, args.d, args.d_sae, args.k, args.batch = 6000, 16, 64, 4, 64
        args.steps, args.seed_steps, args.short_steps = 6, 6, 6
    scratch = Path(tempfile.mkdtemp(prefix="bench-multi-gpu-")) / "runs"
    scratch.mkdir(parents=True)
    if args.store is None:
        args.store = scratch.parent / "store"
    if not (args.store / "manifest.json").exists():
        start = time.perf_counter()
        write_store(args.store, args.rows, args.d, prompt_rows=min(4096, args.rows))
        print(f"wrote {args.rows} rows in {time.perf_counter() - start:.0f} s", flush=True)
    b, steps = str(args.batch), ["--warmup", "20" if not args.cpu_smoke else "2"]
    two = ["--devices", "2", "--strategy", "ddp"]
    r: dict[str, dict] = {}
    try:
        if "speed" in args.parts:
            for mode, flag in (("mem", []), ("stream", ["--streaming"])):
                r[f"one-{mode}"] = run(f"one-{mode}", args, scratch, ["--batch", b, *steps, "--steps", str(args.steps), *flag])
                r[f"ddp-{mode}"] = run(f"ddp-{mode}", args, scratch, [*two, "--batch", b, *steps, "--steps", str(args.steps), *flag])
        if "equal" in args.parts:
            warm = 1 if args.short_steps > 1 else 0
            short = ["--streaming", "--warmup", str(warm), "--steps", str(args.short_steps - warm)]
            for tag, precision in (("", "bf16-mixed"), ("-fp32", "32-true")):
                p = ["--precision", precision]
                init = ["--init-out", str(scratch / f"init{tag}.safetensors")]
                r[f"one-short{tag}"] = run(f"one-short{tag}", args, scratch, ["--batch", str(2 * args.batch), *short, *p, *init])
                if tag:  # the float32 run's repeat shows the GPU's own run-to-run rounding
                    r[f"one-repeat{tag}"] = run(f"one-repeat{tag}", args, scratch, ["--batch", str(2 * args.batch), *short, *p])
                r[f"ddp-short{tag}"] = run(f"ddp-short{tag}", args, scratch, [*two, "--batch", b, *short, *p])
        if "lp" in args.parts:
            lp = ["--devices", "2", "--strategy", "latent_parallel", "--batch", str(2 * args.batch)]
            for mode, flag in (("mem", []), ("stream", ["--streaming"])):
                if f"one-{mode}" not in r:
                    r[f"one-{mode}"] = run(f"one-{mode}", args, scratch, ["--batch", b, *steps, "--steps", str(args.steps), *flag])
                r[f"lp-{mode}"] = run(f"lp-{mode}", args, scratch, [*lp, *steps, "--steps", str(args.steps), *flag])
            r["one2b-mem"] = run("one2b-mem", args, scratch, ["--batch", str(2 * args.batch), *steps, "--steps", str(args.steps)])
            short = ["--streaming", "--warmup", "0", "--steps", str(args.short_steps), "--precision", "32-true"]
            if "one-short-fp32" not in r:
                r["one-short-fp32"] = run("one-short-fp32", args, scratch, ["--batch", str(2 * args.batch), *short])
            r["lp-short-fp32"] = run("lp-short-fp32", args, scratch, [*lp, *short])
        if "profile" in args.parts:
            for name, extra in (("one-prof", []), ("ddp-prof", two), ("sp-prof", ["--devices", "2", "--strategy", "seed_parallel",
                                                                                     "--seeds", "0", "1"])):
                if name.split("-")[0] not in args.profile_runs:
                    continue
                logs = (args.logs or scratch.parent / "logs") / f"profile-{name}"
                r[name] = run(name, args, scratch, [*extra, "--batch", b, "--warmup", "20", "--steps", "5", "--profile", str(logs)])
        if "seeds" in args.parts:
            for n in args.seed_counts:
                seeds = ["--seeds", *map(str, range(n))]
                seed_steps = [*steps, "--steps", str(args.seed_steps)]
                r[f"one-{n}seeds"] = run(f"one-{n}seeds", args, scratch, ["--batch", b, *seeds, *seed_steps])
                r[f"sp-{n}seeds"] = run(f"sp-{n}seeds", args, scratch,
                                        ["--devices", "2", "--strategy", "seed_parallel", "--batch", b, *seeds, *seed_steps])
        report(r, args)
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)
    return 0


def speed_table(ok: dict[str, dict], two: str, title: str, table: dict) -> bool:
    """Print one GPU against the `two`-GPU runs (in memory, streaming); False when none ran."""
    if f"{two}-mem" not in ok and f"{two}-stream" not in ok:
        return False
    print(f"{title}\n{'data':<10} {'1 GPU act/s':>11} {'2 GPU act/s':>11} {'speed-up':>8} "
          f"{'1 GPU ms':>8} {'2 GPU ms':>8} {'start-up s (ranks)':>20} {'SM % (GPUs)':>12}")
    for mode in ("mem", "stream"):
        one, many = ok.get(f"one-{mode}"), ok.get(f"{two}-{mode}")
        if one and many:
            o, d = one["ranks"][0], many["ranks"][0]
            table[f"{two}_speedup_{mode}"] = d["act_per_s"] / o["act_per_s"]
            util = ",".join(f"{v:.0f}" for v in d["gpu_util"].values()) or "-"
            starts = ",".join(f"{x['process_startup_s']:.1f}" for x in many["ranks"])
            print(f"{'in memory' if mode == 'mem' else 'streaming':<10} {o['act_per_s']:>11.3g} {d['act_per_s']:>11.3g} "
                  f"{d['act_per_s'] / o['act_per_s']:>7.2f}x {o['ms_per_step']:>8.2f} {d['ms_per_step']:>8.2f} "
                  f"{starts:>20} {util:>12}")
    return True


def report(r: dict[str, dict], args: argparse.Namespace) -> None:
    ok = {k: v for k, v in r.items() if not v.get("failed")}
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke else "cpu (gloo)"
    print(f"\n{name} x2 | {args.rows:,} rows, d {args.d}, {args.d_sae:,} latents, k {args.k}, {args.batch} rows per rank "
          "per step | train_saes, fused path, bf16")
    table: dict = {"runs": {k: v["ranks"] for k, v in ok.items()}}
    speed_table(ok, "ddp", "\n(a) DDP, one SAE", table)
    if speed_table(ok, "lp", f"\n(a') latent_parallel, one SAE, global batch {2 * args.batch} (every rank reads it; "
                               f"each owns {args.d_sae // 2:,} latents)", table):
        if "one2b-mem" in ok and "lp-mem" in ok:
            same = ok["lp-mem"]["ranks"][0]["act_per_s"] / ok["one2b-mem"]["ranks"][0]["act_per_s"]
            table["lp_speedup_same_global_batch"] = same
            print(f"against one GPU at the same global batch ({2 * args.batch}): {same:.2f}x")
        if {"one-short-fp32", "lp-short-fp32"} <= set(ok):
            table["lp_weight_diff_fp32"] = weight_diff(ok["lp-short-fp32"]["out"], ok["one-short-fp32"]["out"], [0])
            print(f"weights after {args.short_steps} step(s) (float32), latent_parallel 2 GPUs vs 1 GPU, global batch "
                  f"{2 * args.batch}: max relative difference {table['lp_weight_diff_fp32']:.2e}")
    for tag, precision in (("", "bf16 autocast"), ("-fp32", "float32")):
        if {f"one-short{tag}", f"ddp-short{tag}"} <= set(ok):
            init = scratch_of(ok[f"one-short{tag}"]) / f"init{tag}.safetensors"
            init = init if init.exists() else None
            one = ok[f"one-short{tag}"]["out"]
            same = weight_diff(ok[f"ddp-short{tag}"]["out"], one, [0])
            table[f"ddp_weight_diff{tag}"] = same
            line = (f"weights after {args.short_steps} step(s) ({precision}), DDP 2 x {args.batch} vs 1 GPU x "
                    f"{2 * args.batch}: max relative difference {same:.2e}")
            if init is not None:
                table[f"ddp_update_diff{tag}"] = weight_diff(ok[f"ddp-short{tag}"]["out"], one, [0], init)
                line += f" (of the update: {table[f'ddp_update_diff{tag}']:.2e})"
            if f"one-repeat{tag}" in ok:
                table[f"repeat_weight_diff{tag}"] = weight_diff(ok[f"one-repeat{tag}"]["out"], one, [0])
                line += f"; 1 GPU vs its repeat {table[f'repeat_weight_diff{tag}']:.2e}"
                if init is not None:
                    table[f"repeat_update_diff{tag}"] = weight_diff(ok[f"one-repeat{tag}"]["out"], one, [0], init)
                    line += f" (of the update: {table[f'repeat_update_diff{tag}']:.2e})"
            print(line)
    if any(f"one-{n}seeds" in ok for n in args.seed_counts):
        print(f"\n(b) seed_parallel (in memory)\n{'seeds':<6} {'1 GPU ms':>8} {'2 GPU ms':>8} {'speed-up':>8} "
              f"{'max rel. diff of exports':>24} {'start-up s (ranks)':>20} {'SM % (GPUs)':>12}")
        for n in args.seed_counts:
            one, sp = ok.get(f"one-{n}seeds"), ok.get(f"sp-{n}seeds")
            if one and sp:
                o, s = one["ranks"][0], sp["ranks"][0]
                diff = weight_diff(sp["out"], one["out"], list(range(n)))
                table[f"sp{n}_weight_diff"] = diff
                util = ",".join(f"{v:.0f}" for v in s["gpu_util"].values()) or "-"
                starts = ",".join(f"{x['process_startup_s']:.1f}" for x in sp["ranks"])
                print(f"{n:<6} {o['ms_per_step']:>8.2f} {s['ms_per_step']:>8.2f} {o['ms_per_step'] / s['ms_per_step']:>7.2f}x "
                      f"{diff:>24.2e} {starts:>20} {util:>12}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
