"""The `select` stage: L1 heads, one-vs-rest heads and stability selection on residual units or SAE latents.

`run_selection(store, layer, saes, out_dir, ...)` is the whole stage without argparse (the pipeline
calls it directly; `probes.cli_select` wraps it). For each feature space — raw residual units, or
the latents of each SAE seed — it:

1. fits the multinomial L1 head on extract rows, C chosen by calibrate macro-F1 (`select_l1_head`);
2. evaluates it on eval rows (accuracy with a Wilson 95% CI, macro-F1 with a bootstrap 95% CI);
3. fits one binary head per refusal category (`fit_ovr_heads`) and evaluates each on eval rows;
4. runs stability selection on bootstrap resamples of extract at the chosen C (`n_bootstrap=0`:
   plain top-K of the head) and keeps at most `top_k` features per class;
5. measures each feature's activation frequency per category on extract rows (fraction > tau);
6. writes `features.json`, `head.*`, `ovr/<category>.*` and `stability.safetensors`.

Layout: residual space writes into `OUT/`; SAE space into `OUT/seed_<s>/` per seed, plus
`OUT/features.json` and `OUT/head.*` of the reference (first) seed. `OUT/select_report.json` holds
the metrics of every run. SAE latents of different seeds are not aligned, so stability is per seed;
matching latents across seeds (decoder similarity) is left to `analysis`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES, SPLITS
from activations.store import ActivationStore
from probes.heads import HeadResult, evaluate_head, fit_ovr_heads, select_l1_head
from probes.metrics import classification_summary
from probes.protocol import CONTRAST_MODES, LabelledRows
from probes.selection import ClassSelection, activation_frequency, stability_selection, top_k_features, write_features_json
from probes.stage_data import (
    check_sae_width, encode_latents, keep_classes, load_last_token_rows, model_name, open_store, require_rows,
    row_counts, sae_summary,
)
from probes.storage import save_numpy_tensors, write_json
from sae.model import SparseAutoencoder

REPORT_NAME = "select_report.json"
FEATURES_NAME = "features.json"


def _check_params(top_k: int, n_bootstrap: int, threshold: float, c_grid: Sequence[float],
                  contrast_as: str, categories: Sequence[str]) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0 (0 = no stability selection), got {n_bootstrap}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"stability threshold must be in (0, 1], got {threshold}")
    if not c_grid or any(not (float(c) > 0 and np.isfinite(c)) for c in c_grid):
        raise ValueError(f"the C grid must hold positive finite numbers, got {list(c_grid)}")
    if contrast_as not in CONTRAST_MODES:
        raise ValueError(f"contrast_as must be one of {CONTRAST_MODES}, got {contrast_as!r}")
    unknown = sorted(set(categories) - set(REFUSAL_CATEGORIES))
    if unknown or not categories:
        raise ValueError(f"categories must be refusal categories among {list(REFUSAL_CATEGORIES)}, got {list(categories)}")


def evaluate_ovr_head(head: HeadResult, eval_rows: LabelledRows, contrast_as: str = "benign",
                      n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy (Wilson 95%) and F1 (bootstrap 95%) of a one-vs-rest head ("rest", c) on eval rows."""
    category = head.classes[1]
    keep = np.ones(eval_rows.n, dtype=bool) if contrast_as == "benign" else eval_rows.categories != CONTRAST
    truth = (eval_rows.categories[keep] == category).astype(np.int64)
    summary = classification_summary(truth, head.predict(eval_rows.features[keep]), head.classes, n_boot, seed)
    summary["eval"] = eval_rows.provenance().get("eval", {})
    return summary


def _truncate(selections: dict[str, ClassSelection], top_k: int) -> dict[str, ClassSelection]:
    """At most `top_k` features per class (selections are already best first)."""
    return {c: ClassSelection(s.feature_ids[:top_k], s.weights[:top_k],
                              None if s.frequency is None else s.frequency[:top_k]) for c, s in selections.items()}


