"""`refusal-sae steer`: refusal under steering (± each strength) and SAE-feature ablation, vs the baseline.

Example::

    refusal-sae steer --model runs/pipe/refusal_model/model --vectors runs/vectors/residual \
        --vector global --layer 9 --prompts builtin:quickstart --split eval --alpha 2 4 8 \
        --ablate-sae runs/sae/seed_0 --features runs/select/features.json --out runs/steer.json

Refusal is the model's refusal-token decision on its first response token (spec from
`MODEL/refusal_tokens.json`, or `--tokens`). Conditions: `baseline`; `steer+A` and `steer-A` for each
`--alpha` A (adding ±A · v at `--layer` on every position, or `--positions generated`); `ablate` (the
refusal categories' selected SAE features zeroed, reconstruction error kept) with `--ablate-sae`.
The JSON holds, per condition, the refusal rate per category plus `over_refusal` (benign + contrast)
and `harmful_refusal` (the five refusal categories), each `{rate, ci, n}` (Wilson 95%), the paired
exact McNemar test against the baseline, and every prompt's decision.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from activations.records import SPLITS
from activations.cli_util import run_cli
from analysis.cli_common import add_target_args, rate_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae steer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="refusal-token model folder (or hub id with --tokens)")
    parser.add_argument("--vectors", required=True, type=Path, help="vector-set folder (e.g. VECTORS/residual)")
    parser.add_argument("--vector", required=True, help="name of the vector in the set (e.g. global, safety)")
    parser.add_argument("--layer", required=True, type=int, help="block whose output is steered")
    parser.add_argument("--prompts", required=True, nargs="+", metavar="SPEC", help="prompt source specs")
    parser.add_argument("--split", choices=SPLITS, default="eval", help="split evaluated (default eval)")
    parser.add_argument("--alpha", required=True, type=float, nargs="+", metavar="A",
                        help="steering strengths; each is run as +A and -A")
    parser.add_argument("--positions", choices=("all", "generated"), default="all",
                        help="steer every position (default) or only the last prompt / generated positions")
    parser.add_argument("--ablate-sae", type=Path, default=None, help="one exported SAE folder (RUN/seed_<s>)")
    parser.add_argument("--features", type=Path, default=None,
                        help="features.json of that SAE seed (`refusal-sae select`): the latents to ablate")
    add_target_args(parser, 16, "prompts per forward")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="output JSON (default results.json)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if (args.ablate_sae is None) != (args.features is None):
        raise ValueError("--ablate-sae and --features go together (the SAE and the features selected on it)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not all(np.isfinite(args.alpha)):
        raise ValueError(f"--alpha values must be finite, got {args.alpha}")


def signed_strengths(alphas: list[float]) -> list[float]:
    """+A then -A for each distinct |A|, smallest first; 0 appears once."""
    out: list[float] = []
    for a in sorted({abs(float(a)) for a in alphas}):
        out += [a] if a == 0 else [a, -a]
    return out


def condition_name(alpha: float) -> str:
    return f"steer{'-' if alpha < 0 else '+'}{abs(alpha):g}"


def load_vector(directory: Path, name: str, layer: int, d_model: int) -> Any:
    """The named `SteeringVector` of a vector set, checked against the layer and the model's d_model."""
    from probes.vectors import VectorSet

    if not directory.is_dir():
        raise FileNotFoundError(f"vector-set folder not found: {directory}")
    vectors = VectorSet.load(directory)
    if name not in vectors:
        raise ValueError(f"no steering vector named {name!r} in {directory}; available: {', '.join(vectors)}")
    vector = vectors[name]
    if vector.layer != layer:
        raise ValueError(f"steering vector {name!r} of {directory} is for layer {vector.layer}, not layer {layer}")
    if vector.d_model != d_model:
        raise ValueError(f"steering vector {name!r} has d_model {vector.d_model} but the model's is {d_model}")
    return vector


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load model, vector, prompts (and SAE); evaluate every condition; write and return the results."""
    from activations.adapter import ModelAdapter
    from analysis.ablation import ablate_features
    from analysis.cli_common import (
        load_one_sae, load_records, load_target, refusal_feature_ids, show_progress, write_result,
    )
    from analysis.conditions import EvalSetup, Plan, refusal_table, run_refusal
    from analysis.refusal_eval import compare_conditions

    check_args(args)
    records = load_records(args.prompts, args.split, args.seed)
    model, tokenizer, spec = load_target(args.model, args.tokens, args.device, args.dtype)
    adapter = ModelAdapter(model)
    adapter.check_layer(args.layer)
    vector = load_vector(args.vectors, args.vector, args.layer, adapter.d_model)
    setup = EvalSetup(model, tokenizer, spec, args.layer, args.positions, args.batch_size, args.max_length)
    ablated: list[int] = []
    if args.ablate_sae is not None:
        sae, sae_seed = load_one_sae(args.ablate_sae, args.layer, adapter.d_model, str(adapter.device))
        ablated = refusal_feature_ids(args.features, args.layer, sae.d_sae, sae_seed)

    n = len(records)
    conditions = [{"name": "baseline", "kind": "baseline", "alpha": 0.0}]
    conditions += [{"name": condition_name(a), "kind": "steer", "alpha": a} for a in signed_strengths(args.alpha)]
    if ablated:
        conditions.append({"name": "ablate", "kind": "ablate", "alpha": None, "n_features": len(ablated)})
    results, progress = {}, show_progress()
    for cond in conditions:
        print(f"condition {cond['name']} ({n} prompts)", file=sys.stderr, flush=True)
        if cond["kind"] == "baseline":
            found = run_refusal(setup, records, progress=progress)
        elif cond["kind"] == "steer":
            found = run_refusal(setup, records, Plan.uniform(vector.vector.numpy(), cond["alpha"], n), progress=progress)
        else:
            def zeroed(_rows: np.ndarray) -> Any:  # every batch: the selected features set to 0
                return ablate_features(adapter, args.layer, sae, ablated, positions=args.positions)

            found = run_refusal(setup, records, context=zeroed, progress=progress)
        results[cond["name"]] = found

    payload = {
        "schema_version": 1, "command": "steer", "model": args.model, "layer": args.layer,
        "vector": {"dir": str(args.vectors), "name": args.vector, "norm": vector.norm(),
                   "category": vector.meta.get("category"), "method": vector.meta.get("method")},
        "prompts": list(args.prompts), "split": args.split, "seed": args.seed, "n": n,
        "positions": args.positions, "tokens": spec.tokens, "measure": "refusal-token decision (first response token)",
        "conditions": conditions,
        "ablate": None if not ablated else {"sae": str(args.ablate_sae), "features": str(args.features),
                                            "feature_ids": ablated},
        "refusal": {name: refusal_table(found) for name, found in results.items()},
        "paired_vs_baseline": {name: compare_conditions(results["baseline"], found)
                               for name, found in results.items() if name != "baseline"},
        "rows": {name: [{k: v for k, v in r.to_dict().items() if k not in ("text", "votes", "method")}
                        for r in found] for name, found in results.items()},
    }
    write_result(args.out, payload)
    return payload


def format_table(payload: dict[str, Any]) -> str:
    """One line per condition: over-refusal and harmful refusal with CIs and McNemar p, then each category."""
    categories = [c for c in next(iter(payload["refusal"].values())) if c not in ("over_refusal", "harmful_refusal")]
    head = f"{'condition':<12} {'over_refusal [95% CI]':<22} {'p':>6}  {'harmful [95% CI]':<22} {'p':>6}"
    lines = [head + "".join(f" {c[:12]:>12}" for c in categories)]
    for name, table in payload["refusal"].items():
        paired = payload["paired_vs_baseline"].get(name, {})
        p_over = paired.get("over_refusal", {}).get("all", {}).get("p_value")
        p_harm = paired.get("harmful_refusal", {}).get("all", {}).get("p_value")
        line = (f"{name:<12} {rate_text(table['over_refusal']):<22} {_p(p_over):>6}  "
                f"{rate_text(table['harmful_refusal']):<22} {_p(p_harm):>6}")
        line += "".join(f" {_rate(table[c]):>12}" for c in categories)
        lines.append(line)
    ns = ", ".join(f"{c}={payload['refusal']['baseline'][c]['n']}" for c in categories)
    lines.append(f"n: {ns}; p = exact McNemar vs baseline")
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _rate(entry: dict[str, Any]) -> str:
    return "—" if entry.get("rate") is None else f"{entry['rate']:.2f}"


def show(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    print(f"refusal at layer {payload['layer']}, vector {payload['vector']['name']!r} "
          f"(|v| = {payload['vector']['norm']:.3f}), {payload['split']} split, {payload['n']} prompts")
    print(format_table(payload))
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae steer`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, show, argv)


if __name__ == "__main__":
    sys.exit(main())
