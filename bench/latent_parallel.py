"""One rank's share of a latent-parallel step, timed on one GPU, beside the one-GPU fused step.

Latent parallelism (`sae/kernels/latent_shard.py`) gives each of R ranks d_sae / R latents and the
whole global batch. Without a second GPU this script times what one rank computes, in one process:

- `fused`: the one-GPU fused step, batch B, all d_sae latents (the baseline, act/s = B / time);
- `lp-rank`: rank 0 of R = 2 in the latent-parallel step: global batch 2B, latents [0, d_sae / 2),
  the same code; with one process the collectives are no-ops and the other rank's candidates are
  stood in for by this rank's own values under the other half's ids (`peer_merge`), so each row
  keeps about k / 2 entries of its own, as a real rank does;
- `lp-1`: the latent-parallel code on one process at batch B and all latents: its overhead over `fused`.

It prints ms/step, act/s and the projected two-GPU speed-up = 2B / (lp-rank time + communication)
÷ (B / fused time), with the communication a rank waits for per step computed from the sizes
(candidates all-gather: 2B·k·(2 + 4) bytes; partial reconstruction all-reduce: 2B·d_in·4 bytes)
at `--link-gbps` (NVLink between two H200s: NCCL all-gathers measured 192 GB/s, docs/sae.md); the
all-reduce is counted as two transfers of half the bytes (reduce-scatter + all-gather). It is a
projection, not the two-GPU measurement (`bench/multi_gpu.py --parts lp` on two GPUs is).

    python bench/latent_parallel.py            # GPU
    python bench/latent_parallel.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sae.config import SAEConfig  # noqa: E402
from sae.kernels import latent_shard  # noqa: E402
from sae.kernels.latent_shard import LatentShard  # noqa: E402
from sae.step import BareTrainer, make_optimizer  # noqa: E402
from sae_step import free_memory, time_ms  # noqa: E402


OWNED: list[torch.Tensor] = []
"""Per `peer_merge` call: the share of the selected entries rank 0 owns."""


def peer_merge(values: torch.Tensor, ids: torch.Tensor, k: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_candidates` of rank 0 of 2 with a stand-in peer: the same values under ids of the other half."""
    half = latent_shard.PEER_OFFSET
    all_values = torch.cat([values, values], dim=1)
    all_ids = torch.cat([ids, ids + half], dim=1)
    top, position = all_values.topk(k, dim=1, sorted=False)
    selected = all_ids.gather(1, position)
    OWNED.append((selected < half).float().mean())  # read once, after the timing (no sync in the loop)
    return top, selected


def profile_steps(name: str, trainer: BareTrainer, x: torch.Tensor, device: torch.device) -> None:
    """Print the kernels of 3 steps (device time per step)."""
    activities = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            trainer.step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1000
    print(f"\n{name}: GPU kernels {busy:.2f} ms per step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                    row_limit=25, max_name_column_width=90))


def trainer_for(d_in: int, d_sae: int, k: int, device: torch.device, shard: LatentShard | None) -> BareTrainer:
    """A one-seed fused BareTrainer; with `shard`, its SAE keeps only that shard's latents."""
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, auxk_coeff=1 / 32)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    trainer = BareTrainer(cfg, [0], lr=1e-4, device=device, autocast_dtype=dtype, fused=True)
    if shard is not None:
        for sae, tracker in zip(trainer.saes, trainer.trackers):
            sae.shard_latents(shard)
            tracker.shard_range = (shard.lo, shard.hi)
        trainer.optimizer = make_optimizer(trainer.saes, 1e-4, (0.9, 0.999), 6.25e-10, True)
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096, help="B: the one-GPU batch (a rank of R = 2 takes 2B)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--link-gbps", type=float, default=192.0, help="GB/s a rank receives over the GPU link")
    parser.add_argument("--profile", action="store_true", help="also print the kernels of 3 profiled steps of each run")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.d_in, args.d_sae, args.k, args.batch, args.steps, args.warmup = 32, 256, 4, 64, 3, 1
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    B, d_sae = args.batch, args.d_sae
    runs = {"fused": (B, d_sae, None), "lp-1": (B, d_sae, LatentShard(0, 1, d_sae)),
            "lp-rank": (2 * B, d_sae, LatentShard(0, 2, d_sae))}
    ms: dict[str, float] = {}
    generator = torch.Generator(device=device).manual_seed(0)
    # the latent-parallel code (one process, all latents) against the fused step: same weights after 3 steps
    x = torch.randn(B, args.d_in, device=device, generator=generator)
    pair = [trainer_for(args.d_in, d_sae, args.k, device, shard) for shard in (None, LatentShard(0, 1, d_sae))]
    for _ in range(3):
        for trainer in pair:
            trainer.step(x)
    diffs = {name: float((getattr(pair[1].saes[0], name) - getattr(pair[0].saes[0], name)).norm()
                         / getattr(pair[0].saes[0], name).norm()) for name in ("W_enc_rows", "W_dec", "b_enc", "b_dec")}
    del pair, x
    free_memory(device)
    for name, (batch, latents, shard) in runs.items():
        trainer = trainer_for(args.d_in, latents, args.k, device, shard)
        x = torch.randn(batch, args.d_in, device=device, generator=generator)
        merge = latent_shard.merge_candidates
        if name == "lp-rank":
            latent_shard.PEER_OFFSET = d_sae // 2  # type: ignore[attr-defined]
            latent_shard.merge_candidates = peer_merge
        try:
            ms[name] = time_ms(lambda: trainer.step(x), args.steps, args.warmup, device)
            if args.profile:
                profile_steps(name, trainer, x, device)
        finally:
            latent_shard.merge_candidates = merge
        del trainer, x
        free_memory(device)
    comm_bytes = 2 * B * args.k * (2 + 4) + 2 * B * args.d_in * 4  # received per rank per step
    comm_ms = comm_bytes / (args.link_gbps * 1e9) * 1e3
    fused_rate = B / ms["fused"] * 1e3
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | d_in {args.d_in}, {d_sae:,} latents, "
          f"k {args.k}, B {B} | fused path, {'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    print(f"{'run':<10} {'batch':>6} {'latents':>8} {'ms/step':>8} {'act/s':>10}")
    for name, (batch, latents, shard) in runs.items():
        owned = shard.size if shard is not None else latents
        print(f"{name:<10} {batch:>6} {owned:>8} {ms[name]:>8.2f} {batch / ms[name] * 1e3:>10.3g}")
    projected = 2 * B / (ms["lp-rank"] + comm_ms) * 1e3
    print("lp-1 vs fused after 3 steps, relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(f"lp-rank: share of the selected entries the rank owns {float(OWNED[-1]):.3f}")
    print(f"latent-parallel overhead on one process (lp-1 / fused): {ms['lp-1'] / ms['fused']:.3f}")
    print(f"communication per rank and step: {comm_bytes / 2**20:.1f} MiB = {comm_ms:.2f} ms at {args.link_gbps:g} GB/s")
    print(f"projected 2-GPU speed-up over one fused GPU: {projected / fused_rate:.2f}x "
          f"(2B / (lp-rank {ms['lp-rank']:.2f} ms + comm {comm_ms:.2f} ms) vs B / fused {ms['fused']:.2f} ms)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
