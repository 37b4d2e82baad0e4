"""Read raw rows (dicts) from local JSONL / JSON / CSV files or from a Hugging Face hub dataset.

Every failure is one ValueError / FileNotFoundError line that names the spec and the problem.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activations.io import iter_jsonl_text
from activations.io import file_sha256
from activations.prompts.spec import SourceSpec

Row = dict[str, Any]

FORMAT_BY_SUFFIX: dict[str, str] = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
"""File formats the readers understand, by file suffix."""


@dataclass(frozen=True)
class RawRows:
    """Rows read for one spec: `origin` is the file path or hub id; `file_sha256` is None for hub data."""

    rows: list[Row]
    origin: str
    file_sha256: str | None


def read_file_rows(path: Path, fmt: str, spec_raw: str) -> list[Row]:
    """Read every row of a `jsonl` / `json` (array of objects) / `csv` (with header) file."""
    if fmt == "jsonl":
        return parse_jsonl(path.read_text(encoding="utf-8-sig"), f"{spec_raw!r} ({path})")
    if fmt == "json":
        return _read_json_array(path, spec_raw)
    if fmt == "csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    raise ValueError(f"prompt-source spec {spec_raw!r}: unknown file format {fmt!r}; expected jsonl, json or csv")


def parse_jsonl(text: str, where: str) -> list[Row]:
    """Parse JSON Lines text (blank lines skipped); each line must be a JSON object."""
    return [row for _, row in iter_jsonl_text(text, f"prompt source {where}")]


def _read_json_array(path: Path, spec_raw: str) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"prompt-source spec {spec_raw!r}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise ValueError(f"prompt-source spec {spec_raw!r}: {path} must hold a JSON array of objects")
    return data


def local_file(spec: SourceSpec) -> Path | None:
    """The spec's LOCATION as an existing file, None when it should be read as a hub dataset id.

    A location that looks like a path (known suffix, leading `/` `.` `~`, or more than one `/`)
    but does not exist raises FileNotFoundError naming it.
    """
    location = spec.location
    if not location:
        return None
    path = Path(location).expanduser()
    if path.is_file():
        return path
    looks_like_path = (
        path.suffix.lower() in FORMAT_BY_SUFFIX
        or location.startswith(("/", ".", "~"))
        or location.count("/") > 1
    )
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"prompt-source spec {spec.raw!r}: file not found: {location}")
    return None


def require_file(spec: SourceSpec) -> Path:
    """The spec's LOCATION as an existing file (kinds that cannot read the hub)."""
    if not spec.location:
        raise ValueError(f"prompt-source spec {spec.raw!r}: no file path after '{spec.kind}:'")
    path = Path(spec.location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt-source spec {spec.raw!r}: file not found: {spec.location}")
    return path


def read_rows(spec: SourceSpec, default_hub_id: str, config: str | None, hub_split: str) -> RawRows:
    """Rows of a benchmark spec: from the local file at LOCATION when it exists, else from the hub.

    An empty LOCATION means `default_hub_id`. The file format comes from the suffix (.jsonl/.json/.csv).
    """
    path = local_file(spec)
    if path is not None:
        fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"prompt-source spec {spec.raw!r}: cannot tell the format of {path}; "
                f"expected a suffix among {', '.join(FORMAT_BY_SUFFIX)}"
            )
        return RawRows(read_file_rows(path, fmt, spec.raw), str(path), file_sha256(path))
    hub_id = spec.location or default_hub_id
    return RawRows(load_hub_rows(spec.raw, hub_id, config, hub_split), hub_id, None)


def load_hub_rows(spec_raw: str, dataset_id: str, config: str | None, split: str) -> list[Row]:
    """Load `split` of hub dataset `dataset_id` (optionally a `config`) with `datasets.load_dataset`.

    Any failure (offline, unknown id, unknown config or split) becomes one ValueError line.
    """
    try:
        import datasets
    except ImportError:
        raise ValueError(f"prompt-source spec {spec_raw!r}: reading the hub needs the 'datasets' package") from None
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"prompt-source spec {spec_raw!r}: could not load hub dataset {dataset_id!r} "
            f"(config={config}, split={split}): {type(exc).__name__}: {detail} "
            f"-- no network? pass a local file path instead"
        ) from exc
    return [dict(row) for row in dataset]
