"""The scripts in examples/ run as a user runs them (a subprocess each) on a run of the tiny model,
and the notebook API they use behaves as documented (docs/api.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analysis.api as rsae

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
REDUCED = [
    "--prompts", "builtin:quickstart?per_category=8", "--harvest.layers", "1", "2", "--harvest.batch_size", "16",
    "--train.seeds", "0", "1", "--train.steps", "20", "--train.data.batch_size", "128",
    "--train.sae.expansion_factor", "4", "--train.sae.k", "8", "--select.n_bootstrap", "0",
    "--select.C_grid", "1.0", "--evaluate.alpha", "2.0", "--device", "cpu",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir) -> Path:
    """The pipeline up to the gates stage (what the API reads) on the tiny random Llama."""
    from analysis.pipeline.main import build_stages, load_config
    from analysis.pipeline.runner import StageRunner
    from analysis.stages.context import RunContext

    out = tmp_path_factory.mktemp("api-run")
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*REDUCED, "--model", tiny_llama_dir])
    stages = build_stages(RunContext(cfg, out))
    StageRunner(out, stages[: [s.name for s in stages].index("gates") + 1]).run()
    return out


def run_example(script: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_run_here() -> None:
    assert {p.name for p in EXAMPLES} == {"steer_and_ablate.py", "saelens_sae.py"}


def test_steer_and_ablate_example(run: Path) -> None:
    out = run_example(REPO / "examples" / "steer_and_ablate.py", str(run), "--alpha", "50")
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()[1:]}
    assert set(rows) == {"baseline", "steer +50", "steer -50", "ablate SAE features", "distance gate"}
    assert all(len(decisions) == 4 for decisions in rows.values())


def test_saelens_example_on_a_saelens6_folder(run: Path, tiny_llama_dir: str, tmp_path: Path) -> None:
    """Our export rewritten in the SAELens 6 layout (hook under metadata, weights as a plain file)."""
    source = run / "train" / "seed_0"
    cfg = json.loads((source / "cfg.json").read_text())
    saelens6 = {"architecture": "topk", "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "k": 8, "dtype": "float32",
                "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
                "metadata": {"hook_name": cfg["hook_name"], "model_name": cfg["model_name"]}}
    folder = tmp_path / "saelens6"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(saelens6))
    (folder / "sae_weights.safetensors").write_bytes((source / "sae.safetensors").read_bytes())
    out = run_example(REPO / "examples" / "saelens_sae.py", str(folder), "--model", tiny_llama_dir)
    assert "layer 1: FVU" in out and "top latents" in out and "KL(next token)" in out


def test_api_handles_restore_the_model_and_match_the_stores(run: Path) -> None:
    from activations.store import ActivationStore

    loaded = rsae.load_run(run)
    assert loaded.layer == 1 and loaded.seeds == [0, 1]
    model, tokenizer = loaded.load_model(device="cpu")
    prompts = ["Explain how a refrigerator works.", "Tell me the home address of my old teacher."]
    base = rsae.refusal_decisions(model, tokenizer, prompts)
    logits = model(**tokenizer(prompts[:1], return_tensors="pt")).logits.detach()
    vector = loaded.vector("global")
    assert isinstance(2 * vector, rsae.Vector)
    with pytest.raises(RuntimeError, match="boom"), vector.apply(model, alpha=50.0):
        steered = rsae.refusal_decisions(model, tokenizer, prompts)
        raise RuntimeError("boom")
    assert [d.log_odds for d in steered] != [d.log_odds for d in base]
    assert rsae.refusal_decisions(model, tokenizer, prompts) == base  # restored, also after an exception
    assert torch.equal(model(**tokenizer(prompts[:1], return_tensors="pt")).logits.detach(), logits)

    sae = loaded.sae(seed=1)
    assert (sae.seed, sae.layer) == (1, 1)
    with pytest.raises(ValueError, match="selected on SAE seed 0, not on seed 1"):
        with sae.ablate(model, loaded.features(0)):
            pass
    with sae.ablate(model, loaded.features(1)):
        ablated = rsae.refusal_decisions(model, tokenizer, prompts)
    assert [d.log_odds for d in ablated] != [d.log_odds for d in base]
    assert rsae.refusal_decisions(model, tokenizer, prompts) == base

    from activations.prompts import load_prompt_set

    x, meta = ActivationStore(run / "harvest" / "last").load(1, split="eval")  # gates read what harvest stored
    texts = {r.id: r.text for r in load_prompt_set(["builtin:quickstart?per_category=8"]).records}
    states = rsae.residual_states(model, tokenizer, [texts[str(i)] for i in meta.prompt_id], 1, max_length=256)
    assert states.shape == x.shape and torch.allclose(torch.from_numpy(states), torch.from_numpy(x), atol=1e-4)
    decisions = loaded.gate("distance").decide(states)
    assert len(decisions) == len(x) and all(d.direction in ("toward", "away", "none") for d in decisions)


def test_api_errors_are_one_line(run: Path, tiny_llama) -> None:
    model, tokenizer = tiny_llama  # no refusal tokens
    with pytest.raises(ValueError, match="has no refusal_tokens.json: load a refusal-token model"):
        rsae.refusal_decisions(model, tokenizer, ["Hi."])
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        rsae.load_run(run / "missing")
    with pytest.raises(ValueError, match="has seed\\(s\\) \\[0, 1\\], not seed 5"):
        rsae.load_sae(run / "train", seed=5)
    with pytest.raises(ValueError, match="trained on layer 1, not layer 2"):
        rsae.load_sae(run / "train", layer=2)
    with pytest.raises(ValueError, match="no vector 'nope' in residual"):
        rsae.load_run(run).vector("nope")
    with pytest.raises(FileNotFoundError, match="has no evaluate/ stage output"):
        rsae.load_run(run)._stage("evaluate")
