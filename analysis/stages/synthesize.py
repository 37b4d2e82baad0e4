"""`refusal-sae synthesize-contrast`: rewrite prompts until a target model's refusal decision flips.

Example::

    refusal-sae synthesize-contrast --target runs/model-with-tokens --rewriter smollm2-135m-instruct \
        --prompts builtin:quickstart --split extract --direction harmful-to-benign --synthesize.rounds 3 \
        --few_shot examples.jsonl --synthesize.max_pairs 100 --out runs/contrast.jsonl

The target must have categorical refusal tokens (`MODEL_DIR/refusal_tokens.json`, or `--tokens`).
Originals are the prompt set's refusal-category records for `harmful-to-benign`, its benign and
contrast records for `benign-to-harmful`, all records for `both`. The output jsonl (written
atomically) has one kept pair per line; load the rewrites as prompts with e.g.
`jsonl:OUT?text=rewritten&id=id&as=contrast`. A JSON summary of the run is printed.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from activations.io import write_text_atomic
from activations.model_loading import ModelOptions
from analysis.evaluation.synthesize import ContrastPair, SynthesisStats
from analysis.stages.command import Command

NAME = "synthesize"

_ORIGINAL_CATEGORIES = {
    "harmful-to-benign": ("humanizing", "incomplete", "indeterminate", "safety", "unsupported"),
    "benign-to-harmful": ("benign", "contrast"),
}


@dataclass
class Config:
    """Contrast synthesis (flags `--synthesize.*`).

    Args:
        rounds: rewrite rounds per prompt.
        max_pairs: output budget (split 50/50 for --direction both).
        batch_size: prompts per forward of the target and the rewriter.
        max_new_tokens: rewriter response length.
        limit: use at most this many originals (None = all).
    """

    rounds: int = 3
    max_pairs: int = 100
    batch_size: int = 8
    max_new_tokens: int = 64
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "max_pairs", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass(kw_only=True)
class Inputs(ModelOptions):
    """Files of `refusal-sae synthesize-contrast`.

    Args:
        target: model with refusal tokens (directory or hub id).
        rewriter: causal LM that rewrites prompts (directory, hub id, or smollm2-135m-instruct).
        prompts: prompt source specs of the originals.
        direction: which decisions are flipped.
        out: output jsonl file.
        few_shot: jsonl of {"original", "rewritten"} examples (default: built-in examples).
        tokens: refusal-token preset or JSON file (default: TARGET/refusal_tokens.json).
        split: use one split of the prompt set (default: all records).
        seed: seed of the prompt set's split assignment.
    """

    target: str
    rewriter: str
    prompts: list[str]
    direction: Literal["harmful-to-benign", "benign-to-harmful", "both"]
    out: Path
    few_shot: Path | None = None
    tokens: str | None = None
    split: Literal["extract", "calibrate", "eval"] | None = None
    seed: int = 0


def select_originals(prompts: Sequence[str], direction: str, split: str | None = None, limit: int | None = None,
                     seed: int = 0) -> list[Any]:
    """Prompt records to rewrite: the chosen split, the direction's categories, at most `limit`."""
    from activations.prompts import load_prompt_set

    records = list(load_prompt_set(list(prompts), seed=seed).records)
    if split is not None:
        records = [r for r in records if r.split == split]
    categories = _ORIGINAL_CATEGORIES.get(direction)
    if categories is not None:
        records = [r for r in records if r.category in categories]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"no originals for direction {direction!r} in {' '.join(prompts)}"
                         + (f" (split {split})" if split else ""))
    return records


def _token_spec(target: str, tokens: str | None) -> Any:
    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    if tokens is not None:
        return resolve_token_spec(tokens)
    if not (Path(target) / SPEC_FILE).is_file():
        raise ValueError(f"target {target} has no {SPEC_FILE}; pass --tokens PRESET_OR_JSON")
    return load_refusal_token_spec(target)


def write_pairs_jsonl(pairs: list[ContrastPair], path: Path) -> Path:
    """Atomically write one JSON object per pair (with an `id` of `<original_id>/rw`)."""
    lines = [json.dumps({"id": f"{pair.original_id}/rw", **pair.to_dict()}, ensure_ascii=False) for pair in pairs]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Load models and prompts, synthesize, write the jsonl; returns the run summary."""
    from activations.model_loading import load_model
    from analysis.evaluation.synthesize import DEFAULT_FEW_SHOT, load_few_shot, lm_rewriter, synthesize_contrast
    from probes.refusal_tokens import first_token_decisions, first_token_logits

    few_shot = load_few_shot(inputs.few_shot) if inputs.few_shot is not None else list(DEFAULT_FEW_SHOT)
    spec = _token_spec(inputs.target, inputs.tokens)
    records = select_originals(inputs.prompts, inputs.direction, inputs.split, cfg.limit, inputs.seed)
    device, dtype = inputs.resolved_device, inputs.resolved_dtype
    target, target_tok = load_model(inputs.target, device=device, dtype=dtype)
    spec.token_ids(target_tok)  # fails early, naming a missing token
    if inputs.rewriter == inputs.target:
        rewriter, rewriter_tok = target, target_tok
    else:
        rewriter, rewriter_tok = load_model(inputs.rewriter, device=device, dtype=dtype)

    def decide(texts: list[str]) -> list[str]:
        return first_token_decisions(first_token_logits(target, target_tok, texts, spec, batch_size=cfg.batch_size,
                                                        chat_template=inputs.chat_template,
                                                        max_length=inputs.max_length))

    stats = SynthesisStats()
    rewrite = lm_rewriter(rewriter, rewriter_tok, few_shot, cfg.max_new_tokens, cfg.batch_size, inputs.chat_template)
    pairs = synthesize_contrast(
        [r.text for r in records], rewrite, decide, rounds=cfg.rounds, target_direction=inputs.direction,
        max_pairs=cfg.max_pairs, ids=[r.id for r in records], chunk_size=cfg.batch_size, stats=stats,
    )
    write_pairs_jsonl(pairs, inputs.out)
    return {"out": str(inputs.out), "pairs": len(pairs), "direction": inputs.direction, **stats.__dict__}


def show(_inputs: Inputs, summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2))


COMMAND = Command(
    name="synthesize-contrast", help="rewrite prompts until the refusal decision flips", inputs=Inputs, run=command,
    show=show, config=Config, section=NAME, renamed={"dtype": ["--model_dtype"]},
)
