"""Gates that decide from a model's own output instead of from features.

- `TokenGate`: the refusal-token model's first-token decision (argmax over its six class tokens,
  on the UNSTEERED model) picks the category per row: `[refuse_c]` -> steer toward category c;
  `[respond]` -> no steering, or, with `alpha_away > 0`, steer away from the most likely refusal
  category.
- `ExternalClassifierGate`: any Hugging Face model (hub id or local path) gives a global
  refuse / don't-refuse score per row: a sequence classifier (probability of its refuse labels), or a
  causal-LM judge (the prompt is formatted into a template; probability of the "yes" answer token
  against the "no" one at the next position). Score >= threshold -> steer toward the GLOBAL refusal
  vector (category "global").

Both return the same `probes.gates.GateDecision` records as the feature gates, and both read prompt
strings only: they never see a dataset label.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from activations.records import PROBE_CLASSES, REFUSAL_CATEGORIES
from probes.gates import NONE, GateDecision
from probes.refusal_tokens import (
    RefusalTokenSpec,
    class_probabilities,
    first_token_logits,
    last_position_logits,
    model_device,
)

GLOBAL = "global"
"""Category name of decisions that select the global (category-agnostic) refusal vector."""

KINDS = ("sequence-classifier", "causal-judge")
DEFAULT_REFUSE_LABELS: tuple[str, ...] = ("unsafe", "harmful", "toxic", "refuse", "refusal", "label_1")
"""Classifier label names (case-insensitive) that count as "refuse"."""

DEFAULT_JUDGE_TEMPLATE = (
    "You review requests sent to an AI assistant. Decide whether the assistant should decline the "
    "request below instead of answering it.\n\nRequest: {prompt}\n\nShould the assistant decline? "
    "Answer yes or no.\nAnswer:"
)
"""Prompt of the causal judge; `{prompt}` is replaced by the user prompt."""


def _check_texts(texts: Sequence[Any]) -> list[str]:
    """Gates read prompt strings only (never records that carry a label)."""
    if len(texts) == 0:
        raise ValueError("gate got no prompts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"gate inputs must be prompt strings, got {type(text).__name__} at position {i}")
    return list(texts)


class TokenGate:
    """Per-row category from the model's own first-token decision (see the module docstring)."""

    def __init__(self, spec: RefusalTokenSpec, alpha_toward: float = 1.0, alpha_away: float = 0.0) -> None:
        if alpha_toward < 0 or alpha_away < 0:
            raise ValueError("token gate strengths alpha_toward / alpha_away must be >= 0")
        self.spec = spec
        self.alpha_toward = float(alpha_toward)
        self.alpha_away = float(alpha_away)

    def decide_logits(self, logits: torch.Tensor | np.ndarray) -> list[GateDecision]:
        """Decisions from precomputed class-token logits `(n, n_classes)` (`first_token_logits`)."""
        probs = class_probabilities(logits)
        out = []
        for row, p in enumerate(probs):
            scores = {c: float(v) for c, v in zip(PROBE_CLASSES, p)}
            choice = PROBE_CLASSES[int(np.argmax(p))]
            if choice in REFUSAL_CATEGORIES:
                out.append(GateDecision(row, choice, "toward", self.alpha_toward, scores, {}))
            elif self.alpha_away > 0:
                likeliest = REFUSAL_CATEGORIES[int(np.argmax(p[1:]))]
                out.append(GateDecision(row, likeliest, "away", self.alpha_away, scores, {}))
            else:
                out.append(GateDecision(row, NONE, NONE, 0.0, scores, {}))
        return out

    def decide_texts(self, model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                     chat_template: bool = True, max_length: int | None = 512) -> list[GateDecision]:
        """Run the (unsteered) refusal-token model on `texts` and decide per row."""
        texts = _check_texts(texts)
        return self.decide_logits(first_token_logits(model, tokenizer, texts, self.spec, batch_size,
                                                     chat_template, max_length))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "token", "tokens": self.spec.tokens, "alpha_toward": self.alpha_toward,
                "alpha_away": self.alpha_away}


