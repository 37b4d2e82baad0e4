"""`refusal-sae` console command: one subcommand per stage, each generated from its Config dataclass.

Subcommand modules are imported lazily, so `refusal-sae harvest` never imports the SAE or analysis
code. A module exposes `COMMAND` (an `analysis.stages.command.Command`) or, for commands with
actions (`refusal-tokens fit|eval`), `COMMANDS = {action: Command}`.
"""
from __future__ import annotations

import importlib
import sys

from analysis.stages.command import run_command

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "harvest": ("analysis.stages.harvest", "residual activations of labelled prompts -> HDF5 shards"),
    "train": ("analysis.stages.train", "train top-K SAEs (several seeds) on shards with Lightning"),
    "refusal-tokens": ("analysis.stages.refusal_tokens", "fit categorical refusal tokens onto a model (fit | eval)"),
    "select": ("analysis.stages.select", "L1 heads, stability selection, features.json"),
    "vectors": ("analysis.stages.vectors", "residual / SAE / low-rank steering vectors"),
    "steer": ("analysis.stages.steer", "evaluate steering, gating and ablation conditions"),
    "attribute": ("analysis.stages.attribute", "attribution patching scores per unit / SAE feature"),
    "stability": ("analysis.stages.stability", "cross-seed matching, feature Jaccard, geometry plots"),
    "synthesize-contrast": ("analysis.stages.synthesize", "rewrite prompts until the refusal decision flips"),
    "pipeline": ("analysis.pipeline.main", "run every stage from a YAML config, resumably, and write a report"),
    "compare": ("analysis.stages.compare", "compare summary.json files of several runs"),
    "config": ("analysis.stages.config", "list or print the YAML configs shipped with the package (list | show NAME)"),
}


def version() -> str:
    """The installed distribution's version; in a source checkout, the one pyproject.toml declares."""
    from importlib import metadata
    from pathlib import Path

    try:
        return metadata.version("refusal-sae")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        for line in pyproject.read_text(encoding="utf-8").splitlines() if pyproject.is_file() else []:
            if line.startswith("version"):
                return line.split("=", 1)[1].strip().strip('"')
        return "unknown"


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: refusal-sae [--version] <command> [-c CONFIG.yaml] [--section.key VALUE ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `refusal-sae <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv[0]` to its subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(f"refusal-sae {version()}")
        return 0
    if not argv:  # a usage error, like any other: the usage on stderr, exit status 2
        print(f"error: refusal-sae needs a command\n\n{_usage()}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if hasattr(module, "COMMANDS"):
        actions = module.COMMANDS
        if not rest or rest[0] not in actions:
            if rest and rest[0] in ("-h", "--help"):
                print(f"usage: refusal-sae {name} {{{'|'.join(actions)}}} [options]")
                return 0
            print(f"error: refusal-sae {name} needs an action: {' | '.join(actions)}", file=sys.stderr)
            return 2
        return run_command(actions[rest[0]], rest[1:])
    return run_command(module.COMMAND, rest)


if __name__ == "__main__":
    sys.exit(main())
