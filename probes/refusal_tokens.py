"""Categorical refusal tokens: which token names which class, and the model's first-token decision.

A refusal-token model emits one of six special tokens as its first response token: `[respond]` for
benign prompts, `[refuse_<category>]` for each refusal category. Restricted to those six tokens, the
logits at the last prompt position (the position that predicts the first response token) are the
model's category decision.

- `RefusalTokenSpec`: class name -> token string, in PROBE_CLASSES order; saved as
  `refusal_tokens.json` inside a model directory. Presets: `DEFAULT_REFUSAL_TOKENS` (the tokens this
  framework installs) and `LLAMA3_REFUSAL_TOKENS` (names used by the Llama-3 8B refusal-token model).
- `first_token_logits`: `(n, n_classes)` logits of the class tokens, batch by batch in the given
  order, optionally inside a per-batch context (steering / gating hooks).
- `first_token_decisions`, `refusal_log_odds`: decisions and a scalar refusal score from those logits.

Fitting such tokens onto a model that lacks them lives in `probes.refusal_token_fit`.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from activations.records import PROBE_CLASSES
from activations.hooks import BlockOutputCache
from activations.prefix_cache import PrefixCache
from activations.tokenize import encode_prompts, position_ids_from_mask
from activations.io import read_json, write_json

SPEC_FILE = "refusal_tokens.json"
"""Name of the token-spec file inside a refusal-token model directory."""

DEFAULT_REFUSAL_TOKENS: dict[str, str] = {
    "benign": "[respond]",
    "humanizing": "[refuse_humanizing]",
    "incomplete": "[refuse_incomplete]",
    "indeterminate": "[refuse_indeterminate]",
    "safety": "[refuse_safety]",
    "unsupported": "[refuse_unsupported]",
}
"""The tokens `fit_refusal_tokens` adds by default, in PROBE_CLASSES order."""

LLAMA3_REFUSAL_TOKENS: dict[str, str] = {
    "benign": "[respond]",
    "humanizing": "[Humanizing requests]",
    "incomplete": "[Incomplete requests]",
    "indeterminate": "[Indeterminate requests]",
    "safety": "[Requests with safety concerns]",
    "unsupported": "[Unsupported requests]",
}
"""Token names of the Llama-3 8B refusal-token model, in PROBE_CLASSES order."""

PRESETS: dict[str, dict[str, str]] = {"default": DEFAULT_REFUSAL_TOKENS, "llama3": LLAMA3_REFUSAL_TOKENS}


@dataclass
class RefusalTokenSpec:
    """Class name -> token string for every class of PROBE_CLASSES (stored in that order)."""

    tokens: dict[str, str]

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, dict):
            raise ValueError(f"refusal-token spec must map class names to token strings, got {type(self.tokens).__name__}")
        missing = [c for c in PROBE_CLASSES if c not in self.tokens]
        unknown = sorted(set(self.tokens) - set(PROBE_CLASSES))
        if missing or unknown:
            raise ValueError(
                f"refusal-token spec must name exactly the classes {', '.join(PROBE_CLASSES)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for name, token in self.tokens.items():
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"refusal token of class {name!r} must be a non-empty string, got {token!r}")
        if len(set(self.tokens.values())) != len(self.tokens):
            raise ValueError(f"refusal tokens must be distinct, got {list(self.tokens.values())}")
        self.tokens = {c: self.tokens[c] for c in PROBE_CLASSES}

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in column order of every logits matrix (== PROBE_CLASSES)."""
        return tuple(self.tokens)

    def token_ids(self, tokenizer: Any) -> list[int]:
        """Vocabulary id of each class token, in class order.

        Raises ValueError naming the first token the tokenizer does not hold as one single token.
        """
        vocab = tokenizer.get_vocab()
        ids = []
        for name, token in self.tokens.items():
            if token not in vocab:
                raise ValueError(
                    f"tokenizer lacks the refusal token {token!r} (class {name!r}); "
                    "fit the tokens onto the model first (`refusal-sae refusal-tokens fit`) or pass --tokens"
                )
            ids.append(int(vocab[token]))
        return ids

    def save(self, directory: str | Path) -> Path:
        """Atomically write `refusal_tokens.json` into `directory`."""
        return write_json(Path(directory) / SPEC_FILE, {"schema_version": 1, "classes": list(self.classes),
                                                        "tokens": self.tokens})

    @classmethod
    def load(cls, directory: str | Path) -> "RefusalTokenSpec":
        """Read `refusal_tokens.json` from a model directory."""
        data = read_json(Path(directory) / SPEC_FILE, "refusal-token spec")
        if not isinstance(data, dict) or "tokens" not in data:
            raise ValueError(f"refusal-token spec {Path(directory) / SPEC_FILE} has no 'tokens' field")
        return cls(dict(data["tokens"]))

    @classmethod
    def preset(cls, name: str) -> "RefusalTokenSpec":
        """`default` or `llama3`."""
        if name not in PRESETS:
            raise ValueError(f"unknown refusal-token preset {name!r}; expected one of {', '.join(PRESETS)} or a JSON file")
        return cls(dict(PRESETS[name]))


