"""The pipeline's stamped stages (prompts → harvest → train, the real stage code on a tiny random Llama):
a changed config reruns the stage and the summary matches the artifacts (item 1), a corrupted shard
stops the rerun (item 2), a moved run folder and model resume (item 9)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from analysis.pipeline.main import build_stages, load_config
from analysis.pipeline.outputs import sae_block
from analysis.pipeline.runner import StageRunner
from analysis.stages.context import RunContext
from sae.export import load_sae_run
from tests.reliability.test_shards import flip_byte_in_layer

REPO = Path(__file__).resolve().parents[2]
PREFIX = ("prompts", "harvest", "train")
ARGS = ["--prompts", "builtin:quickstart?per_category=4", "--refusal_tokens.enabled", "false",
        "--harvest.layers", "1", "--harvest.batch_size", "16", "--train.seeds", "0", "--train.steps", "10",
        "--train.data.batch_size", "64", "--train.sae.expansion_factor", "2", "--train.sae.k", "8", "--device", "cpu"]


def run_prefix(out: Path, model: Path, *overrides: str) -> tuple[RunContext, str]:
    """Run (or resume) the prefix stages; returns the context and the runner's progress text."""
    cfg = load_config(REPO / "configs/quickstart.yaml", ["--model", str(model), *ARGS, *overrides])
    ctx = RunContext(cfg, out)
    stream = io.StringIO()
    StageRunner(out, [s for s in build_stages(ctx) if s.name in PREFIX], stream).run()
    return ctx, stream.getvalue()


def exported(out: Path) -> dict[str, int]:
    cfg = json.loads((out / "train" / "seed_0" / "cfg.json").read_text())
    return {"k": cfg["activation_fn_kwargs"]["k"], "d_sae": cfg["d_sae"]}


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_llama_dir, copy)
    return copy


@pytest.fixture
def run(model_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    run_prefix(out, model_dir)
    return out


@pytest.mark.parametrize("change, expect", [
    (["--train.sae.k", "4"], {"k": 4, "d_sae": 128}),
    (["--train.sae.expansion_factor", "4"], {"k": 8, "d_sae": 256}),
])
def test_a_changed_train_section_retrains_and_the_summary_matches(run, model_dir, change, expect):
    """Item 1: the stale checkpoint used to be reloaded (k change: old SAE exported in 0.1 s; width
    change: a crash). Now the stage reruns from step 0 and summary.json's sae block is the export's."""
    assert exported(run) == {"k": 8, "d_sae": 128}
    ctx, progress = run_prefix(run, model_dir, *change)
    assert "train: up to date" not in progress and "[3/3] train: done" in progress
    assert exported(run) == expect
    assert load_sae_run(run / "train")[0].cfg.k == expect["k"]
    block = sae_block(ctx)["0"]
    assert (block["k"], block["n_latents"], block["steps"]) == (expect["k"], expect["d_sae"], 10)
    assert json.loads((run / "train" / "stage.json").read_text())["result"]["metrics"]["seeds"]["0"]["k"] == expect["k"]
    ctx, progress = run_prefix(run, model_dir, *change)  # and a rerun of the same config skips it
    assert "train: up to date, skipped" in progress


def test_a_corrupted_shard_stops_the_rerun(run, model_dir):
    """Item 2: one flipped byte in the harvested SAE rows is caught when the train stage reads them."""
    flip_byte_in_layer(run / "harvest" / "all" / "shard-00000.h5", 1)
    with pytest.raises(ValueError, match=r"harvest/all/shard-00000.h5 fails its sha256 checksum"):
        run_prefix(run, model_dir, "--train.sae.k", "4")


def test_a_moved_run_folder_and_model_resume(run, model_dir, tmp_path):
    """Item 9: move the run folder and the model, change the harvest section: the harvest stage reruns
    and resumes the stores (same weights, new path), the train stage continues its checkpoint."""
    moved_model, moved_run = tmp_path / "moved_model", tmp_path / "moved_run"
    shutil.copytree(model_dir, moved_model)
    run.rename(moved_run)
    rows = json.loads((moved_run / "harvest" / "stage.json").read_text())["result"]["all"]["rows"]
    _, progress = run_prefix(moved_run, moved_model, "--harvest.batch_size", "8")
    assert "[2/3] harvest: done" in progress and "[3/3] train: done" in progress
    assert json.loads((moved_run / "harvest" / "stage.json").read_text())["result"]["all"]["rows"] == rows
    assert exported(moved_run) == {"k": 8, "d_sae": 128}


def test_a_changed_harvest_section_reharvests_and_retrains(run, model_dir):
    """A harvest setting that changes the store (its dtype) used to stop the rerun ("already holds a
    different harvest"); now the stage harvests afresh and the train stage, whose data changed, retrains."""
    _, progress = run_prefix(run, model_dir, "--harvest.storage_dtype", "float16")
    assert "[2/3] harvest: done" in progress and "[3/3] train: done" in progress
    manifest = run / "harvest" / "all" / "manifest.json"
    assert json.loads(manifest.read_text())["dtype"] == "float16"
    cfg = json.loads((run / "train" / "seed_0" / "cfg.json").read_text())
    assert cfg["refusal_sae"]["shards_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
