"""What makes a selected SAE feature fire: the plain data behind a feature page.

`build_feature_cards(...)` returns one JSON-able dict per (class, feature) of a selection:

- `top_examples`: the prompts where the feature is largest (at most `n_top`), each with its
  tokens (template prefix and attention sink left out), the activation of every token and the index
  of the most active one; `other_examples`: the same among prompts of other categories;
- `per_category`: firing frequency and mean activation on each category's response-start rows;
- `logit_lens`: the tokens whose unembedding rows have the largest (and smallest) dot product with
  the decoder direction (`W_U · W_dec[i]`, the final norm's gain folded into `W_U`);
- `cosine_mean_difference`: cosine of the decoder direction with the class's mean-difference vector;
- `stability`: the Hungarian partner of the feature's decoder row in every other seed and its cosine.

Examples come from the extract and calibrate rows only: nothing here reads eval rows or labels.
The HTML is drawn from these dicts by `analysis.reporting.feature_pages`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from activations.positions import PREFIX, RESPONSE_START
from activations.store import ActivationStore, RowMeta
from sae.model import SparseAutoencoder

EXAMPLE_SPLITS = ("extract", "calibrate")
"""The only splits feature examples are drawn from."""


@torch.no_grad()
def latent_values(sae: SparseAutoencoder, store: ActivationStore, layer: int, feature_ids: Sequence[int],
                  splits: Sequence[str] = EXAMPLE_SPLITS, chunk_rows: int = 4096) -> tuple[np.ndarray, RowMeta]:
    """Activations `(n, m)` float32 of the latents `feature_ids` on every row of `splits`, and the rows' meta."""
    bad = sorted(set(splits) - set(EXAMPLE_SPLITS))
    if bad:
        raise ValueError(f"feature examples come from {' / '.join(EXAMPLE_SPLITS)} rows only, not {bad}")
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long)
    column = torch.full((sae.d_sae,), -1, dtype=torch.long)
    column[ids] = torch.arange(len(ids))
    parts, metas = [], []
    for x, meta in store.iter_chunks(layer, list(splits), chunk_rows=chunk_rows):
        values, indices = sae.encode_topk(torch.from_numpy(x).to(sae.device))
        values, indices = values.float().cpu(), indices.cpu()
        out = torch.zeros(len(x), len(ids) + 1)  # the extra column collects latents not asked for
        out.scatter_add_(1, torch.where(column[indices] >= 0, column[indices], len(ids)), values)
        parts.append(out[:, :-1].numpy())
        metas.append(meta)
    if not parts:
        raise ValueError(f"the store {store.directory} has no rows in {list(splits)}")
    return np.concatenate(parts), RowMeta.concat(metas)


def _prompt_starts(meta: RowMeta) -> np.ndarray:
    """Row index where each prompt's (contiguous) rows begin."""
    ids = meta.prompt_id
    return np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])


