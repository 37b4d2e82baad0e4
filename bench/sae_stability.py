"""How big must a run be for SAE features to reproduce across seeds? Train a grid of SAE sizes on one store.

    python bench/sae_stability.py --acts RUN/harvest/all --layer 20 --out /tmp/stability \
        --widths 576 2304 --steps 300 3000 --splits extract extract+calibrate

For every (width, steps, training splits) it trains one SAE per seed (`sae.train.train_saes`, the
quickstart's k, batch and learning rate unless given) on the clean rows (`sae.rows`: no template
prefix, no sink, no duplicates) and prints, per configuration: the rows trained on, the epochs that
makes, the mean Hungarian-matched decoder cosine over seed pairs (all latents, and latents alive in
both seeds), the share of matched pairs above 0.7, the held-out FVU (`calibrate` rows when they were
not trained on) and the wall time relative to the first configuration (timed in this process).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from activations.io import load_numpy_tensors
from analysis.evaluation.stability import match_all_pairs, matched_cosine_summary
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.export import load_sae_run
from sae.train import train_saes


def live_cosine(run: Path, seeds: list[int]) -> float:
    """Mean matched cosine over pairs, counting only latents that fire on held-out rows in both seeds."""
    saes = load_sae_run(run, seeds=seeds)
    alive = {s: load_numpy_tensors(run / f"seed_{s}" / "latent_stats.safetensors", "latent stats")["firing_frequency"] > 0
             for s in seeds}
    values = []
    for (a, b), m in match_all_pairs({s: saes[s].W_dec.detach() for s in seeds}).items():
        keep = alive[a] & (m.perm >= 0)
        keep[keep] &= alive[b][m.perm[keep]]
        values.append(float(np.mean(m.cosine[keep])) if keep.any() else float("nan"))
    return float(np.nanmean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", type=Path, required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--widths", type=int, nargs="+", default=[2304])
    parser.add_argument("--steps", type=int, nargs="+", default=[300])
    parser.add_argument("--splits", nargs="+", default=["extract"], help="training splits, '+'-joined")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--normalize-input", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, baseline = [], None
    for splits in args.splits:
        for width in args.widths:
            for steps in args.steps:
                name = f"w{width}_s{steps}_{splits.replace('+', '-')}"
                split = splits.split("+")
                cfg = TrainConfig(
                    seeds=args.seeds, steps=steps, log_every_n_steps=max(1, steps // 10), ckpt_every=steps,
                    sae=SAEConfig(d_sae=width, k=args.k, auxk_coeff=1 / 32, normalize_input=args.normalize_input),
                    optim=OptimConfig(lr=args.lr), data=DataConfig(split=split if len(split) > 1 else split[0],
                                                                   batch_size=args.batch))
                started = time.perf_counter()
                run = train_saes(args.acts, args.layer, args.out / name, cfg, enable_progress_bar=False, print_table=False)
                seconds = time.perf_counter() - started
                baseline = baseline or seconds
                metrics = json.loads((run / "metrics.json").read_text())
                saes = load_sae_run(run)
                pairs = match_all_pairs({s: m.W_dec.detach() for s, m in saes.items()})
                summaries = [matched_cosine_summary(m) for m in pairs.values()]
                seed_metrics = list(metrics["seeds"].values())
                kept = metrics["training_rows"]["kept"]
                rows.append({
                    "config": name, "rows": kept, "epochs": steps * args.batch / kept,
                    "matched_cosine": float(np.mean([s["mean"] for s in summaries])),
                    "matched_cosine_live": live_cosine(run, list(saes)),
                    "above_0.7": float(np.mean([s["fraction_above"]["0.7"] for s in summaries])),
                    "fvu": float(np.mean([m["fvu"] for m in seed_metrics])),
                    "fvu_split": seed_metrics[0]["metrics_split"],
                    "dead": float(np.mean([m["dead_fraction"] for m in seed_metrics])),
                    "seconds": seconds, "x_first": seconds / baseline,
                })
                print(json.dumps(rows[-1]), flush=True)
    header = f"{'config':<34} {'rows':>6} {'epochs':>7} {'cos':>6} {'cos live':>8} {'>0.7':>6} {'fvu':>7} {'split':>10} {'dead':>6} {'time x':>7}"
    print(header)
    for r in rows:
        print(f"{r['config']:<34} {r['rows']:>6} {r['epochs']:>7.1f} {r['matched_cosine']:>6.3f} {r['matched_cosine_live']:>8.3f} "
              f"{r['above_0.7']:>6.3f} {r['fvu']:>7.3f} {r['fvu_split']:>10} {r['dead']:>6.3f} {r['x_first']:>7.2f}")
    (args.out / "stability_grid.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
