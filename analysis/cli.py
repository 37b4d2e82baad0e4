"""`refusal-sae` console command: a thin dispatcher to each stage's subcommand.

Each subcommand lives in the package of its stage and exposes `main(argv: list[str]) -> int`;
modules are imported lazily so `refusal-sae harvest` never imports the SAE or analysis code.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "harvest": ("activations.cli_harvest", "residual activations of labelled prompts -> HDF5 shards"),
    "train": ("sae.cli", "train top-K SAEs (several seeds) on shards with Lightning"),
    "refusal-tokens": ("probes.cli_refusal_tokens", "fit categorical refusal tokens onto a model"),
    "select": ("probes.cli_select", "L1 heads, stability selection, features.json"),
    "vectors": ("probes.cli_vectors", "residual / SAE / low-rank steering vectors"),
    "steer": ("analysis.cli_steer", "evaluate steering, gating and ablation conditions"),
    "attribute": ("analysis.cli_attribute", "attribution patching scores per unit / SAE feature"),
    "stability": ("analysis.cli_stability", "cross-seed matching, feature Jaccard, geometry plots"),
    "synthesize-contrast": ("analysis.cli_synthesize", "rewrite prompts until the refusal decision flips"),
    "pipeline": ("analysis.pipeline", "run every stage from a YAML config, resumably, and write a report"),
    "compare": ("analysis.compare", "compare summary.json files of several runs"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: refusal-sae <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `refusal-sae <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv[0]` to its subcommand module; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
