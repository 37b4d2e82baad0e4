"""Combine prompt sources into one deduplicated `PromptSet` with deterministic, disjoint splits.

Split rule: a record that already carries a split (the builtin set stores a fixed one) keeps it;
any other record goes to the split whose cumulative-fraction interval holds
`u = sha256(f"{seed}:{id}")[:8] / 2**64`, e.g. with (0.5, 0.25, 0.25):
u < 0.5 → extract, u < 0.75 → calibrate, else eval. The split depends only on (seed, id), so
adding or removing other sources never moves a record between splits.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import replace
from typing import Sequence

from activations.records import SPLITS, PromptRecord
from activations.prompts.hashing import unit_interval
from activations.prompts.prompt_set import PromptSet, SourceSummary
from activations.prompts.sources import LoadedSource, load_source

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.5, 0.25, 0.25)
"""Default (extract, calibrate, eval) fractions."""

_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Dedup key: lower-case, whitespace runs collapsed to one space, punctuation stripped at both ends."""
    collapsed = _WHITESPACE.sub(" ", text.lower()).strip()
    start, end = 0, len(collapsed)
    while start < end and _is_edge_junk(collapsed[start]):
        start += 1
    while end > start and _is_edge_junk(collapsed[end - 1]):
        end -= 1
    return collapsed[start:end]


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (extract, calibrate, eval) fractions: three finite numbers >= 0 summing to 1."""
    values = tuple(float(value) for value in fractions)
    if len(values) != len(SPLITS):
        raise ValueError(f"fractions must have {len(SPLITS)} values ({', '.join(SPLITS)}), got {len(values)}")
    if any(not math.isfinite(value) or value < 0 for value in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {values}")
    return values  # type: ignore[return-value]


def split_for_id(record_id: str, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of an unsplit record: where `unit_interval(seed, id)` falls in the cumulative fractions."""
    u = unit_interval(seed, record_id)
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if u < cumulative:
            return name
    return next(name for name, fraction in reversed(list(zip(SPLITS, fractions))) if fraction > 0)


def load_prompt_set(
    specs: Sequence[str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> PromptSet:
    """Load every spec, drop duplicate texts (first occurrence wins), assign splits, and check ids.

    Dedup compares `normalise_text` across all sources in spec order. Ids must be unique across
    sources (loaders prefix them with the source kind or file name; `?prefix=` overrides).
    Raises ValueError on an empty spec list, bad fractions, or an id shared by two sources.
    """
    if isinstance(specs, str) or not specs:
        raise ValueError("load_prompt_set needs a non-empty list of spec strings, e.g. ['builtin:quickstart']")
    fractions = check_fractions(fractions)
    loaded = [load_source(spec, seed=seed) for spec in specs]

    seen_text: dict[str, PromptRecord] = {}
    owner_of_id: dict[str, str] = {}
    kept: list[PromptRecord] = []
    summaries: list[SourceSummary] = []
    n_duplicates = n_conflicts = 0
    for source in loaded:
        n_kept = 0
        for record in source.records:
            key = normalise_text(record.text)
            first = seen_text.get(key)
            if first is not None:
                n_duplicates += 1
                n_conflicts += first.category != record.category
                continue
            if record.id in owner_of_id:
                raise ValueError(
                    f"prompt id {record.id!r} comes from both {owner_of_id[record.id]!r} and {source.spec!r}; "
                    f"add ?prefix=NAME to one spec"
                )
            seen_text[key] = record
            owner_of_id[record.id] = source.spec
            split = record.split or split_for_id(record.id, seed, fractions)
            kept.append(replace(record, split=split))
            n_kept += 1
        summaries.append(_summary(source, n_kept))
    return PromptSet(
        records=tuple(kept),
        seed=seed,
        fractions=fractions,
        sources=tuple(summaries),
        n_duplicates_removed=n_duplicates,
        n_duplicate_label_conflicts=n_conflicts,
    )


def _summary(source: LoadedSource, n_kept: int) -> SourceSummary:
    return SourceSummary(
        spec=source.spec,
        kind=source.kind,
        origin=source.origin,
        n_read=source.n_read,
        n_loaded=len(source.records),
        n_kept=n_kept,
        sha256=source.sha256,
        hashed=source.hashed,
    )
