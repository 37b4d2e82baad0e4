"""Deterministic sub-selection of a source's records: `per_category=N` and `limit=N`."""
from __future__ import annotations

import math
from collections import defaultdict

from activations.records import PromptRecord
from activations.prompts.hashing import unit_interval


def take_per_category(records: list[PromptRecord], n: int, seed: int) -> list[PromptRecord]:
    """Keep at most `n` records per category, chosen by the rank of `sha256(f"{seed}:{id}")`.

    When records already carry a split (e.g. the builtin set), the `n` are shared out over the
    splits in proportion to their sizes (largest remainder), so `n >= 4` keeps every split of a
    50/25/25 category. The kept records come back in their original order.
    """
    by_category: dict[str, dict[str, list[PromptRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_category[record.category][record.split].append(record)
    keep: set[str] = set()
    for by_split in by_category.values():
        sizes = {split: len(group) for split, group in by_split.items()}
        quotas = proportional_quotas(sizes, min(n, sum(sizes.values())))
        for split, group in by_split.items():
            ranked = sorted(group, key=lambda record: unit_interval(seed, record.id))
            keep.update(record.id for record in ranked[: quotas[split]])
    return [record for record in records if record.id in keep]


def proportional_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` (<= sum of sizes) over keys in proportion to `sizes`, by largest remainder.

    Ties in the remainder go to the larger group, then to the key that sorts first.
    """
    grand = sum(sizes.values())
    if grand == 0 or total <= 0:
        return {key: 0 for key in sizes}
    exact = {key: total * size / grand for key, size in sizes.items()}
    quotas = {key: math.floor(value) for key, value in exact.items()}
    leftover = total - sum(quotas.values())
    order = sorted(sizes, key=lambda key: (-(exact[key] - quotas[key]), -sizes[key], key))
    for key in order[:leftover]:
        quotas[key] += 1
    return quotas


def take_first(records: list[PromptRecord], limit: int) -> list[PromptRecord]:
    """The first `limit` records in source order."""
    return records[:limit]
