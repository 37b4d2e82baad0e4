"""End-to-end tests of `refusal-sae select` and `refusal-sae vectors` on a tiny planted shard store.

Planted structure (d_model 16): every refusal row gets +3 along coordinate 0 (the shared refusal
direction r) and +3 along its category's own coordinate (1 + index in REFUSAL_CATEGORIES); benign
rows are noise. The SAEs are hand-built TopK SAEs whose first 16 decoder rows are the coordinate
axes (seed 0 in order, seed 1 permuted, so latent ids differ between seeds), plus 8 random rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from activations.records import PROBE_CLASSES, REFUSAL_CATEGORIES
from activations.store import ShardWriter
from analysis.stages import select as select_stage
from analysis.stages import vectors as vectors_stage
from analysis.stages.command import run_command
from probes.heads import HeadResult
from probes.vectors import VectorSet
from sae.config import SAEConfig
from sae.export import save_sae
from sae.model import SparseAutoencoder

D_MODEL, D_SAE, LAYER, SHIFT = 16, 24, 2, 3.0
N_PER_SPLIT = {"extract": 40, "calibrate": 30, "eval": 30}
C_GRID = ["0.1", "1"]
SPLIT_OF = ("extract", "extract", "calibrate", "eval")  # split of prompt q<i> in the all-positions store


def planted_coordinate(category: str) -> int:
    """Residual coordinate carrying a refusal category's own direction."""
    return 1 + REFUSAL_CATEGORIES.index(category)


