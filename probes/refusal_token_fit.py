"""Fit categorical refusal tokens onto a model that has none (the research's starting model).

The class decision is a multinomial logistic regression on the final-norm state `h (d_model,)` of the
last prompt position, which is exactly the input of the unembedding, so each class becomes one
unembedding row: logit_c = W_c . h. The regression is fitted WITHOUT intercept (`fit_intercept=False`):
the unembedding has no bias, and a post-RMSNorm state has a nearly constant norm, so an intercept adds
little; `FitReport.intercept_check` reports the calibrate macro-F1 with and without one.

Protocol: rows of the `extract` split fit the weights, rows of the `calibrate` split choose C (macro-F1)
and report; `eval` rows are refused (report them afterwards with `first_token_logits`). Labels are
PROBE_CLASSES; contrast rows count as benign (`[respond]`). Statistics are float64.

States are read with a plain torch forward hook on the adapter's final norm (local to
`final_norm_states`, removed on exit) while the base model runs; the LM head is applied to the last
position only, to find the largest ordinary-token logit used to lift the class tokens.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.records import PROBE_CLASSES, PromptRecord
from activations.tokenize import encode_prompts, position_ids_from_mask, token_lengths
from probes.metrics import classification_summary, macro_f1
from probes.rows import probe_targets, require_split, split_hash
from probes.refusal_token_install import install_refusal_tokens, offset_strength
from probes.refusal_tokens import RefusalTokenSpec, first_token_logits, model_device

DEFAULT_C_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Inverse L2 strengths tried (on RMS-scaled features); C is chosen by calibrate macro-F1."""

DEFAULT_MARGIN = 5.0
"""Logits by which the winning class token must beat every ordinary token on the fit prompts."""


@dataclass
class FitReport:
    """Everything about one refusal-token fit (written as `fit_report.json`)."""

    model: str
    tokens: dict[str, str]
    token_ids: list[int]
    added_tokens: list[str]
    untied: bool
    C: float
    C_scores: dict[str, float]
    class_weight: str | None
    seed: int
    splits: dict[str, Any]
    calibrate: dict[str, Any]
    intercept_check: dict[str, float]
    offset: dict[str, float]
    self_check_max_abs_diff: float
    seconds: float
    eval: dict[str, Any] | None = None
    head: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Arrays (not in the JSON): `class_weights (n_classes, d_model)` float64 — the logistic regression
    on raw states, `offset_direction (d_model,)` — u, `offset_beta (1,)` — beta."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without the `head` arrays)."""
        return {k: v for k, v in asdict(self).items() if k != "head"}


