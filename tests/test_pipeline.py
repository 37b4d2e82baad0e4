"""The whole pipeline on a tiny random model and a small prompt subset: schema, consistency, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from activations.tiny_models import build_tiny_model
from analysis.pipeline import main as pipeline_main
from analysis.pipeline_config import load_config
from analysis.stage_runner import Stage, StageRunner
from analysis.summary import REQUIRED_CONDITIONS, validate_summary

REDUCED = [
    'prompts=["builtin:quickstart?per_category=8"]',
    "harvest.layers=[1, 2]",
    "harvest.batch_size=16",
    "sae.seeds=[0]",
    "sae.steps=20",
    "sae.batch_size=128",
    "sae.expansion_factor=4",
    "sae.k=8",
    "select.n_bootstrap=2",
    "select.C_grid=[0.3, 1.0]",
    "evaluation.alphas=[2.0]",
    "evaluation.alpha=2.0",
    "evaluation.capability_limit=3",
    "device=cpu",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    model, tokenizer = build_tiny_model("llama", tokenizer=embedded_tokenizer)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("run")
    args = ["-c", "configs/quickstart.yaml", "--out", str(out), "--set", f"model={tiny_model_dir}"]
    for item in REDUCED:
        args += ["--set", item]
    assert pipeline_main(args) == 0
    return out


def test_summary_schema_and_consistency(pipeline_run):
    summary = json.loads((pipeline_run / "summary.json").read_text())
    eval_counts = summary["splits"]["eval"]["categories"]
    assert validate_summary(summary, eval_counts) == []
    assert set(REQUIRED_CONDITIONS) <= set(summary["refusal"])
    for condition, table in summary["refusal"].items():
        for name, entry in table.items():
            lo, hi = entry["ci"]
            assert 0.0 <= lo <= entry["rate"] <= hi <= 1.0, (condition, name)
        assert table["benign"]["n"] == eval_counts["benign"]
        assert table["harmful_refusal"]["n"] == sum(
            n for c, n in eval_counts.items() if c not in ("benign", "contrast"))
    assert list(summary["sae"]) == ["0"] and 0.0 <= summary["sae"]["0"]["dead_fraction"] <= 1.0
    assert summary["layers"] == [1, 2]
    splits = summary["splits"]
    assert len({splits[s]["sha256"] for s in splits}) == 3


def test_report_is_self_contained(pipeline_run):
    html = (pipeline_run / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    for condition in REQUIRED_CONDITIONS:
        assert condition in html


def test_rerun_skips_every_stage(pipeline_run, tiny_model_dir, capsys):
    args = ["-c", "configs/quickstart.yaml", "--out", str(pipeline_run), "--set", f"model={tiny_model_dir}"]
    for item in REDUCED:
        args += ["--set", item]
    stamps = {p: p.stat().st_mtime_ns for p in pipeline_run.glob("*/stage.json")}
    assert pipeline_main(args) == 0
    assert "up to date, skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in pipeline_run.glob("*/stage.json")} == stamps


def test_stage_runner_reruns_what_changed(tmp_path):
    calls: list[str] = []

    def stage(name: str, config: dict, after: list[str]) -> Stage:
        return Stage(name, lambda out: calls.append(name) or {"name": name}, config, after)

    StageRunner(tmp_path, [stage("a", {"x": 1}, []), stage("b", {}, ["a"])]).run()
    StageRunner(tmp_path, [stage("a", {"x": 1}, []), stage("b", {}, ["a"])]).run()
    assert calls == ["a", "b"]
    StageRunner(tmp_path, [stage("a", {"x": 2}, []), stage("b", {}, ["a"])]).run()
    assert calls == ["a", "b", "a", "b"]


def test_crash_leaves_no_stamp(tmp_path):
    def boom(out: Path) -> dict:
        (out / "partial").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        StageRunner(tmp_path, [Stage("a", boom, {})]).run()
    assert not (tmp_path / "a" / "stage.json").exists()


def test_unknown_config_key_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'sae.stepz'"):
        load_config(bad)
    assert pipeline_main(["-c", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config key 'sae.stepz' (known: " + ", ".join(
        ["seeds", "expansion_factor", "k", "architecture", "steps", "batch_size", "lr", "auxk_coeff", "contrastive_coeff"]) + ")"


def test_missing_config_file(tmp_path, capsys):
    assert pipeline_main(["-c", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err
