"""`refusal-sae harvest`: capture residual activations of a prompt set into an activation shard store.

Example::

    refusal-sae harvest --model smollm2-135m-instruct --prompts builtin:quickstart \
        --layers 9 18 --positions last --out runs/acts

Rerunning the same command after an interruption resumes it (prompts already stored are skipped).
Besides the shards, `DIR/prompts.json` records the prompt set's split manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from activations.cli_util import run_cli
from activations.store_format import POSITION_MODES, STORAGE_DTYPES, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae harvest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, local model directory, or smollm2-135m-instruct")
    parser.add_argument("--prompts", required=True, nargs="+", metavar="SPEC", help="prompt source specs")
    parser.add_argument("--layers", required=True, nargs="+", type=int, metavar="L", help="block indices (hidden_states[L+1])")
    parser.add_argument("--positions", choices=POSITION_MODES, default="last", help="last prompt token or every token")
    parser.add_argument("--out", required=True, type=Path, help="store folder (resumed if it holds this harvest)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="prompts are truncated from the left to this many tokens")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype of the activations")
    parser.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="feed raw prompt text instead of the chat template")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    parser.add_argument("--rows-per-shard", type=int, default=None, help="rows per shard (default: ~64 MiB of activations)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Load prompts and model, harvest, write `prompts.json`; returns the store folder."""
    from activations.harvest import harvest, prompt_info_from_manifest
    from activations.model_loading import load_model, resolve_device
    from activations.prompts import load_prompt_set

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {args.max_length}")
    prompt_set = load_prompt_set(list(args.prompts), seed=args.seed)
    if not prompt_set.records:
        raise ValueError(f"the prompt specs {' '.join(args.prompts)} gave no prompts")
    device = resolve_device(args.device)
    model_dtype = args.model_dtype
    if model_dtype == "auto":
        model_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model(args.model, device=device, dtype=model_dtype)
    out = harvest(
        model, tokenizer, prompt_set.records, args.layers, args.out,
        positions=args.positions, batch_size=args.batch_size, max_length=args.max_length,
        dtype=args.dtype, chat_template=args.chat_template, progress=args.progress,
        rows_per_shard=args.rows_per_shard, prompt_info=prompt_info_from_manifest(prompt_set.manifest()),
    )
    write_json_atomic(out / "prompts.json", prompt_set.manifest())
    return out


def show(_args: argparse.Namespace, out: Path) -> None:
    from activations.store import ActivationStore

    store = ActivationStore(out)
    print(f"harvested {store.n_rows} rows of layers {store.layers} ({store.positions} positions) into {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae harvest`; returns the exit status (2 on bad input)."""
    return run_cli(build_parser(), run, show, argv)


if __name__ == "__main__":
    sys.exit(main())