def final_norm_states(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    chat_template: bool = True,
    max_length: int | None = 512,
    exclude_ids: Sequence[int] = (),
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Final-norm state of the last prompt position and the largest ordinary-token logit there.

    Returns `h (n, d_model)` float64 (the unembedding's input) and `ordinary_max (n,)` float64, the
    largest logit over vocabulary rows not in `exclude_ids` (before any logit soft-capping).
    """
    from activations.progress import progress_bar

    adapter = ModelAdapter(model)
    base = getattr(model, model.base_model_prefix, model)
    device = model_device(model)
    captured: list[torch.Tensor] = []

    def keep_last(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        captured.append(hidden[:, -1, :])

    # Batches of similar length waste less compute on padding; rows are put back in order at the end.
    order = np.argsort(token_lengths(tokenizer, texts, chat_template), kind="stable")
    states, maxima = [], []
    handle = adapter.final_norm.register_forward_hook(keep_last)
    try:
        for start in progress_bar(range(0, len(texts), batch_size), desc="final-norm states", unit="batch",
                                  disable=not progress):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            batch = encode_prompts(tokenizer, chunk, chat_template, max_length, device=device)
            captured.clear()
            with torch.no_grad():
                base(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
                if len(captured) != 1:
                    raise ValueError(f"final norm ran {len(captured)} times in one forward; expected once")
                logits = adapter.unembed(captured[0]).double()
                if exclude_ids:
                    logits[:, list(exclude_ids)] = -torch.inf
            states.append(captured[0].double().cpu().numpy())
            maxima.append(logits.max(dim=-1).values.cpu().numpy())
    finally:
        handle.remove()
    inverse = np.argsort(order)
    return np.concatenate(states)[inverse], np.concatenate(maxima)[inverse]


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float, class_weight: str | None, seed: int,
                  fit_intercept: bool = False) -> Any:
    """Multinomial L2 logistic regression (lbfgs, float64)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, l1_ratio=0.0, fit_intercept=fit_intercept, class_weight=class_weight,
                               max_iter=5000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _split_rows(records: Sequence[PromptRecord]) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(extract rows, calibrate rows); any other split is refused."""
    if not records:
        raise ValueError("refusal-token fit got no prompt records")
    fit_rows = [r for r in records if r.split != "calibrate"]
    tune_rows = [r for r in records if r.split == "calibrate"]
    require_split(np.array([r.split or "<unsplit>" for r in fit_rows]), "extract", "refusal-token head")
    return fit_rows, tune_rows


def _class_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """(n, n_classes) decision scores with a column for every class, absent ones at -inf."""
    scores = np.full((x.shape[0], len(PROBE_CLASSES)), -np.inf)
    scores[:, model.classes_] = model.decision_function(x).reshape(x.shape[0], -1)
    return scores


def fit_class_weights(
    h_fit: np.ndarray,
    y_fit: np.ndarray,
    h_tune: np.ndarray,
    y_tune: np.ndarray | None,
    C_grid: Sequence[float],
    class_weight: str | None,
    seed: int,
) -> tuple[np.ndarray, float, dict[str, float], dict[str, Any], dict[str, float]]:
    """No-intercept multinomial regression on raw final-norm states, C chosen by tune macro-F1.

    h_fit (n_fit, d_model) / y_fit (n_fit,) class indices fit; h_tune / y_tune (None: no tuning rows,
    first C used) choose C. Features are divided by their RMS for the solver and the scale is folded
    back, so `weights (n_classes, d_model)` float64 scores raw states: logit_c = weights[c] . h.
    Returns `(weights, C, {repr(C): tune macro-F1}, tune classification_summary, intercept_check)`.
    """
    scale = np.sqrt(np.mean(h_fit ** 2, axis=0))
    scale = np.where(scale > 1e-12, scale, 1.0)
    n_classes = len(PROBE_CLASSES)
    C_scores: dict[str, float] = {}
    if y_tune is not None:
        for C in C_grid:
            head = _fit_logistic(h_fit / scale, y_fit, C, class_weight, seed)
            C_scores[repr(float(C))] = macro_f1(y_tune, np.argmax(_class_scores(head, h_tune / scale), 1), n_classes)
    best_C = float(max(C_grid, key=lambda c: C_scores.get(repr(float(c)), 0.0)))  # first best on ties
    head = _fit_logistic(h_fit / scale, y_fit, best_C, class_weight, seed)
    weights = head.coef_ / scale[None, :]  # W_c . h == decision_function(h / scale)
    if y_tune is None:
        return weights, best_C, C_scores, {}, {}
    summary = classification_summary(y_tune, np.argmax(h_tune @ weights.T, axis=1), PROBE_CLASSES, seed=seed)
    with_b = _fit_logistic(h_fit / scale, y_fit, best_C, class_weight, seed, fit_intercept=True)
    intercept_check = {
        "no_intercept_macro_f1": summary["macro_f1"]["value"],
        "with_intercept_macro_f1": macro_f1(y_tune, np.argmax(_class_scores(with_b, h_tune / scale), 1), n_classes),
    }
    return weights, best_C, C_scores, summary, intercept_check


def fit_refusal_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    spec: RefusalTokenSpec | None = None,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    batch_size: int = 16,
    seed: int = 0,
    *,
    class_weight: str | None = "balanced",
    margin: float = DEFAULT_MARGIN,
    chat_template: bool = True,
    max_length: int | None = 512,
    check_rows: int = 8,
    progress: bool = False,
) -> FitReport:
    """Fit the class tokens on extract rows (C chosen on calibrate rows) and install them IN PLACE.

    `model` and `tokenizer` are modified (tokens added, unembedding untied and rows written); pass
    copies to keep the originals. `records` hold extract rows and, when `C_grid` has more than one
    value, calibrate rows. After installing, the first `check_rows` extract prompts are run through
    the model and its class-token logits compared with the regression's (`self_check_max_abs_diff`,
    after removing the common per-row offset). Save the result with `save_refusal_token_model`.
    """
    began = time.perf_counter()
    spec = spec or RefusalTokenSpec.preset("default")
    if not C_grid or any(not (c > 0 and np.isfinite(c)) for c in C_grid):
        raise ValueError(f"C_grid must hold positive finite numbers, got {list(C_grid)}")
    fit_rows, tune_rows = _split_rows(records)
    if len(C_grid) > 1 and not tune_rows:
        raise ValueError("choosing C needs calibrate rows; pass calibrate records or a single-value C_grid")
    y_fit, _ = probe_targets(np.array([r.category for r in fit_rows]))
    missing = [c for i, c in enumerate(PROBE_CLASSES) if not np.any(y_fit == i)]
    if missing:
        raise ValueError(f"refusal-token fit has no extract rows of class(es) {missing}")
    existing = [i for t, i in tokenizer.get_vocab().items() if t in set(spec.tokens.values())]
    h_all, ordinary_max = final_norm_states(model, tokenizer, [r.text for r in (*fit_rows, *tune_rows)],
                                            batch_size, chat_template, max_length, existing, progress)
    h_fit, h_tune = h_all[:len(fit_rows)], h_all[len(fit_rows):]

    y_tune = probe_targets(np.array([r.category for r in tune_rows]))[0] if tune_rows else None
    weights, best_C, C_scores, calibrate, intercept_check = fit_class_weights(
        h_fit, y_fit, h_tune, y_tune, C_grid, class_weight, seed)

    direction = h_fit.mean(axis=0)
    direction = direction / np.linalg.norm(direction)
    beta = offset_strength(h_all @ weights.T, ordinary_max, h_all @ direction, margin)
    installed = install_refusal_tokens(model, tokenizer, spec, weights, direction, beta)

    probe = [r.text for r in fit_rows[:check_rows]]
    model_logits = first_token_logits(model, tokenizer, probe, spec, batch_size, chat_template, max_length).double().numpy()
    expected = h_fit[:len(probe)] @ weights.T
    centred = (model_logits - model_logits.mean(1, keepdims=True)) - (expected - expected.mean(1, keepdims=True))

    splits = {"extract": {"n_rows": len(fit_rows), "split_hash": split_hash(r.id for r in fit_rows),
                          "class_counts": {c: int(np.sum(y_fit == i)) for i, c in enumerate(PROBE_CLASSES)}}}
    if tune_rows:
        splits["calibrate"] = {"n_rows": len(tune_rows), "split_hash": split_hash(r.id for r in tune_rows)}
    return FitReport(
        model=str(getattr(model.config, "name_or_path", "")),
        tokens=dict(spec.tokens),
        token_ids=installed["token_ids"],
        added_tokens=installed["added_tokens"],
        untied=installed["untied"],
        C=best_C,
        C_scores=C_scores,
        class_weight=class_weight,
        seed=seed,
        splits=splits,
        calibrate=calibrate,
        intercept_check=intercept_check,
        offset={"beta": beta, "margin": float(margin),
                "min_direction_projection": float((h_all @ direction).min())},
        self_check_max_abs_diff=float(np.abs(centred).max()),
        seconds=time.perf_counter() - began,
        head={"class_weights": weights, "offset_direction": direction, "offset_beta": np.array([beta])},
    )
