"""HTML building blocks for the report: escaping, number and rate cells, tables, figures, sections.

Every function returns a string of HTML in which all text that came from data has been passed
through `html.escape`, so a value like `<script>` shows up as text and never runs.
"""
from __future__ import annotations

import html
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from analysis.reporting.plots import png_to_data_uri

SECTION_TITLES: dict[str, str] = {
    "findings": "Findings",
    "splits": "Data splits",
    "sae": "SAE training and quality",
    "probe": "Probe accuracy",
    "features": "Selected features",
    "refusal": "Refusal by condition",
    "seeded": "SAE-dependent conditions under every SAE seed",
    "paired": "Paired tests against the baseline (McNemar)",
    "ablation": "Ablation experiments: necessity and sufficiency beside random controls",
    "gating": "The gating goal: gates against unconditional steering",
    "distance_gate": "Distance gate: tuning and score distributions",
    "heldout": "Held-out benchmarks",
    "separation": "Does the refusal-token head separate refuse from answer?",
    "tradeoff": "Refusal trade-off",
    "vectors": "Steering toward each category: benign + contrast prompts",
    "seeds": "Per-seed results",
    "capability": "Capability",
    "cost": "What steering costs on benign text",
    "stability": "Stability across seeds",
    "geometry": "Geometry",
    "notes": "Notes",
    "config": "Configuration",
    "other": "Other summary fields",
}
"""Anchor → h2 title of every section, in page order (sections without data are left out)."""


@dataclass(frozen=True)
class Section:
    """One h2 section of the page: `anchor` is its id (a key of SECTION_TITLES), `body` is HTML."""

    anchor: str
    body: str

    @property
    def title(self) -> str:
        return SECTION_TITLES[self.anchor]

    def html(self) -> str:
        return f'<section id="{self.anchor}">\n<h2>{esc(self.title)}</h2>\n{self.body}\n</section>'


def esc(value: Any) -> str:
    """`str(value)` with &, <, >, " and ' escaped."""
    return html.escape(str(value), quote=True)


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ints as is, floats to `digits` significant decimals, None/NaN as "—"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def is_rate(value: Any) -> bool:
    """True for a `{rate|value|score, ci, n}` dict (the project's reported-rate format)."""
    return isinstance(value, Mapping) and "n" in value and any(k in value for k in ("rate", "value", "score"))


def fmt_rate(value: Any) -> str:
    """A rate or CI bound in [0, 1] to two decimals; None/NaN as "—"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.2f}"


def rate_cell(entry: Mapping[str, Any], shade: bool = True) -> str:
    """`<td>` showing "rate [lo, hi] n=…" for a rate dict; shaded in proportion to the rate."""
    value = next((entry[k] for k in ("rate", "value", "score") if k in entry), None)
    n = entry.get("n")
    lo, hi = list(entry.get("ci") or [None, None])[:2]
    if value is None or n == 0:
        return f'<td class="rate empty">— <span class="n">n={esc(n)}</span></td>'
    style = f' style="background: rgba(214, 39, 40, {0.04 + 0.36 * float(value):.3f})"' if shade else ""
    return (f'<td class="rate"{style}>{fmt_rate(value)} '
            f'<span class="ci">[{fmt_rate(lo)}, {fmt_rate(hi)}]</span> <span class="n">n={esc(n)}</span></td>')


def value_cell(value: Any) -> str:
    """`<td>` for any JSON-like value: rate dicts as rate cells, numbers right-aligned, the rest as text."""
    if is_rate(value):
        return rate_cell(value, shade=False)
    if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
        return f'<td class="num">{esc(fmt_num(value))}</td>'
    if isinstance(value, (Mapping, list, tuple)):
        return f"<td><code>{esc(json.dumps(value, default=str, sort_keys=True))}</code></td>"
    return f"<td>{esc(value)}</td>"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "", css_class: str = "",
          header_html: str | None = None) -> str:
    """A `<table>` followed by an optional caption paragraph.

    `headers` are plain text (escaped here) unless `header_html` (ready `<tr>` rows for the
    `<thead>`) replaces them; each row is a list of ready `<td>`/`<th>` HTML. `css_class` is
    added to the `<table>` (e.g. "matrix": rate cells put their n on a second line).
    """
    head = header_html if header_html is not None else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
    body = "\n".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    cls = f' class="{esc(css_class)}"' if css_class else ""
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return f'<div class="table-wrap"><table{cls}><thead>{head}</thead>\n<tbody>\n{body}\n</tbody></table></div>{cap}'


def row_header(text: Any) -> str:
    """A `<th>` used as the first cell of a row."""
    return f'<th scope="row">{esc(text)}</th>'


def records_table(records: Sequence[Mapping[str, Any]], caption: str = "") -> str:
    """Table of a list of dicts: one column per key (in first-seen order), missing cells as "—"."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    rows = [[value_cell(record.get(col)) for col in columns] for record in records]
    return table(columns, rows, caption)


def key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    """A compact `<dl>` of label → value (values rendered as text, numbers formatted)."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt_num(v) if not isinstance(v, (list, dict)) else _compact(v))}</dd>"
                    for k, v in pairs)
    return f'<dl class="kv">{items}</dl>'


def _compact(value: Any) -> str:
    return json.dumps(value, default=str)


def yaml_block(data: Any) -> str:
    """`<pre>` with `data` as YAML (non-JSON types such as paths become strings first)."""
    plain = json.loads(json.dumps(data, default=str))
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f'<pre class="yaml">{esc(text)}</pre>'


def figure(data_uri: str, caption: str, alt: str = "") -> str:
    """`<figure>` with an inlined image (`data:image/png;base64,...`) and an escaped caption."""
    if not data_uri.startswith("data:image/png;base64,"):
        raise ValueError("figure() only inlines PNG data URIs, so the page makes no external requests")
    return (f'<figure><img src="{data_uri}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


class FigureMaker:
    """Runs plot helpers into a private temporary folder and hands back their PNGs as data URIs.

    Use as a context manager; the folder and its PNGs are deleted on exit (the report inlines them).
    """

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    def __enter__(self) -> "FigureMaker":
        self._tmp = tempfile.TemporaryDirectory(prefix="refusal-sae-report-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def plot(self, plot_fn: Callable[..., Path], data: Any, **kwargs: Any) -> str:
        """Call `plot_fn(data, out_png, **kwargs)` and return the PNG as a data URI."""
        if self._tmp is None:
            raise RuntimeError("FigureMaker.plot used outside its `with` block")
        self._count += 1
        out = Path(self._tmp.name) / f"figure_{self._count:02d}.png"
        return png_to_data_uri(plot_fn(data, out, **kwargs))
