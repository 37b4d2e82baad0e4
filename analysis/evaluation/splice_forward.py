"""The forwards behind the spliced evaluation, done as little as possible (`analysis.evaluation.splice`).

One left-padded batch runs in pieces on a KV cache: the columns before the first user-content
token once (`prefix`), then the rest. A splice variant changes nothing before `layer`, so after
one clean pass of the rest (which records the layer's output and the inputs of every later block)
a variant only **replays the blocks after `layer`** and the head on its edited layer output,
attending to a copy of the prefix's cache. The replay is checked once against the clean pass
(`check_replay`); a model where it does not reproduce the clean logits runs full forwards instead.
A response-start variant runs only the last column on the cache of the others.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.positions import CONTENT
from activations.tokenize import position_ids_from_mask

Reconstruction = Callable[[torch.Tensor], torch.Tensor]


def content_mask(kinds: Sequence[np.ndarray], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """`(batch, seq)` bool: user-content tokens of left-padded rows (row i = its last len(kinds[i]) columns)."""
    b, s = shape
    kind = torch.full((b, s), -1, dtype=torch.int64)
    for i, k in enumerate(kinds):
        kind[i, s - len(k):] = torch.from_numpy(k.astype(np.int64))
    return (kind == CONTENT).to(device)


def cropped(cache: Any, length: int) -> Any:
    """A copy of `cache` cut to its first `length` columns, or None when the cache type cannot be cut."""
    try:
        out = copy.deepcopy(cache)
        extra = out.get_seq_length() - length
        if extra > 0:
            out.crop(-extra)  # a negative argument removes that many columns (every transformers version)
        return out if out.get_seq_length() == length else None
    except (AttributeError, NotImplementedError, ValueError, TypeError, RuntimeError):
        return None


def spliced(hidden: torch.Tensor, mask: torch.Tensor, recon: Reconstruction | None) -> torch.Tensor:
    """`hidden (b, n, d)` with the rows at `mask (b, n)` replaced by `recon` of them (None: zeros)."""
    out = hidden.clone()
    rows = hidden[mask]
    out[mask] = torch.zeros_like(rows) if recon is None else recon(rows).to(hidden.dtype).to(hidden.device)
    return out


@dataclass
class _Recorded:
    """What the clean pass over columns [lo, hi) recorded for replays."""

    lo: int
    hidden: torch.Tensor
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
    cache: Any


class SpliceRunner:
    """Forwards of one left-padded batch `{input_ids, attention_mask}` of `adapter`'s model, spliced at `layer`."""

    def __init__(self, adapter: ModelAdapter, layer: int, batch: dict[str, torch.Tensor], replay: bool = True) -> None:
        self.adapter, self.layer = adapter, layer
        self.ids, self.attn = batch["input_ids"], batch["attention_mask"]
        self.pos = position_ids_from_mask(self.attn)
        params = inspect.signature(adapter.model.forward).parameters  # transformers >= 5.2x calls it `cache`
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.tail = [adapter.layer_module(i) for i in range(layer + 1, adapter.num_layers)]
        self.replay_ok = replay
        self.recorded: _Recorded | None = None

    def run(self, lo: int, hi: int, cache: Any, edit_mask: torch.Tensor | None = None, recon: Reconstruction | None = None,
            splice: bool = False, record: bool = False, keep: bool = False) -> tuple[torch.Tensor, Any]:
        """Log-probabilities `(batch, hi - lo, vocab)` float32 of columns [lo, hi) after `cache` (columns
        [0, lo), None when lo == 0). With `splice` the layer's output at `edit_mask (batch, hi - lo)`
        becomes `recon` of it (None: zeros); with `record` the layer's output and the later blocks'
        inputs are kept for `replay`. With `keep` the cache of [0, hi) is returned (`cache` itself,
        extended); otherwise `cache` is left as it was (cut back, or copied first if it cannot be cut)
        and None is returned."""
        kept: dict[str, Any] = {"inputs": []}

        def edit(hidden: torch.Tensor) -> torch.Tensor | None:
            if record:
                kept["hidden"] = hidden.detach().clone()
            return spliced(hidden, edit_mask, recon) if splice else None

        def keep_inputs(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kept["inputs"].append((args, dict(kwargs)))

        handles = [block.register_forward_pre_hook(keep_inputs, with_kwargs=True) for block in self.tail] if record else []
        in_place = keep or getattr(cache, "is_croppable", False) is True
        past = cache if in_place or cache is None else copy.deepcopy(cache)
        try:
            with torch.no_grad(), residual_hooks(self.adapter, {self.layer: edit}):
                out = self.adapter.model(input_ids=self.ids[:, lo:hi], attention_mask=self.attn[:, :hi],
                                         position_ids=self.pos[:, lo:hi], use_cache=True, **{self.cache_arg: past})
        finally:
            for handle in handles:
                handle.remove()
        new_cache = getattr(out, "cache", None) if self.cache_arg == "cache" else out.past_key_values
        if record:
            self.recorded = _Recorded(lo, kept["hidden"], kept["inputs"], new_cache)
        if not keep:
            if past is cache and cache is not None:
                cache.crop(-(hi - lo))
            new_cache = None
        return torch.log_softmax(out.logits.float(), dim=-1), new_cache

    def replay(self, edit_mask: torch.Tensor | None, recon: Reconstruction | None, splice: bool = True) -> torch.Tensor | None:
        """Log-probabilities of the recorded columns with the layer's output spliced, from the blocks
        after `layer` only; None when this model's blocks cannot be replayed (use `run`)."""
        rec = self.recorded
        if rec is None or not self.replay_ok or len(rec.inputs) != len(self.tail):
            return None
        cache = cropped(rec.cache, rec.lo)
        if cache is None:
            return None
        h = spliced(rec.hidden, edit_mask, recon) if splice else rec.hidden
        swap = lambda v: cache if v is rec.cache else v  # noqa: E731 (the recorded cache → a fresh prefix copy)
        with torch.no_grad():
            for block, (args, kwargs) in zip(self.tail, rec.inputs):
                kwargs = {k: swap(v) for k, v in kwargs.items()}
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = h
                    out = block(*[swap(a) for a in args], **kwargs)
                else:
                    out = block(h, *[swap(a) for a in args[1:]], **kwargs)
                h = out[0] if isinstance(out, (tuple, list)) else out
            logits = self.adapter.unembed(self.adapter.final_norm(h)).float()
        cap = getattr(self.adapter.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    def check_replay(self, clean: torch.Tensor) -> bool:
        """Replay the recorded clean pass unedited; keep replaying only if it gives `clean` back."""
        again = self.replay(None, None, splice=False)
        self.replay_ok = again is not None and again.shape == clean.shape and bool(
            torch.allclose(again, clean, atol=1e-3, rtol=1e-4))
        return self.replay_ok
