"""L1-penalised logistic heads on features (residual activations or SAE latents).

- `fit_l1_head`: multinomial head over PROBE_CLASSES (benign + 5 refusal categories), fitted on
  extract rows with a pure L1 penalty: scikit-learn's saga (`solver="sklearn"`, the reference) or
  batched FISTA in torch on any device (`solver="torch"`, `probes/l1_solver.py`: the same objective).
  `fit_l1_heads` fits several C values at once.
- `select_l1_head`: the same, with C chosen from a grid by macro-F1 on calibrate rows.
- `fit_ovr_heads`: one binary L1 head per refusal category (category vs everything else).
- `HeadResult` (`probes/head_result.py`): coefficients in float64, `predict_proba`, save/load as
  safetensors + JSON.

Coefficients live in the (optionally) standardised feature space: `logits = ((x - mean) / scale) @
coef.T + intercept`; `raw_coef()` gives the equivalent weights on unstandardised features.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from activations.records import BENIGN, CONTRAST, PROBE_CLASSES, REFUSAL_CATEGORIES
from probes.head_result import HeadResult
from probes.metrics import classification_summary, macro_f1
from probes.rows import LabelledRows, probe_targets, require_split

DEFAULT_C_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Inverse L1 strengths tried by `select_l1_head` (small C = sparser head)."""

REST = "rest"
"""Name of the negative class of a one-vs-rest head."""


def _require_l1_sklearn() -> None:
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 8):
        raise ImportError(f"probes need scikit-learn >= 1.8 (pure L1 via l1_ratio=1), found {sklearn.__version__}")


SPARSE_DENSITY = 0.1
"""Feature matrices with fewer non-zeros than this (SAE latents) are fitted in sparse form."""


