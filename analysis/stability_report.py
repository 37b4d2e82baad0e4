"""Cross-seed stability and category geometry from explicit folders (no pipeline run needed).

Used by `refusal-sae stability` and by the pipeline's `analysis` stage:

- `selected_features(select_dir, seed, layer)`: refusal-category latents chosen on one SAE seed
  (`SELECT_DIR/seed_<s>/features.json`, as written by `refusal-sae select --sae RUN`).
- `stability_summary(saes, select_dir, layer)`: Hungarian matching of decoder rows for every pair of
  seeds, matched-cosine summaries, per-category Jaccard of the selected features through the
  matching, and the features stable across seeds (in the reference = first seed's index space).
- `geometry_summary(store, layer, saes, out)`: cluster metrics of the categories on the last-token
  rows of one split, in residual space and in the reference seed's SAE space, plus one PNG per space
  with a PCA / t-SNE / UMAP panel each.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from activations.records import REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.geometry import EMBED_METHODS, cluster_metrics, plot_embeddings
from analysis.stability import cross_seed_feature_stability, match_decoders, matched_cosine_summary, stable_features
from probes.stage_data import encode_latents, load_last_token_rows, open_store
from probes.storage import read_json


def selected_features(select_dir: str | Path, seed: int, layer: int | None = None) -> dict[str, list[int]]:
    """{refusal category: latent ids} of `select_dir/seed_<seed>/features.json`, checked against seed and layer."""
    path = Path(select_dir) / f"seed_{seed}" / "features.json"
    data = read_json(path, f"features.json of SAE seed {seed}")
    meta = data.get("meta", {})
    if meta.get("space", "sae") != "sae":
        raise ValueError(f"{path} selects {meta['space']} units, not SAE latents")
    if meta.get("sae_seed") is not None and int(meta["sae_seed"]) != seed:
        raise ValueError(f"{path} was selected on SAE seed {meta['sae_seed']}, not seed {seed}")
    if layer is not None and meta.get("layer") is not None and int(meta["layer"]) != layer:
        raise ValueError(f"{path} was selected at layer {meta['layer']}, not layer {layer}")
    return {c: [int(i) for i in e["feature_ids"]] for c, e in data["per_class"].items() if c in REFUSAL_CATEGORIES}


def stability_summary(
    saes: Mapping[int, Any], select_dir: str | Path, layer: int | None = None, min_seeds: int | None = None
) -> dict[str, Any]:
    """Decoder matching, feature-set Jaccard and stable features across the seeds of `saes` ({seed: SAE}).

    `min_seeds` (default: max(2, half the seeds rounded up)) is how many seeds must select a
    feature for it to count as stable. With one seed there is nothing to compare: a note is returned.
    """
    seeds = sorted(saes)
    if len(seeds) < 2:
        return {"note": "one SAE seed: no cross-seed stability", "matched_cosine_mean": None, "feature_jaccard": {}}
    min_seeds = max(2, (len(seeds) + 1) // 2) if min_seeds is None else min_seeds
    decoders = {s: saes[s].W_dec.detach().cpu() for s in seeds}
    pairs = {(s, t): match_decoders(decoders[s], decoders[t]) for i, s in enumerate(seeds) for t in seeds[i + 1:]}
    cosine = {f"{s}-{t}": matched_cosine_summary(m) for (s, t), m in pairs.items()}
    selected = {s: selected_features(select_dir, s, layer) for s in seeds}
    jaccard = cross_seed_feature_stability(selected, pairs)
    reference = seeds[0]
    to_reference = {t: pairs[(reference, t)].inverse() for t in seeds[1:]}
    stable = stable_features(selected, to_reference, reference, min_seeds=min_seeds)
    return {
        "matched_cosine_mean": float(np.mean([c["mean"] for c in cosine.values()])),
        "matched_cosine": cosine,
        "feature_jaccard": {c: v["mean"] for c, v in jaccard["per_category"].items()},
        "feature_jaccard_pairs": jaccard["pairs"],
        "stable_features": stable,
        "min_seeds": min_seeds,
        "reference_seed": reference,
    }


def geometry_summary(
    store: ActivationStore | str | Path,
    layer: int,
    saes: Mapping[int, Any],
    out: str | Path,
    seed: int = 0,
    split: str = "eval",
    methods: Sequence[str] = EMBED_METHODS,
) -> dict[str, Any]:
    """Cluster metrics and embedding PNGs (`out/embeddings_<space>.png`) of the categories on `split` rows.

    Spaces: `residual` (the layer's last-token activations) and `sae_seed<s>` (latents of the first
    seed of `saes`). Returns `{"metrics": {space: ...}, "pngs": {space: path}, "split", "n_rows"}`.
    """
    rows = load_last_token_rows(open_store(store), layer, splits=(split,))
    if not saes:
        raise ValueError("geometry_summary needs at least one SAE")
    reference_seed, sae = next(iter(saes.items()))
    spaces = {"residual": rows.features, f"sae_seed{reference_seed}": encode_latents(sae, rows.features)}
    metrics, pngs = {}, {}
    for name, X in spaces.items():
        metrics[name] = cluster_metrics(X, rows.categories, seed=seed)
        pngs[name] = str(plot_embeddings(X, rows.categories, Path(out) / f"embeddings_{name}.png", methods=methods,
                                         title=f"{name}, layer {layer}, {split} split", seed=seed))
    return {"metrics": metrics, "pngs": pngs, "split": split, "n_rows": int(len(rows.categories))}
