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


def test_ablation_matrices_of_seed_only_runs_are_averaged_over_run_and_sae_seed(tmp_path):
    """Three runs (two SAE seeds each) on the same eval prompts: each matrix cell is `seed_average` over
    the six (run, SAE seed) pairs; its CI holds every pair's mean; selected − control is averaged too."""
    import numpy as np

    from activations.records import PromptRecord
    from activations.stats import seed_average
    from analysis.evaluation.matrix_average import ablation_rows
    from analysis.evaluation.refusal import RefusalResult
    from analysis.stages.compare import seed_averaged_cells

    cats = ["benign"] * 10 + ["safety"] * 10 + ["humanizing"] * 10
    records = [PromptRecord(f"p{i}", "t", c) for i, c in enumerate(cats)]
    rng = np.random.default_rng(3)

    def results(flags):
        return [RefusalResult(r.id, r.category, "", bool(f), "token") for r, f in zip(records, flags)]

    base = np.array([c != "benign" for c in cats])
    removed = rng.random(30) < 0.4  # what ablation removes on every seed; each seed also flips a few more
    effects, versus = [], []
    for i in range(3):
        run = tmp_path / f"run{i}"
        (run / "ablate").mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(synthetic_summary()))
        (run / "config.yaml").write_text(f"seed: {i}\ntrain:\n  seeds: [{2 * i}, {2 * i + 1}]\n")
        conds, ctls = {}, {}
        for s in (2 * i, 2 * i + 1):
            sel = base & ~removed ^ (base & (rng.random(30) < 0.08))
            draws = [base & (rng.random(30) < 0.9) for _ in range(3)]
            conds[s], ctls[s] = {"safety": results(sel)}, {"safety": [results(d) for d in draws]}
            m = np.array([c == "safety" for c in cats])
            effects.append(sel[m].astype(float) - base[m])
            versus.append(sel[m].astype(float) - np.mean([d[m] for d in draws], axis=0))
        (run / "ablate" / "rows.json").write_text(json.dumps(ablation_rows(records, results(base), conds, ctls)))
    cells = seed_averaged_cells([tmp_path / f"run{i}" for i in range(3)])
    for label, values in (("ablation.safety.safety", effects), ("ablation_vs_control.safety.safety", versus)):
        expected = seed_average(np.stack(values), bounds=(-1.0, 1.0))
        mean, lo, hi = (float(x) for x in cells[label].replace("[", "").replace(",", "").replace("]", "").split()[:3])
        assert mean == pytest.approx(expected["mean"], abs=1e-3) and [lo, hi] == pytest.approx(expected["ci"], abs=1e-3)
        assert all(lo - 1e-3 <= v.mean() <= hi + 1e-3 for v in values), label
        assert "runs=3, run×seed pairs=6" in cells[label]
    assert {k.split(".")[2] for k in cells if k.startswith("ablation.safety.")} >= {"safety", "over_refusal", "harmful_refusal"}
    out = tmp_path / "cmp"
    assert main([str(tmp_path / f"run{i}") for i in range(3)] + ["--out", str(out)]) == 0
    row = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ablation.safety.safety "))
    assert row.strip().strip("|").split("|")[-1].strip() == cells["ablation.safety.safety"]
