"""Held-out benchmark sets: prompt sources that are only ever evaluated, never split, fitted or tuned on.

    sets = load_heldout_sets({"xstest": ["xstest:../shared/data/xstest/xstest_prompts.csv"]}, prompt_set)
    sets["xstest"].records          # every prompt of the set, minus those the run fitted or tuned on
    sets["xstest"].manifest()       # counts, overlap removed per split, sha256

A held-out set is read in full (the spec's own `per_category=` / `limit=` still apply), duplicates
inside it are dropped (first occurrence wins), and every prompt whose normalised text
(`normalise_text`, the key the prompt set's dedup uses) equals a prompt of the run's `extract` or
`calibrate` split is removed and counted. Overlap with the run's `eval` split is counted but kept
(those prompts were never fitted or tuned on either). Records keep their ids and get split `eval`.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from activations.prompts.hashing import records_sha256
from activations.prompts.prompt_set import PromptSet
from activations.prompts.sources import load_source
from activations.prompts.splits import normalise_text
from activations.records import CATEGORIES, PromptRecord

FITTING_SPLITS: tuple[str, ...] = ("extract", "calibrate")
"""Splits a held-out prompt must not share text with (fitted on / tuned on)."""


@dataclass(frozen=True)
class HeldOutSet:
    """One named held-out set: its records (split `eval`) and what was removed from it, and why."""

    name: str
    specs: tuple[str, ...]
    records: tuple[PromptRecord, ...]
    n_read: int
    n_duplicates_removed: int
    n_overlap_removed: dict[str, int]
    n_overlap_eval: int

    def manifest(self) -> dict[str, Any]:
        """Counts per category, sha256 of the `(id, text, category)` triples, and the removals."""
        counts = Counter(r.category for r in self.records)
        return {
            "name": self.name, "specs": list(self.specs), "n": len(self.records), "n_read": self.n_read,
            "categories": {c: counts[c] for c in CATEGORIES if counts[c]},
            "sha256": records_sha256(self.records),
            "n_duplicates_removed": self.n_duplicates_removed,
            "n_overlap_removed": dict(self.n_overlap_removed),
            "n_overlap_eval": self.n_overlap_eval,
        }


def check_set_names(named_specs: Mapping[str, Sequence[str]]) -> None:
    """ValueError for an empty name, a name that is not a plain word, or a set without specs."""
    for name, specs in named_specs.items():
        if not name or not name.replace("-", "_").isidentifier():
            raise ValueError(f"eval set name {name!r} must be a plain word (letters, digits, _ or -)")
        if isinstance(specs, str) or not specs:
            raise ValueError(f"eval set {name!r} needs a list of prompt-source specs, got {specs!r}")


def load_heldout_sets(named_specs: Mapping[str, Sequence[str]], fitting: PromptSet | Sequence[PromptRecord],
                      seed: int = 0) -> dict[str, HeldOutSet]:
    """Load each named set (`{name: [spec, ...]}`) and remove its overlap with `fitting`'s extract and
    calibrate records (a `PromptSet` or records carrying their split). `seed` orders `per_category=`."""
    check_set_names(named_specs)
    return {name: heldout_from_records(name, [r for spec in specs for r in load_source(spec, seed=seed).records],
                                       fitting, specs)
            for name, specs in named_specs.items()}


def heldout_from_records(name: str, records: Sequence[PromptRecord], fitting: PromptSet | Sequence[PromptRecord],
                         specs: Sequence[str] = ()) -> HeldOutSet:
    """A held-out set of already loaded `records`: duplicates dropped, overlap with `fitting`'s extract
    and calibrate prompts removed and counted (see the module docstring)."""
    split_of: dict[str, str] = {}
    for record in (fitting.records if isinstance(fitting, PromptSet) else fitting):
        split_of.setdefault(normalise_text(record.text), record.split)
    kept: list[PromptRecord] = []
    seen: set[str] = set()
    ids: set[str] = set()
    duplicates = overlap_eval = 0
    removed = {split: 0 for split in FITTING_SPLITS}
    for record in records:
        key = normalise_text(record.text)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        split = split_of.get(key)
        if split in removed:
            removed[split] += 1
            continue
        overlap_eval += split == "eval"
        if record.id in ids:
            raise ValueError(f"eval set {name!r}: prompt id {record.id!r} occurs in two of its sources; "
                             "add ?prefix=NAME to one spec")
        ids.add(record.id)
        kept.append(replace(record, split="eval"))
    if not kept:
        raise ValueError(f"eval set {name!r} has no prompts left after removing its overlap with the fitting data")
    return HeldOutSet(name, tuple(specs), tuple(kept), len(records), duplicates, removed, overlap_eval)
