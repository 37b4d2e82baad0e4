"""`refusal-sae stability`: cross-seed matching of SAE latents, feature-set Jaccard, and category geometry.

    refusal-sae stability --sae runs/sae --select runs/select --acts runs/acts --layer 9 --out runs/stability

Reads the SAE training run (`RUN/seed_<s>/`), the selection folder of `refusal-sae select --sae RUN`
(`SELECT/seed_<s>/features.json`) and the activation store, then writes `OUT/stability.json` and
`OUT/embeddings_<space>.png` (PCA / t-SNE / UMAP panels). The pipeline's `analyze` stage uses the
same two summaries:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from activations.io import write_json
from activations.records import REFUSAL_CATEGORIES
from activations.store import ActivationStore
from analysis.evaluation.geometry import EMBED_METHODS, cluster_metrics, plot_embeddings
from analysis.stages.command import Command
from analysis.evaluation.stability import cross_seed_feature_stability, match_decoders, matched_cosine_summary, stable_features
from probes.latents import encode_latents
from probes.rows import load_last_token_rows, open_store
from probes.selection import class_feature_ids, read_features


def selected_features(select_dir: str | Path, seed: int, layer: int | None = None) -> dict[str, list[int]]:
    """{refusal category: latent ids} of `select_dir/seed_<seed>/features.json`, checked against seed and layer."""
    data = read_features(Path(select_dir) / f"seed_{seed}", layer=layer, sae_seed=seed,
                         what=f"features.json of SAE seed {seed}")
    return class_feature_ids(data, [c for c in data["per_class"] if c in REFUSAL_CATEGORIES])


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


# --- command -------------------------------------------------------------------------------------

RESULT_NAME = "stability.json"


@dataclass
class Config:
    """Stability and geometry (flags `--stability.*`; the pipeline's `analyze` section holds the same keys).

    Args:
        min_seeds: seeds that must select a feature for it to count as stable (default: max(2, half)).
        split: rows used for the geometry.
        methods: embedding plots drawn.
    """

    min_seeds: int | None = None
    split: Literal["extract", "calibrate", "eval"] = "eval"
    methods: list[str] = field(default_factory=lambda: list(EMBED_METHODS))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(EMBED_METHODS))
        if unknown:
            raise ValueError(f"unknown embedding method {unknown[0]!r}; expected some of {', '.join(EMBED_METHODS)}")


@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae stability`.

    Args:
        sae: SAE training run folder (RUN/seed_<s>/).
        select: selection folder of `refusal-sae select --sae RUN` (SELECT/seed_<s>/features.json).
        acts: activation store folder (harvest output).
        layer: block the SAEs were trained on.
        out: output folder (stability.json and PNGs).
        seeds: SAE seeds to compare (default: all; the smallest is the reference).
        seed: seed of t-SNE / UMAP and the silhouette subsample.
        device: device for SAE encoding: auto | cpu | cuda | cuda:N.
    """

    sae: Path
    select: Path
    acts: Path
    layer: int
    out: Path
    seeds: list[int] | None = None
    seed: int = 0
    device: str = "auto"


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Load the SAEs and the store, compute stability and geometry; write and return the report."""
    from activations.model_loading import resolve_device
    from sae.export import load_sae_run

    if not inputs.select.is_dir():
        raise FileNotFoundError(f"selection folder not found: {inputs.select}")
    store = open_store(inputs.acts)
    if inputs.layer not in store.layers:
        raise ValueError(f"layer {inputs.layer} is not in the store {store.directory}; available layers: {store.layers}")
    seeds = None if inputs.seeds is None else sorted(set(inputs.seeds))
    saes = load_sae_run(inputs.sae, inputs.layer, store.d_model, seeds, resolve_device(inputs.device),
                        model=store.manifest.get("model"))
    if cfg.min_seeds is not None and not 1 <= cfg.min_seeds <= len(saes):
        raise ValueError(f"--stability.min_seeds must be in [1, {len(saes)}], got {cfg.min_seeds}")
    stability = stability_summary(saes, inputs.select, layer=inputs.layer, min_seeds=cfg.min_seeds)
    geometry = geometry_summary(store, inputs.layer, saes, inputs.out, seed=inputs.seed, split=cfg.split,
                                methods=cfg.methods)
    payload = {
        "schema_version": 1, "command": "stability", "sae_run": str(inputs.sae), "select": str(inputs.select),
        "acts": str(inputs.acts), "layer": inputs.layer, "seeds": list(saes), "stability": stability, "geometry": geometry,
    }
    write_json(inputs.out / RESULT_NAME, payload, nonfinite="null")
    return payload


def format_tables(payload: dict[str, Any]) -> str:
    """Matched cosine per seed pair, Jaccard and stable-feature count per category, cluster metrics per space."""
    stability, lines = payload["stability"], []
    if "note" in stability:
        lines.append(stability["note"])
    else:
        lines.append(f"{'seed pair':<10} {'method':<10} {'mean cos':>9} {'median':>8} {'>0.7':>6}")
        for pair, c in stability["matched_cosine"].items():
            lines.append(f"{pair:<10} {c['method']:<10} {c['mean']:>9.3f} {c['median']:>8.3f} "
                         f"{c['fraction_above']['0.7']:>6.2f}")
        lines.append(f"{'category':<14} {'Jaccard':>8} {'stable':>7}")
        for category, j in stability["feature_jaccard"].items():
            text = "—" if j is None else f"{j:.3f}"
            lines.append(f"{category:<14} {text:>8} {len(stability['stable_features'].get(category, [])):>7}")
    lines.append(f"{'space':<14} {'silhouette':>10} {'Davies-B.':>10} {'Calinski-H.':>12}  ({payload['geometry']['split']}, "
                 f"n={payload['geometry']['n_rows']})")
    for space, m in payload["geometry"]["metrics"].items():
        lines.append(f"{space:<14} {m['silhouette']:>10.3f} {m['davies_bouldin']:>10.3f} {m['calinski_harabasz']:>12.2f}")
    return "\n".join(lines)


def show(inputs: Inputs, payload: dict[str, Any]) -> None:
    print(f"layer {payload['layer']}, SAE seeds {payload['seeds']}")
    print(format_tables(payload))
    print(f"wrote {inputs.out / RESULT_NAME} and {', '.join(Path(p).name for p in payload['geometry']['pngs'].values())}")


COMMAND = Command(
    name="stability", help="cross-seed matching, feature Jaccard, geometry plots", inputs=Inputs, run=command,
    show=show, config=Config, section="stability",
)
