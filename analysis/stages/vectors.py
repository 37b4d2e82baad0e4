"""The `vectors` stage: residual CAA, SAE-space and low-rank steering vectors from extract rows.

    refusal-sae vectors --acts runs/acts --layer 9 --out runs/vectors --sae runs/sae \
        --features runs/select --vectors.top_k 32 --vectors.lowrank_rank 2

`build_vectors(store, layer, saes, features, out_dir, cfg)` does the work for the command and the
pipeline (which writes `RUN/vectors/`). From the last-token extract rows at `layer`:

- `OUT/residual/`: per refusal category v(c) = mean(a | c) − mean(a | benign), plus "global" =
  mean of all rows of the refusal categories − mean(a | benign) (pooled, so weighted by row counts);
- `OUT/sae_seed<s>/`: per category and SAE seed, the filtered latent mean difference decoded through
  W_dec (`probes.directions.sae_steering_vectors`), optionally restricted to the features that seed's
  features.json selected for the category — by default only the consensus features the seeds agree
  on (`consensus.json` of the selection, `vectors.features`); a category whose direction is empty
  after filtering is skipped (listed in the report), not an error;
- `OUT/lowrank/`: the low-rank combination of the residual category vectors ("lowrank",
  `probes.lowrank.fit_lowrank_combination`);
- `OUT/vectors_report.json`: norms, cosines and what each filter kept.
Contrast rows are not used (the baseline of every vector is benign).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from activations.io import write_json
from activations.records import BENIGN, REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext
from probes.directions import residual_steering_vectors, sae_latent_direction, sae_steering_vectors
from probes.latents import encode_latents
from probes.lowrank import fit_lowrank_combination
from probes.rows import LabelledRows, category_mean, keep_classes, load_last_token_rows, model_name, open_store, require_rows
from probes.selection import check_features, class_feature_ids, read_features
from probes.vectors import SteeringVector, VectorSet
from sae.model import SparseAutoencoder

NAME = "vectors"
REPORT_NAME = "vectors_report.json"


@dataclass
class Config:
    """Steering vectors (pipeline section `vectors:`, flags `--vectors.*`).

    Args:
        tau: a latent is active in a group when its mean there exceeds tau.
        shared_frequency: also call a latent active when it fires on more than this fraction of
            the group's rows; one active in both benign and the category is "shared" and dropped.
        top_k: keep the k largest latents per SAE-space vector (None or 0 = all).
        fire_threshold: a latent fires on a row when its value exceeds this.
        lowrank_rank: rank of the low-rank combination.
        mixing: how the low-rank combination's weights are fitted.
        mixing_balance: what the mixing weighs: "category" = every refusal category the same total
            weight (a category with many rows does not dominate), "pooled" = every row the same.
        eps: whitening ridge of the low-rank combination.
        categories: refusal categories (default: all five).
        batch_size: rows per SAE encoding batch.
        features: restrict each seed's SAE vector to its consensus features (selected and matched
            across seeds; `select`'s consensus.json) or to every selected feature.
    """

    tau: float = 0.0
    shared_frequency: float | None = 0.25
    top_k: int | None = 32
    fire_threshold: float = 0.0
    lowrank_rank: int = 2
    mixing: Literal["logistic", "lda"] = "logistic"
    mixing_balance: Literal["category", "pooled"] = "category"
    eps: float = 1e-6
    categories: list[str] = field(default_factory=lambda: list(REFUSAL_CATEGORIES))
    batch_size: int = 4096
    features: Literal["consensus", "selected"] = "consensus"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.categories) - set(REFUSAL_CATEGORIES))
        if unknown or not self.categories:
            raise ValueError(f"categories must be refusal categories among {list(REFUSAL_CATEGORIES)}, "
                             f"got {list(self.categories)}")
        if self.top_k == 0:
            self.top_k = None
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or null = all latents), got {self.top_k}")
        if self.lowrank_rank < 1:
            raise ValueError(f"lowrank_rank must be >= 1, got {self.lowrank_rank}")


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Cosine similarity of two vectors in float64 (0.0 if either is zero)."""
    a = np.asarray(a.double() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.double() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def global_refusal_vector(rows: LabelledRows, layer: int, model: str,
                          categories: Sequence[str] = REFUSAL_CATEGORIES) -> SteeringVector:
    """mean(a | any of `categories`) − mean(a | benign) on extract rows, as SteeringVector "global"."""
    vector = category_mean(rows, list(categories)) - category_mean(rows, BENIGN)
    meta = {"model": model, "space": "residual", "method": "mean_difference", "category": "global",
            "categories": list(categories), "baseline": [BENIGN],
            "n_rows": {"category": int(rows.category_mask(list(categories)).sum()),
                       "baseline": int(rows.category_mask(BENIGN).sum())},
            "splits": rows.provenance()}
    return SteeringVector(torch.from_numpy(vector), layer, meta)


def load_seed_features(path: str | Path, seeds: Sequence[int], layer: int | None = None) -> dict[int, dict[str, Any]]:
    """{seed: parsed features.json} for each SAE seed, from a selection folder or one features.json.

    For seed s this reads `<folder>/seed_<s>/features.json`, else the given file when it was selected
    on seed s (latent ids of one seed mean nothing for another seed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"features.json not found: {path}")
    folder = path if path.is_dir() else path.parent
    out = {}
    for seed in seeds:
        for candidate in (folder / f"seed_{seed}" / "features.json", path / "features.json" if path.is_dir() else path):
            if candidate.is_file():
                data = read_features(candidate, layer=layer, space=None)  # the seed match below comes first
                if (data.get("meta") or {}).get("sae_seed") == seed:
                    out[seed] = data
                    break
        else:
            raise FileNotFoundError(f"no features.json selected on SAE seed {seed} at {path} (looked for seed_{seed}/features.json)")
    return out


def with_consensus(features: dict[int, dict[str, Any]], select_dir: str | Path) -> tuple[dict[int, dict[str, Any]], bool]:
    """Each seed's features.json with its class feature ids replaced by the consensus ids of
    `select_dir/consensus.json`; (unchanged, False) when there is none (e.g. one seed)."""
    from analysis.stages.select import read_consensus

    consensus = read_consensus(select_dir)
    if consensus is None:
        return features, False
    out = {}
    for seed, data in features.items():
        if seed not in consensus:
            raise ValueError(f"{select_dir}/consensus.json has no SAE seed {seed}")
        per_class = {c: {**entry, "feature_ids": consensus[seed].get(c, [])} for c, entry in data["per_class"].items()}
        out[seed] = {**data, "per_class": per_class}
    return out, True


def _restriction(features: Mapping[str, Any], seed: int, layer: int, d_sae: int,
                 categories: Sequence[str], model: Mapping[str, Any] | None = None) -> dict[str, list[int]]:
    """Per category, the latent ids features.json selected; checks space, layer, seed, width and model."""
    check_features(features, layer=layer, sae_seed=seed, d_sae=d_sae, model=model, against="the activation store")
    return class_feature_ids(features, categories)


def _sae_vectors(rows: LabelledRows, sae: SparseAutoencoder, seed: int, layer: int, model: str,
                 restrict: dict[str, list[int]] | None, categories: Sequence[str], filters: dict[str, Any],
                 residual: VectorSet, batch_size: int) -> tuple[VectorSet | None, dict[str, Any]]:
    """Decoded SAE-space vectors of one seed (None when every category is empty) and their report."""
    z_rows = rows.with_features(encode_latents(sae, rows.features, batch_size, desc=f"encode seed {seed}"))
    directions = {c: sae_latent_direction(z_rows, c, restrict_to=None if restrict is None else restrict[c], **filters)
                  for c in categories}
    kept = [c for c in categories if directions[c].kept.size > 0]
    report: dict[str, Any] = {"d_sae": sae.d_sae, "restricted": restrict is not None,
                              "skipped": [c for c in categories if c not in kept], "per_category": {}}
    for c, d in directions.items():
        report["per_category"][c] = {"latents": d.kept, "n_removed_inactive": int(d.removed_inactive.size),
                                     "n_removed_shared": int(d.removed_shared.size)}
    if not kept:
        return None, report
    vectors, _ = sae_steering_vectors(z_rows, sae.W_dec, layer, model, kept, restrict, **filters)
    tagged = {c: SteeringVector(v.vector, v.layer, {**v.meta, "sae_seed": seed}) for c, v in vectors.items()}
    for c, v in tagged.items():
        report["per_category"][c].update(norm=v.norm(), cos_residual=cosine(v.vector, residual[c].vector))
    return VectorSet(tagged), report


def build_vectors(
    store: ActivationStore | str | Path,
    layer: int,
    saes: dict[int, SparseAutoencoder] | None,
    features: dict[int, Mapping[str, Any]] | None,
    out_dir: str | Path,
    cfg: Config,
    sae_run: str | None = None,
) -> dict[str, Any]:
    """Build and save every vector set at `layer` -> the report dict (see the module docstring).

    `features` maps an SAE seed to its parsed features.json (`load_seed_features`); None = no restriction.
    """
    categories = list(cfg.categories)
    if features is not None and saes is None:
        raise ValueError("features.json restricts SAE-space vectors: give SAEs too")
    store = open_store(store)
    rows = load_last_token_rows(store, layer, splits=("extract",))
    rows, n_dropped = keep_classes(rows, (BENIGN, *categories), keep_contrast=False)
    require_rows(rows, (BENIGN, *categories), ("extract",), f"activation store {store.directory}, layer {layer}")
    for seed, sae in (saes or {}).items():
        if sae.d_in != store.d_model:
            raise ValueError(f"SAE seed {seed} has d_in {sae.d_in} but the activation store has d_model {store.d_model}")
    model, out, identity = model_name(store), Path(out_dir), store.manifest.get("model")

    residual = residual_steering_vectors(rows, layer, model, categories)
    global_vector = global_refusal_vector(rows, layer, model, categories)
    _tagged({**residual, "global": global_vector}, identity).save(out / "residual")
    lowrank = fit_lowrank_combination(rows, dict(residual), rank=cfg.lowrank_rank, eps=cfg.eps,
                                      refusal_categories=categories, mixing=cfg.mixing, balance=cfg.mixing_balance)
    lowrank_vector = lowrank.to_steering_vector(layer, model)
    _tagged({"lowrank": lowrank_vector}, identity).save(out / "lowrank")

    report: dict[str, Any] = {
        "schema_version": 1, "stage": "vectors", "model": model, "layer": layer, "store": str(store.directory),
        "sae_run": sae_run, "categories": list(categories), "dropped_rows": n_dropped,
        "sae_features": None if features is None else cfg.features,
        "extract": rows.provenance()["extract"],
        "params": {"tau": cfg.tau, "top_k": cfg.top_k, "rank": cfg.lowrank_rank, "shared_frequency": cfg.shared_frequency,
                   "fire_threshold": cfg.fire_threshold, "mixing": cfg.mixing, "mixing_balance": cfg.mixing_balance,
                   "eps": cfg.eps},
        "residual": {c: {"norm": v.norm(), "cos_global": cosine(v.vector, global_vector.vector),
                         "n_rows": v.meta["n_rows"]["category"]} for c, v in residual.items()},
        "global": {"norm": global_vector.norm(), "n_rows": global_vector.meta["n_rows"]},
        "residual_cosines": {a: {b: cosine(residual[a].vector, residual[b].vector) for b in categories} for a in categories},
        "lowrank": {"rank": lowrank.rank, "category_weights": lowrank.category_weights, "norm": lowrank_vector.norm(),
                    "cos_global": cosine(lowrank_vector.vector, global_vector.vector),
                    "singular_values": lowrank.singular_values},
        "sae": {},
    }
    filters = {"tau": cfg.tau, "top_k": cfg.top_k, "shared_frequency": cfg.shared_frequency,
               "fire_threshold": cfg.fire_threshold}
    for seed, sae in (saes or {}).items():
        restrict = None if features is None else _restriction(_seed_entry(features, seed), seed, layer, sae.d_sae,
                                                              categories, identity)
        vectors, seed_report = _sae_vectors(rows, sae, seed, layer, model, restrict, categories, filters, residual,
                                              cfg.batch_size)
        if vectors is not None:
            _tagged(dict(vectors.items()), identity).save(out / f"sae_seed{seed}")
        report["sae"][f"seed_{seed}"] = {**seed_report, "dir": None if vectors is None else str(out / f"sae_seed{seed}")}
    write_json(out / REPORT_NAME, report)
    return report


def _tagged(vectors: Mapping[str, SteeringVector], identity: Mapping[str, Any] | None) -> VectorSet:
    """The vectors with the store's model identity in their meta (checked where they are applied)."""
    return VectorSet({name: SteeringVector(v.vector, v.layer, {**v.meta, "model_identity": identity})
                      for name, v in vectors.items()})


def _seed_entry(features: Mapping[int, Mapping[str, Any]], seed: int) -> Mapping[str, Any]:
    if seed not in features:
        raise ValueError(f"no features.json given for SAE seed {seed} (have seeds {sorted(features)})")
    return features[seed]


# --- command -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae vectors`.

    Args:
        acts: activation store folder (harvest output).
        layer: block index stored in the activation store.
        out: folder for the vector sets.
        sae: SAE training run folder (RUN/seed_<s>/) or one SAE folder: adds SAE-space vectors.
        seeds: SAE seeds to use (default: all).
        features: features.json or selection folder of `refusal-sae select`: restrict each seed's
            SAE vectors to its selected features (seed_<s>/features.json next to it).
        device: device for SAE encoding: auto | cpu | cuda | cuda:N.
    """

    acts: Path
    layer: int
    out: Path
    sae: Path | None = None
    seeds: list[int] | None = None
    features: Path | None = None
    device: str = "auto"


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Open the store, SAEs and features.json files, build the vectors; returns the report."""
    from activations.model_loading import resolve_device
    from sae.export import load_sae_run

    if inputs.features is not None and inputs.sae is None:
        raise ValueError("--features needs --sae (the features are SAE latents)")
    store = open_store(inputs.acts)
    saes = None if inputs.sae is None else load_sae_run(inputs.sae, inputs.layer, store.d_model, inputs.seeds,
                                                         resolve_device(inputs.device), model=store.manifest.get("model"))
    features = None if inputs.features is None else load_seed_features(inputs.features, list(saes or {}), inputs.layer)
    if features is not None and cfg.features == "consensus":
        folder = inputs.features if inputs.features.is_dir() else inputs.features.parent
        features, used = with_consensus(features, folder)
        if not used:
            print(f"note: no consensus.json in {folder}; SAE vectors use every selected feature", file=sys.stderr)
    return build_vectors(store, inputs.layer, saes, features, inputs.out, cfg,
                         sae_run=None if inputs.sae is None else str(inputs.sae))


def format_table(report: dict[str, Any]) -> str:
    """Per category: residual norm, cosine to the global vector, and per SAE seed latents kept / cosine."""
    seeds = list(report["sae"])
    header = f"{'category':<14} {'|v|':>8} {'cos(global)':>11}" + "".join(f"  {s + ' n/cos':>16}" for s in seeds)
    lines = [header]
    for c, info in report["residual"].items():
        line = f"{c:<14} {info['norm']:>8.3f} {info['cos_global']:>11.3f}"
        for s in seeds:
            entry = report["sae"][s]["per_category"][c]
            cell = f"{len(entry['latents'])}/{entry['cos_residual']:.3f}" if "cos_residual" in entry else "skipped"
            line += f"  {cell:>16}"
        lines.append(line)
    low = report["lowrank"]
    lines.append(f"{'global':<14} {report['global']['norm']:>8.3f} {1.0:>11.3f}")
    lines.append(f"{'lowrank':<14} {low['norm']:>8.3f} {low['cos_global']:>11.3f}  (rank {low['rank']})")
    return "\n".join(lines)


def show(inputs: Inputs, report: dict[str, Any]) -> None:
    print(f"layer {report['layer']} steering vectors (model {report['model']})")
    print(format_table(report))
    print(f"wrote {inputs.out}/residual, {inputs.out}/lowrank" + "".join(
        f", {info['dir']}" for info in report["sae"].values() if info["dir"]) + f" and {Path(inputs.out) / REPORT_NAME}")


COMMAND = Command(
    name=NAME, help="residual / SAE / low-rank steering vectors", inputs=Inputs, run=command, show=show,
    config=Config, section=NAME, renamed={"rank": ["--vectors.lowrank_rank"]},
)


# --- pipeline ------------------------------------------------------------------------------------

def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Residual CAA, SAE-space (L1-restricted, per seed) and low-rank vectors at the primary layer."""
    from analysis.stages.harvest import store_dir
    from analysis.stages.select import selection_dir
    from analysis.stages.train import run_saes

    models = run_saes(ctx)
    features = load_seed_features(selection_dir(ctx, "sae"), list(models), ctx.layer)
    if cfg.features == "consensus":
        features, _ = with_consensus(features, selection_dir(ctx, "sae"))
    report = build_vectors(ActivationStore(store_dir(ctx, "last")), ctx.layer, models, features, ctx.stage_dir(NAME),
                           cfg, sae_run=str(ctx.stage_dir("train")))
    return {"global_norm": report["global"]["norm"], "lowrank": report["lowrank"]["cos_global"],
            "sae_seeds": sorted(report["sae"])}


def vector_set(ctx: RunContext, which: str) -> VectorSet:
    """One of this run's vector sets at the primary layer: "residual", "lowrank" or "sae_seed<s>"."""
    return VectorSet.load(ctx.stage_dir(NAME) / which, expected_layer=ctx.layer)


STAGE = PipelineStage(NAME, run, section=NAME, after=("select",))
