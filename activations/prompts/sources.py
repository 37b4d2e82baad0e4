"""Load one prompt source from a spec string into PromptRecords.

Kinds: `builtin` (packaged JSONL), `jsonl` / `json` / `csv` (local files with a field mapping),
and the benchmarks `coconot`, `coconot-contrast`, `xstest`, `orbench` (see `benchmarks.py`).
Every loader returns a `RawSource`; `load_source` then applies `per_category` and `limit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Callable

from activations.records import CATEGORIES, PromptRecord
from activations.prompts import benchmarks
from activations.io import file_sha256
from activations.prompts.hashing import records_sha256
from activations.prompts.readers import parse_jsonl, read_file_rows, require_file
from activations.prompts.rows import RawSource, check_unique_ids, make_record, optional_field, prefixed_id, require_field
from activations.prompts.selection import take_first, take_per_category
from activations.prompts.spec import KINDS, SourceSpec, parse_spec

BUILTIN_PACKAGE = "activations"
BUILTIN_FOLDER = "builtin"


@dataclass(frozen=True)
class LoadedSource:
    """Records of one spec after its options, and what identifies the underlying data.

    `sha256` is the hash of the file bytes (`hashed == "file"`) for local files, or of the full
    record set before options (`hashed == "records"`) for hub and builtin data. `n_read` counts
    records before `per_category` / `limit`.
    """

    spec: str
    kind: str
    origin: str
    records: list[PromptRecord]
    n_read: int
    sha256: str
    hashed: str


def load_source(spec: str | SourceSpec, seed: int = 0) -> LoadedSource:
    """Parse `spec` (if a string), load its records and apply `per_category` then `limit`.

    `seed` orders the `per_category` choice. Raises ValueError / FileNotFoundError (one line,
    naming the spec) for an unknown kind, a missing file or field, or an empty result.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    raw = LOADERS[parsed.kind](parsed)
    check_unique_ids(raw.records, parsed)
    records = raw.records
    per_category = parsed.int_option("per_category")
    if per_category is not None:
        records = take_per_category(records, per_category, seed)
    limit = parsed.int_option("limit")
    if limit is not None:
        records = take_first(records, limit)
    if not records:
        raise ValueError(f"prompt-source spec {parsed.raw!r}: no prompts loaded (empty source)")
    return LoadedSource(
        spec=parsed.raw,
        kind=parsed.kind,
        origin=raw.origin,
        records=records,
        n_read=len(raw.records),
        sha256=raw.sha256,
        hashed=raw.hashed,
    )


def _load_table(spec: SourceSpec) -> RawSource:
    """`jsonl:` / `json:` / `csv:` files with options `text=`, `category=` or `as=`, `id=`, `split=`, `meta=`."""
    path = require_file(spec)
    rows = read_file_rows(path, spec.kind, spec.raw)
    records = map_fields(rows, spec, prefix=spec.option("prefix", path.stem) or "")
    return RawSource(records, str(path), file_sha256(path), "file")


def _load_builtin(spec: SourceSpec) -> RawSource:
    """`builtin:NAME`: the packaged `activations/builtin/NAME.jsonl`, which carries fixed splits."""
    name = spec.location or "quickstart"
    folder = resources.files(BUILTIN_PACKAGE) / BUILTIN_FOLDER
    resource = folder / f"{name}.jsonl"
    if not resource.is_file():
        available = sorted(item.name[: -len(".jsonl")] for item in folder.iterdir() if item.name.endswith(".jsonl"))
        raise ValueError(f"prompt-source spec {spec.raw!r}: no builtin prompt set {name!r}; available: {', '.join(available)}")
    rows = parse_jsonl(resource.read_text(encoding="utf-8"), f"builtin:{name}")
    records = map_fields(rows, spec, prefix=spec.option("prefix", "") or "", split_field="split", meta_fields=("subcategory",))
    return RawSource(records, f"builtin:{name}", records_sha256(records), "records")


def map_fields(
    rows: list[dict],
    spec: SourceSpec,
    prefix: str,
    split_field: str | None = None,
    meta_fields: tuple[str, ...] = (),
) -> list[PromptRecord]:
    """Map rows to records using the spec's field options.

    `text=` (default "text") and `category=` (default "category") name fields; `as=CATEGORY`
    gives every row that category instead. `id=` names the id field (default "id"; when the
    default is absent from the first row, ids are row numbers). `split=FIELD` keeps a split
    stored in the file; `meta=a,b` copies those fields into `meta`.
    """
    text_field = spec.option("text", "text")
    fixed = spec.option("as")
    if fixed is not None and "category" in spec.options:
        raise ValueError(f"prompt-source spec {spec.raw!r}: give either 'category=' (a field) or 'as=' (a value), not both")
    if fixed is not None and fixed not in CATEGORIES:
        raise ValueError(f"prompt-source spec {spec.raw!r}: 'as={fixed}' is not a category; expected one of {', '.join(CATEGORIES)}")
    category_field = spec.option("category", "category")
    id_field = spec.option("id", "id")
    use_row_numbers = "id" not in spec.options and bool(rows) and "id" not in rows[0]
    split_field = spec.option("split", split_field)
    meta_fields = tuple(name for name in (spec.option("meta") or "").split(",") if name) or meta_fields

    records = []
    for index, row in enumerate(rows):
        raw_id = f"{index + 1:06d}" if use_row_numbers else require_field(row, id_field, spec, index)
        category = fixed if fixed is not None else require_field(row, category_field, spec, index).lower()
        split = require_field(row, split_field, spec, index).lower() if split_field else ""
        meta = {name: optional_field(row, name) for name in meta_fields if name in row}
        text = require_field(row, text_field, spec, index)
        records.append(make_record(spec, index, prefixed_id(prefix, raw_id), text, category, split, meta))
    return records


LOADERS: dict[str, Callable[[SourceSpec], RawSource]] = {
    "builtin": _load_builtin,
    "jsonl": _load_table,
    "json": _load_table,
    "csv": _load_table,
    "coconot": benchmarks.load_coconot,
    "coconot-contrast": benchmarks.load_coconot_contrast,
    "xstest": benchmarks.load_xstest,
    "orbench": benchmarks.load_orbench,
}
"""Loader of each spec kind."""

assert set(LOADERS) == set(KINDS), "every kind in spec.OPTIONS_BY_KIND needs a loader"
