"""Ablation matrices with controls: a planted refusal feature on a tiny model, frequency-matched
controls, the across-seed average and its CI."""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.records import (
    CATEGORIES,
    PROBE_CLASSES,
    REFUSAL_CATEGORIES,
    PromptRecord,
)
from activations.stats import control_difference, seed_average
from analysis.evaluation.ablation_matrix import (
    effect_matrix,
    matched_controls,
    random_directions,
    run_feature_ablations,
    seed_averaged_matrix,
    target_masks,
)
from analysis.evaluation.refusal import RefusalResult, evaluate_refusal
from analysis.interventions.ablation import ablate_features
from probes.refusal_tokens import RefusalTokenSpec

SPEC = RefusalTokenSpec({"benign": "Sure", "humanizing": "A", "incomplete": "B", "indeterminate": "C",
                         "safety": "Sorry", "unsupported": "D"})
PER_CATEGORY = 8


class DualSAE(torch.nn.Module):
    """A ReLU SAE whose encoder is the pseudo-inverse of its decoder: a latent reads back exactly the
    coefficient of its decoder row, so zeroing it removes exactly what was planted along that row."""

    def __init__(self, decoder: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("W_dec", decoder)
        self.register_buffer("W_enc", torch.linalg.pinv(decoder))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec


@pytest.fixture(scope="module")
def planted(tiny_llama):
    """The tiny Llama with a planted refusal feature per class at its last block: feature j's decoder
    row moves only the class-j token's logit (through the final norm's weight), every row carries
    the `benign` feature at a medium strength and a row of category c carries c's feature strongly,
    so c's feature alone makes the model refuse c's prompts."""
    model, tokenizer = tiny_llama
    adapter = ModelAdapter(model)
    layer = adapter.num_layers - 1
    ids = SPEC.token_ids(tokenizer)
    gain = adapter.final_norm.weight.detach().float()
    readout = model.get_output_embeddings().weight.detach().float()[ids] * gain  # (6, d)
    planted_rows = torch.linalg.pinv(readout).t()  # (6, d): readout @ row_j = e_j
    rest = torch.randn(32 - len(ids), adapter.d_model, generator=torch.Generator().manual_seed(3))
    sae = DualSAE(torch.cat([planted_rows, rest / rest.norm(dim=1, keepdim=True)]))
    feature = {c: i for i, c in enumerate(PROBE_CLASSES)}
    records = [PromptRecord(f"{c}{i}", f"Question {i} about {c} things?", c)
               for c in PROBE_CLASSES for i in range(PER_CATEGORY)]
    strength = {"benign": 40.0, "planted": 80.0}

    def plant(rows: np.ndarray):
        pushes = torch.stack([strength["benign"] * sae.W_dec[feature["benign"]]
                              + (0 if records[i].category == "benign" else strength["planted"])
                              * sae.W_dec[feature[records[i].category]] for i in rows])
        return residual_hooks(adapter, {layer: lambda h: h + pushes[:, None, :].to(h.dtype)})

    def run(make_context, _desc=""):
        def both(rows):
            stack = ExitStack()
            stack.enter_context(plant(rows))
            if make_context is not None:
                stack.enter_context(make_context(rows))
            return stack
        return evaluate_refusal(model, tokenizer, records, spec=SPEC, make_context=both, batch_size=16)

    def make(feature_ids):
        return lambda _rows: ablate_features(adapter, layer, sae, feature_ids)

    log_density = np.full(32, -1.0)
    log_density[: len(ids)] = -0.8  # the planted features fire on their category's rows
    return {"run": run, "make": make, "records": records, "feature": feature, "log_density": log_density}


def test_planted_feature_beats_its_control_and_the_diagonal_is_largest(planted):
    run, feature = planted["run"], planted["feature"]
    baseline = run(None)
    assert all(r.refused == (r.category != "benign") for r in baseline)  # the plant decides every row
    selected = {c: [feature[c]] for c in REFUSAL_CATEGORIES}
    conditions, controls, drawn = run_feature_ablations(run, planted["make"], selected, planted["log_density"],
                                                        n_draws=5, exclude=list(feature.values()))
    assert all(len(d) == 5 and all(set(ids).isdisjoint(feature.values()) for ids in d) for d in drawn.values())
    matrix = effect_matrix(planted["records"], baseline, conditions, controls, expect="decrease")
    for c in REFUSAL_CATEGORIES:
        row = matrix[c]
        assert row[c]["effect"]["estimate"] == pytest.approx(-1.0)  # c's prompts are answered without c's feature
        assert row[c]["p_value"] < 0.01
        assert row[c]["control"]["effect_spread"] == [0.0, 0.0]  # random features of the same frequency: nothing
        assert row[c]["beats_control"] and row[c]["vs_control"]["ci"][1] < 0
        off = [abs(row[t]["effect"]["estimate"]) for t in REFUSAL_CATEGORIES if t != c]
        assert abs(row[c]["effect"]["estimate"]) > max(off)  # the diagonal is the largest entry
        assert not row["benign"]["beats_control"]


def test_averaged_cells_over_seeds_of_the_same_matrix(planted):
    run, feature = planted["run"], planted["feature"]
    baseline = run(None)
    selected = {"safety": [feature["safety"]], "humanizing": [feature["humanizing"]]}
    per_seed, per_seed_controls = {}, {}
    for seed in (0, 1):
        per_seed[seed], per_seed_controls[seed], _ = run_feature_ablations(
            run, planted["make"], selected, planted["log_density"], n_draws=2, exclude=list(feature.values()), seed=seed)
    averaged = seed_averaged_matrix(planted["records"], baseline, per_seed, per_seed_controls)
    cell = averaged["safety"]["safety"]
    assert cell["effect"]["mean"] == pytest.approx(-1.0) and cell["effect"]["per_seed"] == [-1.0, -1.0]
    assert cell["beats_control"] and cell["seeds"] == ["0", "1"] and len(cell["p_values"]) == 2
    assert averaged["safety"]["humanizing"]["effect"]["mean"] == 0.0


def test_seed_averaged_ci_contains_every_per_seed_mean():
    rng = np.random.default_rng(0)
    n = 60
    # three seeds whose effects differ a lot (0.1, 0.3, 0.5 of the prompts flip), on the same prompts
    values = np.stack([(rng.random(n) < p).astype(float) for p in (0.1, 0.3, 0.5)])
    avg = seed_average(values)
    lo, hi = avg["ci"]
    assert avg["mean"] == pytest.approx(values.mean(axis=1).mean())
    assert all(lo <= m <= hi for m in avg["per_seed"])
    # one seed: only prompt variance (a normal interval around that seed's mean)
    one = seed_average(values[:1])
    assert one["ci"][0] < one["mean"] < one["ci"][1] and one["n_seeds"] == 1
    # identical seeds: the interval is the prompt-level one
    same = seed_average(np.stack([values[1]] * 3))
    assert same["per_seed"] == [same["mean"]] * 3 and same["ci"][1] - same["ci"][0] > 0
    with pytest.raises(ValueError):
        seed_average(np.zeros(4))


def test_control_difference_and_matched_draws():
    sel = np.zeros(40)
    ctl = np.ones((5, 40))
    out = control_difference(sel, ctl)
    assert out["estimate"] == -1.0 and out["ci"] == [-1.0, -1.0] and out["n_draws"] == 5
    density = np.linspace(-4, -0.5, 64)
    density[10] = -10.0  # dead: never drawn
    draws = matched_controls([20, 40], density, n_draws=6, exclude=[21], seed=1, pool=4)
    for d in draws:
        assert len(d) == 2 and not {20, 40, 21, 10} & set(d)
        assert max(abs(density[f] - density[s]) for f, s in zip(d, [20, 40])) < 0.5  # matched in frequency
    assert draws == matched_controls([20, 40], density, n_draws=6, exclude=[21], seed=1, pool=4)
    dirs = random_directions(np.ones(16) * 2.0, 3)
    assert np.allclose(np.linalg.norm(dirs, axis=1), 8.0, atol=1e-5)


def test_target_masks_columns():
    records = [PromptRecord("a", "x", "benign"), PromptRecord("b", "y", "safety"), PromptRecord("c", "z", "contrast")]
    masks = target_masks(records)
    assert list(masks) == [c for c in CATEGORIES if c in ("benign", "contrast", "safety")] + [
        "over_refusal", "harmful_refusal"]
    assert masks["over_refusal"].tolist() == [True, False, True]
    results = [RefusalResult(r.id, r.category, "", False, "token") for r in records]
    assert effect_matrix(records, results, {"safety": results})["safety"]["safety"]["effect"]["estimate"] == 0.0


def test_position_mask_edits_only_its_positions():
    from analysis.interventions.core import edit_rows

    hidden = torch.randn(3, 5, 4)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[2, 4] = True
    out = edit_rows(hidden, lambda shape: mask, None, lambda x, _rows: x + 1.0)
    assert torch.equal(out[mask], hidden[mask] + 1.0) and torch.equal(out[~mask], hidden[~mask])
    active = torch.tensor([True, False, False])  # row 2 is inactive: its masked position stays
    out = edit_rows(hidden, lambda shape: mask, active, lambda x, _rows: x + 1.0)
    assert torch.equal(out[2], hidden[2]) and torch.equal(out[0, 1:3], hidden[0, 1:3] + 1.0)
    with pytest.raises(ValueError, match="position mask"):
        edit_rows(hidden, lambda shape: torch.ones(3, 4, dtype=torch.bool), None, lambda x, _rows: x)


def test_ablate_config_refuses_bad_values():
    from analysis.stages.ablate import Config

    assert Config().positions == "all" and Config().control_draws == 5
    for bad in ({"control_draws": 1}, {"positions": "middle"}, {"direction_draws": -1}, {"n_resamples": 10}):
        with pytest.raises(ValueError):
            Config(**bad)


def test_content_positions_of_the_stage_match_the_prompt_kinds(tiny_llama):
    from activations.positions import CONTENT, position_kinds
    from activations.tokenize import encode_prompts
    from analysis.evaluation.conditions import EvalSetup
    from analysis.stages.ablate import Config, _position_fn

    model, tokenizer = tiny_llama
    records = [PromptRecord("a", "Hi there", "benign"), PromptRecord("b", "How do tides work in detail?", "safety")]
    setup = EvalSetup(model, tokenizer, SPEC, 1, max_length=64)
    rows = np.array([0, 1])
    batch = encode_prompts(tokenizer, [r.text for r in records], True, 64)
    mask = _position_fn(Config(positions="content"), setup, records, True)(rows)(tuple(batch["input_ids"].shape))
    kinds = position_kinds(tokenizer, [r.text for r in records], True, 64)
    for i, k in enumerate(kinds):
        row = mask[i, mask.shape[1] - len(k):]
        assert row.tolist() == (k == CONTENT).tolist() and not mask[i, : mask.shape[1] - len(k)].any()
    assert _position_fn(Config(positions="response_start"), setup, records, True)(rows) == "generated"