def write_planted_store(directory: Path, skip: tuple[str, str] | None = None, n_scale: float = 1.0) -> Path:
    """Store with one `last` row per prompt; `skip=(category, split)` leaves that cell empty."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(directory, layers=[LAYER], d_model=D_MODEL, dtype="float32", positions="last",
                         model_info={"id": "planted"}, rows_per_shard=200)
    with writer:
        for split, n in N_PER_SPLIT.items():
            for category in (*PROBE_CLASSES, "contrast"):
                if (category, split) == skip:
                    continue
                for i in range(max(2, int(n * n_scale)) if category != "contrast" else 8):
                    x = rng.normal(size=(1, D_MODEL)).astype(np.float32)
                    if category in REFUSAL_CATEGORIES:
                        x[0, 0] += SHIFT
                        x[0, planted_coordinate(category)] += SHIFT
                    writer.add_prompt(f"{split}-{category}-{i}", category, split, positions=np.array([5]),
                                      token_ids=np.array([7]), activations={LAYER: x})
    writer.finish()
    return directory


def sae_permutation(seed: int) -> np.ndarray:
    """perm[latent] = decoder row source: latent j of seed s decodes to axis perm[j] (for perm[j] < 16)."""
    return np.arange(D_SAE) if seed == 0 else np.random.default_rng(seed).permutation(D_SAE)


def write_sae_run(run: Path, seeds=(0, 1), d_in: int = D_MODEL, layer: int = LAYER) -> Path:
    """A training-run folder with hand-built TopK SAEs (k=4) exported by `save_sae`."""
    rng = np.random.default_rng(123)
    extra = np.zeros((D_SAE - d_in, d_in))
    extra[:, min(6, d_in - 1):] = rng.normal(size=(D_SAE - d_in, d_in - min(6, d_in - 1)))
    base = np.vstack([np.eye(d_in), extra / np.linalg.norm(extra, axis=1, keepdims=True)])
    for seed in seeds:
        W_dec = torch.tensor(base[sae_permutation(seed)], dtype=torch.float32)
        sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=D_SAE, k=4), seed=seed)
        with torch.no_grad():
            sae.W_dec.copy_(W_dec)
            sae.W_enc.copy_(W_dec.t())
        save_sae(sae.eval(), run / f"seed_{seed}", {"layer": layer, "model_name": "planted"})
    return run


def latent_of_axis(seed: int, axis: int) -> int:
    return int(np.flatnonzero(sae_permutation(seed) == axis)[0])


def unit(i: int) -> np.ndarray:
    v = np.zeros(D_MODEL)
    v[i] = 1.0
    return v


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_probes")
    return {"root": root, "acts": write_planted_store(root / "acts"), "run": write_sae_run(root / "sae")}


@pytest.fixture(scope="module")
def selection(planted):
    out = planted["root"] / "select"
    argv = ["--acts", str(planted["acts"]), "--layer", str(LAYER), "--out", str(out), "--sae", str(planted["run"]),
            "--top-k", "4", "--n-bootstrap", "3", "--C-grid", *C_GRID, "--n-boot-ci", "200"]
    assert select_main(argv) == 0
    return out


def select_main(argv: list[str]) -> int:
    return run_command(select_stage.COMMAND, argv)


def vectors_main(argv: list[str]) -> int:
    return run_command(vectors_stage.COMMAND, argv)


def run_cli(main, argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_select_residual_space_finds_planted_coordinates(planted, tmp_path, capsys):
    out = tmp_path / "sel_res"
    code = select_main(["--space", "residual", "--acts", str(planted["acts"]), "--layer", str(LAYER), "--out",
                            str(out), "--top-k", "3", "--n-bootstrap", "2", "--C-grid", *C_GRID, "--n-boot-ci", "200"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "residual" in printed and "eval accuracy" in printed
    report = json.loads((out / "select_report.json").read_text())
    metrics = report["runs"]["residual"]["probe_eval"]
    assert metrics["accuracy"]["rate"] > 0.9 and metrics["accuracy"]["n"] == 6 * 30 + 8  # contrast counts as benign
    lo, hi = metrics["macro_f1"]["ci"]
    assert lo <= metrics["macro_f1"]["value"] <= hi
    assert report["rows"]["eval"]["safety"] == 30 and report["dropped_rows"] == 0
    features = json.loads((out / "features.json").read_text())
    assert features["meta"]["space"] == "residual" and features["meta"]["layer"] == LAYER
    assert set(features["meta"]["splits"]) == {"extract", "calibrate"}
    for category in REFUSAL_CATEGORIES:
        entry = features["per_class"][category]
        assert entry["feature_ids"][0] == planted_coordinate(category)  # most stable, heaviest first
        assert entry["selection_frequency"][0] == 1.0
        # the planted coordinate fires (> tau = 0) on nearly every row of its category
        assert entry["activation_frequency"][category][0] > 0.9
    head = HeadResult.load(str(out / "head"))
    assert head.classes == PROBE_CLASSES and head.n_features == D_MODEL
    for category in REFUSAL_CATEGORIES:
        ovr = HeadResult.load(str(out / "ovr" / category))
        assert ovr.classes == ("rest", category)
        assert report["runs"]["residual"]["ovr"][category]["eval"]["accuracy"]["rate"] > 0.9


def test_select_with_the_torch_solver_finds_the_same_planted_coordinates(planted, tmp_path, capsys):
    """`--select.solver torch` (the GPU path, here on the CPU) selects what the reference does."""
    out = tmp_path / "sel_torch"
    code = select_main(["--space", "residual", "--acts", str(planted["acts"]), "--layer", str(LAYER), "--out",
                        str(out), "--top-k", "3", "--n-bootstrap", "2", "--C-grid", *C_GRID, "--n-boot-ci", "200",
                        "--select.solver", "torch", "--device", "cpu"])
    assert code == 0
    features = json.loads((out / "features.json").read_text())
    assert features["meta"]["solver"] == "torch"
    for category in REFUSAL_CATEGORIES:
        assert features["per_class"][category]["feature_ids"][0] == planted_coordinate(category)
    report = json.loads((out / "select_report.json").read_text())
    assert report["runs"]["residual"]["probe_eval"]["accuracy"]["rate"] > 0.9


def test_select_sae_space_per_seed(selection):
    report = json.loads((selection / "select_report.json").read_text())
    assert set(report["runs"]) == {"seed_0", "seed_1"} and report["reference_seed"] == 0
    for seed in (0, 1):
        run = report["runs"][f"seed_{seed}"]
        assert run["probe_eval"]["accuracy"]["rate"] > 0.85
        assert run["sae"]["d_sae"] == D_SAE and 0 < run["sae"]["mean_l0"] <= 4
        features = json.loads((selection / f"seed_{seed}" / "features.json").read_text())
        assert features["meta"]["sae_seed"] == seed and features["meta"]["n_features"] == D_SAE
        for category in REFUSAL_CATEGORIES:  # the latent decoding to the category's axis, whatever its id
            assert latent_of_axis(seed, planted_coordinate(category)) in features["per_class"][category]["feature_ids"]
            assert len(features["per_class"][category]["feature_ids"]) <= 4
        stability = load_file(str(selection / f"seed_{seed}" / "stability.safetensors"))
        assert stability["frequency"].shape == (len(PROBE_CLASSES), D_SAE)
        assert 0.0 <= stability["frequency"].min() and stability["frequency"].max() <= 1.0
        assert HeadResult.load(str(selection / f"seed_{seed}" / "head")).n_features == D_SAE
    top = json.loads((selection / "features.json").read_text())
    seed0 = json.loads((selection / "seed_0" / "features.json").read_text())
    assert top["meta"]["reference_seed"] == 0 and top["per_class"] == seed0["per_class"]
    ids0 = json.loads((selection / "seed_0" / "features.json").read_text())["per_class"]["safety"]["feature_ids"]
    ids1 = json.loads((selection / "seed_1" / "features.json").read_text())["per_class"]["safety"]["feature_ids"]
    assert ids0 != ids1  # latent ids are per seed: not aligned


def test_vectors_residual_sae_and_lowrank(planted, selection, tmp_path, capsys):
    out = tmp_path / "vec"
    code = vectors_main(["--acts", str(planted["acts"]), "--layer", str(LAYER), "--out", str(out),
                             "--sae", str(planted["run"]), "--features", str(selection / "features.json"),
                             "--tau", "1.0", "--top-k", "8", "--rank", "2"])
    assert code == 0
    assert "lowrank" in capsys.readouterr().out
    residual = VectorSet.load(out / "residual", expected_layer=LAYER)
    assert set(residual) == {*REFUSAL_CATEGORIES, "global"}
    assert cos(residual["global"].vector, unit(0)) > 0.85  # shared refusal direction
    for category in REFUSAL_CATEGORIES:
        planted_dir = unit(0) + unit(planted_coordinate(category))
        assert cos(residual[category].vector, planted_dir) > 0.95
    assert residual["global"].meta["n_rows"] == {"category": 5 * 40, "baseline": 40}
    lowrank = VectorSet.load(out / "lowrank", expected_layer=LAYER)["lowrank"]
    assert cos(lowrank.vector, residual["global"].vector) > 0.8
    report = json.loads((out / "vectors_report.json").read_text())
    for seed in (0, 1):
        sae_set = VectorSet.load(out / f"sae_seed{seed}", expected_layer=LAYER)
        selected = json.loads((selection / f"seed_{seed}" / "features.json").read_text())["per_class"]
        for category in REFUSAL_CATEGORIES:
            vec = sae_set[category].vector.double().numpy()
            own = planted_coordinate(category)
            assert vec[own] > 2.0 and cos(vec, unit(own)) > 0.6  # decoded back to the category's own axis
            kept = report["sae"][f"seed_{seed}"]["per_category"][category]["latents"]
            assert set(kept) <= set(selected[category]["feature_ids"])  # restricted to features.json
            assert sae_set[category].meta["sae_seed"] == seed


def test_consensus_features_agree_across_seeds_and_restrict_sae_vectors(planted, selection, tmp_path):
    consensus = json.loads((selection / "consensus.json").read_text())
    assert consensus["min_seeds"] == 2 and consensus["seeds"] == [0, 1] and consensus["min_cosine"] == 0.7
    for category in REFUSAL_CATEGORIES:
        ids0, ids1 = consensus["per_seed"]["0"][category], consensus["per_seed"]["1"][category]
        assert latent_of_axis(0, planted_coordinate(category)) in ids0  # the planted latent, in both seeds
        assert latent_of_axis(1, planted_coordinate(category)) in ids1
        assert {int(sae_permutation(1)[j]) for j in ids1} == set(ids0)  # the same decoder rows on both seeds
        assert set(ids0) <= set(consensus["selected"]["0"][category])
    out = tmp_path / "vec_consensus"
    assert vectors_main(["--acts", str(planted["acts"]), "--layer", str(LAYER), "--out", str(out), "--sae",
                         str(planted["run"]), "--features", str(selection), "--tau", "1.0"]) == 0
    report = json.loads((out / "vectors_report.json").read_text())
    assert report["sae_features"] == "consensus"
    for seed in (0, 1):
        for category in REFUSAL_CATEGORIES:
            kept = report["sae"][f"seed_{seed}"]["per_category"][category]["latents"]
            assert set(kept) <= set(consensus["per_seed"][str(seed)][category])


def test_vectors_without_sae_writes_residual_and_lowrank_only(planted, tmp_path):
    out = tmp_path / "vec_res"
    assert vectors_main(["--acts", str(planted["acts"]), "--layer", str(LAYER), "--out", str(out)]) == 0
    assert (out / "residual" / "index.json").is_file() and (out / "lowrank" / "index.json").is_file()
    assert not list(out.glob("sae_seed*"))


def test_select_errors_exit_2_with_one_line(planted, tmp_path, capsys):
    acts, run = planted["acts"], planted["run"]
    common = ["--out", tmp_path / "o", "--select.n_bootstrap", "0", "--select.C_grid", "1"]
    cases = [
        (["--acts", tmp_path / "missing", "--layer", LAYER, "--space", "residual"], "activation store folder not found"),
        (["--acts", acts, "--layer", 7, "--space", "residual"], "layer 7 is not in the store"),
        (["--acts", acts, "--layer", LAYER], "--space sae needs --sae"),
        (["--acts", acts, "--layer", LAYER, "--sae", write_sae_run(tmp_path / "narrow", (0,), d_in=8)],
         "SAE seed 0 has d_in 8 but the activation store has d_model 16"),
        (["--acts", acts, "--layer", LAYER, "--sae", write_sae_run(tmp_path / "l5", (0,), layer=5)],
         "was trained on layer 5, not layer 2"),
        (["--acts", acts, "--layer", LAYER, "--sae", run, "--seeds", 3], "has seeds [0, 1], not [3]"),
        (["--acts", write_planted_store(tmp_path / "holey", skip=("safety", "calibrate"), n_scale=0.2),
          "--layer", LAYER, "--space", "residual"], "category 'safety' has no rows in the 'calibrate' split"),
    ]
    for argv, message in cases:
        code, err = run_cli(select_main, [*argv, *common], capsys)
        assert code == 2, message
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_vectors_errors_exit_2_with_one_line(planted, selection, tmp_path, capsys):
    acts, run = planted["acts"], planted["run"]
    residual_sel = tmp_path / "res_sel"
    assert select_main(["--space", "residual", "--acts", str(acts), "--layer", str(LAYER), "--out",
                        str(residual_sel), "--select.n_bootstrap", "0", "--select.C_grid", "1", "--select.n_boot_ci", "50"]) == 0
    capsys.readouterr()
    cases = [
        (["--acts", tmp_path / "missing", "--layer", LAYER], "activation store folder not found"),
        (["--acts", acts, "--layer", 9], "layer 9 is not in the store"),
        (["--acts", acts, "--layer", LAYER, "--features", selection], "--features needs --sae"),
        (["--acts", acts, "--layer", LAYER, "--sae", write_sae_run(tmp_path / "narrow", (0,), d_in=8)],
         "d_in 8 but the activation store has d_model 16"),
        (["--acts", acts, "--layer", LAYER, "--sae", run, "--features", residual_sel / "features.json"],
         "no features.json selected on SAE seed 0"),
        (["--acts", acts, "--layer", LAYER, "--sae", run, "--features", tmp_path / "nope.json"],
         "features.json not found"),
        (["--acts", write_planted_store(tmp_path / "holey", skip=("humanizing", "extract"), n_scale=0.2),
          "--layer", LAYER], "category 'humanizing' has no rows in the 'extract' split"),
    ]
    for argv, message in cases:
        code, err = run_cli(vectors_main, [*argv, "--out", tmp_path / "v"], capsys)
        assert code == 2, message
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_features_of_another_layer_are_refused(planted, selection, tmp_path):
    from analysis.stages.vectors import Config, build_vectors, load_seed_features
    from sae.export import load_sae_run

    saes = load_sae_run(planted["run"], LAYER)
    features = load_seed_features(selection, [0, 1])
    features[1] = {**features[1], "meta": {**features[1]["meta"], "layer": 5}}
    with pytest.raises(ValueError, match="selected at layer 5, not layer 2"):
        build_vectors(planted["acts"], LAYER, saes, features, tmp_path / "v", Config())


def test_last_token_rows_of_all_positions_store(tmp_path):
    from activations.store import ActivationStore
    from probes.rows import load_last_token_rows

    writer = ShardWriter(tmp_path / "all", layers=[LAYER], d_model=4, dtype="float32", positions="all",
                         model_info={"id": "planted"}, rows_per_shard=5)
    expected = {}
    with writer:
        for p in range(4):
            positions = np.roll(np.arange(2 + p), 1)  # unsorted: the last position comes first
            x = np.zeros((positions.size, 4), dtype=np.float32)
            x[:, 0], x[:, 1] = p, positions
            split = SPLIT_OF[p]
            writer.add_prompt(f"q{p}", "benign" if p % 2 else "safety", split, positions, positions, {LAYER: x})
            expected[f"q{p}"] = (p, positions.max())
    writer.finish()
    store = ActivationStore(tmp_path / "all")
    rows = load_last_token_rows(store, LAYER, chunk_rows=3)  # chunks cross prompt and shard boundaries
    assert sorted(rows.ids.tolist()) == sorted(expected)
    for pid, x in zip(rows.ids, rows.features):
        assert (x[0], x[1]) == expected[pid]
    assert load_last_token_rows(store, LAYER, splits=("eval",)).ids.tolist() == ["q3"]


def test_rows_without_split_are_refused(tmp_path):
    from activations.store import ActivationStore
    from probes.rows import load_last_token_rows

    writer = ShardWriter(tmp_path / "nosplit", layers=[LAYER], d_model=4, dtype="float32", positions="last",
                         model_info={"id": "planted"})
    with writer:
        writer.add_prompt("a", "benign", "extract", [0], [1], {LAYER: np.ones((1, 4), np.float32)})
        writer.add_prompt("b", "benign", "", [0], [1], {LAYER: np.ones((1, 4), np.float32)})
    writer.finish()
    with pytest.raises(ValueError, match="1 rows of the store .* have no split"):
        load_last_token_rows(ActivationStore(tmp_path / "nosplit"), LAYER)
