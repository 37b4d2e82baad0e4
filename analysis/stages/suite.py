"""A finished (or finishing) run's conditions as a `ConditionSuite`: its target model, steering vectors,
tuned gates and the SAE features to ablate, read from the run folder. The evaluate stage builds it
once per run; `refusal-sae steer --run RUN` builds it from a finished run to test new prompts
without refitting anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.evaluation.suite import ConditionSuite
from analysis.interventions.ablation import ablate_features
from analysis.stages.context import RunContext
from analysis.stages.gates import eval_setup, external_gate, gate_path, residual_vectors
from analysis.stages.select import selection_dir
from analysis.stages.train import run_saes
from analysis.stages.vectors import vector_set
from probes.gates import DistanceGate, load_gate
from probes.latents import encode_latents
from probes.model_gates import TokenGate
from probes.selection import read_features, refusal_feature_ids


@dataclass
class RunSuite:
    """The suite plus what the evaluate stage reports beside it: every SAE seed (reference first),
    the reference seed, and the tuned distance gate (for its score distributions)."""

    suite: ConditionSuite
    saes: dict[int, Any]
    reference_seed: int
    distance: DistanceGate


def selected_union(ctx: RunContext, seed: int) -> list[int]:
    """The features selected for any refusal category on SAE seed `seed` (the ablation set)."""
    return refusal_feature_ids(read_features(selection_dir(ctx, "sae") / f"seed_{seed}", layer=ctx.layer, sae_seed=seed))


def build_suite(ctx: RunContext) -> RunSuite:
    """Conditions of the run at `evaluate.alpha` (module docstring of `analysis.evaluation.suite`):
    residual global and category vectors, the low-rank vector, the distance / probe / token gates
    (and the external one when configured), ablation of the reference SAE seed's selected features."""
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

    suite = ConditionSuite(setup, cfg.alpha, residual_vectors(ctx), vector_set(ctx, "lowrank")["lowrank"].vector.numpy(),
                           gates, {"ablate": ablation}, ctx.cfg.chat_template,
                           labels={"ablate": f"ablate (seed {reference_seed}, {len(ids)} features)"})
    return RunSuite(suite, saes, reference_seed, distance)
