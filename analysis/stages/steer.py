"""`refusal-sae steer`: refusal under steering (± each strength) and SAE-feature ablation, vs the baseline.

Example::

    refusal-sae steer --model runs/pipe/refusal_model/model --vectors runs/vectors/residual \
        --vector global --layer 9 --prompts builtin:quickstart --split eval --steer.alphas 2 4 8 \
        --ablate_sae runs/sae --features runs/select/seed_0/features.json --out runs/steer.json

Refusal is the model's refusal-token decision on its first response token (spec from
`MODEL/refusal_tokens.json`, or `--tokens`). Conditions: `baseline`; `steer+A` and `steer-A` for each
A of `--steer.alphas` (adding ±A · v at `--layer` on every position, or `--steer.positions generated`);
`ablate` (the refusal categories' selected SAE features zeroed, reconstruction error kept) with
`--ablate_sae`. The JSON holds, per condition, the refusal rate per category plus `over_refusal`
(benign + contrast) and `harmful_refusal` (the five refusal categories), each `{rate, ci, n}`
(Wilson 95%), the paired exact McNemar test against the baseline, and every prompt's decision.

A finished pipeline run on new prompts, without refitting anything::

    refusal-sae steer --run checkpoints/quickstart --prompts xstest:../shared/data/xstest/xstest_prompts.csv \
        --split all --out xstest.json

`--run RUN` takes the run's target model, refusal tokens, primary layer, steering vectors, tuned gates
and SAE (and its `evaluate:` strength, sweep, positions and batch size unless `--steer.*` says
otherwise; its model dtype, max_length and chat template always) and runs every condition of the
run's evaluate stage on the prompts (`analysis.evaluation.set_evaluation`). `--split all` takes every
prompt of the sources (a held-out benchmark), a split name that split of them. Either way, prompts
whose text matches one the run fitted or tuned on (its extract / calibrate split) are removed and
counted. On the run's own prompts with `--split eval` the baseline reproduces the run's exactly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from analysis.stages.command import Command
from analysis.stages.common import TargetInputs, rate_text

NAME = "steer"


@dataclass
class Config:
    """Steering evaluation (flags `--steer.*`).

    Args:
        alphas: steering strengths; each is run as +A and -A. None = 2 4 8, or with --run the run's
            evaluate.alphas (its sweep).
        positions: steer every position, or only the last prompt / generated positions. None = all,
            or with --run the run's evaluate.positions.
        batch_size: prompts per forward. None = 16, or with --run the run's evaluate.batch_size.
    """

    alphas: list[float] | None = None
    positions: Literal["all", "generated"] | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.alphas is not None and not self.alphas:
            raise ValueError("alphas needs at least one steering strength")
        if self.alphas is not None and not all(np.isfinite(self.alphas)):
            raise ValueError(f"alphas must be finite, got {list(self.alphas)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


STANDALONE = {"alphas": [2.0, 4.0, 8.0], "positions": "all", "batch_size": 16}
"""What a None field of Config means without --run."""


@dataclass(kw_only=True)
class Inputs(TargetInputs):
    """Files of `refusal-sae steer`.

    Args:
        model: refusal-token model folder (or a hub id with --tokens); not with --run.
        split: split of the prompt set used; "all" = every prompt (a held-out benchmark).
        run: a finished pipeline run folder: evaluate its conditions on --prompts (see the module
            docstring); then --model, --tokens, --vectors, --vector, --layer, --ablate_sae and
            --features are not given.
        vectors: vector-set folder (e.g. VECTORS/residual).
        vector: name of the vector in the set (e.g. global, safety).
        layer: block whose output is steered.
        ablate_sae: SAE training run folder (then the seed the features were selected on) or one
            seed's folder (RUN/seed_<s>): adds the ablation condition.
        features: features.json of `refusal-sae select` (a selection folder means its reference
            features.json, seed_<s>/features.json one seed's): the latents to ablate.
        out: output JSON.
    """

    model: str | None = None
    split: Literal["extract", "calibrate", "eval", "all"] = "eval"
    run: Path | None = None
    vectors: Path | None = None
    vector: str | None = None
    layer: int | None = None
    ablate_sae: Path | None = None
    features: Path | None = None
    out: Path = Path("results.json")


def signed_strengths(alphas: list[float]) -> list[float]:
    """+A then -A for each distinct |A|, smallest first; 0 appears once."""
    out: list[float] = []
    for a in sorted({abs(float(a)) for a in alphas}):
        out += [a] if a == 0 else [a, -a]
    return out


def condition_name(alpha: float) -> str:
    return f"steer{'-' if alpha < 0 else '+'}{abs(alpha):g}"


def load_vector(directory: Path, name: str, layer: int, d_model: int, model: dict[str, Any] | None = None) -> Any:
    """The named `SteeringVector` of a vector set, checked against the layer, the model's d_model and
    (given its identity record `model`) the model whose activations it was made from."""
    from activations.model_identity import check_same_model
    from probes.vectors import VectorSet

    if not directory.is_dir():
        raise FileNotFoundError(f"vector-set folder not found: {directory}")
    vectors = VectorSet.load(directory)
    if name not in vectors:
        raise ValueError(f"no steering vector named {name!r} in {directory}; available: {', '.join(vectors)}")
    vector = vectors[name]
    if vector.layer != layer:
        raise ValueError(f"steering vector {name!r} of {directory} is for layer {vector.layer}, not layer {layer}")
    if vector.d_model != d_model:
        raise ValueError(f"steering vector {name!r} has d_model {vector.d_model} but the model's is {d_model}")
    check_same_model(vector.meta.get("model_identity"), f"steering vector {name!r} of {directory}", model, "the model")
    return vector


def ablated_feature_ids(features: Path, layer: int, d_sae: int, sae_seed: int,
                        model: dict[str, Any] | None = None) -> list[int]:
    """Sorted union of the refusal categories' selected latents in `features` (checked: layer, seed,
    width, model)."""
    from probes.selection import read_features, refusal_feature_ids

    data = read_features(features, layer=layer, sae_seed=sae_seed, d_sae=d_sae, model=model)
    ids = refusal_feature_ids(data)
    if ids[0] < 0 or ids[-1] >= d_sae:
        bad = ids[-1] if ids[-1] >= d_sae else ids[0]
        raise ValueError(f"{data['path']} selects feature {bad}, outside the SAE's 0..{d_sae - 1}")
    return ids


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Load model, vector, prompts (and SAE); evaluate every condition; write and return the results."""
    from activations.adapter import ModelAdapter
    from activations.io import write_json
    from activations.model_identity import model_identity
    from analysis.evaluation.conditions import EvalSetup, Plan, refusal_table
    from analysis.evaluation.refusal import compare_conditions, evaluate_refusal
    from analysis.interventions.ablation import ablate_features
    from analysis.stages.common import features_seed, load_records, load_seed_sae, load_target

    if inputs.run is not None:
        from analysis.stages.steer_run import evaluate_run

        return evaluate_run(cfg, inputs)
    missing = [f"--{name}" for name in ("model", "vectors", "vector", "layer") if getattr(inputs, name) is None]
    if missing:
        raise ValueError(f"steer needs {', '.join(missing)} (or --run RUN to evaluate a finished run)")
    if inputs.split == "all":
        raise ValueError("--split all is for held-out prompts against a finished run (--run RUN)")
    cfg = Config(**{k: STANDALONE[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in STANDALONE})
    if (inputs.ablate_sae is None) != (inputs.features is None):
        raise ValueError("--ablate_sae and --features go together (the SAE and the features selected on it)")
    records = load_records(inputs.prompts, inputs.split, inputs.seed)
    model, tokenizer, spec = load_target(inputs.model, inputs.tokens, inputs.device, inputs.resolved_dtype)
    adapter = ModelAdapter(model)
    adapter.check_layer(inputs.layer)
    identity = model_identity(model, inputs.model)
    vector = load_vector(inputs.vectors, inputs.vector, inputs.layer, adapter.d_model, identity)
    setup = EvalSetup(model, tokenizer, spec, inputs.layer, cfg.positions, cfg.batch_size, inputs.max_length)
    ablated: list[int] = []
    if inputs.ablate_sae is not None:
        from sae.export import CFG_NAME

        is_run = not (Path(inputs.ablate_sae) / CFG_NAME).is_file()  # a run: take the features' seed from it
        sae, sae_seed = load_seed_sae(inputs.ablate_sae, inputs.layer, adapter.d_model, str(adapter.device), identity,
                                      seed=features_seed(inputs.features) if is_run else None)
        ablated = ablated_feature_ids(inputs.features, inputs.layer, sae.d_sae, sae_seed, identity)

    n = len(records)
    conditions = [{"name": "baseline", "kind": "baseline", "alpha": 0.0}]
    conditions += [{"name": condition_name(a), "kind": "steer", "alpha": a} for a in signed_strengths(cfg.alphas)]
    if ablated:
        conditions.append({"name": "ablate", "kind": "ablate", "alpha": None, "n_features": len(ablated)})

    def zeroed(_rows: np.ndarray) -> Any:  # every batch: the selected features set to 0
        return ablate_features(adapter, inputs.layer, sae, ablated, positions=cfg.positions)

    results = {}
    for cond in conditions:
        if cond["kind"] == "baseline":
            context = None
        elif cond["kind"] == "steer":
            context = Plan.uniform(vector.vector.numpy(), cond["alpha"], n).context(setup)
        else:
            context = zeroed
        results[cond["name"]] = evaluate_refusal(
            model, tokenizer, records, spec=spec, make_context=context, batch_size=cfg.batch_size,
            chat_template=inputs.chat_template, max_length=inputs.max_length, progress=True,
            desc=f"condition {cond['name']}")

    payload = {
        "schema_version": 1, "command": "steer", "model": inputs.model, "layer": inputs.layer,
        "vector": {"dir": str(inputs.vectors), "name": inputs.vector, "norm": vector.norm(),
                   "category": vector.meta.get("category"), "method": vector.meta.get("method")},
        "prompts": list(inputs.prompts), "split": inputs.split, "seed": inputs.seed, "n": n,
        "positions": cfg.positions, "tokens": spec.tokens, "measure": "refusal-token decision (first response token)",
        "conditions": conditions,
        "ablate": None if not ablated else {"sae": str(inputs.ablate_sae), "features": str(inputs.features),
                                            "feature_ids": ablated},
        "refusal": {name: refusal_table(found) for name, found in results.items()},
        "paired_vs_baseline": {name: compare_conditions(results["baseline"], found)
                               for name, found in results.items() if name != "baseline"},
        "rows": {name: [{k: v for k, v in r.to_dict().items() if k not in ("text", "votes", "method")}
                        for r in found] for name, found in results.items()},
    }
    write_json(inputs.out, payload, nonfinite="null")
    return payload


def format_table(payload: dict[str, Any]) -> str:
    """One line per condition: over-refusal and harmful refusal with CIs and McNemar p, then each category."""
    categories = [c for c in next(iter(payload["refusal"].values())) if c not in ("over_refusal", "harmful_refusal")]
    head = f"{'condition':<12} {'over_refusal [95% CI]':<22} {'p':>6}  {'harmful [95% CI]':<22} {'p':>6}"
    lines = [head + "".join(f" {c[:12]:>12}" for c in categories)]
    for name, table in payload["refusal"].items():
        paired = payload["paired_vs_baseline"].get(name, {})
        p_over = paired.get("over_refusal", {}).get("all", {}).get("p_value")
        p_harm = paired.get("harmful_refusal", {}).get("all", {}).get("p_value")
        line = (f"{name:<12} {rate_text(table['over_refusal']):<22} {_p(p_over):>6}  "
                f"{rate_text(table['harmful_refusal']):<22} {_p(p_harm):>6}")
        line += "".join(f" {_rate(table[c]):>12}" for c in categories)
        lines.append(line)
    ns = ", ".join(f"{c}={payload['refusal']['baseline'][c]['n']}" for c in categories)
    lines.append(f"n: {ns}; p = exact McNemar vs baseline")
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _rate(entry: dict[str, Any]) -> str:
    return "—" if entry.get("rate") is None else f"{entry['rate']:.2f}"


def show(inputs: Inputs, payload: dict[str, Any]) -> None:
    if inputs.run is not None:
        from analysis.stages.steer_run import show_run

        return show_run(inputs, payload, format_table(payload))
    print(f"refusal at layer {payload['layer']}, vector {payload['vector']['name']!r} "
          f"(|v| = {payload['vector']['norm']:.3f}), {payload['split']} split, {payload['n']} prompts")
    print(format_table(payload))
    print(f"wrote {inputs.out}")


COMMAND = Command(
    name=NAME, help="evaluate steering, gating and ablation conditions", inputs=Inputs, run=command, show=show,
    config=Config, section=NAME, renamed={"alpha": ["--steer.alphas"], "dtype": ["--model_dtype"]},
)
