"""`refusal-sae synthesize-contrast`: rewrite prompts until a target model's refusal decision flips.

Example::

    refusal-sae synthesize-contrast --target runs/model-with-tokens --rewriter smollm2-135m-instruct \
        --prompts builtin:quickstart --split extract --direction harmful-to-benign --rounds 3 \
        --few-shot examples.jsonl --max-pairs 100 --out runs/contrast.jsonl

The target must have categorical refusal tokens (`MODEL_DIR/refusal_tokens.json`, or `--tokens`).
Originals are the prompt set's refusal-category records for `harmful-to-benign`, its benign and
contrast records for `benign-to-harmful`, all records for `both`. The output jsonl (written
atomically) has one kept pair per line; load the rewrites as prompts with e.g.
`jsonl:OUT?text=rewritten&id=id&as=contrast`. A JSON summary of the run is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from activations.atomic import write_text_atomic
from activations.cli_util import run_cli
from analysis.synthesize import DIRECTIONS, ContrastPair, SynthesisStats

_ORIGINAL_CATEGORIES = {
    "harmful-to-benign": ("humanizing", "incomplete", "indeterminate", "safety", "unsupported"),
    "benign-to-harmful": ("benign", "contrast"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae synthesize-contrast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="model with refusal tokens (directory or hub id)")
    parser.add_argument("--rewriter", required=True,
                        help="causal LM that rewrites prompts (directory, hub id, or smollm2-135m-instruct)")
    parser.add_argument("--prompts", required=True, nargs="+", metavar="SPEC",
                        help="prompt source specs of the originals")
    parser.add_argument("--direction", required=True, choices=DIRECTIONS)
    parser.add_argument("--out", required=True, type=Path, help="output jsonl file")
    parser.add_argument("--rounds", type=int, default=3, help="rewrite rounds per prompt (default 3)")
    parser.add_argument("--few-shot", type=Path, default=None, help='jsonl of {"original", "rewritten"} examples')
    parser.add_argument("--max-pairs", type=int, default=100, help="output budget (split 50/50 for --direction both)")
    parser.add_argument("--tokens", default=None,
                        help="refusal-token preset or JSON file (default: TARGET/refusal_tokens.json)")
    parser.add_argument("--split", choices=("extract", "calibrate", "eval"), default=None,
                        help="use one split of the prompt set")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many originals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set's split assignment")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="rewriter response length")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("rounds", "max_pairs", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")


def select_originals(args: argparse.Namespace) -> list[Any]:
    """Prompt records to rewrite: the chosen split, the direction's categories, at most `--limit`."""
    from activations.prompts import load_prompt_set

    records = list(load_prompt_set(list(args.prompts), seed=args.seed).records)
    if args.split is not None:
        records = [r for r in records if r.split == args.split]
    categories = _ORIGINAL_CATEGORIES.get(args.direction)
    if categories is not None:
        records = [r for r in records if r.category in categories]
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise ValueError(f"no originals for direction {args.direction!r} in {' '.join(args.prompts)}"
                         + (f" (split {args.split})" if args.split else ""))
    return records


def _token_spec(args: argparse.Namespace) -> Any:
    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    if args.tokens is not None:
        return resolve_token_spec(args.tokens)
    if not (Path(args.target) / SPEC_FILE).is_file():
        raise ValueError(f"target {args.target} has no {SPEC_FILE}; pass --tokens PRESET_OR_JSON")
    return load_refusal_token_spec(args.target)


def write_pairs_jsonl(pairs: list[ContrastPair], path: Path) -> Path:
    """Atomically write one JSON object per pair (with an `id` of `<original_id>/rw`)."""
    lines = [json.dumps({"id": f"{pair.original_id}/rw", **pair.to_dict()}, ensure_ascii=False) for pair in pairs]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load models and prompts, synthesize, write the jsonl; returns the run summary."""
    from activations.model_loading import load_model, resolve_device
    from analysis.synthesize import DEFAULT_FEW_SHOT, load_few_shot, lm_rewriter, synthesize_contrast
    from probes.refusal_tokens import first_token_decisions, first_token_logits

    _check_args(args)
    few_shot = load_few_shot(args.few_shot) if args.few_shot is not None else list(DEFAULT_FEW_SHOT)
    spec = _token_spec(args)
    records = select_originals(args)
    device = resolve_device(args.device)
    target, target_tok = load_model(args.target, device=device, dtype=args.dtype)
    spec.token_ids(target_tok)  # fails early, naming a missing token
    if args.rewriter == args.target:
        rewriter, rewriter_tok = target, target_tok
    else:
        rewriter, rewriter_tok = load_model(args.rewriter, device=device, dtype=args.dtype)

    def decide(texts: list[str]) -> list[str]:
        return first_token_decisions(first_token_logits(target, target_tok, texts, spec, batch_size=args.batch_size))

    stats = SynthesisStats()
    pairs = synthesize_contrast(
        [r.text for r in records], lm_rewriter(rewriter, rewriter_tok, few_shot, args.max_new_tokens, args.batch_size),
        decide, rounds=args.rounds, target_direction=args.direction, max_pairs=args.max_pairs,
        ids=[r.id for r in records], chunk_size=args.batch_size, stats=stats,
    )
    write_pairs_jsonl(pairs, args.out)
    return {"out": str(args.out), "pairs": len(pairs), "direction": args.direction, **stats.__dict__}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae synthesize-contrast`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, lambda _args, summary: print(json.dumps(summary, indent=2)), argv)


if __name__ == "__main__":
    sys.exit(main())
