"""The `vectors` stage: residual CAA, SAE-space and low-rank steering vectors from extract rows.

`build_vectors(store, layer, saes, features, out_dir, ...)` is the whole stage without argparse (the
pipeline calls it directly; `probes.cli_vectors` wraps it). From the last-token extract rows at `layer`:

- `OUT/residual/`: per refusal category v(c) = mean(a | c) − mean(a | benign), plus "global" =
  mean of all rows of the refusal categories − mean(a | benign) (pooled, so weighted by row counts);
- `OUT/sae_seed<s>/`: per category and SAE seed, the filtered latent mean difference decoded through
  W_dec (`probes.directions.sae_steering_vectors`), optionally restricted to the features that seed's
  features.json selected for the category; a category whose direction is empty after filtering is
  skipped (listed in the report), not an error;
- `OUT/lowrank/`: the low-rank combination of the residual category vectors ("lowrank",
  `probes.lowrank.fit_lowrank_combination`);
- `OUT/vectors_report.json`: norms, cosines and what each filter kept.
Contrast rows are not used (the baseline of every vector is benign).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from activations.records import BENIGN, REFUSAL_CATEGORIES
from activations.store import ActivationStore
from probes.directions import residual_steering_vectors, sae_latent_direction, sae_steering_vectors
from probes.lowrank import fit_lowrank_combination
from probes.protocol import LabelledRows, category_mean
from probes.stage_data import (
    check_sae_width, encode_latents, keep_classes, load_last_token_rows, model_name, open_store, require_rows,
)
from probes.storage import read_json, write_json
from probes.vectors import SteeringVector, VectorSet
from sae.model import SparseAutoencoder

REPORT_NAME = "vectors_report.json"


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


def _features_candidates(path: Path, seed: int) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    own = folder / "features.json" if path.is_dir() else path
    return [folder / f"seed_{seed}" / "features.json", own]


def load_seed_features(path: str | Path, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """{seed: parsed features.json} for each SAE seed, from a selection folder or one features.json.

    For seed s this reads `<folder>/seed_<s>/features.json`, else the given file when its
    `meta.sae_seed` is s (latent ids of one seed mean nothing for another seed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"features.json not found: {path}")
    out = {}
    for seed in seeds:
        for candidate in _features_candidates(path, seed):
            if candidate.is_file():
                data = read_json(candidate, "features.json")
                if (data.get("meta") or {}).get("sae_seed") == seed:
                    out[seed] = {**data, "path": str(candidate)}
                    break
        else:
            raise FileNotFoundError(f"no features.json selected on SAE seed {seed} at {path} (looked for seed_{seed}/features.json)")
    return out


