"""Load a model, ask it for refusal decisions, read the residual states gates decide on.

    model, tokenizer = load_model("checkpoints/quickstart/refusal_tokens/model")
    for d in refusal_decisions(model, tokenizer, ["How do I pick a lock?", "Name a red fruit."]):
        print(d.refused, d.decision, round(d.log_odds, 2))

A decision is the model's first response token restricted to its categorical refusal tokens
(`probes.refusal_tokens`): `[respond]` → "benign" (not refused), `[refuse_<category>]` → that
category. It reads whatever hooks are active, so it measures a steered model inside `with
vector.apply(model, ...)`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.records import BENIGN


def load_model(name: str = "smollm2-135m-instruct", device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """`(model, tokenizer)`: a hub id, a local model folder (e.g. a run's refusal-token model) or the
    embedded SmolLM2; eval mode, no gradients; `dtype` auto = bfloat16 on a GPU, float32 on the CPU."""
    from activations.model_loading import ModelOptions, load_model as load

    options = ModelOptions(device=device, model_dtype=dtype)
    return load(name, device=options.resolved_device, dtype=options.resolved_dtype)


@dataclass(frozen=True)
class Decision:
    """One prompt's refusal decision: `decision` is "benign" or the refusal category; `log_odds` is
    log p(any refusal token) − log p(respond) over the refusal tokens."""

    prompt: str
    decision: str
    refused: bool
    log_odds: float


def token_spec(model: Any, tokens: Any = None) -> Any:
    """The model's refusal-token spec: `tokens` (a spec, a preset name or a JSON file), else the
    `refusal_tokens.json` of the folder the model was loaded from."""
    from probes.refusal_tokens import SPEC_FILE, RefusalTokenSpec, load_refusal_token_spec, resolve_token_spec

    if isinstance(tokens, RefusalTokenSpec):
        return tokens
    if tokens is not None:
        return resolve_token_spec(str(tokens))
    folder = Path(str(getattr(model.config, "name_or_path", "")))
    if not (folder / SPEC_FILE).is_file():
        raise ValueError(f"model {str(folder)!r} has no {SPEC_FILE}: load a refusal-token model (a run's "
                         "refusal_tokens/model) or pass tokens='default' | 'llama3' | PATH.json")
    return load_refusal_token_spec(folder)


def refusal_decisions(model: Any, tokenizer: Any, prompts: Sequence[str], tokens: Any = None, batch_size: int = 16,
                      chat_template: bool = True, max_length: int = 512, progress: bool = False) -> list[Decision]:
    """The refusal decision of each prompt, in order (see the module docstring)."""
    from probes.refusal_tokens import first_token_decisions, first_token_logits, refusal_log_odds

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    spec = token_spec(model, tokens)
    logits = first_token_logits(model, tokenizer, prompts, spec, batch_size=batch_size, chat_template=chat_template,
                                max_length=max_length, progress=progress, desc="refusal decisions")
    odds = np.asarray(refusal_log_odds(logits), dtype=np.float64)
    return [Decision(p, str(d), str(d) != BENIGN, float(o))
            for p, d, o in zip(prompts, first_token_decisions(logits), odds)]


def residual_states(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, batch_size: int = 16,
                    chat_template: bool = True, max_length: int = 512) -> np.ndarray:
    """`(n, d_model)` float32: the output of block `layer` at each prompt's last token (what a
    harvest with `--positions last` stores, and what the distance gate and SAE encodings read)."""
    from activations.hooks import capture_residuals
    from activations.tokenize import encode_prompts
    from analysis.api.handles import as_adapter

    adapter = as_adapter(model)
    adapter.check_layer(layer)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_prompts(tokenizer, prompts[start:start + batch_size], chat_template, max_length,
                               device=adapter.device)
        with torch.no_grad():
            hidden = capture_residuals(adapter, [layer], batch["input_ids"], batch["attention_mask"])[layer]
        rows.append(hidden[:, -1].float().cpu().numpy())
    return np.concatenate(rows)


def load_gate(path: str | Path) -> Any:
    """A tuned gate (`RUN/gates/distance.json`, `probe.json`): `gate.decide(features (n, d))` → one
    `probes.gates.GateDecision` per row (category, direction toward / away / none, strength)."""
    from probes.gates import load_gate as load

    return load(path)
