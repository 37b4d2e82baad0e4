"""Loaders for public refusal benchmarks: CoCoNot, XSTest and OR-Bench.

Each reads a local file when LOCATION is an existing path, else the hub dataset LOCATION (or the
default hub id when LOCATION is empty) through `datasets.load_dataset`.
"""
from __future__ import annotations

from activations.records import CONTRAST
from activations.prompts.hashing import records_sha256
from activations.prompts.readers import RawRows, local_file, read_rows
from activations.prompts.rows import RawSource, make_record, optional_field, prefixed_id, require_field
from activations.prompts.spec import SourceSpec

COCONOT_HUB = "allenai/coconot"
COCONOT_CATEGORIES: dict[str, str] = {
    "requests with safety concerns": "safety",
    "incomplete requests": "incomplete",
    "unsupported requests": "unsupported",
    "indeterminate requests": "indeterminate",
    "humanizing requests": "humanizing",
}
"""CoCoNot category names (lower-cased) → our refusal categories."""

XSTEST_HUB = "walledai/XSTest"
XSTEST_HUB_SPLITS: dict[str, str] = {"walledai/XSTest": "train", "natolambert/xstest-v2-copy": "prompts"}
"""Default hub split of each known XSTest copy (others default to "train")."""
XSTEST_LABELS: dict[str, str] = {"safe": CONTRAST, "unsafe": "safety"}

ORBENCH_HUB = "bench-llm/or-bench"
ORBENCH_CONFIGS: dict[str, str] = {
    "or-bench-80k": CONTRAST,
    "or-bench-hard-1k": CONTRAST,
    "or-bench-toxic": "safety",
}
"""OR-Bench configs → category: the 80k / hard-1k prompts only look toxic (benign); `toxic` is harmful."""
ORBENCH_DEFAULT_CONFIG = "or-bench-hard-1k"


def _raw_source(rows: RawRows, records: list) -> RawSource:
    if rows.file_sha256 is not None:
        return RawSource(records, rows.origin, rows.file_sha256, "file")
    return RawSource(records, rows.origin, records_sha256(records), "records")


def load_coconot(spec: SourceSpec) -> RawSource:
    """`coconot:PATH_OR_HUB`: the CoCoNot original set (fields id, category, subcategory, prompt).

    Categories map through COCONOT_CATEGORIES; `meta` keeps `subcategory` and `dataset_category`.
    Hub default: `allenai/coconot`, config "original", split `hub_split` (default "test").
    """
    return _coconot(spec, contrast=False)


def load_coconot_contrast(spec: SourceSpec) -> RawSource:
    """`coconot-contrast:PATH_OR_HUB`: the CoCoNot contrast set; every row becomes `contrast`,
    with the original refusal category in `meta["original_category"]`.
    Hub default: `allenai/coconot`, config "contrast", split `hub_split` (default "test")."""
    return _coconot(spec, contrast=True)


def _coconot(spec: SourceSpec, contrast: bool) -> RawSource:
    config = "contrast" if contrast else "original"
    rows = read_rows(spec, COCONOT_HUB, config, spec.option("hub_split", "test") or "test")
    prefix = spec.option("prefix", spec.kind) or ""
    records = []
    for index, row in enumerate(rows.rows):
        raw_id = require_field(row, "id", spec, index)
        text = require_field(row, "prompt", spec, index)
        dataset_category = require_field(row, "category", spec, index)
        mapped = COCONOT_CATEGORIES.get(dataset_category.lower())
        if mapped is None:
            raise ValueError(
                f"prompt-source spec {spec.raw!r}: row {index + 1} has unknown CoCoNot category {dataset_category!r}; "
                f"expected one of {', '.join(repr(name) for name in COCONOT_CATEGORIES)} (any case)"
            )
        meta = {"subcategory": optional_field(row, "subcategory"), "dataset_category": dataset_category}
        if contrast:
            meta["original_category"] = mapped
        category = CONTRAST if contrast else mapped
        records.append(make_record(spec, index, prefixed_id(prefix, raw_id), text, category, meta=meta))
    return _raw_source(rows, records)


