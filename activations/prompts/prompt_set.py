"""`PromptSet`: split prompt records plus the provenance needed to reproduce them (the manifest)."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from activations.io import write_json
from activations.records import CATEGORIES, SPLITS, PromptRecord
from activations.prompts.hashing import records_sha256


@dataclass(frozen=True)
class SourceSummary:
    """Provenance of one spec: records read, kept after options, kept after dedup, and a data hash."""

    spec: str
    kind: str
    origin: str
    n_read: int
    n_loaded: int
    n_kept: int
    sha256: str
    hashed: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "origin": self.origin,
            "n": self.n_kept,
            "n_read": self.n_read,
            "n_loaded": self.n_loaded,
            "sha256": self.sha256,
            "sha256_of": self.hashed,
        }


@dataclass(frozen=True)
class PromptSet:
    """Deduplicated prompt records, each with a split in SPLITS, and where they came from.

    Built by `load_prompt_set`; `records` keep source order. `subset` narrows it without
    changing any split and records the narrowing in `filters` (sources keep their load-time counts).
    """

    records: tuple[PromptRecord, ...]
    seed: int
    fractions: tuple[float, float, float]
    sources: tuple[SourceSummary, ...]
    n_duplicates_removed: int = 0
    n_duplicate_label_conflicts: int = 0
    filters: dict[str, list[str]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        ids: set[str] = set()
        for record in self.records:
            if record.split not in SPLITS:
                raise ValueError(f"prompt record {record.id!r} has no split; PromptSet needs one of {', '.join(SPLITS)}")
            if record.id in ids:
                raise ValueError(f"prompt id {record.id!r} occurs twice in the prompt set")
            ids.add(record.id)

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> list[PromptRecord]:
        """Records of split `name` (one of SPLITS), in source order."""
        _check_names("split", [name], SPLITS)
        return [record for record in self.records if record.split == name]

    def categories(self) -> tuple[str, ...]:
        """Categories present, in the fixed CATEGORIES order."""
        present = {record.category for record in self.records}
        return tuple(category for category in CATEGORIES if category in present)

    def subset(self, categories: Iterable[str] | None = None, splits: Iterable[str] | None = None) -> "PromptSet":
        """A PromptSet with only the given categories and/or splits (None keeps all)."""
        wanted_categories = _check_names("category", categories, CATEGORIES)
        wanted_splits = _check_names("split", splits, SPLITS)
        kept = tuple(
            record
            for record in self.records
            if (wanted_categories is None or record.category in wanted_categories)
            and (wanted_splits is None or record.split in wanted_splits)
        )
        filters = dict(self.filters)
        if wanted_categories is not None:
            narrowed = wanted_categories & set(filters.get("categories", wanted_categories))
            filters["categories"] = [name for name in CATEGORIES if name in narrowed]
        if wanted_splits is not None:
            narrowed = wanted_splits & set(filters.get("splits", wanted_splits))
            filters["splits"] = [name for name in SPLITS if name in narrowed]
        return replace(self, records=kept, filters=filters)

    def manifest(self) -> dict[str, Any]:
        """Counts and sha256 of each split, provenance of each source, seed, fractions, dedup counts.

        Split hashes are `records_sha256` of the split's sorted (id, text, category) triples.
        """
        splits = {}
        for name in SPLITS:
            records = self.split(name)
            counts = Counter(record.category for record in records)
            splits[name] = {
                "n": len(records),
                "categories": {category: counts[category] for category in CATEGORIES if counts[category]},
                "sha256": records_sha256(records),
            }
        totals = Counter(record.category for record in self.records)
        return {
            "n": len(self.records),
            "categories": {category: totals[category] for category in CATEGORIES if totals[category]},
            "seed": self.seed,
            "fractions": list(self.fractions),
            "split_rule": "records with a stored split keep it; others: sha256(f'{seed}:{id}') in [0,1) vs cumulative fractions",
            "n_duplicates_removed": self.n_duplicates_removed,
            "n_duplicate_label_conflicts": self.n_duplicate_label_conflicts,
            "filters": dict(self.filters),
            "splits": splits,
            "sources": [source.as_dict() for source in self.sources],
        }

    def write_manifest(self, path: str | os.PathLike) -> Path:
        """Write `manifest()` as indented JSON, atomically (temp file in the same folder + os.replace)."""
        target = Path(path)
        return write_json(target, self.manifest())


def _check_names(what: str, names: Iterable[str] | None, allowed: tuple[str, ...]) -> set[str] | None:
    """The names as a set (None stays None); ValueError naming the first unknown one."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    chosen = set(names)
    for name in chosen:
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(allowed)}")
    return chosen
