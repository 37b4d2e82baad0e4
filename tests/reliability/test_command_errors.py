"""Items 6 and 7: unusable output paths and bad pipeline configs stop with one `error:` line, before any work."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from analysis.cli import main as cli_main
from tests.reliability.conftest import LAYER, one_error_line

REPO = Path(__file__).resolve().parents[2]


def command(name: str, out: Path, store: Path, model: str) -> list[str]:
    """A valid command line of `name` writing to `out` (the inputs exist; only `out` is wrong)."""
    return {
        "harvest": ["harvest", "--model", model, "--prompts", "builtin:quickstart?per_category=2",
                    "--harvest.layers", "1", "--out", str(out)],
        "train": ["train", "--acts", str(store), "--layer", str(LAYER), "--out", str(out), "--train.steps", "2",
                  "--train.sae.expansion_factor", "2", "--train.sae.k", "2"],
        "pipeline": ["pipeline", "-c", str(REPO / "configs/quickstart.yaml"), "--model", model, "--out", str(out)],
        "select": ["select", "--space", "residual", "--acts", str(store), "--layer", str(LAYER), "--out", str(out)],
    }[name]


COMMANDS = ("harvest", "train", "pipeline", "select")


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create: inside a read-only folder, or under /sys when root."""
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
        yield parent / "out"
        parent.chmod(0o700)
    elif Path("/sys/fs").is_dir():
        yield Path("/sys/fs/refusal-sae-test/out")  # sysfs refuses new entries, even to root
    else:
        pytest.skip("no unwritable location for root")


@pytest.mark.parametrize("name", COMMANDS)
def test_output_folder_that_is_an_existing_file(name, sae_store, tiny_llama_dir, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("not a folder")
    assert cli_main(command(name, existing, sae_store, tiny_llama_dir)) == 2
    assert f"output folder {existing} is an existing file" in one_error_line(capsys.readouterr().err)
    assert existing.read_text() == "not a folder"
    assert cli_main(command(name, existing / "sub", sae_store, tiny_llama_dir)) == 2
    assert f"lies inside {existing}, which is a file" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", COMMANDS)
def test_unwritable_output_folder(name, sae_store, tiny_llama_dir, unwritable, capsys):
    assert cli_main(command(name, unwritable, sae_store, tiny_llama_dir)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {unwritable}") and ("permission denied" in line or "not permitted" in line)


def test_output_file_inside_a_file(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("x")
    args = ["steer", "--model", str(tmp_path), "--vectors", str(tmp_path), "--vector", "global", "--layer", "1",
            "--prompts", "builtin:quickstart", "--out", str(existing / "results.json")]
    assert cli_main(args) == 2
    assert f"output file {existing / 'results.json'} lies inside {existing}" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("text, message", [
    ("train:\n  sae:\n    k: [4\n", "is not valid YAML"),
    ("train:\n  sae:\n    k: abc\n", 'Parser key "train.sae.k"'),
    ("train:\n  steps: -3\n", "steps must be >= 1"),
    ("harvest:\n  layers: [1, 9]\n", "harvest.layers: layer 9 is out of range"),
    ("train:\n  sae:\n    k: 600\n", "k=600 must be smaller than the number of latents d_sae=512"),
])
def test_bad_pipeline_config_stops_before_the_first_stage(text, message, tiny_llama_dir, tmp_path, capsys):
    """Item 7: YAML syntax, types, values and what needs the model's shape (a 4-block model, d_model 64)."""
    config, out = tmp_path / "bad.yaml", tmp_path / "run"
    config.write_text(text)
    assert cli_main(["pipeline", "-c", str(config), "--model", tiny_llama_dir, "--out", str(out)]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()
