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


def _card(category: str, feature: int, token: str) -> dict:
    example = {"prompt_id": "p1", "category": category, "split": "extract", "value": 2.5, "argmax": 1,
               "truncated_left": False, "tokens": ["How", token, "?"], "values": [0.0, 2.5, 0.4]}
    return {"feature": feature, "category": category, "weight": 0.4, "selection_frequency": 0.8, "consensus": True,
            "top_examples": [example], "other_examples": [],
            "per_category": {"benign": {"frequency": 0.1, "mean": 0.2, "n": 10}, category: {"frequency": 0.9, "mean": 2.0, "n": 8}},
            "logit_lens": {"top": [["refuse", 1.5]], "bottom": [["sure", -1.0]]}, "cosine_mean_difference": 0.42,
            "stability": {"seeds": {"1": {"latent": 9, "cosine": 0.91}}, "match_cosine": 0.7, "n_matched": 1, "n_other_seeds": 1}}


def test_feature_cards_and_sae_quality_are_shown_and_escaped(tmp_path):
    summary = synthetic_summary()
    summary["sae"]["0"].update({"fvu_content": 0.3, "ce_recovered_content": 0.9, "ce_recovered_content_ci": [0.85, 0.95],
                                "decision_fidelity_response_start": {"rate": 0.9, "ci": [0.8, 0.95], "n": 64}})
    assert validate_summary(summary) == []
    cards = [_card("safety", 17, "<script>alert(1)</script>"), _card("humanizing", 5, "feel")]
    extras = ReportExtras(features={"safety": [{"feature": 17, "weight": 0.4, "selection_frequency": 0.8,
                                                "activation_frequency": {"safety": 0.9, "benign": 0.0}},
                                               {"feature": 3, "weight": 0.2, "selection_frequency": None, "dense": True,
                                                "activation_frequency": {"safety": 1.0, "benign": 1.0}}]},
                          feature_cards=cards, sae_training_rows={"candidates": 100, "removed": {"duplicate": 7}, "kept": 93})
    page = write_report(tmp_path, summary, extras).read_text(encoding="utf-8")
    assert 'id="feature-safety-17"' in page and 'id="feature-humanizing-5"' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "Dense, not presented as safety features: 3" in page
    assert "CE loss recovered, splice at content" in page and "0.900 <span class=\"ci\">[0.850, 0.950]</span>" in page
    assert "removed duplicate 7; 93 kept" in page
    assert "matched (cos ≥ 0.70) in 1 of 1 other seeds" in page


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


def test_head_separation_is_shown(full_report):
    _, page = full_report
    section = page.split('<section id="separation">')[1].split("</section>")[0]
    assert "0.900 [" in section and "4 / 5" in section  # 17 of 20 pairs ordered, two ties count half
    assert "no refusal-token log-odds or an empty group" in section
