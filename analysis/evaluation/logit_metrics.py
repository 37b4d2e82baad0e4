"""Metrics of the refusal decision computed from final logits, for attribution and activation patching.

A metric maps logits `(batch, seq, vocab)` to one score per row `(batch,)`; it must be differentiable.
With left padding the last position predicts the first response token, so the metrics read position -1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


def _token_ids(token_ids: int | Sequence[int], what: str) -> torch.Tensor:
    ids = torch.as_tensor([token_ids] if isinstance(token_ids, int) else list(token_ids), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"{what}: need at least one token id")
    if (ids < 0).any():
        raise ValueError(f"{what}: token ids must be non-negative, got {ids.tolist()}")
    return ids


def _set_logprob(logits: torch.Tensor, ids: torch.Tensor, what: str) -> torch.Tensor:
    """log Σ_{t in ids} p(t) at the last position, `(batch,)`, computed in float32 or wider."""
    if logits.ndim != 3:
        raise ValueError(f"{what}: logits must be (batch, seq, vocab), got {tuple(logits.shape)}")
    if int(ids.max()) >= logits.shape[-1]:
        raise ValueError(f"{what}: token id {int(ids.max())} out of range for vocab size {logits.shape[-1]}")
    last = logits[:, -1, :].to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(last, dim=-1)
    return torch.logsumexp(logprobs[:, ids.to(logits.device)], dim=-1)


def token_logprob_metric(token_ids: int | Sequence[int]) -> Metric:
    """log-probability, at the last position, of one token or of a set of tokens (logsumexp)."""
    ids = _token_ids(token_ids, "token_logprob_metric")
    return lambda logits: _set_logprob(logits, ids, "token_logprob_metric")


def refusal_margin_metric(refuse_ids: int | Sequence[int], respond_ids: int | Sequence[int]) -> Metric:
    """log p(refusal tokens) − log p(response tokens) at the last position (each a logsumexp over its set)."""
    refuse = _token_ids(refuse_ids, "refusal_margin_metric (refuse)")
    respond = _token_ids(respond_ids, "refusal_margin_metric (respond)")
    if set(refuse.tolist()) & set(respond.tolist()):
        raise ValueError("refusal_margin_metric: refuse and respond token sets overlap")
    return lambda logits: (_set_logprob(logits, refuse, "refusal_margin_metric")
                           - _set_logprob(logits, respond, "refusal_margin_metric"))


def resolve_metric(metric: Metric | int | Sequence[int]) -> Metric:
    """A callable is used as is; a token id or a list of ids becomes `token_logprob_metric(ids)`."""
    if callable(metric):
        return metric
    return token_logprob_metric(metric)


def evaluate_metric(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    """Apply `metric` and check it returns one finite value per row, `(batch,)`."""
    values = metric(logits)
    if not isinstance(values, torch.Tensor) or values.shape != (logits.shape[0],):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"metric must return one value per row, shape ({logits.shape[0]},), got {shape}")
    if not torch.isfinite(values).all():
        raise ValueError("metric returned NaN or infinite values")
    return values
