"""Turn raw rows into validated PromptRecords, with errors that name the spec, row and field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from activations.records import PromptRecord
from activations.prompts.spec import SourceSpec


@dataclass(frozen=True)
class RawSource:
    """What a loader returns: all records of a source (before `per_category` / `limit`),
    where they came from (`origin`: path, hub id or builtin name) and a sha256 of the file
    bytes (`hashed == "file"`) or of the records (`hashed == "records"`)."""

    records: list[PromptRecord]
    origin: str
    sha256: str
    hashed: str


def require_field(row: dict[str, Any], name: str, spec: SourceSpec, index: int) -> str:
    """The non-empty string value of `row[name]`; ValueError naming spec, row number and field."""
    if name not in row:
        fields = ", ".join(sorted(str(key) for key in row)) or "none"
        raise ValueError(f"prompt-source spec {spec.raw!r}: row {index + 1} has no field {name!r} (fields: {fields})")
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"prompt-source spec {spec.raw!r}: row {index + 1} has an empty field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"prompt-source spec {spec.raw!r}: row {index + 1} field {name!r} must be a string, got {type(value).__name__}"
        )
    return str(value).strip()


def optional_field(row: dict[str, Any], name: str) -> str:
    """`row[name]` as a stripped string, "" when absent or null."""
    value = row.get(name)
    return "" if value is None else str(value).strip()


def prefixed_id(prefix: str, raw_id: str) -> str:
    """`prefix-raw_id`, or `raw_id` alone when the prefix is empty."""
    return f"{prefix}-{raw_id}" if prefix else raw_id


def make_record(
    spec: SourceSpec,
    index: int,
    record_id: str,
    text: str,
    category: str,
    split: str = "",
    meta: dict[str, Any] | None = None,
) -> PromptRecord:
    """Build a PromptRecord with `source=spec.raw`; a validation error names the spec and row."""
    try:
        return PromptRecord(
            id=record_id,
            text=text,
            category=category,
            split=split,
            source=spec.raw,
            meta=dict(meta or {}),
        )
    except ValueError as exc:
        raise ValueError(f"prompt-source spec {spec.raw!r}: row {index + 1}: {exc}") from None


def check_unique_ids(records: list[PromptRecord], spec: SourceSpec) -> None:
    """Raise ValueError naming the first id that occurs twice within one source."""
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"prompt-source spec {spec.raw!r}: duplicate id {record.id!r} within the source")
        seen.add(record.id)
