"""`refusal-sae compare`: tables from several summary.json files."""
from __future__ import annotations

import copy
import json

import pytest

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


def _rows(refused: list[bool]) -> dict:
    cats = ["benign", "contrast", "safety", "humanizing"] * (len(refused) // 4)
    return {"baseline": [{"prompt_id": f"p{i}", "category": c, "refused": f} for i, (c, f) in enumerate(zip(cats, refused))]}


def test_runs_differing_only_in_seed_are_seed_averaged(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    for i, name in enumerate(("seed_a", "seed_b", "seed_c")):
        run = tmp_path / name
        (run / "evaluate").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(synthetic_summary()))
        (run / "config.yaml").write_text(f"seed: {i}\ntrain:\n  seeds: [{i}]\n  steps: 10\n")
        (run / "evaluate" / "rows.json").write_text(json.dumps(_rows([bool(x) for x in rng.random(40) < 0.2 + 0.2 * i])))
    out = tmp_path / "cmp"
    assert main([str(tmp_path / n) for n in ("seed_a", "seed_b", "seed_c")] + ["--out", str(out)]) == 0
    markdown = (out / "compare.md").read_text()
    assert "seed-averaged [95% CI]" in markdown.splitlines()[0]
    row = next(line for line in markdown.splitlines() if line.startswith("| refusal.baseline.safety "))
    cell = [c.strip() for c in row.strip("|").split("|")][-1]
    mean, lo, hi = (float(x) for x in cell.replace("[", "").replace(",", "").replace("]", "").split()[:3])
    per_run = [np.mean([x["refused"] for x in json.loads((tmp_path / n / "evaluate" / "rows.json").read_text())["baseline"]
                        if x["category"] == "safety"]) for n in ("seed_a", "seed_b", "seed_c")]
    assert mean == pytest.approx(np.mean(per_run), abs=1e-3) and all(lo <= m <= hi for m in per_run)
    # a run whose config differs in more than its seed is not averaged
    (tmp_path / "seed_c" / "config.yaml").write_text("seed: 2\ntrain:\n  seeds: [2]\n  steps: 99\n")
    assert main([str(tmp_path / n) for n in ("seed_a", "seed_b", "seed_c")] + ["--out", str(out)]) == 0
    assert "seed-averaged" not in (out / "compare.md").read_text()
