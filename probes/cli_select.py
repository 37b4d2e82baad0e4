"""`refusal-sae select`: L1 heads, stability selection and features.json on SAE latents or residual units.

Example::

    refusal-sae select --sae runs/sae --acts runs/acts --layer 9 --out runs/select
    refusal-sae select --space residual --acts runs/acts --layer 9 --out runs/select_residual

The work is done by `probes.select_stage.run_selection` (see its module docstring for the files).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from activations.cli_util import run_cli
from activations.records import REFUSAL_CATEGORIES
from probes.protocol import CONTRAST_MODES
from probes.select_stage import REPORT_NAME, run_selection


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--acts", required=True, type=Path, help="activation store folder (harvest output)")
    parser.add_argument("--layer", required=True, type=int, help="block index stored in the activation store")
    parser.add_argument("--out", required=True, type=Path, help="selection folder to write")
    parser.add_argument("--space", choices=("sae", "residual"), default="sae",
                        help="SAE latents of every seed of --sae (default) or raw residual units")
    parser.add_argument("--sae", type=Path, help="SAE training run folder (RUN/seed_<s>/); needed for --space sae")
    parser.add_argument("--seeds", type=int, nargs="+", help="SAE seeds to use (default: all; the first is the reference)")
    parser.add_argument("--top-k", type=int, default=10, help="at most this many features per class")
    parser.add_argument("--n-bootstrap", type=int, default=10, help="bootstrap refits for stability selection (0 = off)")
    parser.add_argument("--threshold", type=float, default=0.5, help="stability selection frequency threshold")
    parser.add_argument("--C-grid", dest="c_grid", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                        help="inverse L1 strengths tried (chosen by calibrate macro-F1)")
    parser.add_argument("--tau", type=float, default=0.0, help="a feature is active on a row when its value > tau")
    parser.add_argument("--contrast-as", choices=CONTRAST_MODES, default="benign", help="how contrast rows enter the heads")
    parser.add_argument("--categories", nargs="+", default=list(REFUSAL_CATEGORIES), choices=REFUSAL_CATEGORIES,
                        metavar="CATEGORY", help="refusal categories to separate from benign (default: all five)")
    parser.add_argument("--n-boot-ci", type=int, default=1000, help="bootstrap resamples for the macro-F1 CI")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fits and bootstrap resamples")
    parser.add_argument("--device", default="auto", help="device for SAE encoding: auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per SAE encoding batch")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Open the store (and SAEs), run the selection; returns the report."""
    from activations.model_loading import resolve_device
    from probes.stage_data import load_sae_seeds, open_store

    store = open_store(args.acts)
    saes = None
    if args.space == "sae":
        if args.sae is None:
            raise ValueError("--space sae needs --sae RUN (or use --space residual)")
        saes = load_sae_seeds(args.sae, args.layer, args.seeds, resolve_device(args.device))
    elif args.sae is not None:
        print(f"note: --space residual ignores --sae {args.sae}", file=sys.stderr)
    return run_selection(
        store, args.layer, saes, args.out, top_k=args.top_k, n_bootstrap=args.n_bootstrap,
        threshold=args.threshold, c_grid=args.c_grid, tau=args.tau, contrast_as=args.contrast_as,
        categories=args.categories, n_boot_ci=args.n_boot_ci, seed=args.seed, batch_size=args.batch_size,
        sae_run=None if saes is None else str(args.sae),
    )


def format_table(report: dict[str, Any]) -> str:
    """One line per run: C, eval accuracy and macro-F1 with 95% CIs, features selected per class."""
    lines = [f"{'run':<10} {'C':>6}  {'eval accuracy [95% CI]':<28} {'macro-F1 [95% CI]':<22} selected per class"]
    for name, run_ in report["runs"].items():
        acc, f1 = run_["probe_eval"]["accuracy"], run_["probe_eval"]["macro_f1"]
        acc_text = f"{acc['rate']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] n={acc['n']}"
        f1_text = f"{f1['value']:.3f} [{f1['ci'][0]:.3f}, {f1['ci'][1]:.3f}]"
        counts = " ".join(f"{c}={len(ids)}" for c, ids in run_["selected"].items())
        lines.append(f"{name:<10} {run_['C']:>6g}  {acc_text:<28} {f1_text:<22} {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae select`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, show, argv)


def show(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(f"layer {report['layer']} ({report['space']} space, model {report['model']})")
    print(format_table(report))
    print(f"wrote {Path(args.out) / 'features.json'} and {Path(args.out) / REPORT_NAME}")


if __name__ == "__main__":
    sys.exit(main())