def _scaler(x: np.ndarray, standardize: bool, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Float64 column mean and std of x (n, d); std 0 becomes 1. Identity stats if not standardising.

    With `center=False` the mean is reported as 0 (scale-only standardisation keeps zeros zero).
    """
    d = x.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    mean = np.mean(x, axis=0, dtype=np.float64)
    std = np.std(x, axis=0, dtype=np.float64)
    return (mean if center else np.zeros(d)), np.where(std > 0, std, 1.0)


def _design_matrix(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, sparse: bool) -> Any:
    """Standardised features; a CSR matrix when `sparse` (saga's cost then scales with the non-zeros)."""
    if not sparse:
        return (x - mean) / scale
    from scipy.sparse import csr_matrix

    return csr_matrix(x / scale)


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, tol: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pure-L1 saga logistic regression; returns (coef (k or 1, d), intercept, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if not (C > 0 and np.isfinite(C)):
        raise ValueError(f"C must be a positive finite number, got {C}")
    model = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.coef_.astype(np.float64), model.intercept_.astype(np.float64), converged


SOLVERS = ("sklearn", "torch")


def resolve_solver(solver: str, device: str) -> str:
    """"auto" → "torch" on a CUDA device (seconds on the GPU), "sklearn" otherwise (saga is faster
    than FISTA on a CPU); other values as given."""
    if solver != "auto":
        return solver
    return "torch" if str(device).startswith("cuda") else "sklearn"


def _prepare(rows: LabelledRows, classes: Sequence[str], contrast_as: str, standardize: bool) -> tuple[Any, ...]:
    """(x float64 (n, d), targets (n,), class counts, sparse, mean, scale) of extract rows for a head."""
    require_split(rows.splits, "extract", "L1 head")
    y, keep = probe_targets(rows.categories, classes, contrast_as)
    counts = np.bincount(y, minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"L1 head: classes {empty} have no extract rows")
    x = np.asarray(rows.features[keep], dtype=np.float64)
    # Mostly-zero features (SAE latents) are scaled but not centred, and fitted as a sparse matrix:
    # the same L1 problem up to the intercept, at a cost proportional to the non-zeros.
    sparse = bool(np.count_nonzero(x) < SPARSE_DENSITY * x.size)
    mean, scale = _scaler(x, standardize, center=not sparse)
    return x, y, counts, sparse, mean, scale


def _torch_fits(designs: list[np.ndarray], targets: list[np.ndarray], Cs: Sequence[float], n_classes: int,
                max_iter: int, tol: float, device: str | None) -> Any:
    """One batched torch fit: problem i has design `designs[i]` (or all share `designs[0]`)."""
    import torch

    from probes.l1_solver import fit_l1_logistic

    for C in Cs:
        if not (C > 0 and np.isfinite(C)):
            raise ValueError(f"C must be a positive finite number, got {C}")
    dev = torch.device(device or "cpu")
    x = torch.from_numpy(np.stack(designs) if len(designs) > 1 else designs[0]).to(dev, torch.float32)
    y = torch.from_numpy(np.stack(targets)).to(dev)
    return fit_l1_logistic(x, y, torch.tensor([float(c) for c in Cs]), n_classes, binary=n_classes == 2,
                           max_iter=max_iter, tol=tol)


def _as_head(coef: np.ndarray, intercept: np.ndarray, C: float, mean: np.ndarray, scale: np.ndarray,
             info: dict[str, Any], classes: Sequence[str]) -> HeadResult:
    if coef.shape[0] == 1:  # two classes: one row for the positive class
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    return HeadResult(coef, intercept, tuple(classes), float(C), mean, scale, info)


def fit_l1_heads(
    rows: LabelledRows,
    Cs: Sequence[float],
    *,
    classes: Sequence[str] = PROBE_CLASSES,
    **kwargs: Any,
) -> list[HeadResult]:
    """One L1 head per C in `Cs` on the same extract rows (see `fit_l1_head`); the torch solver fits
    them together. Keywords: contrast_as, standardize, max_iter, tol, seed, meta, solver ("sklearn"
    | "torch"), device. `max_iter`, `tol`: saga epochs and its coefficient-change tolerance, or
    FISTA iterations and its optimality tolerance (`probes/l1_solver.py`)."""
    return _fit_many([(rows, tuple(classes))], Cs, **kwargs)[0]


def _fit_many(
    problems: list[tuple[LabelledRows, tuple[str, ...]]],
    Cs: Sequence[float],
    *,
    contrast_as: str = "benign",
    standardize: bool = True,
    max_iter: int = 2000,
    tol: float = 1e-4,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    solver: str = "sklearn",
    device: str | None = None,
) -> list[list[HeadResult]]:
    """Heads for every (rows, classes) problem and every C. With the torch solver all of them are
    one batched fit when the problems share their design (relabelled rows, e.g. one-vs-rest)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if solver == "sklearn":
        _require_l1_sklearn()
    prepared = [_prepare(rows, classes, contrast_as, standardize) for rows, classes in problems]
    infos = []
    for (rows, classes), (_, _, counts, sparse, _, _) in zip(problems, prepared):
        infos.append({
            "kind": "multinomial" if len(classes) > 2 else "binary", "contrast_as": contrast_as,
            "standardize": standardize, "centered": not sparse, "sparse_fit": sparse,
            "class_counts": counts.tolist(), "solver": solver, "splits": rows.provenance(), **(meta or {}),
        })
    out: list[list[HeadResult]] = []
    if solver == "sklearn":
        for (rows, classes), (x, y, _, sparse, mean, scale), info in zip(problems, prepared, infos):
            design = _design_matrix(x, mean, scale, sparse)
            heads = []
            for C in Cs:
                coef, intercept, converged = _fit_logistic(design, y, C, max_iter, tol, seed)
                heads.append(_as_head(coef, intercept, C, mean, scale, {**info, "converged": converged}, classes))
            out.append(heads)
        return out
    x0, _, _, sparse0, mean0, scale0 = prepared[0]
    shared = all(len(set(len(c) for _, c in problems)) == 1 and p[0].shape == x0.shape and np.array_equal(p[0], x0)
                 for p in prepared)
    if not shared:  # (not used by the stage) one fit per problem
        return [_fit_many([problem], Cs, contrast_as=contrast_as, standardize=standardize, max_iter=max_iter, tol=tol,
                          seed=seed, meta=meta, solver=solver, device=device)[0] for problem in problems]
    design = _design_matrix(x0, mean0, scale0, sparse0)
    dense = design.toarray() if sparse0 else design
    fit = _torch_fits([dense], [p[1] for p in prepared for _ in Cs], [C for _ in problems for C in Cs],
                      len(problems[0][1]), max_iter, tol, device)
    for i, ((_, classes), info) in enumerate(zip(problems, infos)):
        out.append([_as_head(fit.coef[j], fit.intercept[j], C, mean0, scale0,
                             {**info, "converged": bool(fit.converged[j])}, classes)
                    for j, C in ((i * len(Cs) + k, C) for k, C in enumerate(Cs))])
    return out


def fit_l1_head(rows: LabelledRows, C: float = 1.0, **kwargs: Any) -> HeadResult:
    """Fit a multinomial L1 head on extract rows (features (n, d)) over `classes` (class 0 benign).

    Keywords as `fit_l1_heads` (classes, contrast_as, standardize, max_iter, tol, seed, meta,
    solver, device). Contrast rows count as benign unless `contrast_as="drop"`. Every class needs at
    least one row.
    """
    return fit_l1_heads(rows, [C], **kwargs)[0]


def fit_resampled_heads(resamples: list[LabelledRows], C: float, *, classes: Sequence[str] = PROBE_CLASSES,
                        contrast_as: str = "benign", standardize: bool = True, max_iter: int = 2000,
                        tol: float = 1e-4, device: str | None = None, **_: Any) -> list[HeadResult]:
    """Torch solver: one head per resample of extract rows (each standardised on its own rows), all
    solved together (stability selection). The resamples must have the same number of rows."""
    prepared = [_prepare(r, classes, contrast_as, standardize) for r in resamples]
    designs = []
    for x, _, _, sparse, mean, scale in prepared:
        design = _design_matrix(x, mean, scale, sparse)
        designs.append(design.toarray() if sparse else design)
    fit = _torch_fits(designs, [p[1] for p in prepared], [C] * len(resamples), len(classes), max_iter, tol, device)
    return [_as_head(fit.coef[i], fit.intercept[i], C, p[4], p[5], {"converged": bool(fit.converged[i])}, classes)
            for i, p in enumerate(prepared)]


def _score_on(head: HeadResult, rows: LabelledRows, contrast_as: str) -> float:
    y, keep = probe_targets(rows.categories, head.classes, contrast_as)
    return macro_f1(y, head.predict(rows.features[keep]), len(head.classes))


def select_l1_head(
    extract: LabelledRows,
    calibrate: LabelledRows,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    **fit_kwargs: Any,
) -> HeadResult:
    """Fit one head per C on extract, keep the C with the best calibrate macro-F1 (ties: smaller C).

    `meta["c_scores"]` records every C with its calibrate macro-F1.
    """
    require_split(calibrate.splits, "calibrate", "L1 head C selection")
    if not c_grid:
        raise ValueError("c_grid is empty")
    if extract.d != calibrate.d:
        raise ValueError(f"extract rows have {extract.d} features, calibrate rows {calibrate.d}")
    return _best_by_calibrate(fit_l1_heads(extract, sorted(float(c) for c in c_grid), **fit_kwargs), calibrate,
                              fit_kwargs.get("contrast_as", "benign"), {**extract.provenance(), **calibrate.provenance()})


def _best_by_calibrate(heads: list[HeadResult], calibrate: LabelledRows, contrast_as: str,
                       splits: dict[str, Any]) -> HeadResult:
    """The head (ascending C) with the best calibrate macro-F1, ties to the smaller C; records every score."""
    best: HeadResult | None = None
    scores: list[dict[str, float]] = []
    for head in heads:
        score = _score_on(head, calibrate, contrast_as)
        scores.append({"C": head.C, "calibrate_macro_f1": score})
        if best is None or score > best.meta["calibrate_macro_f1"]:
            best = head
            best.meta["calibrate_macro_f1"] = score
    assert best is not None
    best.meta["c_scores"] = scores
    best.meta["splits"] = splits
    return best


def _one_vs_rest_rows(rows: LabelledRows, category: str) -> LabelledRows:
    """Relabel rows for a binary head: `category` stays, contrast stays, everything else -> benign."""
    keep = np.isin(rows.categories, [category, CONTRAST])
    return rows.with_categories(np.where(keep, rows.categories, BENIGN))


def fit_ovr_heads(
    extract: LabelledRows,
    calibrate: LabelledRows | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    C: float = 1.0,
    categories: Sequence[str] = REFUSAL_CATEGORIES,
    **fit_kwargs: Any,
) -> dict[str, HeadResult]:
    """One binary L1 head per category: rows of the category vs all other rows (contrast included).

    The negative class is stored as "rest". With `calibrate` rows, C is chosen per category from
    `c_grid` by calibrate macro-F1 of the two classes; else `C` is used.
    """
    if calibrate is not None:
        require_split(calibrate.splits, "calibrate", "L1 head C selection")
        if not c_grid:
            raise ValueError("c_grid is empty")
    Cs = [float(C)] if calibrate is None else sorted(float(c) for c in c_grid)
    problems = [(_one_vs_rest_rows(extract, c), (BENIGN, c)) for c in categories]
    fits = _fit_many(problems, Cs, **fit_kwargs)  # torch: every category and C in one batched fit
    splits = {**extract.provenance(), **(calibrate.provenance() if calibrate is not None else {})}
    heads: dict[str, HeadResult] = {}
    for category, candidates in zip(categories, fits):
        head = candidates[0] if calibrate is None else _best_by_calibrate(
            candidates, _one_vs_rest_rows(calibrate, category), fit_kwargs.get("contrast_as", "benign"), splits)
        head.classes = (REST, category)
        head.meta.update({"kind": "one_vs_rest", "positive": category, "splits": splits})
        heads[category] = head
    return heads


def evaluate_head(head: HeadResult, eval_rows: LabelledRows, contrast_as: str = "benign",
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy (Wilson 95%) and macro-F1 (bootstrap 95%) of a multinomial head on eval rows."""
    require_split(eval_rows.splits, "eval", "head evaluation")
    if REST in head.classes:
        raise ValueError("evaluate_head expects a multinomial head, got a one-vs-rest head")
    y, keep = probe_targets(eval_rows.categories, head.classes, contrast_as)
    summary = classification_summary(y, head.predict(eval_rows.features[keep]), head.classes, n_boot, seed)
    summary["eval"] = eval_rows.provenance().get("eval", {})
    return summary
