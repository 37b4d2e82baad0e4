"""End-to-end tests of `refusal-sae steer`, `attribute` and `stability` on a tiny random Llama.

The refusal-token model is built so steering has a known effect: its class rows read one direction
w = g ⊙ v (g = the final-norm weight, v = the "global" steering vector): the five refusal rows are
+3w (plus tiny noise) and [respond] is −3w. Steering the last block's output by +α v with large α
makes every prompt refuse, −α v makes every prompt respond. The sign of v is chosen so the unsteered
model responds to every eval prompt. Seed 1's SAE is seed 0's with its latents permuted, so decoder
matching must find the permutation with cosine 1.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES
from analysis.stages import attribute, stability, steer
from analysis.stages.command import run_command

PROMPTS = "builtin:quickstart?per_category=8"  # 4 extract / 2 calibrate / 2 eval prompts per category
LAYER, D_SAE = 3, 128
MAX_LENGTH = 16  # prompt tokens kept by `attribute` in these tests
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def steer_main(argv):
    return run_command(steer.COMMAND, argv)


def attribute_main(argv):
    return run_command(attribute.COMMAND, argv)


def stability_main(argv):
    return run_command(stability.COMMAND, argv)


def install_class_rows(model, tokenizer, spec, v: np.ndarray, seed: int = 0) -> None:
    """Refusal rows +3 g⊙v (+ noise), [respond] row −3 g⊙v."""
    from activations.adapter import ModelAdapter
    from probes.refusal_token_install import write_class_rows

    rng = np.random.default_rng(seed)
    w = ModelAdapter(model).final_norm.weight.detach().double().numpy() * v
    rows = np.vstack([-w] + [w + 0.01 * rng.normal(size=w.size) for _ in REFUSAL_CATEGORIES]) * 3.0
    write_class_rows(model, spec.token_ids(tokenizer), rows)


def build_model(root: Path, tokenizer) -> Path:
    """Save the refusal-token model and a vector set {global: ±v, safety: random} at LAYER."""
    from activations.prompts import load_prompt_set
    from activations.tiny_models import build_tiny_model
    from probes.refusal_token_install import add_class_tokens, save_refusal_token_model, untie_unembedding
    from probes.refusal_tokens import RefusalTokenSpec, first_token_decisions, first_token_logits
    from probes.vectors import SteeringVector, VectorSet

    model, tokenizer = build_tiny_model("llama", tokenizer=copy.deepcopy(tokenizer))
    spec = RefusalTokenSpec.preset("default")
    untie_unembedding(model)
    add_class_tokens(model, tokenizer, spec)
    rng = np.random.default_rng(0)
    v = rng.normal(size=64)
    v /= np.linalg.norm(v)
    texts = [r.text for r in load_prompt_set([PROMPTS]).split("eval")]
    install_class_rows(model, tokenizer, spec, v)
    if np.mean([d != BENIGN for d in first_token_decisions(first_token_logits(model, tokenizer, texts, spec))]) > 0.5:
        v = -v
        install_class_rows(model, tokenizer, spec, v)
    decisions = first_token_decisions(first_token_logits(model, tokenizer, texts, spec))
    assert all(d == BENIGN for d in decisions), "fixture: the unsteered model should respond to every eval prompt"
    save_refusal_token_model(model, tokenizer, spec, root / "model", {"note": "test fixture"})
    VectorSet({"global": SteeringVector(torch.tensor(v, dtype=torch.float32), LAYER, {"category": "global"}),
               "safety": SteeringVector(torch.tensor(rng.normal(size=64), dtype=torch.float32), LAYER)}
              ).save(root / "vectors")
    return root / "model"


def build_sae_run(run: Path) -> None:
    """Two exported TopK SAEs at LAYER: seed 0 random, seed 1 = seed 0 with latents permuted."""
    from sae.config import SAEConfig
    from sae.export import save_sae
    from sae.model import SparseAutoencoder

    base = SparseAutoencoder(SAEConfig(d_in=64, d_sae=D_SAE, k=8), seed=0)
    perm = torch.as_tensor(np.random.default_rng(1).permutation(D_SAE))
    permuted = SparseAutoencoder(SAEConfig(d_in=64, d_sae=D_SAE, k=8), seed=1)
    with torch.no_grad():
        permuted.W_dec.copy_(base.W_dec[perm])
        permuted.W_enc.copy_(base.W_enc[:, perm])
        permuted.b_enc.copy_(base.b_enc[perm])
    for seed, sae in ((0, base), (1, permuted)):
        save_sae(sae.eval(), run / f"seed_{seed}", {"layer": LAYER, "model_name": "tiny"})


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedded_tokenizer):
    """Model + vectors, a shard store (layers 1 and 3) from the real harvester, an SAE run, a selection."""
    from activations.harvest import harvest
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set
    from analysis.stages.select import Config, run_selection
    from sae.export import load_sae_run

    root = tmp_path_factory.mktemp("cli_analysis")
    model_dir = build_model(root, embedded_tokenizer)
    model, tokenizer = load_model(str(model_dir))
    harvest(model, tokenizer, load_prompt_set([PROMPTS]).records, [1, LAYER], root / "acts", positions="last",
            dtype="float32", progress=False)
    build_sae_run(root / "sae")
    run_selection(root / "acts", LAYER, load_sae_run(root / "sae"), root / "select",
                  Config(top_k=4, n_bootstrap=0, C_grid=[1.0], n_boot_ci=20))
    return root


def call(main, argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(main, argv, message, capsys) -> None:
    code, _, err = call(main, argv, capsys)
    assert code == 2, (message, err)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    # the one error line is the last thing printed (transformers may draw a loading bar before it)
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0] and message in errors[0], err


def with_value(argv: list, flag: str, value) -> list:
    """`argv` with the value after `flag` replaced."""
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def check_rate(entry: dict, n: int | None = None) -> None:
    assert 0.0 <= entry["ci"][0] <= entry["rate"] <= entry["ci"][1] <= 1.0
    if n is not None:
        assert entry["n"] == n


# ---------------------------------------------------------------- steer


def steer_argv(world: Path, out: Path, *extra) -> list:
    return ["--model", world / "model", "--vectors", world / "vectors", "--vector", "global", "--layer", LAYER,
            "--prompts", PROMPTS, "--device", "cpu", "--out", out, *extra]


def test_steer_baseline_alphas_and_ablation(world, tmp_path, capsys):
    out = tmp_path / "steer.json"
    argv = steer_argv(world, out, "--alpha", 0, 50, "--ablate-sae", world / "sae" / "seed_0",
                      "--features", world / "select" / "seed_0" / "features.json")
    code, printed, err = call(steer_main, argv, capsys)
    assert code == 0 and out.is_file() and "steer+50" in printed and "McNemar" in printed
    for name in ("baseline", "steer+50", "steer-50", "ablate"):  # one bar per condition, on stderr
        assert any(line.startswith(f"condition {name}: 100%") for line in err.splitlines()), (name, err)
    result = json.loads(out.read_text())
    assert [c["name"] for c in result["conditions"]] == ["baseline", "steer+0", "steer+50", "steer-50", "ablate"]
    assert result["n"] == 14 and result["split"] == "eval"
    refusal = result["refusal"]
    for table in refusal.values():
        for category in (BENIGN, CONTRAST, *REFUSAL_CATEGORIES):
            check_rate(table[category], n=2)
        check_rate(table["over_refusal"], n=4)
        check_rate(table["harmful_refusal"], n=10)
    assert refusal["steer+0"] == refusal["baseline"] and result["rows"]["steer+0"] == result["rows"]["baseline"]
    assert refusal["baseline"]["harmful_refusal"]["rate"] == 0.0
    assert refusal["steer+50"]["harmful_refusal"]["rate"] == 1.0 and refusal["steer+50"]["over_refusal"]["rate"] == 1.0
    assert refusal["steer-50"]["harmful_refusal"]["rate"] == 0.0
    paired = result["paired_vs_baseline"]
    assert set(paired) == {"steer+0", "steer+50", "steer-50", "ablate"}
    harmful = paired["steer+50"]["harmful_refusal"]["all"]
    assert harmful["after_only"] == 10 and harmful["p_value"] == pytest.approx(2 * 0.5**10)
    assert paired["steer+0"]["harmful_refusal"]["all"]["p_value"] == 1.0
    selected = json.loads((world / "select" / "seed_0" / "features.json").read_text())["per_class"]
    expected = sorted({i for c in REFUSAL_CATEGORIES for i in selected[c]["feature_ids"]})
    assert result["ablate"]["feature_ids"] == expected
    assert all(r["decision"] is not None for r in result["rows"]["ablate"])


def test_steer_takes_a_run_folder_and_ablates_the_features_seed(world, tmp_path, capsys):
    out = tmp_path / "steer.json"
    features = world / "select" / "seed_1" / "features.json"
    argv = steer_argv(world, out, "--alpha", 0, "--ablate-sae", world / "sae", "--features", features)
    code, _, _ = call(steer_main, argv, capsys)
    assert code == 0
    result = json.loads(out.read_text())
    selected = json.loads(features.read_text())["per_class"]
    assert result["ablate"]["feature_ids"] == sorted({i for c in REFUSAL_CATEGORIES for i in selected[c]["feature_ids"]})


def test_steer_errors_exit_2_with_one_line(world, tmp_path, capsys):
    out = tmp_path / "s.json"
    seed7 = tmp_path / "seed7.json"
    features = json.loads((world / "select" / "seed_0" / "features.json").read_text())
    seed7.write_text(json.dumps({**features, "meta": {**features["meta"], "sae_seed": 7}}))
    argv = steer_argv(world, out, "--alpha", 1)
    cases = [
        (with_value(argv, "--model", tmp_path / "missing"), "model folder not found"),
        (with_value(argv, "--layer", 9), "layer 9 out of range: this llama model has blocks 0..3"),
        (with_value(argv, "--vector", "nope"), "no steering vector named 'nope'"),
        (with_value(argv, "--vectors", tmp_path / "novectors"), "vector-set folder not found"),
        (with_value(argv, "--layer", 1), "is for layer 3, not layer 1"),
        ([*argv, "--features", world / "select" / "features.json"], "--ablate_sae and --features go together"),
        ([*argv, "--ablate-sae", world / "sae", "--features", seed7], "has seed(s) [0, 1], not seed 7"),
        ([*argv, "--ablate-sae", world / "sae" / "seed_1", "--features", world / "select" / "seed_0" / "features.json"],
         "selected on SAE seed 0, not on seed 1"),
        ([*argv, "--tokens", "nonsense"], "unknown refusal-token preset"),
        (with_value(argv, "--prompts", "builtin:nothing"), "no builtin prompt set 'nothing'"),
    ]
    for case, message in cases:
        assert_one_line_error(steer_main, case, message, capsys)
    assert not out.exists()


# ---------------------------------------------------------------- attribute


def attribute_argv(world: Path, out: Path, *extra) -> list:
    """Prompts cut to their last MAX_LENGTH tokens: the full-vocabulary logits at every position dominate the cost."""
    return ["--model", world / "model", "--layer", LAYER, "--prompts", PROMPTS, "--split", "extract",
            "--max-length", MAX_LENGTH, "--device", "cpu", "--out", out, *extra]


def test_attribute_residual_matches_library_and_patching(world, tmp_path, capsys):
    from activations.adapter import ModelAdapter
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set
    from activations.tokenize import encode_prompts
    from analysis.interventions.attribution import attribution_patching
    from analysis.evaluation.logit_metrics import refusal_margin_metric
    from probes.refusal_tokens import load_refusal_token_spec

    out = tmp_path / "attribution.json"
    argv = attribute_argv(world, out, "--n-pairs", 4, "--batch-size", 3, "--top", 10, "--validate-top", 8)
    code, printed, _ = call(attribute_main, argv, capsys)
    assert code == 0 and "Spearman" in printed
    result = json.loads(out.read_text())
    assert result["space"] == "residual" and result["n_units"] == 64 and result["n_pairs"] == 4
    assert [p["clean_category"] for p in result["pairs"]] == list(REFUSAL_CATEGORIES[:4])  # categories in turn
    scores = [abs(t["mean_score"]) for t in result["top"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    assert all(0 <= t["unit"] < 64 for t in result["top"])
    validation = result["validation"]
    assert validation["n_units"] == 8 and [u["unit"] for u in validation["units"]] == [t["unit"] for t in result["top"][:8]]
    assert validation["spearman"] > 0.5  # first-order estimate ranks the real patching effects

    # the same pairs through the library in one padded batch give the same mean scores
    model, tokenizer = load_model(str(world / "model"))
    ids = load_refusal_token_spec(world / "model").token_ids(tokenizer)
    by_id = {r.id: r for r in load_prompt_set([PROMPTS]).split("extract")}
    assert [by_id[p["corrupt"]].category for p in result["pairs"]] == [BENIGN] * 4
    clean = [by_id[p["clean"]].text for p in result["pairs"]]
    corrupt = [by_id[p["corrupt"]].text for p in result["pairs"]]
    batch = encode_prompts(tokenizer, clean + corrupt, max_length=MAX_LENGTH)
    attribution = attribution_patching(ModelAdapter(model), {k: v[:4] for k, v in batch.items()},
                                       {k: v[4:] for k, v in batch.items()}, LAYER,
                                       refusal_margin_metric(ids[1:], ids[0]))
    mean = attribution.mean_scores().numpy()
    for row in result["top"]:
        assert row["mean_score"] == pytest.approx(mean[row["unit"]], rel=1e-4, abs=1e-6)
    assert np.mean(result["clean_metric"]["values"]) == pytest.approx(result["clean_metric"]["mean"])


def test_attribute_sae_features(world, tmp_path, capsys):
    out = tmp_path / "attribution_sae.json"
    argv = attribute_argv(world, out, "--sae", world / "sae" / "seed_0", "--n-pairs", 3, "--top", 5,
                          "--validate-top", 4)
    code, printed, _ = call(attribute_main, argv, capsys)
    assert code == 0 and "sae space" in printed
    result = json.loads(out.read_text())
    assert result["space"] == "sae" and result["n_units"] == D_SAE
    assert len(result["top"]) == 5 and all(0 <= t["unit"] < D_SAE for t in result["top"])
    assert -1.0 <= result["validation"]["spearman"] <= 1.0


def test_every_sae_input_takes_a_run_folder_or_a_seed_folder(world, capsys):
    from analysis.stages.common import load_seed_sae

    run, seed_1 = world / "sae", world / "sae" / "seed_1"
    first, seed = load_seed_sae(run, LAYER, 64)
    assert seed == 0 and "has seeds [0, 1]; using seed 0" in capsys.readouterr().err
    chosen, seed = load_seed_sae(run, LAYER, 64, seed=1)
    alone, own = load_seed_sae(seed_1, LAYER, 64)
    assert seed == own == 1 and torch.equal(chosen.W_dec, alone.W_dec) and not torch.equal(first.W_dec, alone.W_dec)
    from sae.export import load_sae_run  # select / vectors / stability

    assert sorted(load_sae_run(run, LAYER, 64)) == [0, 1] and list(load_sae_run(seed_1, LAYER, 64)) == [1]


def test_attribute_errors_exit_2_with_one_line(world, tmp_path, capsys):
    out = tmp_path / "a.json"
    argv = attribute_argv(world, out, "--n-pairs", 2)
    cases = [
        (with_value(argv, "--model", tmp_path / "missing"), "model folder not found"),
        (with_value(argv, "--layer", 4), "layer 4 out of range"),
        (with_value(argv, "--n-pairs", 5), "needs 5 benign prompts for the corrupt side, but the extract split has 4"),
        ([*with_value(argv, "--n-pairs", 5), "--categories", "safety"],
         "needs 5 refusal-category (safety) prompts for the clean side, but the extract split has 4"),
        ([*argv, "--validate-top", 2], "validate_top must be 0 (off) or >= 3"),
        ([*argv, "--sae", world / "sae", "--sae_seed", 5], "has seed(s) [0, 1], not seed 5"),
        ([*argv, "--sae", tmp_path / "nosae"], "SAE folder not found"),
    ]
    for case, message in cases:
        assert_one_line_error(attribute_main, case, message, capsys)
    assert not out.exists()


# ---------------------------------------------------------------- stability


def stability_argv(world: Path, out: Path, *extra) -> list:
    return ["--sae", world / "sae", "--select", world / "select", "--acts", world / "acts", "--layer", LAYER,
            "--out", out, "--methods", "pca", "--device", "cpu", *extra]


def test_stability_matching_jaccard_and_geometry(world, tmp_path, capsys):
    out = tmp_path / "stability"
    code, printed, _ = call(stability_main, stability_argv(world, out), capsys)
    assert code == 0 and "hungarian" in printed and "silhouette" in printed
    result = json.loads((out / "stability.json").read_text())
    assert result["seeds"] == [0, 1]
    stability = result["stability"]
    cosine = stability["matched_cosine"]["0-1"]
    assert cosine["method"] == "hungarian" and cosine["n_matched"] == D_SAE
    assert cosine["mean"] == pytest.approx(1.0, abs=1e-5) and cosine["fraction_above"]["0.9"] == 1.0
    selected = {s: json.loads((world / "select" / f"seed_{s}" / "features.json").read_text())["per_class"] for s in (0, 1)}
    for category in REFUSAL_CATEGORIES:
        # the same latents, permuted: the selections agree once mapped through the matching
        assert stability["feature_jaccard"][category] == 1.0
        assert stability["stable_features"][category] == sorted(selected[0][category]["feature_ids"])
        assert set(selected[1][category]["feature_ids"]) != set(selected[0][category]["feature_ids"])
    geometry = result["geometry"]
    assert set(geometry["metrics"]) == {"residual", "sae_seed0"} and geometry["n_rows"] == 14
    for metrics in geometry["metrics"].values():
        assert -1.0 <= metrics["silhouette"] <= 1.0 and metrics["davies_bouldin"] >= 0.0
        assert metrics["calinski_harabasz"] >= 0.0 and metrics["n_categories"] == 7
    for png in geometry["pngs"].values():
        assert Path(png).parent == out and Path(png).read_bytes()[:8] == PNG_MAGIC


def test_stability_errors_exit_2_with_one_line(world, tmp_path, capsys):
    out = tmp_path / "st"
    partial = tmp_path / "partial_select"
    (partial / "seed_0").mkdir(parents=True)
    (partial / "seed_0" / "features.json").write_text((world / "select" / "seed_0" / "features.json").read_text())
    argv = stability_argv(world, out)
    cases = [
        (with_value(argv, "--sae", tmp_path / "missing"), "SAE run folder not found"),
        (with_value(argv, "--acts", tmp_path / "noacts"), "not found"),
        (with_value(argv, "--layer", 2), "layer 2 is not in the store"),
        (with_value(argv, "--layer", 1), "trained on layer 3, not layer 1"),
        (with_value(argv, "--select", tmp_path / "nosel"), "selection folder not found"),
        (with_value(argv, "--select", partial), "features.json of SAE seed 1 not found"),
        ([*argv, "--seeds", 0, 5], "not [5]"),
        ([*argv, "--min-seeds", 3], "--stability.min_seeds must be in [1, 2]"),
    ]
    for case, message in cases:
        assert_one_line_error(stability_main, case, message, capsys)
    assert not (out / "stability.json").exists()


# ---------------------------------------------------------------- rate-bar layout


def test_rate_bars_palette_width_and_n_labels(tmp_path):
    from analysis.reporting.plots import MAX_BAR_FIGURE_WIDTH, _n_label, condition_colors, plot_rate_bars
    from activations.stats import rate_from_counts

    conditions = ["baseline", "steer_toward", "steer_away", "steer_lowrank", "conditional_distance",
                  "conditional_probe", "conditional_token", "ablate"]
    colors = condition_colors(conditions)
    assert list(colors) == conditions and len(set(colors.values())) == len(conditions)
    table = {c: {cat: rate_from_counts(i % 13, 12) for i, cat in enumerate(REFUSAL_CATEGORIES)} for c in conditions}
    table["ablate"]["safety"] = rate_from_counts(3, 11)
    assert _n_label(table, conditions, "humanizing") == "n=12"
    assert _n_label(table, conditions, "safety") == "n=11–12"
    path = plot_rate_bars(table, tmp_path / "bars.png")
    from PIL import Image

    with Image.open(path) as image:  # saved at 120 dpi; the legend outside the axes adds a little width
        assert image.width <= (MAX_BAR_FIGURE_WIDTH + 3) * 120