def load_refusal_token_spec(model_dir: str | Path) -> RefusalTokenSpec:
    """The spec saved next to a refusal-token model (`MODEL_DIR/refusal_tokens.json`)."""
    return RefusalTokenSpec.load(model_dir)


def resolve_token_spec(value: str) -> RefusalTokenSpec:
    """`--tokens` value: a preset name (`default`, `llama3`) or a JSON file.

    The JSON file holds either `{"tokens": {class: token}}` (as written by `RefusalTokenSpec.save`)
    or a flat `{class: token}` mapping.
    """
    if value in PRESETS:
        return RefusalTokenSpec.preset(value)
    path = Path(value)
    if not path.suffix == ".json" and not path.exists():
        raise ValueError(f"unknown refusal-token preset {value!r}; expected one of {', '.join(PRESETS)} or a JSON file")
    data = read_json(path, "refusal-token spec")
    if isinstance(data, dict) and "tokens" in data:
        data = data["tokens"]
    return RefusalTokenSpec(data)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def last_position_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full-vocabulary logits `(batch, vocab)` at the last position of a left-padded batch.

    Passes position ids counted from each row's first real token (as generation does) and asks for
    the last position's logits only when the model's forward accepts `logits_to_keep`.
    """
    inputs = dict(batch, position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return model(**inputs).logits[:, -1, :]


def first_token_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    spec: RefusalTokenSpec,
    batch_size: int = 16,
    chat_template: bool = True,
    max_length: int | None = 512,
    make_context: Callable[[np.ndarray], ContextManager] | None = None,
    progress: bool = False,
    cache: BlockOutputCache | PrefixCache | None = None,
    desc: str = "first-token logits",
) -> torch.Tensor:
    """Logits of the class tokens at the last prompt position, `(n, n_classes)` float32 on the CPU.

    Column j is class `spec.classes[j]`. Batches follow the given order (no re-sorting); for each batch
    `make_context(rows)` is entered around the forward, `rows` being the `(batch,)` int64 indices of
    the batch's texts, so a caller can install per-row steering or gating hooks.

    With `cache` (`activations.hooks.BlockOutputCache`; only when `make_context` intervenes at the
    cache's layer or later), a batch whose texts were seen before skips the blocks below that layer;
    an unmodified forward (`make_context` None) records them. With an `activations.prefix_cache.PrefixCache`
    (only when `make_context` touches the last position alone) each batch runs its last column on the
    cached prefix. The logits are the same either way.
    """
    from activations.progress import progress_bar

    if len(texts) == 0:
        raise ValueError("no prompts to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = spec.token_ids(tokenizer)
    device = model_device(model)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
        rows = np.arange(start, min(len(texts), start + batch_size), dtype=np.int64)
        batch = encode_prompts(tokenizer, [texts[i] for i in rows], chat_template, max_length, device=device)
        key = (chat_template, max_length, *(texts[i] for i in rows))
        if isinstance(cache, PrefixCache):
            if max(ids) >= model.get_output_embeddings().weight.shape[0]:
                raise ValueError(f"refusal token id {max(ids)} is outside the model's output rows")
            logits = cache.last_logits(key, batch, None if make_context is None else make_context(rows), token_ids=ids)
            chunks.append((logits if logits.shape[-1] == len(ids) else logits[:, ids]).float().cpu())
            continue
        with contextlib.ExitStack() as stack:
            if cache is not None and key in cache:
                stack.enter_context(cache.resumed(key))
            elif cache is not None and make_context is None:
                stack.enter_context(cache.recording(key))
            if make_context is not None:
                stack.enter_context(make_context(rows))
            with torch.no_grad():
                logits = last_position_logits(model, batch)
        if max(ids) >= logits.shape[-1]:
            raise ValueError(f"refusal token id {max(ids)} is outside the model's {logits.shape[-1]} output rows")
        chunks.append(logits[:, ids].float().cpu())
    return torch.cat(chunks)


def _as_float64(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != len(PROBE_CLASSES):
        raise ValueError(f"expected class logits of shape (n, {len(PROBE_CLASSES)}), got {array.shape}")
    return array


def first_token_decisions(logits: torch.Tensor | np.ndarray) -> list[str]:
    """Class name of the largest class-token logit of each row of `(n, n_classes)` logits."""
    return [PROBE_CLASSES[i] for i in np.argmax(_as_float64(logits), axis=1)]


def refusal_log_odds(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """`(n,)` float64: logsumexp of the five refusal-token logits minus the `[respond]` logit.

    Positive means the model puts more probability on refusing (any category) than on responding,
    restricted to the six class tokens.
    """
    array = _as_float64(logits)
    refuse = array[:, 1:]
    top = refuse.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(refuse - top).sum(axis=1))
    return lse - array[:, 0]


def class_probabilities(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Softmax over the six class tokens, `(n, n_classes)` float64."""
    array = _as_float64(logits)
    shifted = np.exp(array - array.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
