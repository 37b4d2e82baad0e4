"""`refusal-sae vectors`: residual CAA, SAE-space and low-rank steering vectors per refusal category.

Example::

    refusal-sae vectors --acts runs/acts --layer 9 --out runs/vectors \
        --sae runs/sae --features runs/select/features.json --tau 0 --top-k 32 --rank 2

The work is done by `probes.vector_stage.build_vectors` (see its module docstring for the files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from activations.cli_util import run_cli
from activations.records import REFUSAL_CATEGORIES
from probes.vector_stage import REPORT_NAME, build_vectors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae vectors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--acts", required=True, type=Path, help="activation store folder (harvest output)")
    parser.add_argument("--layer", required=True, type=int, help="block index stored in the activation store")
    parser.add_argument("--out", required=True, type=Path, help="folder for the vector sets")
    parser.add_argument("--sae", type=Path, help="SAE training run folder (RUN/seed_<s>/): adds SAE-space vectors")
    parser.add_argument("--seeds", type=int, nargs="+", help="SAE seeds to use (default: all)")
    parser.add_argument("--features", type=Path,
                        help="features.json (or selection folder) of `refusal-sae select`: restrict each seed's "
                             "SAE vectors to its selected features (seed_<s>/features.json next to it)")
    parser.add_argument("--tau", type=float, default=0.0, help="a latent is active when its mean exceeds tau")
    parser.add_argument("--top-k", type=int, default=32, help="keep the k largest latents per SAE vector (0 = all)")
    parser.add_argument("--shared-frequency", type=float, default=None,
                        help="also call a latent active in a group when it fires on more than this fraction of its rows")
    parser.add_argument("--rank", type=int, default=2, help="rank of the low-rank combination")
    parser.add_argument("--mixing", choices=("logistic", "lda"), default="logistic", help="low-rank mixing fit")
    parser.add_argument("--categories", nargs="+", default=list(REFUSAL_CATEGORIES), choices=REFUSAL_CATEGORIES,
                        metavar="CATEGORY", help="refusal categories (default: all five)")
    parser.add_argument("--device", default="auto", help="device for SAE encoding: auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per SAE encoding batch")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Open the store, SAEs and features.json files, build the vectors; returns the report."""
    from activations.model_loading import resolve_device
    from probes.stage_data import load_sae_seeds, open_store
    from probes.vector_stage import load_seed_features

    if args.features is not None and args.sae is None:
        raise ValueError("--features needs --sae (the features are SAE latents)")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = all latents), got {args.top_k}")
    store = open_store(args.acts)
    saes = None if args.sae is None else load_sae_seeds(args.sae, args.layer, args.seeds, resolve_device(args.device))
    features = None if args.features is None else load_seed_features(args.features, list(saes or {}))
    return build_vectors(
        store, args.layer, saes, features, args.out, tau=args.tau, top_k=args.top_k or None, rank=args.rank,
        shared_frequency=args.shared_frequency, categories=args.categories, mixing=args.mixing,
        batch_size=args.batch_size, sae_run=None if args.sae is None else str(args.sae),
    )


def format_table(report: dict[str, Any]) -> str:
    """Per category: residual norm, cosine to the global vector, and per SAE seed latents kept / cosine."""
    seeds = list(report["sae"])
    header = f"{'category':<14} {'|v|':>8} {'cos(global)':>11}" + "".join(f"  {s + ' n/cos':>16}" for s in seeds)
    lines = [header]
    for c, info in report["residual"].items():
        line = f"{c:<14} {info['norm']:>8.3f} {info['cos_global']:>11.3f}"
        for s in seeds:
            entry = report["sae"][s]["per_category"][c]
            cell = f"{len(entry['latents'])}/{entry['cos_residual']:.3f}" if "cos_residual" in entry else "skipped"
            line += f"  {cell:>16}"
        lines.append(line)
    low = report["lowrank"]
    lines.append(f"{'global':<14} {report['global']['norm']:>8.3f} {1.0:>11.3f}")
    lines.append(f"{'lowrank':<14} {low['norm']:>8.3f} {low['cos_global']:>11.3f}  (rank {low['rank']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae vectors`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, show, argv)


def show(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(f"layer {report['layer']} steering vectors (model {report['model']})")
    print(format_table(report))
    print(f"wrote {args.out}/residual, {args.out}/lowrank" + "".join(
        f", {info['dir']}" for info in report["sae"].values() if info["dir"]) + f" and {Path(args.out) / REPORT_NAME}")


if __name__ == "__main__":
    sys.exit(main())