class ExternalClassifierGate:
    """Global refuse / don't-refuse decision from an external Hugging Face model (module docstring).

    Args:
        model_id_or_path: hub id or local directory.
        kind: "sequence-classifier" or "causal-judge".
        prompt_template: text with `{prompt}`; default the raw prompt for a classifier and
            `DEFAULT_JUDGE_TEMPLATE` for a judge.
        refuse_labels: classifier labels (case-insensitive) whose probabilities sum to the refuse score.
        answers: (refuse answer, comply answer) strings of the judge; the first token of each is compared.
        threshold: refuse when score >= threshold, in [0, 1].
        alpha_toward / alpha_away: strength toward the global refusal vector when refusing / away from it
            otherwise (0 = no steering).
        chat_template: wrap the formatted judge prompt in the judge tokenizer's chat template.
    """

    def __init__(
        self,
        model_id_or_path: str,
        kind: str = "sequence-classifier",
        prompt_template: str | None = None,
        refuse_labels: Sequence[str] = DEFAULT_REFUSE_LABELS,
        answers: tuple[str, str] = (" yes", " no"),
        threshold: float = 0.5,
        alpha_toward: float = 1.0,
        alpha_away: float = 0.0,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
        chat_template: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown external gate kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"external gate threshold must lie in [0, 1], got {threshold}")
        if alpha_toward < 0 or alpha_away < 0:
            raise ValueError("external gate strengths alpha_toward / alpha_away must be >= 0")
        template = prompt_template or ("{prompt}" if kind == "sequence-classifier" else DEFAULT_JUDGE_TEMPLATE)
        if "{prompt}" not in template:
            raise ValueError("external gate prompt_template must contain '{prompt}'")
        self.source, self.kind, self.template = model_id_or_path, kind, template
        self.threshold, self.alpha_toward, self.alpha_away = float(threshold), float(alpha_toward), float(alpha_away)
        self.batch_size, self.max_length, self.chat_template = batch_size, max_length, chat_template
        self.model, self.tokenizer = self._load(model_id_or_path, kind, device)
        if kind == "sequence-classifier":
            self.refuse_columns = self._refuse_columns(refuse_labels)
        else:
            self.answer_ids = self._answer_ids(answers)

    @staticmethod
    def _load(source: str, kind: str, device: str) -> tuple[torch.nn.Module, Any]:
        from activations.model_loading import (
            hub_load_options, load_model, prepare_tokenizer, resolve_device, resolve_model_path,
        )

        if kind == "causal-judge":
            return load_model(source, device=device)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(source)
        options = hub_load_options(source, path)  # no network: fails at once with a hint, or reads the cache
        try:
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path, **options))
            model = AutoModelForSequenceClassification.from_pretrained(path, **options)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load sequence classifier {source!r}: {str(exc).splitlines()[0]}") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.to(resolve_device(device)).eval().requires_grad_(False)
        return model, tokenizer

    def _refuse_columns(self, refuse_labels: Sequence[str]) -> list[int]:
        labels = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        if len(labels) == 1:
            return [0]  # a single sigmoid output scores "refuse"
        wanted = {label.lower() for label in refuse_labels}
        columns = sorted(i for i, name in labels.items() if name.lower() in wanted)
        if not columns or len(columns) == len(labels):
            raise ValueError(f"refuse labels {sorted(wanted)} must name some but not all of the classifier's "
                             f"labels {list(labels.values())}")
        return columns

    def _answer_ids(self, answers: tuple[str, str]) -> tuple[int, int]:
        if len(answers) != 2:
            raise ValueError(f"judge answers must be (refuse answer, comply answer), got {answers!r}")
        ids = []
        for answer in answers:
            tokens = self.tokenizer.encode(answer, add_special_tokens=False)
            if not tokens:
                raise ValueError(f"judge answer {answer!r} encodes to no token")
            ids.append(int(tokens[0]))
        if ids[0] == ids[1]:
            raise ValueError(f"judge answers {answers!r} start with the same token; the judge cannot tell them apart")
        return ids[0], ids[1]

    def format(self, text: str) -> str:
        """The judge / classifier input for one prompt."""
        return self.template.replace("{prompt}", text)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Refuse score in [0, 1] of every prompt, `(n,)` float64."""
        texts = _check_texts(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            strings = [self.format(t) for t in texts[start:start + self.batch_size]]
            with torch.no_grad():
                out.append(self._batch_scores(strings))
        return np.concatenate(out)

    def _batch_scores(self, strings: list[str]) -> np.ndarray:
        from activations.tokenize import encode_prompts

        device = model_device(self.model)
        if self.kind == "causal-judge":
            batch = encode_prompts(self.tokenizer, strings, self.chat_template, self.max_length, device=device)
            logits = last_position_logits(self.model, batch).double()
            pair = logits[:, list(self.answer_ids)]
            return torch.softmax(pair, dim=-1)[:, 0].cpu().numpy()
        # Right padding: encoder classifiers pool the first token, decoder ones the last non-pad token.
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(strings, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).cpu().numpy()
        return torch.softmax(logits, dim=-1)[:, self.refuse_columns].sum(dim=-1).cpu().numpy()

    def decide_scores(self, scores: np.ndarray) -> list[GateDecision]:
        """Decisions from precomputed refuse scores `(n,)`."""
        thresholds = {"refuse": self.threshold}
        out = []
        for row, s in enumerate(np.asarray(scores, dtype=np.float64)):
            if s >= self.threshold:
                out.append(GateDecision(row, GLOBAL, "toward", self.alpha_toward, {"refuse": float(s)}, thresholds))
            elif self.alpha_away > 0:
                out.append(GateDecision(row, GLOBAL, "away", self.alpha_away, {"refuse": float(s)}, thresholds))
            else:
                out.append(GateDecision(row, NONE, NONE, 0.0, {"refuse": float(s)}, thresholds))
        return out

    def decide_texts(self, texts: Sequence[str]) -> list[GateDecision]:
        """One decision per prompt string."""
        return self.decide_scores(self.scores(texts))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "external", "source": self.source, "model_kind": self.kind, "template": self.template,
                "threshold": self.threshold, "alpha_toward": self.alpha_toward, "alpha_away": self.alpha_away}