def _restriction(features: Mapping[str, Any], seed: int, layer: int, d_sae: int,
                 categories: Sequence[str]) -> dict[str, list[int]]:
    """Per category, the latent ids features.json selected; checks space, layer, seed and width."""
    where = features.get("path", f"features.json of seed {seed}")
    meta, per_class = features.get("meta") or {}, features.get("per_class")
    if meta.get("space") != "sae" or per_class is None:
        raise ValueError(f"{where} is not an SAE-space selection (meta.space={meta.get('space')!r})")
    if meta.get("layer") != layer:
        raise ValueError(f"{where} was selected at layer {meta.get('layer')}, not layer {layer}")
    if meta.get("sae_seed") != seed:
        raise ValueError(f"{where} was selected on SAE seed {meta.get('sae_seed')}, not seed {seed}")
    if meta.get("n_features", d_sae) != d_sae:
        raise ValueError(f"{where} has {meta['n_features']} features, SAE seed {seed} has d_sae {d_sae}")
    missing = [c for c in categories if c not in per_class]
    if missing:
        raise ValueError(f"{where} has no class {missing[0]!r}")
    return {c: [int(i) for i in per_class[c]["feature_ids"]] for c in categories}


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
    *,
    tau: float = 0.0,
    top_k: int | None = 32,
    rank: int = 2,
    shared_frequency: float | None = None,
    fire_threshold: float = 0.0,
    categories: Sequence[str] = REFUSAL_CATEGORIES,
    mixing: str = "logistic",
    eps: float = 1e-6,
    batch_size: int = 4096,
    sae_run: str | None = None,
) -> dict[str, Any]:
    """Build and save every vector set at `layer` -> the report dict (see the module docstring).

    `features` maps an SAE seed to its parsed features.json (`load_seed_features`); None = no restriction.
    """
    unknown = sorted(set(categories) - set(REFUSAL_CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"categories must be refusal categories among {list(REFUSAL_CATEGORIES)}, got {list(categories)}")
    if features is not None and saes is None:
        raise ValueError("features.json restricts SAE-space vectors: give SAEs too")
    store = open_store(store)
    rows = load_last_token_rows(store, layer, splits=("extract",))
    rows, n_dropped = keep_classes(rows, (BENIGN, *categories), keep_contrast=False)
    require_rows(rows, (BENIGN, *categories), ("extract",), f"activation store {store.directory}, layer {layer}")
    if saes is not None:
        check_sae_width(saes, store.d_model)
    model, out = model_name(store), Path(out_dir)

    residual = residual_steering_vectors(rows, layer, model, categories)
    global_vector = global_refusal_vector(rows, layer, model, categories)
    VectorSet({**residual, "global": global_vector}).save(out / "residual")
    lowrank = fit_lowrank_combination(rows, dict(residual), rank=rank, eps=eps, refusal_categories=categories, mixing=mixing)
    lowrank_vector = lowrank.to_steering_vector(layer, model)
    VectorSet({"lowrank": lowrank_vector}).save(out / "lowrank")

    report: dict[str, Any] = {
        "schema_version": 1, "stage": "vectors", "model": model, "layer": layer, "store": str(store.directory),
        "sae_run": sae_run, "categories": list(categories), "dropped_rows": n_dropped,
        "extract": rows.provenance()["extract"],
        "params": {"tau": tau, "top_k": top_k, "rank": rank, "shared_frequency": shared_frequency,
                   "fire_threshold": fire_threshold, "mixing": mixing, "eps": eps},
        "residual": {c: {"norm": v.norm(), "cos_global": cosine(v.vector, global_vector.vector),
                         "n_rows": v.meta["n_rows"]["category"]} for c, v in residual.items()},
        "global": {"norm": global_vector.norm(), "n_rows": global_vector.meta["n_rows"]},
        "residual_cosines": {a: {b: cosine(residual[a].vector, residual[b].vector) for b in categories} for a in categories},
        "lowrank": {"rank": lowrank.rank, "category_weights": lowrank.category_weights, "norm": lowrank_vector.norm(),
                    "cos_global": cosine(lowrank_vector.vector, global_vector.vector),
                    "singular_values": lowrank.singular_values},
        "sae": {},
    }
    filters = {"tau": tau, "top_k": top_k, "shared_frequency": shared_frequency, "fire_threshold": fire_threshold}
    for seed, sae in (saes or {}).items():
        restrict = None if features is None else _restriction(_seed_entry(features, seed), seed, layer, sae.d_sae, categories)
        vectors, seed_report = _sae_vectors(rows, sae, seed, layer, model, restrict, categories, filters, residual, batch_size)
        if vectors is not None:
            vectors.save(out / f"sae_seed{seed}")
        report["sae"][f"seed_{seed}"] = {**seed_report, "dir": None if vectors is None else str(out / f"sae_seed{seed}")}
    write_json(out / REPORT_NAME, report)
    return report


def _seed_entry(features: Mapping[int, Mapping[str, Any]], seed: int) -> Mapping[str, Any]:
    if seed not in features:
        raise ValueError(f"no features.json given for SAE seed {seed} (have seeds {sorted(features)})")
    return features[seed]
