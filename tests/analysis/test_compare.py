"""`refusal-sae compare`: tables from several summary.json files."""
from __future__ import annotations

import copy
import json

from analysis.stages.command import run_command
from analysis.stages.compare import COMMAND
from tests.helpers.report_fixtures import synthetic_summary


def main(argv):
    return run_command(COMMAND, argv)


def test_compare_two_runs_writes_markdown_and_html(tmp_path, capsys):
    first = synthetic_summary()
    second = copy.deepcopy(first)
    second["refusal"]["baseline"]["benign"]["rate"] = 0.5
    second["refusal"]["baseline"]["benign"]["ci"] = [0.3, 0.7]
    for name, summary in (("run_a", first), ("run_b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--out", str(out)]) == 0
    markdown = (out / "compare.md").read_text()
    assert markdown == capsys.readouterr().out.rstrip("\n") + "\n"
    row = next(line for line in markdown.splitlines() if line.startswith("| refusal.baseline.benign "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("0.50 [0.30, 0.70]")
    expected_mean = (first["refusal"]["baseline"]["benign"]["rate"] + 0.5) / 2
    assert cells[3].startswith(f"{expected_mean:.3f} ± ")
    html = (out / "compare.html").read_text()
    assert "<table>" in html and "run_a" in html and "run_b" in html


def test_missing_summary_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the resolved config comes first, then the one error line
    assert err[-1] == f"error: no summary.json at {tmp_path / 'nowhere'}"
    assert [line for line in err if line.startswith("error")] == err[-1:]
