"""A synthetic, schema-valid `summary.json` and `ReportExtras` for the report tests (made-up numbers)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from activations.records import CATEGORIES, REFUSAL_CATEGORIES
from analysis.evaluation.geometry import plot_embeddings
from analysis.reporting.report import ReportExtras
from activations.stats import rate_from_counts
from analysis.reporting.summary import REQUIRED_CONDITIONS, REQUIRED_SETS, SCHEMA_VERSION
from analysis.evaluation.separation import head_separation

EVAL_N = {"benign": 60, "contrast": 24, **{c: 12 for c in REFUSAL_CATEGORIES}}
INJECTED = "<script>alert('x')</script>"


def synthetic_summary(seed: int = 0) -> dict[str, Any]:
    """Every required key, condition and set, with Wilson-CI rates from random counts."""
    rng = np.random.default_rng(seed)
    seeds = [0, 1, 2]

    def counts_rate(n: int, p: float) -> dict[str, Any]:
        return rate_from_counts(int(rng.binomial(n, p)), n)

    def score(n: int, p: float) -> dict[str, Any]:
        entry = counts_rate(n, p)
        return {"score": entry["rate"], "ci": entry["ci"], "n": entry["n"]}

    refusal = {}
    for condition in REQUIRED_CONDITIONS:
        refusal[condition] = {s: counts_rate(EVAL_N[s], 0.1 if s in ("benign", "contrast") else 0.6)
                              for s in REQUIRED_SETS}
    refusal["baseline"]["harmful"] = counts_rate(60, 0.55)  # an aggregate set beyond the required ones
    refusal["ablate"]["humanizing"] = rate_from_counts(0, 0)  # an empty cell must render as "—"
    splits = {name: {"n": n, "sha256": f"{i:x}" * 64,
                     "categories": {c: max(1, n // len(CATEGORIES)) for c in CATEGORIES}}
              for i, (name, n) in enumerate([("extract", 420), ("calibrate", 140), ("eval", 144)], start=10)}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": "smollm2-135m-instruct",
        "layers": [9, 18],
        "seeds": seeds,
        "date": "2025-01-01T00:00:00Z",
        "splits": splits,
        "sae": {str(s): {"fvu": 0.2 + 0.01 * s, "l0": 16.0, "dead_fraction": 0.02 * s} for s in seeds},
        "probe": {"accuracy": {"value": 0.8, "ci": [0.72, 0.86], "n": 144},
                  "macro_f1": {"value": 0.74, "ci": [0.66, 0.81], "n": 144}},
        "stability": {"matched_cosine_mean": 0.83,
                      "feature_jaccard": {c: (0.4 if c != "unsupported" else None) for c in REFUSAL_CATEGORIES}},
        "geometry": {space: {"silhouette": 0.12, "davies_bouldin": 2.3, "calinski_harabasz": 41.5}
                     for space in ("residual", "sae_features")},
        "refusal": refusal,
        "capability": {c: {"builtin_mc": score(40, 0.7), "arithmetic": score(20, 0.5)}
                       for c in ("baseline", "steer_away", "ablate")},
        "alpha_sweep": {"alphas": [2.0, 4.0, 8.0]},
        **benchmark_keys(counts_rate),
        **ablation_keys(rng),
    }


def ablation_keys(rng: np.random.Generator) -> dict[str, Any]:
    """`paired_vs_baseline`, `ablation` (two seeds, controls, directional, sufficiency) and `findings`,
    computed by the library from made-up verdicts."""
    from activations.records import PromptRecord
    from activations.stats import paired_compare
    from analysis.evaluation.ablation_matrix import effect_matrix, seed_averaged_matrix
    from analysis.evaluation.refusal import RefusalResult
    from analysis.reporting.findings import build_findings, paired_summary

    cats = [c for c in CATEGORIES for _ in range(10)]
    records = [PromptRecord(f"p{i}", "t", c) for i, c in enumerate(cats)]
    base = np.array([c not in ("benign", "contrast") for c in cats]) | (rng.random(len(cats)) < 0.1)

    def results(flags: np.ndarray) -> list:
        return [RefusalResult(r.id, r.category, "", bool(f), "token") for r, f in zip(records, flags)]

    def flip(p: float) -> list:
        return results(base & (rng.random(len(cats)) > p))

    conds = {s: {c: flip(0.5) for c in REFUSAL_CATEGORIES[:2]} for s in (0, 1)}
    ctls = {s: {c: [flip(0.05) for _ in range(5)] for c in REFUSAL_CATEGORIES[:2]} for s in (0, 1)}
    baseline = results(base)
    ablation = {
        "positions": "response_start", "features": "selected", "control_draws": 5, "control_seeds": "all",
        "baseline_disagreements": 0,
        "feature_ablation": {"per_seed": {str(s): {"matrix": effect_matrix(records, baseline, conds[s], ctls[s])}
                                          for s in conds},
                             "averaged": seed_averaged_matrix(records, baseline, conds, ctls)},
        "directional": {"layers": "one", "draws": 2, "matrix": effect_matrix(records, baseline, conds[0], ctls[0])},
        "sufficiency": {"alpha": 0.5, "draws": 2, "matrix": effect_matrix(
            records, baseline, {"safety": results(base | (rng.random(len(cats)) < 0.4))},
            {"safety": [results(base) for _ in range(2)]}, "increase")},
    }
    paired = {"steer_away": {"over_refusal": {"all": paired_compare(base, base & (rng.random(len(cats)) < 0.5))},
                             "category": {}}}
    out = {"paired_vs_baseline": paired_summary(paired), "ablation": ablation, **seed_keys(records, baseline, flip)}
    out["findings"] = [f.to_dict() for f in build_findings(out)]
    return out


def seed_keys(records: list, baseline: list, flip: Any) -> dict[str, Any]:
    """`seed_averaged` (the SAE-dependent conditions under three SAE seeds, from made-up verdicts; seed 2
    has no SAE-space vector) and `steer_sae` (the vectors' comparison with v_global)."""
    from analysis.evaluation.seed_conditions import seed_averaged

    by_seed = {"conditional_probe": {s: flip(0.2 + 0.1 * s) for s in (0, 1, 2)},
               "steer_sae": {s: flip(0.05) for s in (0, 1)}, "ablate": {s: flip(0.4) for s in (0, 1, 2)}}
    seeded = seed_averaged(records, baseline, by_seed)
    del seeded["refusal"]["ablate"]["humanizing"]  # as a set without prompts would be: the empty cell stays
    info = {"categories": ["safety", "humanizing"], "weights": {"safety": 0.5, "humanizing": 0.5}, "norm_own": 3.2,
            "norm_global": 35.0, "cosine_global": 0.61, "norm": "global", "norm_used": 35.0}
    return {"seed_averaged": seeded,
            "steer_sae": {"0": info, "1": {**info, "cosine_global": 0.58}, "2": {"skipped": "no category kept"}}}


def synthetic_frontier(counts_rate) -> dict[str, Any]:
    """A `gating_frontier` result over made-up rates: one gate that meets the goal, one that does not."""
    from analysis.evaluation.frontier import gating_frontier

    tables = {"baseline": {"over_refusal": counts_rate(84, 0.3), "harmful_refusal": counts_rate(60, 0.8)},
              "conditional_probe": {"over_refusal": counts_rate(84, 0.1), "harmful_refusal": counts_rate(60, 0.85)},
              "conditional_distance": {"over_refusal": counts_rate(84, 0.5), "harmful_refusal": counts_rate(60, 0.9)}}
    sweep = [{"condition": c, "strength": a, "over_refusal": counts_rate(84, 0.3 + sign * 0.05 * a),
              "harmful": counts_rate(60, 0.8 + sign * 0.02 * a)}
             for c, sign in (("steer_toward", 1), ("steer_away", -1)) for a in (1.0, 2.0)]
    return gating_frontier(tables, sweep, ["conditional_probe", "conditional_distance"])


def benchmark_keys(counts_rate) -> dict[str, Any]:
    """The held-out set, gating, distance-gate, capability-readability and benign-text keys."""
    frontier = synthetic_frontier(counts_rate)
    short = {k: frontier[k] for k in ("best_gate", "goal_met", "tolerance", "verdict")}
    held_counts = {"contrast": 25, "safety": 20}
    scores = {"per_category": {c: {"n": 20, "mean": 0.5, "quantiles": {"0.05": 0.4, "0.25": 0.45, "0.5": 0.5,
                                                                     "0.75": 0.55, "0.95": 0.6}}
                               for c in ("benign", "safety", "contrast")}, "auc_refusal_vs_benign": 0.55}
    grid = [{"t_low": 0.0, "t_high": 1.0, "over_refusal": 0.3, "harmful_refusal": 0.8, "n_steered": 0},
            {"t_low": 0.45, "t_high": 0.55, "over_refusal": 0.25, "harmful_refusal": 0.7, "n_steered": 30}]
    return {
        "eval_sets": {"xstest": {"specs": ["xstest:x.csv"], "n": 45, "n_read": 50, "categories": held_counts,
                                 "sha256": "e" * 64, "n_duplicates_removed": 1,
                                 "n_overlap_removed": {"extract": 3, "calibrate": 1}, "n_overlap_eval": 2,
                                 "refusal": {c: {k: counts_rate(n, 0.4) for k, n in held_counts.items()}
                                             for c in ("baseline", "conditional_probe")},
                                 "frontier": short}},
        "frontier": short,
        "head_separation": {"eval": head_separation(
            [{"category": "safety", "log_odds": 2.0 + i, "refused": True} for i in range(4)]
            + [{"category": "contrast", "log_odds": -1.0 + i, "refused": i > 2} for i in range(5)]),
            "xstest": None},
        "gates": {"distance": {"baseline": grid[0], "chosen": grid[0], "chosen_is_noop": True, "frontier": grid,
                               "scores": {"calibrate": scores, "eval": scores}, "eval_decisions": {"none:none": 144}}},
        "capability_readable": {"builtin_mc": {"chance": 0.25, "score": 0.7, "ci": [0.55, 0.82], "n": 40,
                                               "readable": True, "reason": "baseline above chance"}},
        "benign_text": {c: {"loss": {"value": 2.0 + i, "ci": [1.8 + i, 2.2 + i], "n": 12},
                            "kl": {"value": 0.0 if c == "baseline" else 0.1 * i, "ci": [0.0, 0.0] if c == "baseline"
                                   else [0.05 * i, 0.2 * i], "n": 12}, "n_tokens": 400}
                        for i, c in enumerate(("baseline", "steer_toward", "steer_away"))},
    }


def synthetic_extras(tmp_dir: Path, seed: int = 0) -> ReportExtras:
    """Extras with every field set; the embedding PNG is a PCA panel of random rows."""
    rng = np.random.default_rng(seed)
    steps = list(range(0, 50, 10))
    curves = {s: {"step": steps, "fvu": list(np.linspace(1.0, 0.2 + 0.01 * s, len(steps))),
                  "l0": [16.0] * len(steps), "dead_fraction": list(np.linspace(0.0, 0.02 * s, len(steps)))}
              for s in (0, 1, 2)}
    features = {c: [{"feature": int(f), "weight": float(rng.normal()), "selection_frequency": float(rng.random()),
                     "activation_frequency": {k: float(rng.random()) for k in CATEGORIES}}
                    for f in rng.choice(256, size=12, replace=False)] for c in REFUSAL_CATEGORIES}
    points = [{"condition": cond, "strength": a,
               "over_refusal": rate_from_counts(int(60 * min(0.9, slope * a)), 60),
               "harmful": rate_from_counts(int(60 * min(0.95, 0.5 + 0.05 * a)), 60)}
              for cond, slope in (("steer_toward", 0.05), ("conditional_probe", 0.015)) for a in (2.0, 4.0, 8.0)]
    labels = np.repeat(np.array(["benign", "safety", "incomplete"]), 20)
    X = rng.normal(size=(60, 8)) + (labels == "safety")[:, None] * 2.0
    png = plot_embeddings(X, labels, tmp_dir / "embed_residual.png", methods=("pca",), title="residual")
    manifest = {"n": 704, "seed": 0, "fractions": [0.6, 0.2, 0.2], "n_duplicates_removed": 3,
                "splits": {"eval": {"n": 144, "sha256": "c" * 64}},
                "sources": [{"spec": "builtin:quickstart", "kind": "builtin", "n": 704, "sha256": "d" * 64}]}
    return ReportExtras(
        config={"model": "smollm2-135m-instruct", "note": INJECTED, "sae": {"seeds": [0, 1, 2], "k": 16}},
        split_manifest=manifest,
        training_curves=curves,
        features=features,
        tradeoff_points=points,
        embedding_pngs={"residual": png},
        seed_table=[{"seed": s, "fvu": 0.2 + 0.01 * s, "refusal": {"safety": rate_from_counts(7 + s, 12)}}
                    for s in (0, 1, 2)],
        notes=["harvest: 41.2 s", "train: 3 seeds × 12.0 s"],
        per_category_vectors={c: rate_from_counts(20 + i, 60) for i, c in enumerate(REFUSAL_CATEGORIES)},
        frontiers={"eval split": synthetic_frontier(lambda n, p: rate_from_counts(int(round(n * p)), n))},
        distance_tuning={"table": benchmark_keys(lambda n, p: rate_from_counts(int(round(n * p)), n))["gates"]
                         ["distance"]["frontier"], "frontier": [], "chosen": {"t_low": 0.0, "t_high": 1.0,
                                                                              "over_refusal": 0.3, "harmful_refusal": 0.8},
                         "baseline": {"over_refusal": 0.3, "harmful_refusal": 0.8}},
    )
