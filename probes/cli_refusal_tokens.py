"""`refusal-sae refusal-tokens`: fit categorical refusal tokens onto a model, or evaluate them.

    refusal-sae refusal-tokens fit --model smollm2-135m-instruct --prompts builtin:quickstart \
        --out checkpoints/smollm2-refusal-tokens
    refusal-sae refusal-tokens eval --model checkpoints/smollm2-refusal-tokens --prompts builtin:quickstart

`fit` fits on the extract split, chooses C on the calibrate split, reports the eval split (accuracy
with a Wilson 95% CI, macro-F1 with a percentile-bootstrap 95% CI) and writes the model directory.
`eval` prints the first-token decision of every category of one split (eval by default).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import numpy as np

from activations.records import CATEGORIES, PROBE_CLASSES, SPLITS, PromptRecord
from probes.metrics import classification_summary, rate_with_ci
from probes.protocol import probe_targets


def evaluate_decisions(records: Sequence[PromptRecord], decisions: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Overall metrics and the per-category decision table of first-token decisions.

    Contrast rows are correct when the decision is benign (`[respond]`). Returns
    `{"overall": classification_summary, "table": {category: {"n", "decisions": {class: count},
    "correct": {"rate", "ci", "n"}}}}`.
    """
    if len(records) != len(decisions) or not records:
        raise ValueError(f"need one decision per record, got {len(decisions)} decisions for {len(records)} records")
    y, _ = probe_targets(np.array([r.category for r in records]))
    pred = np.array([PROBE_CLASSES.index(d) for d in decisions], dtype=np.int64)
    table: dict[str, Any] = {}
    for category in CATEGORIES:
        rows = [i for i, r in enumerate(records) if r.category == category]
        if not rows:
            continue
        counts = {c: int(sum(decisions[i] == c for i in rows)) for c in PROBE_CLASSES}
        correct = int(np.sum(pred[rows] == y[rows]))
        table[category] = {"n": len(rows), "decisions": counts, "correct": rate_with_ci(correct, len(rows))}
    return {"overall": classification_summary(y, pred, PROBE_CLASSES, seed=seed), "table": table}


def format_summary(summary: dict[str, Any], split: str) -> str:
    """Accuracy and macro-F1 lines of `evaluate_decisions(...)["overall"]`."""
    acc, f1 = summary["accuracy"], summary["macro_f1"]
    return (f"{split}: accuracy {acc['rate']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] (n={acc['n']}, Wilson 95%)\n"
            f"{split}: macro-F1 {f1['value']:.3f} [{f1['ci'][0]:.3f}, {f1['ci'][1]:.3f}] "
            f"(n={f1['n']}, percentile bootstrap 95%, {f1['n_boot']} resamples)")


def format_table(table: dict[str, Any]) -> str:
    """Rows = true category, columns = first-token decision counts, last column = correct rate [CI]."""
    width = max(len(c) for c in CATEGORIES)
    header = (f"{'category':<{width}}  {'n':>4}  " + "  ".join(f"{c:>{width}}" for c in PROBE_CLASSES)
              + "  correct [95% CI]")
    lines = ["first-token decision counts (columns) per true category (rows)", header, "-" * len(header)]
    for category, row in table.items():
        counts = "  ".join(f"{row['decisions'][c]:>{width}}" for c in PROBE_CLASSES)
        ok = row["correct"]
        lines.append(f"{category:<{width}}  {row['n']:>4}  {counts}  {ok['rate']:.3f} [{ok['ci'][0]:.3f}, {ok['ci'][1]:.3f}]")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-sae refusal-tokens", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (("fit", "fit the class tokens and write a model directory"),
                        ("eval", "per-category first-token decisions of one split")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True, help="hub id, local directory, or smollm2-135m-instruct")
        p.add_argument("--prompts", nargs="+", required=True, metavar="SPEC", help="prompt-source specs")
        p.add_argument("--seed", type=int, default=0, help="split seed and solver / bootstrap seed")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        p.add_argument("--max-length", type=int, default=512, help="prompt tokens kept (from the right)")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    fit = sub.choices["fit"]
    fit.add_argument("--out", required=True, help="output model directory, e.g. checkpoints/<name>")
    fit.add_argument("--tokens", default="default", help="preset (default, llama3) or a JSON file {class: token}")
    fit.add_argument("--margin", type=float, default=5.0, help="logit margin over ordinary tokens on fit prompts")
    ev = sub.choices["eval"]
    ev.add_argument("--tokens", default=None, help="preset or JSON file (default: refusal_tokens.json in --model)")
    ev.add_argument("--split", default="eval", choices=SPLITS)
    return parser


def _resolve_spec(value: str | None, model: str) -> Any:
    from pathlib import Path

    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    if value is not None:
        return resolve_token_spec(value)
    if (Path(model) / SPEC_FILE).is_file():
        return load_refusal_token_spec(model)
    raise ValueError(f"model {model!r} has no {SPEC_FILE}; pass --tokens default|llama3|PATH.json")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set
    from probes.refusal_token_fit import fit_refusal_tokens
    from probes.refusal_token_install import save_refusal_token_model
    from probes.refusal_tokens import first_token_decisions, first_token_logits

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = load_prompt_set(args.prompts, seed=args.seed)
    spec = _resolve_spec(args.tokens, args.model)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    split = "eval" if args.action == "fit" else args.split
    records = prompts.split(split)
    if not records:
        raise ValueError(f"the prompt set has no {split!r} rows")
    report = None
    if args.action == "fit":
        fit_records = prompts.split("extract") + prompts.split("calibrate")
        report = fit_refusal_tokens(model, tokenizer, fit_records, spec, batch_size=args.batch_size, seed=args.seed,
                                    margin=args.margin, max_length=args.max_length, progress=True)
        f1 = report.calibrate.get("macro_f1", {})
        print(f"fitted C={report.C:g} on {report.splits['extract']['n_rows']} extract rows; "
              f"calibrate macro-F1 {f1.get('value', float('nan')):.3f}; offset beta={report.offset['beta']:.3f}")
    logits = first_token_logits(model, tokenizer, [r.text for r in records], spec, args.batch_size,
                                max_length=args.max_length, progress=True)
    result = evaluate_decisions(records, first_token_decisions(logits), seed=args.seed)
    print(format_summary(result["overall"], split))
    if args.action == "fit":
        report.eval = result
        save_refusal_token_model(model, tokenizer, spec, args.out, report)
        print(f"wrote {args.out}")
    else:
        print(format_table(result["table"]))
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of `refusal-sae refusal-tokens`; returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = _run(args)
        if args.json:
            from probes.storage import write_json

            write_json(args.json, result)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
