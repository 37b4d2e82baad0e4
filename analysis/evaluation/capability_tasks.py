"""Capability task specs of the evaluate stage: which tasks to score, from which files, with how many items."""
from __future__ import annotations

from analysis.evaluation.builtin_capability import builtin_arith_items, builtin_mc_items
from analysis.evaluation.capability_data import (
    GenItem,
    MCItem,
    load_gsm8k,
    load_mmlu,
    load_truthfulqa_mc,
)

CAPABILITY_KINDS = ("builtin", "builtin_mc", "builtin_arith", "mmlu", "truthfulqa", "gsm8k")
"""Capability task specs: `builtin` (both builtin tasks), `builtin_mc`, `builtin_arith`, `mmlu:DIR`,
`truthfulqa:CSV`, `gsm8k:JSONL`; any may end in `?limit=N` (items of that task)."""


def parse_capability_spec(spec: str) -> tuple[str, str, int | None]:
    """`(kind, location, limit or None)` of one task spec; ValueError naming the spec when it is bad."""
    body, _, query = spec.partition("?")
    kind, _, location = body.partition(":")
    if kind not in CAPABILITY_KINDS:
        raise ValueError(f"unknown capability task {spec!r}; expected one of builtin, builtin_mc, builtin_arith, "
                         "mmlu:DIR, truthfulqa:CSV, gsm8k:JSONL (each may end in ?limit=N)")
    if kind.startswith("builtin") == bool(location):
        raise ValueError(f"capability task {spec!r}: " + ("builtin tasks take no path" if location else "needs a path after ':'"))
    limit = None
    if query:
        name, _, value = query.partition("=")
        if name != "limit" or not value.isdigit() or int(value) < 1:
            raise ValueError(f"capability task {spec!r}: the only option is ?limit=N with N a positive integer")
        limit = int(value)
    return kind, location, limit


def load_capability_tasks(specs: list[str], default_limit: int | None = None) -> dict[str, list[MCItem] | list[GenItem]]:
    """Task name -> items for each spec (`CAPABILITY_KINDS`); a spec's `?limit=N` beats `default_limit`."""
    tasks: dict[str, list[MCItem] | list[GenItem]] = {}
    for spec in specs:
        kind, location, limit = parse_capability_spec(spec)
        limit = limit or default_limit
        if kind in ("builtin", "builtin_mc"):
            tasks["builtin_mc"] = builtin_mc_items()[:limit]
        if kind in ("builtin", "builtin_arith"):
            tasks["builtin_arith"] = builtin_arith_items()[:limit]
        if kind == "mmlu":
            tasks["mmlu"] = load_mmlu(location, limit=limit)
        elif kind == "truthfulqa":
            tasks["truthfulqa_mc"] = load_truthfulqa_mc(location, limit=limit)
        elif kind == "gsm8k":
            tasks["gsm8k"] = load_gsm8k(location, limit=limit)
    return tasks