def load_xstest(spec: SourceSpec) -> RawSource:
    """`xstest:PATH_OR_HUB`: XSTest (fields id, prompt, type, label, focus, note).

    label `safe` → `contrast`, `unsafe` → `safety`; without a label column, types starting with
    `contrast_` are unsafe. Rows without an `id` are numbered. `meta` keeps type, label, focus, note.
    """
    hub_id = spec.location or XSTEST_HUB
    rows = read_rows(spec, XSTEST_HUB, None, spec.option("hub_split") or XSTEST_HUB_SPLITS.get(hub_id, "train"))
    prefix = spec.option("prefix", "xstest") or ""
    records = []
    for index, row in enumerate(rows.rows):
        raw_id = optional_field(row, "id") or f"{index + 1:04d}"
        text = require_field(row, "prompt", spec, index)
        label = _xstest_label(row, spec, index)
        meta = {name: optional_field(row, name) for name in ("type", "focus", "note") if name in row}
        meta["label"] = label
        records.append(make_record(spec, index, prefixed_id(prefix, raw_id), text, XSTEST_LABELS[label], meta=meta))
    return _raw_source(rows, records)


def _xstest_label(row: dict, spec: SourceSpec, index: int) -> str:
    """`safe` or `unsafe` from the `label` field, or from the `type` prefix when no label exists."""
    if "label" in row:
        label = require_field(row, "label", spec, index).lower()
        if label not in XSTEST_LABELS:
            raise ValueError(f"prompt-source spec {spec.raw!r}: row {index + 1} has label {label!r}; expected safe or unsafe")
        return label
    if "type" in row:
        return "unsafe" if require_field(row, "type", spec, index).lower().startswith("contrast") else "safe"
    raise ValueError(f"prompt-source spec {spec.raw!r}: row {index + 1} has neither a 'label' nor a 'type' field")


def load_orbench(spec: SourceSpec) -> RawSource:
    """`orbench:PATH_OR_HUB?config=...`: OR-Bench (fields prompt, category).

    `or-bench-80k` and `or-bench-hard-1k` (benign prompts that look toxic) → `contrast`;
    `or-bench-toxic` → `safety`. For a local file the config comes from `config=` or the file
    name; for the hub (default `bench-llm/or-bench`, split "train") it defaults to or-bench-hard-1k.
    `meta` keeps the OR-Bench `category` as `orbench_category` and the config.
    """
    config = _orbench_config(spec)
    rows = read_rows(spec, ORBENCH_HUB, config, spec.option("hub_split", "train") or "train")
    prefix = spec.option("prefix", config) or ""
    category = ORBENCH_CONFIGS[config]
    records = []
    for index, row in enumerate(rows.rows):
        raw_id = optional_field(row, "id") or f"{index + 1:05d}"
        text = require_field(row, "prompt", spec, index)
        meta = {"orbench_category": optional_field(row, "category"), "config": config}
        records.append(make_record(spec, index, prefixed_id(prefix, raw_id), text, category, meta=meta))
    return _raw_source(rows, records)


def _orbench_config(spec: SourceSpec) -> str:
    """The OR-Bench config: the `config=` option, else guessed from a local file name, else the default."""
    config = spec.option("config")
    if config is None:
        path = local_file(spec)
        if path is None:
            return ORBENCH_DEFAULT_CONFIG
        config = _config_from_filename(path.name)
        if config is None:
            raise ValueError(
                f"prompt-source spec {spec.raw!r}: cannot tell the OR-Bench config from the file name; "
                f"add ?config= with one of {', '.join(ORBENCH_CONFIGS)}"
            )
    if config not in ORBENCH_CONFIGS:
        raise ValueError(f"prompt-source spec {spec.raw!r}: unknown OR-Bench config {config!r}; expected one of {', '.join(ORBENCH_CONFIGS)}")
    return config


def _config_from_filename(name: str) -> str | None:
    lowered = name.lower()
    for marker, config in (("toxic", "or-bench-toxic"), ("hard", "or-bench-hard-1k"), ("80k", "or-bench-80k")):
        if marker in lowered:
            return config
    return None
