"""The `select` stage: L1 heads, one-vs-rest heads and stability selection on residual units or SAE latents.

    refusal-sae select --sae runs/sae --acts runs/acts --layer 9 --out runs/select
    refusal-sae select --space residual --acts runs/acts --layer 9 --out runs/select_residual

`run_selection(store, layer, saes, out_dir, cfg)` does the work for the command and the pipeline.
For each feature space — raw residual units, or the latents of each SAE seed — it:

1. fits the multinomial L1 head on extract rows, C chosen by calibrate macro-F1 (`select_l1_head`);
2. evaluates it on eval rows (accuracy with a Wilson 95% CI, macro-F1 with a bootstrap 95% CI);
3. fits one binary head per refusal category (`fit_ovr_heads`) and evaluates each on eval rows;
4. runs stability selection on bootstrap resamples of extract at the chosen C (`n_bootstrap=0`:
   plain top-K of the head) and keeps at most `top_k` features per class;
5. measures each feature's activation frequency per category on extract rows (fraction > tau) and,
   in SAE space, moves features that fire on more than `dense_frequency` of the rows of every
   category (dense latents, not category features) from the selection to `dense_features`;
6. writes `features.json`, `head.*`, `ovr/<category>.*` and `stability.safetensors`.

With several SAE seeds it then keeps the **consensus** features (`consensus.json`): a feature selected
for a category on one seed survives when, in at least `consensus_min_seeds` seeds (itself included),
the Hungarian partner of its decoder row has cosine >= `consensus_min_cosine` and was selected for
the same category (`analysis.evaluation.stability.consensus_features`).

Layout: residual space writes into `OUT/`; SAE space into `OUT/seed_<s>/` per seed, plus
`OUT/features.json` and `OUT/head.*` of the reference (first) seed. `OUT/select_report.json` holds
the metrics of every run. SAE latents of different seeds are not aligned, so stability is per seed;
matching latents across seeds (decoder similarity) is left to `analysis`. In the pipeline the stage
writes `RUN/select/sae/` (every SAE seed) and `RUN/select/residual/`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from activations.io import save_numpy_tensors, write_json
from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES, SPLITS
from activations.store import ActivationStore
from analysis.evaluation.stability import consensus_features, match_all_pairs
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext
from probes.heads import SOLVERS, HeadResult, resolve_solver, evaluate_head, fit_ovr_heads, select_l1_head
from probes.latents import encode_latents, sae_summary
from probes.metrics import classification_summary
from probes.rows import (
    CONTRAST_MODES, LabelledRows, keep_classes, load_last_token_rows, model_name, open_store, require_rows, row_counts,
)
from probes.selection import (
    ClassSelection, activation_frequency, dense_everywhere, split_dense, stability_selection, top_k_features,
    write_features_json,
)
from sae.model import SparseAutoencoder
from sae.quality import DENSE_THRESHOLD

NAME = "select"

REPORT_NAME = "select_report.json"
FEATURES_NAME = "features.json"
CONSENSUS_NAME = "consensus.json"


@dataclass
class Config:
    """Feature selection (pipeline section `select:`, flags `--select.*`).

    Args:
        top_k: at most this many features per class.
        n_bootstrap: bootstrap refits for stability selection (0 = plain top-k of the head).
        stability_threshold: a feature is stable when selected in at least this fraction of refits.
        C_grid: inverse L1 strengths tried; the one with the best calibrate macro-F1 is used.
        solver: "torch" (batched working-set FISTA on the run's device, `probes/l1_solver.py`),
            "sklearn" (saga on the CPU, the reference; faster than torch on a CPU) or "auto" (torch
            on a CUDA device, sklearn otherwise); both minimise the same L1 logistic objective.
        max_iter, tol: saga epochs and stopping tolerance per fit (solver sklearn).
        torch_max_iter, torch_tol: FISTA iterations and gradient-mapping tolerance (solver torch).
        tau: a feature is active on a row when its value exceeds tau.
        contrast_as: contrast rows count as benign, or are dropped from the heads.
        categories: refusal categories separated from benign.
        n_boot_ci: bootstrap resamples of the macro-F1 CI.
        batch_size: rows per SAE encoding batch.
        dense_frequency: an SAE latent firing on more than this fraction of the extract rows of every
            category is dense: reported under `dense_features`, not as a class feature (None = keep it).
        consensus_min_seeds: seeds that must agree on a feature (default: max(2, half the seeds)).
        consensus_min_cosine: decoder cosine of a match across seeds.
    """

    top_k: int = 10
    n_bootstrap: int = 8
    stability_threshold: float = 0.5
    C_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    solver: Literal["auto", "torch", "sklearn"] = "auto"
    max_iter: int = 2000
    tol: float = 1e-4
    torch_max_iter: int = 20000
    torch_tol: float = 1e-3
    tau: float = 0.0
    contrast_as: Literal["benign", "drop"] = "benign"
    categories: list[str] = field(default_factory=lambda: list(REFUSAL_CATEGORIES))
    n_boot_ci: int = 1000
    batch_size: int = 4096
    dense_frequency: float | None = DENSE_THRESHOLD
    consensus_min_seeds: int | None = None
    consensus_min_cosine: float = 0.7

    def __post_init__(self) -> None:
        if self.dense_frequency is not None and not 0.0 <= self.dense_frequency < 1.0:
            raise ValueError(f"dense_frequency must be in [0, 1) or null, got {self.dense_frequency}")
        if self.consensus_min_seeds is not None and self.consensus_min_seeds < 1:
            raise ValueError(f"consensus_min_seeds must be >= 1, got {self.consensus_min_seeds}")
        if not -1.0 <= self.consensus_min_cosine <= 1.0:
            raise ValueError(f"consensus_min_cosine must be in [-1, 1], got {self.consensus_min_cosine}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0 (0 = no stability selection), got {self.n_bootstrap}")
        if not 0.0 < self.stability_threshold <= 1.0:
            raise ValueError(f"stability threshold must be in (0, 1], got {self.stability_threshold}")
        if not self.C_grid or any(not (float(c) > 0 and np.isfinite(c)) for c in self.C_grid):
            raise ValueError(f"the C grid must hold positive finite numbers, got {list(self.C_grid)}")
        if self.contrast_as not in CONTRAST_MODES:
            raise ValueError(f"contrast_as must be one of {CONTRAST_MODES}, got {self.contrast_as!r}")
        unknown = sorted(set(self.categories) - set(REFUSAL_CATEGORIES))
        if unknown or not self.categories:
            raise ValueError(f"categories must be refusal categories among {list(REFUSAL_CATEGORIES)}, "
                             f"got {list(self.categories)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.solver not in ("auto", *SOLVERS):
            raise ValueError(f"solver must be one of {('auto', *SOLVERS)}, got {self.solver!r}")
        if min(self.max_iter, self.torch_max_iter) < 1 or not min(self.tol, self.torch_tol) > 0:
            raise ValueError("max_iter / torch_max_iter must be >= 1 and tol / torch_tol > 0")


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


def _select_one(rows: LabelledRows, out: Path, meta: dict[str, Any], cfg: Config, classes: tuple[str, ...],
                seed: int, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Heads, evaluation and selection for one feature matrix; writes its files into `out`.

    Returns (report entry, the pieces of features.json so the caller can write a reference copy).
    """
    extract, calibrate, eval_rows = (rows.only(s) for s in SPLITS)
    top_k, n_bootstrap, threshold, c_grid = cfg.top_k, cfg.n_bootstrap, cfg.stability_threshold, cfg.C_grid
    tau, contrast_as, n_boot_ci = cfg.tau, cfg.contrast_as, cfg.n_boot_ci
    solver = resolve_solver(cfg.solver, device)
    torch_solver = solver == "torch"
    solve = {"solver": solver, "device": device, "max_iter": cfg.torch_max_iter if torch_solver else cfg.max_iter,
             "tol": cfg.torch_tol if torch_solver else cfg.tol}
    fit = {"classes": classes, "contrast_as": contrast_as, "seed": seed, **solve}
    head = select_l1_head(extract, calibrate, c_grid, meta=dict(meta), **fit)
    probe_eval = evaluate_head(head, eval_rows, contrast_as, n_boot=n_boot_ci, seed=seed)
    ovr = fit_ovr_heads(extract, calibrate, c_grid, categories=classes[1:], contrast_as=contrast_as,
                        seed=seed, meta=dict(meta), **solve)
    if n_bootstrap > 0:
        stability = stability_selection(extract, head.C, n_bootstrap=n_bootstrap, threshold=threshold,
                                        top_k=top_k, seed=seed, classes=classes, contrast_as=contrast_as, **solve)
        selections = _truncate(stability.selections(), top_k)
        save_numpy_tensors(out / "stability.safetensors",
                           {"frequency": stability.frequency, "mean_weight": stability.mean_weight})
        method = "stability_selection"
    else:
        selections, method = top_k_features(head, top_k), "top_k"
    act_freq = activation_frequency(extract, tau)
    dense: dict[str, ClassSelection] | None = None
    if meta["space"] == "sae" and cfg.dense_frequency is not None:
        selections, dense = split_dense(selections, dense_everywhere(act_freq, cfg.dense_frequency))
    features_meta = {**meta, "method": method, "solver": solver, "dense_frequency": cfg.dense_frequency if dense is not None else None,
                     "C": head.C, "top_k": top_k, "n_bootstrap": n_bootstrap,
                     "stability_threshold": threshold if n_bootstrap > 0 else None, "c_grid": [float(c) for c in c_grid],
                     "contrast_as": contrast_as, "tau": tau, "n_features": rows.d, "splits": head.meta["splits"]}
    write_features_json(str(out / FEATURES_NAME), selections, act_freq, probe_eval, features_meta, dense)
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
        "dense": {c: d.feature_ids for c, d in (dense or {}).items()},
    }
    pieces = {"selections": selections, "act_freq": act_freq, "probe_eval": probe_eval,
              "meta": features_meta, "head": head, "dense": dense}
    return entry, pieces


