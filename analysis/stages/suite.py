"""A finished (or finishing) run's conditions as a `ConditionSuite`: its target model, steering vectors,
tuned gates and the SAE features to ablate, read from the run folder. The evaluate stage builds it
once per run; `refusal-sae steer --run RUN` builds it from a finished run to test new prompts
without refitting anything. `seed_conditions` reads every SAE seed's own SAE-dependent conditions
(probe gate, pooled SAE-space vector, ablation set) for the evaluate stage's per-seed runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.evaluation.seed_conditions import SeedConditions, pooled_sae_vector, warn_missing
from analysis.evaluation.suite import ConditionSuite
from analysis.interventions.ablation import ablate_features
from analysis.stages.context import RunContext
from analysis.stages.gates import eval_setup, external_gate, gate_path, residual_vectors
from analysis.stages.select import selection_dir
from analysis.stages.train import run_saes
from analysis.stages.vectors import NAME as VECTORS
from analysis.stages.vectors import vector_set
from probes.gates import DistanceGate, load_gate
from probes.latents import encode_latents
from probes.model_gates import TokenGate
from probes.selection import read_features, refusal_feature_ids


@dataclass
class RunSuite:
    """The suite plus what the evaluate stage reports beside it: every SAE seed (reference first),
    the reference seed, the tuned distance gate (for its score distributions), and per seed its pooled
    SAE-space vector (None when the seed has none) with its comparison to v_global (`pooled_sae_vector`
    info, or `{"skipped": why}`)."""

    suite: ConditionSuite
    saes: dict[int, Any]
    reference_seed: int
    distance: DistanceGate
    sae_vectors: dict[int, tuple[np.ndarray | None, dict[str, Any]]] = field(default_factory=dict)


def selected_union(ctx: RunContext, seed: int) -> list[int]:
    """The features selected for any refusal category on SAE seed `seed` (the ablation set)."""
    return refusal_feature_ids(read_features(selection_dir(ctx, "sae") / f"seed_{seed}", layer=ctx.layer, sae_seed=seed))


def sae_steering_vector(ctx: RunContext, seed: int, v_global: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Seed `seed`'s pooled SAE-space vector at `evaluate.sae_vector_norm` (`pooled_sae_vector`) and its
    info, or `(None, {"skipped": why})` when the vectors stage kept no category for the seed."""
    folder = ctx.stage_dir(VECTORS) / f"sae_seed{seed}"
    if not folder.is_dir():
        return None, {"skipped": f"the vectors stage wrote no SAE-space vector for seed {seed} (every category "
                                 "was empty after filtering; see vectors/vectors_report.json)"}
    vectors = vector_set(ctx, f"sae_seed{seed}")
    vector, info = pooled_sae_vector(dict(vectors.items()), v_global, ctx.cfg.evaluate.sae_vector_norm)
    return vector, info


def build_suite(ctx: RunContext) -> RunSuite:
    """Conditions of the run at `evaluate.alpha` (module docstring of `analysis.evaluation.suite`):
    residual global and category vectors, the low-rank vector, the reference SAE seed's pooled
    SAE-space vector (`steer_sae`), the distance / probe / token gates (and the external one when
    configured), ablation of the reference SAE seed's selected features."""
    cfg = ctx.cfg.evaluate
    setup = eval_setup(ctx)
    saes = run_saes(ctx)
    reference_seed = next(iter(saes))
    sae = saes[reference_seed]
    distance = load_gate(gate_path(ctx, "distance"))
    probe = load_gate(gate_path(ctx, "probe"))
    token = TokenGate(setup.spec, alpha_toward=cfg.alpha)
    gates = {
        "conditional_distance": lambda inputs: distance.decide(inputs.features),
        "conditional_probe": lambda inputs: probe.decide(encode_latents(sae, inputs.features)),
        "conditional_token": lambda inputs: token.decide_logits(inputs.logits),
    }
    external = external_gate(ctx.cfg.gates, cfg.alpha, ctx.device, cfg.batch_size, ctx.cfg.max_length)
    if external is not None:  # reads the prompt text only, never the label
        gates["conditional_external"] = lambda inputs: external.decide_texts(inputs.texts)
    ids = selected_union(ctx, reference_seed)
    adapter = setup.adapter

    def ablation(_rows: Any) -> Any:
        return ablate_features(adapter, ctx.layer, sae, ids)

    vectors = residual_vectors(ctx)
    sae_vectors = {seed: sae_steering_vector(ctx, seed, vectors["global"]) for seed in saes}
    steering = {} if sae_vectors[reference_seed][0] is None else {"steer_sae": sae_vectors[reference_seed][0]}
    suite = ConditionSuite(setup, cfg.alpha, vectors, vector_set(ctx, "lowrank")["lowrank"].vector.numpy(),
                           gates, {"ablate": ablation}, ctx.cfg.chat_template,
                           labels={"ablate": f"ablate (seed {reference_seed}, {len(ids)} features)",
                                   "steer_sae": f"steer_sae (seed {reference_seed})"}, steering=steering)
    return RunSuite(suite, saes, reference_seed, distance, sae_vectors)


def seed_conditions(ctx: RunContext, built: RunSuite) -> dict[int, SeedConditions]:
    """Every SAE seed's own probe gate (`gates/probe_seed_<s>.json`), pooled SAE-space vector (read once,
    by `build_suite`) and selected features to ablate; a seed without an SAE-space vector is said loudly
    and has none."""
    setup = built.suite.setup
    adapter = setup.adapter
    out, missing = {}, {}
    for seed, sae in built.saes.items():
        path = gate_path(ctx, "probe", seed)
        if not path.is_file():
            raise FileNotFoundError(f"no probe gate for SAE seed {seed} ({path}); re-run the gates stage")
        probe = load_gate(path)
        ids = selected_union(ctx, seed)
        vector, info = built.sae_vectors[seed]
        if vector is None:
            missing[seed] = info["skipped"]

        def gate(inputs: Any, probe: Any = probe, sae: Any = sae) -> list:
            return probe.decide(encode_latents(sae, inputs.features))

        def ablation(_rows: Any, sae: Any = sae, ids: list[int] = ids) -> Any:
            return ablate_features(adapter, ctx.layer, sae, ids)

        out[seed] = SeedConditions(gate, vector, ablation, len(ids))
    warn_missing("steer_sae", missing)
    return out
