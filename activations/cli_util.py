"""The one command-line wrapper every subcommand uses: parse, run, show; bad input is one line, exit 2."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    show: Callable[[argparse.Namespace, Any], None],
    argv: list[str] | None,
) -> int:
    """Parse `argv`, `result = run(args)`, `show(args, result)`.

    A `ValueError` or `FileNotFoundError` (the framework's "bad input" errors) prints
    `error: <message on one line>` on stderr and returns 2; nothing else is printed.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message
        return int(exc.code or 0)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    show(args, result)
    return 0