def run_selection(
    store: ActivationStore | str | Path,
    layer: int,
    saes: dict[int, SparseAutoencoder] | None,
    out_dir: str | Path,
    cfg: Config,
    seed: int = 0,
    sae_run: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the select stage at `layer` (saes=None: residual units; else each SAE seed) -> the report dict.

    `device`: where the torch solver runs (the SAEs' device when given).

    Every category of `("benign", *cfg.categories)` needs rows in each of extract / calibrate / eval.
    Rows of refusal categories outside `cfg.categories` are left out (counted under "dropped_rows").
    """
    store = open_store(store)
    classes = (BENIGN, *cfg.categories)
    rows = load_last_token_rows(store, layer)
    rows, n_dropped = keep_classes(rows, classes)
    require_rows(rows, classes, SPLITS, f"activation store {store.directory}, layer {layer}")
    for sae_seed, sae in (saes or {}).items():
        if sae.d_in != store.d_model:
            raise ValueError(f"SAE seed {sae_seed} has d_in {sae.d_in} but the activation store has d_model {store.d_model}")
    out = Path(out_dir)
    space = "residual" if saes is None else "sae"
    base = {"model": model_name(store), "layer": layer, "space": space, "store": str(store.directory),
            "model_identity": store.manifest.get("model")}
    runs: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    if saes is None:
        runs["residual"], _ = _select_one(rows, out, base, cfg, classes, seed, device)
    else:
        for sae_seed, sae in saes.items():
            z = encode_latents(sae, rows.features, cfg.batch_size, desc=f"encode seed {sae_seed}")
            meta = {**base, "sae_seed": sae_seed, "sae_run": sae_run, "d_sae": sae.d_sae}
            entry, pieces = _select_one(rows.with_features(z), out / f"seed_{sae_seed}", meta, cfg, classes, seed, device)
            entry["sae"] = sae_summary(sae, z[rows.splits == "extract"])
            runs[f"seed_{sae_seed}"] = entry
            if reference is None:
                reference = {**pieces, "seed": sae_seed}
    if reference is not None:  # top-level copy of the reference seed's selection
        write_features_json(str(out / FEATURES_NAME), reference["selections"], reference["act_freq"],
                            reference["probe_eval"], {**reference["meta"], "reference_seed": reference["seed"]},
                            reference["dense"])
        reference["head"].save(str(out / "head"))
    consensus = write_consensus(saes, runs, out, cfg) if saes is not None and len(saes) > 1 else None
    report = {
        "schema_version": 1, "stage": "select", **base, "sae_run": sae_run, "classes": list(classes),
        "params": {**asdict(cfg), "seed": seed},
        "rows": row_counts(rows), "dropped_rows": n_dropped,
        "reference_seed": None if reference is None else reference["seed"],
        "runs": runs,
        "consensus": None if consensus is None else {s: {c: len(ids) for c, ids in per.items()}
                                                     for s, per in consensus["per_seed"].items()},
        "note": "SAE latent ids are per seed (not aligned across seeds); match decoders before comparing them.",
    }
    write_json(out / REPORT_NAME, report)
    return report


def write_consensus(saes: dict[int, SparseAutoencoder], runs: dict[str, Any], out: Path, cfg: Config) -> dict[str, Any]:
    """The consensus features of every seed (`consensus.json`: `per_seed.<s>.<class>` = latent ids)."""
    seeds = sorted(saes)
    min_seeds = cfg.consensus_min_seeds or max(2, (len(seeds) + 1) // 2)
    if min_seeds > len(seeds):
        raise ValueError(f"consensus_min_seeds is {min_seeds} but only {len(seeds)} SAE seeds were given")
    selected = {s: {c: [int(i) for i in ids] for c, ids in runs[f"seed_{s}"]["selected"].items()} for s in seeds}
    matchings = match_all_pairs({s: saes[s].W_dec.detach().cpu() for s in seeds})
    per_seed = consensus_features(selected, matchings, min_seeds, cfg.consensus_min_cosine)
    payload = {"schema_version": 1, "min_seeds": min_seeds, "min_cosine": cfg.consensus_min_cosine, "seeds": seeds,
               "per_seed": {str(s): per for s, per in per_seed.items()},
               "selected": {str(s): per for s, per in selected.items()}}
    write_json(out / CONSENSUS_NAME, payload)
    return payload


def read_consensus(select_dir: str | Path) -> dict[int, dict[str, list[int]]] | None:
    """`{seed: {class: consensus latent ids}}` of a selection folder, or None when it has no consensus.json."""
    from activations.io import read_json

    path = Path(select_dir) / CONSENSUS_NAME
    if not path.is_file():
        return None
    return {int(s): {c: [int(i) for i in ids] for c, ids in per.items()}
            for s, per in read_json(path, "consensus features")["per_seed"].items()}


# --- command -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae select`.

    Args:
        acts: activation store folder (harvest output).
        layer: block index stored in the activation store.
        out: selection folder to write.
        space: SAE latents of every seed of --sae, or raw residual units.
        sae: SAE training run folder (RUN/seed_<s>/) or one SAE folder; needed for --space sae.
        seeds: SAE seeds to use (default: all; the first is the reference).
        seed: seed of the fits and bootstrap resamples.
        device: device for SAE encoding and the torch solver: auto | cpu | cuda | cuda:N.
    """

    acts: Path
    layer: int
    out: Path
    space: Literal["sae", "residual"] = "sae"
    sae: Path | None = None
    seeds: list[int] | None = None
    seed: int = 0
    device: str = "auto"


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Open the store (and SAEs), run the selection; returns the report."""
    from activations.model_loading import resolve_device
    from sae.export import load_sae_run

    store = open_store(inputs.acts)
    saes = None
    if inputs.space == "sae":
        if inputs.sae is None:
            raise ValueError("--space sae needs --sae RUN (or use --space residual)")
        saes = load_sae_run(inputs.sae, inputs.layer, store.d_model, inputs.seeds, resolve_device(inputs.device),
                            model=store.manifest.get("model"))
    elif inputs.sae is not None:
        print(f"note: --space residual ignores --sae {inputs.sae}", file=sys.stderr)
    return run_selection(store, inputs.layer, saes, inputs.out, cfg, seed=inputs.seed,
                         sae_run=None if saes is None else str(inputs.sae), device=str(resolve_device(inputs.device)))


def format_table(report: dict[str, Any]) -> str:
    """One line per run: C, eval accuracy and macro-F1 with 95% CIs, features selected per class."""
    lines = [f"{'run':<10} {'C':>6}  {'eval accuracy [95% CI]':<28} {'macro-F1 [95% CI]':<22} selected per class"]
    for name, run_ in report["runs"].items():
        acc, f1 = run_["probe_eval"]["accuracy"], run_["probe_eval"]["macro_f1"]
        acc_text = f"{acc['rate']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] n={acc['n']}"
        f1_text = f"{f1['value']:.3f} [{f1['ci'][0]:.3f}, {f1['ci'][1]:.3f}]"
        counts = " ".join(f"{c}={len(ids)}" for c, ids in run_["selected"].items())
        lines.append(f"{name:<10} {run_['C']:>6g}  {acc_text:<28} {f1_text:<22} {counts}")
    return "\n".join(lines)


def show(inputs: Inputs, report: dict[str, Any]) -> None:
    print(f"layer {report['layer']} ({report['space']} space, model {report['model']})")
    print(format_table(report))
    print(f"wrote {Path(inputs.out) / FEATURES_NAME} and {Path(inputs.out) / REPORT_NAME}")


COMMAND = Command(
    name=NAME, help="L1 heads, stability selection, features.json", inputs=Inputs, run=command, show=show,
    config=Config, section=NAME,
    renamed={"C-grid": ["--select.C_grid"], "threshold": ["--select.stability_threshold"]},
)


# --- pipeline ------------------------------------------------------------------------------------

def _probe_metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: v for k, v in entry.items() if k in ("probe_eval", "C")} for name, entry in report["runs"].items()}


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """L1 heads + stability selection on SAE latents (every seed) and on residual units."""
    from analysis.stages.harvest import store_dir
    from analysis.stages.train import run_saes

    store = ActivationStore(store_dir(ctx, "last"))
    out = ctx.stage_dir(NAME)
    sae_report = run_selection(store, ctx.layer, run_saes(ctx), out / "sae", cfg, seed=ctx.cfg.seed,
                               sae_run=str(ctx.stage_dir("train")), device=ctx.device)
    residual_report = run_selection(store, ctx.layer, None, out / "residual", cfg, seed=ctx.cfg.seed, device=ctx.device)
    return {"sae": _probe_metrics(sae_report), "residual": _probe_metrics(residual_report)}


def selection_dir(ctx: RunContext, space: str = "sae") -> Path:
    """This run's selection folder of one space ("sae": `seed_<s>/` inside; "residual")."""
    return ctx.stage_dir(NAME) / space


STAGE = PipelineStage(NAME, run, section=NAME, uses=("seed",), after=("harvest", "train"))
