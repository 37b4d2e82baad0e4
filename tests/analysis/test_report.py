"""The HTML report: every section, condition and category shown, images inlined, text escaped."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from activations.records import REFUSAL_CATEGORIES
from analysis.reporting.report import ReportExtras, render_report, write_report
from analysis.reporting.html import SECTION_TITLES
from analysis.reporting.summary import REQUIRED_CONDITIONS, REQUIRED_SETS, SECTION_KEYS, validate_summary
from tests.helpers.report_fixtures import INJECTED, synthetic_extras, synthetic_summary


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    summary = synthetic_summary()
    assert validate_summary(summary) == []
    path = write_report(out, summary, synthetic_extras(out))
    return path, path.read_text(encoding="utf-8")


def test_writes_one_file_with_every_section(full_report):
    path, page = full_report
    assert path.name == "report.html" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".report.html")]  # no temp file left
    for anchor, title in SECTION_TITLES.items():
        assert f'<section id="{anchor}">' in page, anchor
        assert f"<h2>{title}</h2>" in page, title
        assert f'href="#{anchor}"' in page  # listed in the table of contents


def test_every_condition_category_and_header_fact_is_shown(full_report):
    _, page = full_report
    for name in (*REQUIRED_CONDITIONS, *REQUIRED_SETS, "harmful", "builtin_mc", "arithmetic", "sae_features"):
        assert f">{name}<" in page, name
    refusal = page.split('<section id="refusal">')[1].split("</section>")[0]
    assert refusal.count("<tr>") == 1 + len(REQUIRED_CONDITIONS)  # header row + one row per condition
    assert re.search(r"[01]\.\d\d <span class=\"ci\">\[0\.\d\d, [01]\.\d\d\]</span> <span class=\"n\">n=12</span>", refusal)
    assert "— <span class=\"n\">n=0</span>" in refusal  # the empty cell
    for fact in ("smollm2-135m-instruct", "[9, 18]", "[0, 1, 2]", "2025-01-01T00:00:00Z"):
        assert fact in page
    for category in REFUSAL_CATEGORIES:  # a feature table per category, 10 of 12 rows shown
        assert f"<h3>{category} <small>(top 10 of 12)</small></h3>" in page


def test_self_contained_and_escaped(full_report):
    _, page = full_report
    images = re.findall(r'<img src="([^"]*)"', page)
    # training curves, 2 refusal bar charts, trade-off, embeddings, gating frontier, distance grid, 2 score ranges
    assert len(images) == 9
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in images)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, flags=re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert INJECTED not in page


def test_missing_extras_leave_sections_out(tmp_path):
    summary = synthetic_summary()
    summary["capability"] = {}
    for key in SECTION_KEYS:  # the optional summary keys with sections of their own
        summary.pop(key)
    page = write_report(tmp_path, summary, ReportExtras()).read_text(encoding="utf-8")
    for anchor in ("splits", "sae", "probe", "refusal", "stability", "geometry"):
        assert f'<section id="{anchor}">' in page
    for anchor in ("features", "tradeoff", "vectors", "seeds", "notes", "config", "capability", "gating", "heldout",
                   "distance_gate", "cost"):
        assert f'<section id="{anchor}">' not in page and f'href="#{anchor}"' not in page
    assert page.count("<img ") == 2  # only the two refusal bar charts


def test_invalid_summary_and_bad_extras_raise(tmp_path):
    broken = synthetic_summary()
    del broken["refusal"]["steer_away"]
    with pytest.raises(ValueError, match="steer_away"):
        render_report(broken)
    with pytest.raises(ValueError, match="lacks the key"):
        render_report(synthetic_summary(), ReportExtras(features={"safety": [{"feature": 1, "weight": 0.5}]}))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        render_report(synthetic_summary(), ReportExtras(embedding_pngs={"pca": tmp_path / "missing.png"}))
    assert not (tmp_path / "report.html").exists()


def test_manifest_hash_mismatch_is_flagged(tmp_path):
    summary = synthetic_summary()
    manifest = {"seed": 0, "splits": {"eval": {"n": 144, "sha256": "f" * 64}}}
    page = render_report(summary, ReportExtras(split_manifest=manifest))
    assert 'class="warning"' in page and "eval" in page.split('class="warning"')[1].split("</p>")[0]


def test_benchmark_keys_are_validated_and_shown(full_report):
    import copy

    summary = synthetic_summary()
    broken = copy.deepcopy(summary)
    broken["eval_sets"]["xstest"]["refusal"]["baseline"]["safety"]["n"] = 19
    broken["eval_sets"]["xstest"]["n_read"] = 10
    broken["benign_text"]["baseline"]["kl"]["value"] = 0.1
    broken["capability_readable"]["gsm8k"] = {"readable": False}
    problems = "\n".join(validate_summary(broken))
    assert "eval_sets.xstest.refusal.baseline.safety: n=19 but the set has 20" in problems
    assert "n_read=10 is less than kept + removed" in problems
    assert "KL to itself must be 0" in problems and "capability_readable.gsm8k" in problems
    _, page = full_report
    assert "removed: same text as an extract prompt" in page and "conditional_probe meets the goal" in page
    assert "The distance gate steers no calibrate row" in page and "KL to unsteered" in page
