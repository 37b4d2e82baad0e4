"""One model adapter: where the decoder blocks, final norm, embedding and unembedding live.

Everything else in the framework asks the adapter, never "which model is this?".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyLayout:
    """Attribute paths (dotted, from the `*ForCausalLM` module) of one architecture family."""

    blocks: str
    final_norm: str
    embed: str
    unembed: str  # `a|b` lists alternative names


_DECODER = FamilyLayout("model.layers", "model.norm", "model.embed_tokens", "lm_head")
_MULTIMODAL = FamilyLayout(
    "model.language_model.layers", "model.language_model.norm", "model.language_model.embed_tokens", "lm_head"
)
FAMILIES: dict[str, FamilyLayout] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "mixtral": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "gemma3": _MULTIMODAL,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "qwen2_moe": _DECODER,
    "qwen3_moe": _DECODER,
    "gpt2": FamilyLayout("transformer.h", "transformer.ln_f", "transformer.wte", "lm_head"),
    "gpt_neox": FamilyLayout("gpt_neox.layers", "gpt_neox.final_layer_norm", "gpt_neox.embed_in", "lm_head|embed_out"),
}


def _get(module: nn.Module, dotted: str) -> nn.Module:
    """Follow a dotted path; `a|b` tries alternatives (names changed across transformers versions)."""
    alternatives = dotted.split("|")
    for i, path in enumerate(alternatives):
        try:
            found = module
            for name in path.split("."):
                found = getattr(found, name)
            return found
        except AttributeError:
            if i == len(alternatives) - 1:
                raise
    raise AttributeError(dotted)


class ModelAdapter:
    """Uniform access to a causal LM's residual stream.

    Layer `l` (0-based) names the OUTPUT of decoder block `l`, i.e. `hidden_states[l + 1]` of a
    transformers forward with `output_hidden_states=True` (for the last block transformers reports
    the state after the final norm instead; we always mean the block output). Layer `-1` names the
    embedding output (`hidden_states[0]`).
    """

    def __init__(self, model: nn.Module) -> None:
        family = getattr(model.config, "model_type", None)
        if family not in FAMILIES:
            raise ValueError(
                f"unsupported model family {family!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        layout = FAMILIES[family]
        self.model = model
        self.family: str = family
        try:
            self.blocks: nn.ModuleList = _get(model, layout.blocks)
            self.final_norm: nn.Module = _get(model, layout.final_norm)
            self.embed: nn.Embedding = _get(model, layout.embed)
            self.unembed: nn.Linear = _get(model, layout.unembed)
        except AttributeError as exc:
            raise ValueError(f"model of family {family!r} lacks the expected module: {exc}") from None

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.embed.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def check_layer(self, layer: int) -> int:
        """Return `layer` if it is a valid block index (or -1 for the embeddings), else raise."""
        if not isinstance(layer, int) or not -1 <= layer < self.num_layers:
            raise ValueError(
                f"layer {layer} out of range: this {self.family} model has blocks 0..{self.num_layers - 1}"
            )
        return layer

    def layer_module(self, layer: int) -> nn.Module:
        """The module whose output is residual layer `layer` (block `layer`, or the embedding for -1)."""
        self.check_layer(layer)
        return self.embed if layer == -1 else self.blocks[layer]

    def default_layers(self) -> list[int]:
        """A layer about a third of the way up and one at two thirds (the quickstart's choice)."""
        return [self.num_layers // 3, (2 * self.num_layers) // 3]
