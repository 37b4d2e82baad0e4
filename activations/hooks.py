"""The one hook context manager, used by harvesting, steering, ablation and patching alike.

`residual_hooks(adapter, {layer: edit})` registers a forward hook on each residual layer's module.
`edit(hidden)` receives the layer's output `(batch, seq, d_model)` and returns a replacement tensor of
the same shape, or None to leave it unchanged (read-only capture). With a KV cache during generation
`seq` is 1 for every step after the prompt. Hooks are removed on exit, also when the forward raises.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.attention_mask import forward_attention_mask
from activations.tokenize import encode_prompts, position_ids_from_mask

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised inside a hook to end a forward early (after the deepest layer needed)."""


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _hidden_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def residual_hooks(
    adapter: ModelAdapter,
    edits: Mapping[int, Edit],
    stop_after: int | None = None,
) -> Iterator[None]:
    """Apply `edits[layer]` to the output of each residual layer during forwards in this block.

    Args:
        adapter: the model adapter.
        edits: layer → function of the hidden state `(batch, seq, d_model)`; returns a tensor or None.
        stop_after: if given, raise `StopForward` right after this layer's edit (truncated forward).
    """
    for layer in edits:
        adapter.check_layer(layer)
    if stop_after is not None:
        adapter.check_layer(stop_after)
    layers = sorted(set(edits) | ({stop_after} if stop_after is not None else set()))
    handles = []

    def make_hook(layer: int) -> Callable[..., Any]:
        edit = edits.get(layer)

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
            result = output
            if edit is not None:
                new_hidden = edit(_hidden_of(output))
                if new_hidden is not None:
                    result = _replace_hidden(output, new_hidden)
            if layer == stop_after:
                raise StopForward
            return result

        return hook

    try:
        for layer in layers:
            handles.append(adapter.layer_module(layer).register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_residuals(
    adapter: ModelAdapter,
    layers: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stop_early: bool = True,
    position_ids: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """Run a forward and return `{layer: hidden (batch, seq, d_model)}` for the requested layers.

    With `stop_early` the forward ends after the deepest requested layer: later blocks, the final
    norm and the unembedding are never computed. `position_ids` default to counting from each row's
    first real token (a left-padded row equals the row alone). The 4D attention mask is built on the
    device (`activations.attention_mask`), so the forward never waits for the GPU to tell the host
    whether the batch is padded. `reduce(hidden)` runs inside the
    hook and its result is kept instead (e.g. the rows a harvest stores), so full hidden states of
    several layers need not be held at once.
    """
    if not layers:
        raise ValueError("no layers requested")
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Edit:
        def edit(hidden: torch.Tensor) -> None:
            captured[layer] = hidden if reduce is None else reduce(hidden)

        return edit

    deepest = max(adapter.check_layer(layer) for layer in layers)
    base = getattr(adapter.model, adapter.model.base_model_prefix, adapter.model)
    with residual_hooks(adapter, {layer: keep(layer) for layer in layers}, stop_after=deepest if stop_early else None):
        try:  # the base model (no LM head) is enough: no logits are ever needed here
            base(
                input_ids=input_ids,
                attention_mask=forward_attention_mask(adapter, attention_mask),
                position_ids=position_ids_from_mask(attention_mask) if position_ids is None else position_ids,
                use_cache=False,
            )
        except StopForward:
            pass
    return captured


class BlockOutputCache:
    """Block `layer`'s outputs of batches seen once, so later forwards over the same batch skip
    blocks 0..`layer` (the decision-only evaluations of many conditions at one layer).

    The first, unmodified forward of a batch runs inside `recording(key)` and keeps the block's
    output `(batch, seq, d_model)`; a later forward of the same inputs inside `resumed(key)` makes
    blocks `0..layer-1` pass their input through and block `layer` return the recorded output, on
    which the usual hooks of `layer` (steering, ablation) then act. The embedding, attention masks
    and position embeddings are still computed by the model itself, so this is family-independent.
    Valid only when every intervention acts at `layer` or later and the inputs are identical (the
    key should identify them, e.g. the batch's prompt texts).
    """

    def __init__(self, adapter: ModelAdapter, layer: int) -> None:
        adapter.check_layer(layer)
        self.adapter, self.layer = adapter, layer
        self._outputs: dict[Any, torch.Tensor] = {}
        self._tail: int | None = None  # None: blocks return a tensor; n: a tuple of n + 1 items

    def __contains__(self, key: Any) -> bool:
        return key in self._outputs

    @contextmanager
    def recording(self, key: Any) -> Iterator[None]:
        """Keep block `layer`'s output of the forward run inside this block under `key`."""

        def keep(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._tail = None if isinstance(output, torch.Tensor) else len(output) - 1
            self._outputs[key] = _hidden_of(output).detach().clone()

        handle = self.adapter.layer_module(self.layer).register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def resumed(self, key: Any) -> Iterator[None]:
        """Skip blocks `0..layer` for the forward of the inputs recorded under `key`."""
        hidden = self._outputs[key]

        def shaped(value: torch.Tensor) -> Any:
            return value if self._tail is None else (value, *([None] * self._tail))

        def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return shaped(hidden_states)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            return shaped(hidden.clone())

        blocks = [self.adapter.layer_module(i) for i in range(self.layer + 1)]
        for block in blocks[:-1]:
            block.forward = passthrough  # type: ignore[method-assign]
        blocks[-1].forward = recorded  # type: ignore[method-assign]
        try:
            yield
        finally:
            for block in blocks:
                del block.forward  # back to the class's forward


@torch.no_grad()
def last_token_residuals(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    layer: int,
    batch_size: int = 32,
    max_length: int | None = None,
    chat_template: bool = True,
) -> np.ndarray:
    """Output of block `layer` at each prompt's last token, float32 `(n, d_model)`, in `texts` order.

    The prompt is formatted as the harvest formats it (chat template with the generation prompt,
    left padding, left truncation to `max_length`), so with the template the row is the state that
    predicts the first response token: what a gate reads. The forward stops after `layer`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = ModelAdapter(model)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = encode_prompts(tokenizer, texts[start:start + batch_size], chat_template, max_length,
                               device=adapter.device)
        hidden = capture_residuals(adapter, [layer], batch["input_ids"], batch["attention_mask"],
                                   reduce=lambda h: h[:, -1])[layer]
        rows.append(hidden.float().cpu().numpy())
    if not rows:
        return np.zeros((0, adapter.d_model), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)
