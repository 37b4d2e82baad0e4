"""Spliced evaluation of an SAE: replace a layer's output by its reconstruction and score the model.

For each prompt the residual output of `layer` is replaced, inside the forward, by `recon(x)` at the
positions of one **site**:

- `content`: every user-content token (`activations.positions`); next-token predictions are scored
  at every position from the first content token to the second-to-last prompt token (each predicts
  the prompt's next token, the only positions the splice can change);
- `response_start`: the last prompt token only; the score is the prediction of the first response
  token, whose target is the clean model's greedy token there.

Per site and reconstruction it reports, pooled over the scored positions (float64):

- `ce_clean`, `ce_spliced`, `ce_zero`: next-token cross-entropy of the clean model, of the spliced
  one, and with the site zeroed (the zero-ablation baseline);
- `ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)` as SAELens defines it (1: the
  splice changes nothing; 0: as bad as zeroing), with a bootstrap 95% CI over prompts;
- `kl` (and `kl_zero`): mean KL(clean ‖ spliced) of the next-token distributions;
- `decision_fidelity` (when the refusal class-token ids are given): the share of prompts whose
  first-token decision (argmax over the class tokens at the last position) is unchanged, with its
  Wilson 95% CI and n.

    scores = splice_scores(model, tokenizer, texts, layer, {"seed_0": sae}, class_token_ids=ids)
    scores["seed_0"]["content"]["ce_recovered"]

Works with any SAE (`encode`/`decode`, e.g. `sae.model.SparseAutoencoder` or a SAELens SAE) or
any callable `(n, d_model) -> (n, d_model)`, at any layer. The forwards are shared and shortened
(`analysis.evaluation.splice_forward`): a variant recomputes only the blocks after `layer`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.positions import position_kinds
from activations.stats import bootstrap_ci_rows, rate_from_counts
from activations.tokenize import encode_prompts
from analysis.evaluation.splice_forward import Reconstruction, SpliceRunner, content_mask, cropped

SITES = ("content", "response_start")


def as_reconstruction(sae: Any) -> Reconstruction:
    """`x (n, d) -> x_hat (n, d)` of an SAE (`decode(encode(x))`, in the SAE's dtype and device), or
    the callable itself."""
    if hasattr(sae, "encode") and hasattr(sae, "decode"):
        params = list(sae.parameters()) if hasattr(sae, "parameters") else []
        dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else None

        def recon(x: torch.Tensor) -> torch.Tensor:
            return sae.decode(sae.encode(x.to(dtype=dtype, device=device or x.device)))

        return recon
    if callable(sae):
        return sae
    raise ValueError(f"expected an SAE (encode/decode) or a callable, got {type(sae).__name__}")


@dataclass
class _Totals:
    """Per-prompt sums of one (reconstruction, site) over the prompts seen so far."""

    ce: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    same_decision: list[np.ndarray] = field(default_factory=list)

    def add(self, ce: torch.Tensor, kl: torch.Tensor, scored: torch.Tensor, same: torch.Tensor | None) -> None:
        self.ce.append(_per_prompt(ce, scored))
        self.kl.append(_per_prompt(kl, scored))
        if same is not None:
            self.same_decision.append(same.cpu().numpy())


def _per_prompt(values: torch.Tensor, scored: torch.Tensor) -> np.ndarray:
    """Sum over the scored positions of each prompt: `(batch,)` float64."""
    return (values.double() * scored).sum(dim=1).cpu().numpy()


def _kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per position `(batch, seq)` from log-probabilities."""
    return (clean.exp() * (clean - other)).sum(dim=-1)


def _ce(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy `(batch, positions)` of targets under log-probabilities `(batch, positions, vocab)`."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _score_batch(runner: SpliceRunner, kinds: Sequence[np.ndarray], variants: Mapping[str, Reconstruction | None],
                 class_ids: torch.Tensor | None, totals: dict[tuple[str, str], _Totals],
                 clean: dict[str, list[np.ndarray]], counts: dict[str, list[np.ndarray]], check_replay: bool) -> None:
    """Add one batch's scores of every variant (name → recon; None = zero ablation) at both sites
    (`check_replay`: first check that replaying the blocks after the layer reproduces the clean pass)."""
    ids = runner.ids
    b, s = ids.shape
    content = content_mask(kinds, (b, s), ids.device)
    has_content = content.any(dim=1)
    first = torch.where(has_content, content.float().argmax(dim=1), torch.full_like(has_content, s - 1, dtype=torch.long))
    c0 = int(first.min())
    prefix = runner.run(0, c0, None, keep=True)[1] if c0 > 0 else None

    def decision(logp: torch.Tensor) -> torch.Tensor | None:
        return None if class_ids is None else logp[:, -1, class_ids].argmax(dim=-1)

    # content site: columns [c0, s); position p predicts token p + 1 and is scored from the row's first content token
    reference, full_cache = runner.run(c0, s, prefix, record=True, keep=True)  # extends `prefix` to [0, s)
    if check_replay:
        runner.check_replay(reference)
    if c0 > 0:
        prefix = cropped(full_cache, c0) or runner.run(0, c0, None, keep=True)[1]
    ref_logp, targets = reference[:, :-1], ids[:, c0 + 1:]
    columns = torch.arange(c0, s - 1, device=ids.device)
    scored = (columns.unsqueeze(0) >= first.unsqueeze(1)) & has_content.unsqueeze(1) & runner.attn[:, c0:s - 1].bool()
    ref_decision = decision(reference)
    clean["content"].append(_per_prompt(_ce(ref_logp, targets), scored))
    counts["content"].append(scored.sum(dim=1).cpu().numpy().astype(np.float64))
    for name, recon in variants.items():
        out = runner.replay(content[:, c0:], recon)
        if out is None:
            out = runner.run(c0, s, prefix, content[:, c0:], recon, splice=True)[0]
        same = None if ref_decision is None else decision(out) == ref_decision
        totals[(name, "content")].add(_ce(out[:, :-1], targets), _kl(ref_logp, out[:, :-1]), scored, same)

    # response-start site: only the last column, on the clean cache of [0, s - 1)
    last_cache = cropped(full_cache, s - 1)
    if last_cache is None:  # a cache that cannot be cut (e.g. past a sliding window): recompute it
        last_cache = runner.run(c0, s - 1, copy.deepcopy(prefix), keep=True)[1] if s - 1 > c0 else prefix
    reference = runner.run(s - 1, s, last_cache)[0]
    target = reference[:, -1].argmax(dim=-1, keepdim=True)
    one = torch.ones(b, 1, dtype=torch.bool, device=ids.device)
    ref_decision = decision(reference)
    clean["response_start"].append(_per_prompt(_ce(reference, target), one))
    counts["response_start"].append(np.ones(b))
    for name, recon in variants.items():
        out = runner.run(s - 1, s, last_cache, one, recon, splice=True)[0]
        same = None if ref_decision is None else decision(out) == ref_decision
        totals[(name, "response_start")].add(_ce(out, target), _kl(reference, out), one, same)


@torch.no_grad()
def splice_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int,
    reconstructions: Mapping[str, Any],
    class_token_ids: Sequence[int] | None = None,
    chat_template: bool = True,
    max_length: int | None = 512,
    batch_size: int = 16,
    n_boot: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{name: {site: scores}}` for every reconstruction (see the module docstring).

    Args:
        reconstructions: name → SAE or callable `(n, d_model) -> (n, d_model)`.
        class_token_ids: the refusal class tokens (benign first) for the decision fidelity; None = skip it.
        batch_size: prompts per forward (prompts are batched by token length).
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ValueError("spliced evaluation needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = ModelAdapter(model)
    adapter.check_layer(layer)
    variants: dict[str, Reconstruction | None] = {"__zero__": None, **{n: as_reconstruction(r) for n, r in reconstructions.items()}}
    totals = {(n, site): _Totals() for n in variants for site in SITES}
    clean: dict[str, list[np.ndarray]] = {site: [] for site in SITES}
    counts: dict[str, list[np.ndarray]] = {site: [] for site in SITES}
    device = next(model.parameters()).device
    class_ids = None if class_token_ids is None else torch.as_tensor(list(class_token_ids), dtype=torch.long, device=device)
    all_kinds = position_kinds(tokenizer, texts, chat_template, max_length)
    replay = True
    order = sorted(range(len(texts)), key=lambda i: (len(all_kinds[i]), i))
    for start in tqdm(range(0, len(order), batch_size), desc="spliced evaluation", disable=not progress):
        chosen = order[start:start + batch_size]
        batch = encode_prompts(tokenizer, [texts[i] for i in chosen], chat_template, max_length, device=device)
        kinds = [all_kinds[i] for i in chosen]
        if [len(k) for k in kinds] != batch["attention_mask"].sum(dim=1).tolist():
            raise RuntimeError("position kinds and the encoded prompts disagree in length")
        runner = SpliceRunner(adapter, layer, batch, replay=replay)
        _score_batch(runner, kinds, variants, class_ids, totals, clean, counts, check_replay=start == 0)
        replay = runner.replay_ok  # checked on the first batch: a model whose blocks cannot be replayed runs full forwards
    clean_sums = {site: np.concatenate(clean[site]) for site in SITES}
    n_pos = {site: np.concatenate(counts[site]) for site in SITES}
    return {name: {site: _site_result(totals[(name, site)], totals[("__zero__", site)], clean_sums[site], n_pos[site],
                                      n_boot, seed) for site in SITES} for name in variants if name != "__zero__"}


def _site_result(spliced: _Totals, zero: _Totals, clean: np.ndarray, n_pos: np.ndarray, n_boot: int,
                 seed: int) -> dict[str, Any]:
    """Pooled scores of one (reconstruction, site), with a bootstrap CI of ce_recovered over prompts."""
    ce, ce_zero = np.concatenate(spliced.ce), np.concatenate(zero.ce)
    positions = float(n_pos.sum())
    if positions == 0:
        return {"n_prompts": int(n_pos.size), "n_positions": 0, "ce_recovered": None}

    def recovered(index: np.ndarray) -> float:
        c, s, z = clean[index].sum(), ce[index].sum(), ce_zero[index].sum()
        return float((z - s) / (z - c)) if abs(z - c) > 1e-12 else float("nan")

    everything = np.arange(clean.size)
    value = recovered(everything)
    ci = None
    if np.isfinite(value) and n_boot > 0 and clean.size > 1:
        lo, hi = bootstrap_ci_rows(recovered, clean.size, n_resamples=n_boot, seed=seed)
        ci = [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None
    result: dict[str, Any] = {
        "ce_clean": float(clean.sum() / positions), "ce_spliced": float(ce.sum() / positions),
        "ce_zero": float(ce_zero.sum() / positions),
        "ce_recovered": value if np.isfinite(value) else None, "ce_recovered_ci": ci,
        "kl": float(np.concatenate(spliced.kl).sum() / positions), "kl_zero": float(np.concatenate(zero.kl).sum() / positions),
        "n_prompts": int(clean.size), "n_positions": int(positions), "decision_fidelity": None,
    }
    if spliced.same_decision:
        same = np.concatenate(spliced.same_decision)
        result["decision_fidelity"] = rate_from_counts(int(same.sum()), int(same.size))
        zero_same = np.concatenate(zero.same_decision)
        result["decision_fidelity_zero"] = rate_from_counts(int(zero_same.sum()), int(zero_same.size))
    return result