def _select_one(rows: LabelledRows, out: Path, meta: dict[str, Any], *, classes: tuple[str, ...], top_k: int,
                n_bootstrap: int, threshold: float, c_grid: Sequence[float], tau: float, contrast_as: str,
                n_boot_ci: int, seed: int, max_iter: int, tol: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Heads, evaluation and selection for one feature matrix; writes its files into `out`.

    Returns (report entry, the pieces of features.json so the caller can write a reference copy).
    """
    extract, calibrate, eval_rows = (rows.only(s) for s in SPLITS)
    fit = {"classes": classes, "contrast_as": contrast_as, "seed": seed, "max_iter": max_iter, "tol": tol}
    head = select_l1_head(extract, calibrate, c_grid, meta=dict(meta), **fit)
    probe_eval = evaluate_head(head, eval_rows, contrast_as, n_boot=n_boot_ci, seed=seed)
    ovr = fit_ovr_heads(extract, calibrate, c_grid, categories=classes[1:], contrast_as=contrast_as,
                        seed=seed, meta=dict(meta), max_iter=max_iter, tol=tol)
    if n_bootstrap > 0:
        stability = stability_selection(extract, head.C, n_bootstrap=n_bootstrap, threshold=threshold,
                                        top_k=top_k, seed=seed, classes=classes, contrast_as=contrast_as,
                                        max_iter=max_iter, tol=tol)
        selections = _truncate(stability.selections(), top_k)
        save_numpy_tensors(out / "stability.safetensors",
                           {"frequency": stability.frequency, "mean_weight": stability.mean_weight})
        method = "stability_selection"
    else:
        selections, method = top_k_features(head, top_k), "top_k"
    act_freq = activation_frequency(extract, tau)
    features_meta = {**meta, "method": method, "C": head.C, "top_k": top_k, "n_bootstrap": n_bootstrap,
                     "stability_threshold": threshold if n_bootstrap > 0 else None, "c_grid": [float(c) for c in c_grid],
                     "contrast_as": contrast_as, "tau": tau, "n_features": rows.d, "splits": head.meta["splits"]}
    write_features_json(str(out / FEATURES_NAME), selections, act_freq, probe_eval, features_meta)
    head.save(str(out / "head"))
    ovr_report = {}
    for category, ovr_head in ovr.items():
        ovr_head.save(str(out / "ovr" / category))
        ovr_report[category] = {
            "C": ovr_head.C, "calibrate_macro_f1": ovr_head.meta["calibrate_macro_f1"],
            "converged": ovr_head.meta["converged"],
            "eval": evaluate_ovr_head(ovr_head, eval_rows, contrast_as, n_boot_ci, seed),
            "top_features": top_k_features(ovr_head, top_k)[category].feature_ids,
        }
    entry = {
        "dir": str(out), "method": method, "C": head.C, "c_scores": head.meta["c_scores"],
        "calibrate_macro_f1": head.meta["calibrate_macro_f1"], "converged": head.meta["converged"],
        "probe_eval": probe_eval, "n_features": rows.d,
        "selected": {c: s.feature_ids for c, s in selections.items()}, "ovr": ovr_report,
    }
    pieces = {"selections": selections, "act_freq": act_freq, "probe_eval": probe_eval,
              "meta": features_meta, "head": head}
    return entry, pieces


def run_selection(
    store: ActivationStore | str | Path,
    layer: int,
    saes: dict[int, SparseAutoencoder] | None,
    out_dir: str | Path,
    *,
    top_k: int = 10,
    n_bootstrap: int = 10,
    threshold: float = 0.5,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0),
    tau: float = 0.0,
    contrast_as: str = "benign",
    categories: Sequence[str] = REFUSAL_CATEGORIES,
    n_boot_ci: int = 1000,
    seed: int = 0,
    batch_size: int = 4096,
    sae_run: str | None = None,
    max_iter: int = 2000,
    tol: float = 1e-4,
) -> dict[str, Any]:
    """Run the select stage at `layer` (saes=None: residual units; else each SAE seed) -> the report dict.

    Every category of `("benign", *categories)` needs rows in each of extract / calibrate / eval.
    Rows of refusal categories outside `categories` are left out (counted under "dropped_rows").
    """
    _check_params(top_k, n_bootstrap, threshold, c_grid, contrast_as, categories)
    store = open_store(store)
    classes = (BENIGN, *categories)
    rows = load_last_token_rows(store, layer)
    rows, n_dropped = keep_classes(rows, classes)
    require_rows(rows, classes, SPLITS, f"activation store {store.directory}, layer {layer}")
    if saes is not None:
        check_sae_width(saes, store.d_model)
    out = Path(out_dir)
    space = "residual" if saes is None else "sae"
    base = {"model": model_name(store), "layer": layer, "space": space, "store": str(store.directory)}
    common = dict(classes=classes, top_k=top_k, n_bootstrap=n_bootstrap, threshold=threshold, c_grid=c_grid,
                  tau=tau, contrast_as=contrast_as, n_boot_ci=n_boot_ci, seed=seed, max_iter=max_iter, tol=tol)
    runs: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    if saes is None:
        runs["residual"], _ = _select_one(rows, out, base, **common)
    else:
        for sae_seed, sae in saes.items():
            z = encode_latents(sae, rows.features, batch_size, desc=f"encode seed {sae_seed}")
            meta = {**base, "sae_seed": sae_seed, "sae_run": sae_run, "d_sae": sae.d_sae}
            entry, pieces = _select_one(rows.with_features(z), out / f"seed_{sae_seed}", meta, **common)
            entry["sae"] = sae_summary(sae, z[rows.splits == "extract"])
            runs[f"seed_{sae_seed}"] = entry
            if reference is None:
                reference = {**pieces, "seed": sae_seed}
    if reference is not None:  # top-level copy of the reference seed's selection
        write_features_json(str(out / FEATURES_NAME), reference["selections"], reference["act_freq"],
                            reference["probe_eval"], {**reference["meta"], "reference_seed": reference["seed"]})
        reference["head"].save(str(out / "head"))
    report = {
        "schema_version": 1, "stage": "select", **base, "sae_run": sae_run, "classes": list(classes),
        "params": {"top_k": top_k, "n_bootstrap": n_bootstrap, "stability_threshold": threshold,
                   "c_grid": [float(c) for c in c_grid], "tau": tau, "contrast_as": contrast_as,
                   "n_boot_ci": n_boot_ci, "seed": seed, "max_iter": max_iter, "tol": tol},
        "rows": row_counts(rows), "dropped_rows": n_dropped,
        "reference_seed": None if reference is None else reference["seed"],
        "runs": runs,
        "note": "SAE latent ids are per seed (not aligned across seeds); match decoders before comparing them.",
    }
    write_json(out / REPORT_NAME, report)
    return report
