"""CLI basics: --version, usage errors exit 2, --trainer.logger, prompt files by extension, bundled
configs, and progress bars that show in logs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from analysis.cli import main as cli_main
from analysis.stages import train as train_stage
from analysis.stages.command import parse

REPO = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--acts", "acts", "--layer", "1", "--out", "out"]


def test_version_and_usage_errors_exit_2(capsys) -> None:
    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("refusal-sae ") and out.split()[1][0].isdigit()
    assert cli_main([]) == 2  # the bare command is a usage error
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: refusal-sae needs a command") and "harvest" in captured.err
    assert cli_main(["--help"]) == 0 and "commands:" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    assert cli_main(["harvest"]) == 2 and "required" in capsys.readouterr().err
    assert cli_main(["config"]) == 2 and "needs an action: list | show" in capsys.readouterr().err


def test_trainer_logger_is_the_train_configs_logger(capsys, tmp_path: Path) -> None:
    cfg, _, _ = parse(train_stage.COMMAND, [*TRAIN_ARGS, "--trainer.logger", "wandb"])
    assert cfg.logger == "wandb"
    assert "note: --trainer.logger is now --train.logger" in capsys.readouterr().err
    cfg, _, _ = parse(train_stage.COMMAND, [*TRAIN_ARGS, "--trainer.logger", "tensorboard"])
    assert cfg.logger == "tensorboard"
    with pytest.raises(ValueError, match=r"--train.logger must be one of csv, wandb, tensorboard; got 'x'"):
        parse(train_stage.COMMAND, [*TRAIN_ARGS, "--trainer.logger", "x"])
    config = tmp_path / "t.yaml"
    config.write_text("trainer:\n  logger: tensorboard\n")
    with pytest.raises(ValueError, match=r"key 'trainer.logger' is set by 'train.logger'"):
        parse(train_stage.COMMAND, ["-c", str(config), *TRAIN_ARGS])


def test_tensorboard_logger_is_used_or_named_as_missing(tmp_path: Path) -> None:
    import importlib.util

    from sae.train import make_loggers

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ValueError, match=r"needs the tensorboard package \(pip install tensorboard\)"):
            make_loggers(tmp_path, "tensorboard")
    else:
        loggers = make_loggers(tmp_path, "tensorboard")
        assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger"]


def test_prompt_files_are_recognised_by_extension(tmp_path: Path) -> None:
    from activations.prompts import load_prompt_set, parse_spec

    rows = [{"id": f"p{i}", "text": f"Question number {i}?", "category": "benign"} for i in range(6)]
    path = tmp_path / "my.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert parse_spec(str(path)).kind == "jsonl"
    assert parse_spec(f"{tmp_path}/t.csv?text=prompt").options == {"text": "prompt"}
    assert parse_spec("jsonl:table.csv").kind == "jsonl"  # an explicit kind wins
    assert len(load_prompt_set([str(path)]).records) == 6
    with pytest.raises(ValueError, match=r"or a file ending in \.jsonl, \.json, \.csv"):
        parse_spec("notes.txt")


def test_bundled_configs_list_show_and_dash_c_name(capsys, tmp_path: Path, monkeypatch) -> None:
    assert cli_main(["config", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"quickstart", "sae/smollm2"} <= set(names)
    assert cli_main(["config", "show", "quickstart"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "quickstart.yaml").read_text()
    assert cli_main(["config", "show", "nope"]) == 2 and "no bundled config named 'nope'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # outside the repository: -c NAME and -c configs/NAME.yaml find the bundle
    for name in ("sae/smollm2", "configs/sae/smollm2.yaml"):
        cfg, inputs, _ = parse(train_stage.COMMAND, ["-c", name, "--out", "o"])
        assert cfg.sae.k == 32 and str(inputs.acts) == "checkpoints/acts"
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        parse(train_stage.COMMAND, ["-c", "nope.yaml", *TRAIN_ARGS])


def test_progress_bars_write_lines_at_a_log_rate(monkeypatch) -> None:
    from activations.progress import progress_bar

    stream = io.StringIO()  # not a terminal: plain lines, at most one per interval plus the last
    monkeypatch.setenv("REFUSAL_SAE_PROGRESS_INTERVAL", "3600")
    for _ in progress_bar(range(1000), desc="work", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 2 <= len(lines) <= 3
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%") and "1000/1000" in lines[-1]
    monkeypatch.setenv("REFUSAL_SAE_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="each", stream=stream):
        pass
    assert len(stream.getvalue().splitlines()) >= 6  # every update shows when asked to
    monkeypatch.setenv("REFUSAL_SAE_PROGRESS", "0")
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="off", stream=stream):
        pass
    assert stream.getvalue() == ""


def test_the_wheel_carries_the_configs(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    from analysis.bundled import bundled_names

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("refusal_sae-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(n[len("analysis/configs/"):-len(".yaml")] for n in names
                     if n.startswith("analysis/configs/") and n.endswith(".yaml"))
    assert shipped == bundled_names() and "quickstart" in shipped
    assert sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml")) == shipped
