"""Parse prompt-source spec strings of the form `KIND:LOCATION?opt=val&opt=val`.

Examples::

    builtin:quickstart?per_category=10
    jsonl:data/alpaca.jsonl?text=instruction&as=benign&limit=500
    data/alpaca.jsonl?text=instruction      (a .jsonl / .json / .csv file: the extension is the kind)
    coconot:../shared/data/coconot/coconot_eval.jsonl
    coconot:allenai/coconot            (hub dataset id, needs network)
    orbench:bench-llm/or-bench?config=or-bench-hard-1k

The option names a kind accepts are listed in `OPTIONS_BY_KIND`; an unknown kind or option,
a repeated option, or a non-integer count stops with one ValueError naming the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

COMMON_OPTIONS: frozenset[str] = frozenset({"per_category", "limit", "prefix"})
"""Options every kind accepts: `per_category=N`, `limit=N`, `prefix=` (id prefix)."""

_FIELD_OPTIONS = frozenset({"text", "category", "id", "as", "split", "meta"})
_HUB_OPTIONS = frozenset({"hub_split"})

OPTIONS_BY_KIND: dict[str, frozenset[str]] = {
    "builtin": COMMON_OPTIONS,
    "jsonl": COMMON_OPTIONS | _FIELD_OPTIONS,
    "json": COMMON_OPTIONS | _FIELD_OPTIONS,
    "csv": COMMON_OPTIONS | _FIELD_OPTIONS,
    "coconot": COMMON_OPTIONS | _HUB_OPTIONS,
    "coconot-contrast": COMMON_OPTIONS | _HUB_OPTIONS,
    "xstest": COMMON_OPTIONS | _HUB_OPTIONS,
    "orbench": COMMON_OPTIONS | _HUB_OPTIONS | {"config"},
}
"""Every known source kind and the options it accepts."""

KINDS: tuple[str, ...] = tuple(OPTIONS_BY_KIND)

_INT_OPTIONS = ("per_category", "limit")


@dataclass(frozen=True)
class SourceSpec:
    """One parsed spec: `kind`, `location` (path, hub id or builtin name) and string `options`."""

    raw: str
    kind: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def option(self, name: str, default: str | None = None) -> str | None:
        """The string value of option `name`, or `default` when it was not given."""
        return self.options.get(name, default)

    def int_option(self, name: str) -> int | None:
        """The positive integer value of option `name` (validated by `parse_spec`), or None."""
        value = self.options.get(name)
        return None if value is None else int(value)


EXTENSIONS: dict[str, str] = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
"""A spec without a kind whose location ends so is read as that kind (`my.jsonl` = `jsonl:my.jsonl`)."""


def kind_from_extension(spec: str) -> str | None:
    """The kind of a spec written as a bare file name (`data/x.jsonl?text=instruction`), else None.

    Only a spec that does not start with a known `KIND:` counts, so `jsonl:x.csv` stays jsonl.
    """
    head = spec.partition(":")[0].strip().lower()
    if head in OPTIONS_BY_KIND:
        return None
    location = spec.partition("?")[0]
    return next((kind for ext, kind in EXTENSIONS.items() if location.lower().endswith(ext)), None)


def parse_spec(spec: str) -> SourceSpec:
    """Parse `KIND:LOCATION?opt=val&...` (or `FILE.jsonl|.json|.csv?opt=val&...`) into a SourceSpec.

    Raises ValueError (one line, naming the spec) for a missing `:`, an unknown kind, an unknown or
    repeated option, an option without `=`, or a count option that is not a positive integer.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty prompt-source spec {spec!r}; expected KIND:LOCATION, e.g. builtin:quickstart")
    raw = spec.strip()
    by_extension = kind_from_extension(raw)
    if by_extension is not None:
        raw = f"{by_extension}:{raw}"
    kind, sep, rest = raw.partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise ValueError(f"prompt-source spec {raw!r} has no ':'; expected KIND:LOCATION with KIND one of "
                         f"{', '.join(KINDS)}, or a file ending in {', '.join(EXTENSIONS)}")
    if kind not in OPTIONS_BY_KIND:
        raise ValueError(f"prompt-source spec {raw!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    location, _, query = rest.partition("?")
    options = _parse_options(raw, kind, query)
    return SourceSpec(raw=raw, kind=kind, location=location.strip(), options=options)


def _parse_options(raw: str, kind: str, query: str) -> dict[str, str]:
    """Parse and validate the `opt=val&...` part of a spec for `kind`."""
    options: dict[str, str] = {}
    if not query:
        return options
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"prompt-source spec {raw!r}: options must look like opt=val&opt=val, got {query!r}") from None
    allowed = OPTIONS_BY_KIND[kind]
    for name, value in pairs:
        if name not in allowed:
            raise ValueError(
                f"prompt-source spec {raw!r}: unknown option {name!r} for kind {kind!r}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        if name in options:
            raise ValueError(f"prompt-source spec {raw!r}: option {name!r} given twice")
        if not value:
            raise ValueError(f"prompt-source spec {raw!r}: option {name!r} has an empty value")
        options[name] = value
    for name in _INT_OPTIONS:
        if name in options and not (options[name].isdigit() and int(options[name]) > 0):
            raise ValueError(f"prompt-source spec {raw!r}: option {name!r} must be a positive integer, got {options[name]!r}")
    return options
