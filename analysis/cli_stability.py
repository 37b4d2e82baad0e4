"""`refusal-sae stability`: cross-seed matching of SAE latents, feature-set Jaccard, and category geometry.

Example::

    refusal-sae stability --sae runs/sae --select runs/select --acts runs/acts --layer 9 --out runs/stability

Reads the SAE training run (`RUN/seed_<s>/`), the selection folder of `refusal-sae select --sae RUN`
(`SELECT/seed_<s>/features.json`) and the activation store, then writes `OUT/stability.json`:
decoder matching between every pair of seeds (Hungarian on decoder cosine) with matched-cosine
summaries, per-category Jaccard of the selected features through the matching, the features stable
across seeds (reference = smallest seed), and cluster metrics of the categories (silhouette,
Davies–Bouldin, Calinski–Harabasz) in residual and SAE space; plus `OUT/embeddings_<space>.png`
with PCA / t-SNE / UMAP panels. The work is done by `analysis.stability_report`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from activations.records import SPLITS
from activations.cli_util import run_cli
from analysis.geometry import EMBED_METHODS

RESULT_NAME = "stability.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae stability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", required=True, type=Path, help="SAE training run folder (RUN/seed_<s>/)")
    parser.add_argument("--select", required=True, type=Path,
                        help="selection folder of `refusal-sae select --sae RUN` (SELECT/seed_<s>/features.json)")
    parser.add_argument("--acts", required=True, type=Path, help="activation store folder (harvest output)")
    parser.add_argument("--layer", required=True, type=int, help="block the SAEs were trained on")
    parser.add_argument("--out", required=True, type=Path, help="output folder (stability.json and PNGs)")
    parser.add_argument("--seeds", type=int, nargs="+", help="SAE seeds to compare (default: all; the smallest is the reference)")
    parser.add_argument("--min-seeds", type=int, default=None,
                        help="seeds that must select a feature for it to be stable (default: max(2, half the seeds))")
    parser.add_argument("--split", choices=SPLITS, default="eval", help="rows used for the geometry (default eval)")
    parser.add_argument("--methods", nargs="+", choices=EMBED_METHODS, default=list(EMBED_METHODS),
                        help="2-D embeddings drawn (default: pca tsne umap)")
    parser.add_argument("--seed", type=int, default=0, help="seed of t-SNE / UMAP and the silhouette subsample")
    parser.add_argument("--device", default="auto", help="device for SAE encoding: auto | cpu | cuda | cuda:N")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the SAEs and the store, compute stability and geometry; write and return the report."""
    from activations.model_loading import resolve_device
    from analysis.cli_common import write_result
    from analysis.stability_report import geometry_summary, stability_summary
    from probes.stage_data import check_sae_width, load_sae_seeds, open_store

    if not args.select.is_dir():
        raise FileNotFoundError(f"selection folder not found: {args.select}")
    store = open_store(args.acts)
    if args.layer not in store.layers:
        raise ValueError(f"layer {args.layer} is not in the store {store.directory}; available layers: {store.layers}")
    seeds = None if args.seeds is None else sorted(set(args.seeds))
    saes = load_sae_seeds(args.sae, args.layer, seeds, resolve_device(args.device))  # sorted: smallest = reference
    check_sae_width(saes, store.d_model)
    if args.min_seeds is not None and not 1 <= args.min_seeds <= len(saes):
        raise ValueError(f"--min-seeds must be in [1, {len(saes)}], got {args.min_seeds}")
    stability = stability_summary(saes, args.select, layer=args.layer, min_seeds=args.min_seeds)
    geometry = geometry_summary(store, args.layer, saes, args.out, seed=args.seed, split=args.split,
                                methods=args.methods)
    payload = {
        "schema_version": 1, "command": "stability", "sae_run": str(args.sae), "select": str(args.select),
        "acts": str(args.acts), "layer": args.layer, "seeds": list(saes), "stability": stability, "geometry": geometry,
    }
    write_result(args.out / RESULT_NAME, payload)
    return payload


def format_tables(payload: dict[str, Any]) -> str:
    """Matched cosine per seed pair, Jaccard and stable-feature count per category, cluster metrics per space."""
    stability, lines = payload["stability"], []
    if "note" in stability:
        lines.append(stability["note"])
    else:
        lines.append(f"{'seed pair':<10} {'method':<10} {'mean cos':>9} {'median':>8} {'>0.7':>6}")
        for pair, c in stability["matched_cosine"].items():
            lines.append(f"{pair:<10} {c['method']:<10} {c['mean']:>9.3f} {c['median']:>8.3f} "
                         f"{c['fraction_above']['0.7']:>6.2f}")
        lines.append(f"{'category':<14} {'Jaccard':>8} {'stable':>7}")
        for category, j in stability["feature_jaccard"].items():
            text = "—" if j is None else f"{j:.3f}"
            lines.append(f"{category:<14} {text:>8} {len(stability['stable_features'].get(category, [])):>7}")
    lines.append(f"{'space':<14} {'silhouette':>10} {'Davies-B.':>10} {'Calinski-H.':>12}  ({payload['geometry']['split']}, "
                 f"n={payload['geometry']['n_rows']})")
    for space, m in payload["geometry"]["metrics"].items():
        lines.append(f"{space:<14} {m['silhouette']:>10.3f} {m['davies_bouldin']:>10.3f} {m['calinski_harabasz']:>12.2f}")
    return "\n".join(lines)


def show(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    print(f"layer {payload['layer']}, SAE seeds {payload['seeds']}")
    print(format_tables(payload))
    print(f"wrote {args.out / RESULT_NAME} and {', '.join(Path(p).name for p in payload['geometry']['pngs'].values())}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae stability`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, show, argv)


if __name__ == "__main__":
    sys.exit(main())