def _example(values: np.ndarray, meta: RowMeta, lo: int, hi: int, eligible: np.ndarray,
             token_text: Callable[[int], str], context: int) -> dict[str, Any]:
    """One prompt's shown tokens (eligible rows, at most `context` around the peak) and activations."""
    rows = np.arange(lo, hi)[eligible[lo:hi]]
    peak = int(np.argmax(values[rows]))
    start = max(0, min(peak - context // 2, len(rows) - context))
    shown = rows[start:start + context]
    return {"prompt_id": str(meta.prompt_id[lo]), "category": str(meta.category[lo]), "split": str(meta.split[lo]),
            "value": float(values[rows[peak]]), "argmax": peak - start, "truncated_left": start > 0,
            "tokens": [token_text(int(t)) for t in meta.token_id[shown]],
            "values": [float(v) for v in values[shown]]}


def top_examples(values: np.ndarray, meta: RowMeta, token_text: Callable[[int], str], n: int,
                 categories: Sequence[str] | None = None, exclude: Sequence[str] = (), context: int = 40) -> list[dict[str, Any]]:
    """The `n` prompts with the largest activation `values (rows,)` (only where it is > 0), best first.

    Prefix and position-0 rows never count; `categories` / `exclude` restrict the prompts' category.
    """
    eligible = (meta.position_kind != PREFIX) & (meta.position != 0)
    starts = _prompt_starts(meta)
    ends = np.r_[starts[1:], len(meta)]
    masked = np.where(eligible, values, -np.inf)
    best = np.maximum.reduceat(masked, starts) if len(starts) else np.empty(0)
    cats = meta.category[starts]
    allowed = best > 0
    if categories is not None:
        allowed &= np.isin(cats, list(categories))
    if exclude:
        allowed &= ~np.isin(cats, list(exclude))
    order = np.flatnonzero(allowed)[np.argsort(-best[allowed], kind="stable")][:n]
    return [_example(values, meta, int(starts[i]), int(ends[i]), eligible, token_text, context) for i in order]


def category_stats(values: np.ndarray, meta: RowMeta) -> dict[str, dict[str, float | int]]:
    """Per category: firing frequency and mean activation over its response-start rows, and n."""
    last = meta.position_kind == RESPONSE_START
    out = {}
    for category in sorted(set(meta.category[last].tolist())):
        v = values[last & (meta.category == category)].astype(np.float64)
        out[category] = {"frequency": float(np.mean(v > 0)), "mean": float(v.mean()), "n": int(v.size)}
    return out


def unembedding(model: torch.nn.Module) -> np.ndarray:
    """`W_U (vocab, d_model)` float32 with the final norm's gain folded in (the logit-lens matrix)."""
    from activations.adapter import ModelAdapter

    adapter = ModelAdapter(model)
    W = adapter.unembed.weight.detach().float().cpu()
    gain = getattr(adapter.final_norm, "weight", None)
    if gain is not None and gain.ndim == 1 and gain.shape[0] == W.shape[1]:
        gain = gain.detach().float().cpu()
        if type(adapter.final_norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by (1 + weight)
            gain = 1.0 + gain
        W = W * gain
    return W.numpy()


def logit_lens(direction: np.ndarray, W_U: np.ndarray, token_text: Callable[[int], str], k: int = 10) -> dict[str, list]:
    """Top and bottom `k` tokens of `W_U (vocab, d) · direction (d,)`: `{"top": [[token, value]], "bottom": ...}`."""
    scores = W_U.astype(np.float64) @ np.asarray(direction, dtype=np.float64)
    top, bottom = np.argsort(-scores)[:k], np.argsort(scores)[:k]
    return {"top": [[token_text(int(i)), float(scores[i])] for i in top],
            "bottom": [[token_text(int(i)), float(scores[i])] for i in bottom]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return None if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb))


def token_texts(tokenizer: Any) -> Callable[[int], str]:
    """A cached `token id -> text` (`tokenizer.decode([id])`, so byte-level pieces read as text)."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return text


def build_feature_cards(
    sae: SparseAutoencoder,
    store: ActivationStore,
    layer: int,
    features: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    W_U: np.ndarray | None = None,
    mean_differences: Mapping[str, np.ndarray] | None = None,
    matches: Mapping[int, Mapping[int, tuple[int, float]]] | None = None,
    match_cosine: float = 0.7,
    n_top: int = 8,
    n_other: int = 3,
    lens_k: int = 10,
    context: int = 40,
) -> list[dict[str, Any]]:
    """One card per (class, feature) of `features` (class → rows with at least `feature`; the other keys,
    e.g. weight, selection_frequency, consensus, are copied onto the card). See the module docstring.

    `matches[feature] = {other seed: (latent, cosine)}`; a seed counts as matched when cosine >= `match_cosine`.
    """
    ids = sorted({int(row["feature"]) for rows in features.values() for row in rows})
    if not ids:
        return []
    values, meta = latent_values(sae, store, layer, ids)
    column = {f: i for i, f in enumerate(ids)}
    text = token_texts(tokenizer)
    W_dec = sae.W_dec.detach().float().cpu().numpy()
    cards = []
    for category, rows in features.items():
        for row in rows:
            f = int(row["feature"])
            v = values[:, column[f]]
            seeds = {int(s): {"latent": int(j), "cosine": float(c)} for s, (j, c) in (matches or {}).get(f, {}).items()}
            cards.append({
                **{k: val for k, val in row.items()}, "feature": f, "category": category,
                "top_examples": top_examples(v, meta, text, n_top, context=context),
                "other_examples": top_examples(v, meta, text, n_other, exclude=[category], context=context),
                "per_category": category_stats(v, meta),
                "logit_lens": None if W_U is None else logit_lens(W_dec[f], W_U, text, lens_k),
                "cosine_mean_difference": (None if not mean_differences or category not in mean_differences
                                           else _cosine(W_dec[f], np.asarray(mean_differences[category]))),
                "stability": None if matches is None else {
                    "seeds": seeds, "match_cosine": match_cosine,
                    "n_matched": sum(1 for m in seeds.values() if m["cosine"] >= match_cosine), "n_other_seeds": len(seeds)},
            })
    return cards
