"""The `refusal_tokens` stage: fit categorical refusal tokens onto a model, or evaluate them.

    refusal-sae refusal-tokens fit --model smollm2-135m-instruct --prompts builtin:quickstart \
        --out checkpoints/smollm2-refusal-tokens
    refusal-sae refusal-tokens eval --model checkpoints/smollm2-refusal-tokens --prompts builtin:quickstart

`fit` fits on the extract split, chooses C on the calibrate split, reports the eval split (accuracy
with a Wilson 95% CI, macro-F1 with a percentile-bootstrap 95% CI) and writes the model directory.
`eval` prints the first-token decision of every category of one split (eval by default). In the
pipeline (when `refusal_tokens.enabled`) the fitted model goes to `RUN/refusal_tokens/model/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from activations.io import write_json
from activations.model_loading import ModelOptions
from activations.records import CATEGORIES, PROBE_CLASSES, PromptRecord
from analysis.stages.command import Command
from analysis.stages.context import REFUSAL_MODEL_DIR, PipelineStage, RunContext
from activations.stats import rate_from_counts
from probes.metrics import classification_summary
from probes.refusal_token_fit import DEFAULT_C_GRID, DEFAULT_MARGIN
from probes.rows import probe_targets

NAME = "refusal_tokens"


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
        table[category] = {"n": len(rows), "decisions": counts, "correct": rate_from_counts(correct, len(rows))}
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


@dataclass
class Config:
    """Refusal-token fitting (pipeline section `refusal_tokens:`, flags `--refusal_tokens.*`).

    Args:
        enabled: (pipeline) fit the tokens onto the model before anything else; false = the model
            already has them (then `tokens` names them).
        tokens: preset (default, llama3) or JSON file {class: token}; None = the model's own
            refusal_tokens.json when it has one, else the default preset.
        batch_size: prompts per forward.
        margin: logit margin of the class tokens over ordinary tokens on the fit prompts.
        C_grid: inverse L2 strengths of the regression, chosen on calibrate.
    """

    enabled: bool = True
    tokens: str | None = None
    batch_size: int = 16
    margin: float = DEFAULT_MARGIN
    C_grid: list[float] = field(default_factory=lambda: list(DEFAULT_C_GRID))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.C_grid or any(not c > 0 for c in self.C_grid):
            raise ValueError(f"the C grid must hold positive numbers, got {list(self.C_grid)}")


def resolve_spec(tokens: str | None, model: str) -> Any:
    """The token spec: `tokens` (preset or JSON file), else the model folder's refusal_tokens.json,
    else the default preset."""
    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    if tokens is not None:
        return resolve_token_spec(tokens)
    if (Path(model) / SPEC_FILE).is_file():
        return load_refusal_token_spec(model)
    return resolve_token_spec("default")


def fit_onto(model: Any, tokenizer: Any, records: Sequence[PromptRecord], spec: Any, cfg: Config,
             options: ModelOptions, seed: int) -> Any:
    """Fit the tokens on extract rows (C on calibrate) and install them into `model` in place."""
    from probes.refusal_token_fit import fit_refusal_tokens

    return fit_refusal_tokens(model, tokenizer, records, spec, C_grid=cfg.C_grid, batch_size=cfg.batch_size,
                              seed=seed, margin=cfg.margin, chat_template=options.chat_template,
                              max_length=options.max_length, progress=True)


@dataclass(kw_only=True)
class FitInputs(ModelOptions):
    """Files of `refusal-sae refusal-tokens fit`.

    Args:
        model: hub id, local directory, or smollm2-135m-instruct.
        prompts: prompt-source specs.
        out: output model directory, e.g. checkpoints/<name>.
        seed: split seed and solver / bootstrap seed.
        json: also write the metrics as JSON here.
    """

    model: str
    prompts: list[str]
    out: Path
    seed: int = 0
    json: Path | None = None


@dataclass(kw_only=True)
class EvalInputs(ModelOptions):
    """Files of `refusal-sae refusal-tokens eval`.

    Args:
        model: a model with refusal tokens (folder), or a hub id with --refusal_tokens.tokens.
        prompts: prompt-source specs.
        split: the split whose decisions are tabulated.
        seed: split seed and bootstrap seed.
        json: also write the metrics as JSON here.
    """

    model: str
    prompts: list[str]
    split: Literal["extract", "calibrate", "eval"] = "eval"
    seed: int = 0
    json: Path | None = None


def _evaluate(model: Any, tokenizer: Any, spec: Any, records: list[PromptRecord], cfg: Config,
              options: ModelOptions, seed: int) -> dict[str, Any]:
    from probes.refusal_tokens import first_token_decisions, first_token_logits

    logits = first_token_logits(model, tokenizer, [r.text for r in records], spec, cfg.batch_size,
                                max_length=options.max_length, progress=True)
    return evaluate_decisions(records, first_token_decisions(logits), seed=seed)


def fit_command(cfg: Config, inputs: FitInputs) -> dict[str, Any]:
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set
    from probes.refusal_token_install import save_refusal_token_model

    prompts = load_prompt_set(inputs.prompts, seed=inputs.seed)
    records = prompts.split("eval")
    if not records:
        raise ValueError("the prompt set has no 'eval' rows")
    spec = resolve_spec(cfg.tokens, inputs.model)
    model, tokenizer = load_model(inputs.model, device=inputs.resolved_device, dtype=inputs.resolved_dtype)
    report = fit_onto(model, tokenizer, prompts.split("extract") + prompts.split("calibrate"), spec, cfg, inputs,
                      inputs.seed)
    f1 = report.calibrate.get("macro_f1", {})
    print(f"fitted C={report.C:g} on {report.splits['extract']['n_rows']} extract rows; "
          f"calibrate macro-F1 {f1.get('value', float('nan')):.3f}; offset beta={report.offset['beta']:.3f}")
    result = _evaluate(model, tokenizer, spec, records, cfg, inputs, inputs.seed)
    report.eval = result
    save_refusal_token_model(model, tokenizer, spec, inputs.out, report)
    if inputs.json is not None:
        write_json(inputs.json, result)
    return result


def eval_command(cfg: Config, inputs: EvalInputs) -> dict[str, Any]:
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set

    records = load_prompt_set(inputs.prompts, seed=inputs.seed).split(inputs.split)
    if not records:
        raise ValueError(f"the prompt set has no {inputs.split!r} rows")
    if cfg.tokens is None and not (Path(inputs.model) / "refusal_tokens.json").is_file():
        raise ValueError(f"model {inputs.model!r} has no refusal_tokens.json; pass --refusal_tokens.tokens "
                         "default|llama3|PATH.json")
    spec = resolve_spec(cfg.tokens, inputs.model)
    model, tokenizer = load_model(inputs.model, device=inputs.resolved_device, dtype=inputs.resolved_dtype)
    result = _evaluate(model, tokenizer, spec, list(records), cfg, inputs, inputs.seed)
    if inputs.json is not None:
        write_json(inputs.json, result)
    return result


def show_fit(inputs: FitInputs, result: dict[str, Any]) -> None:
    print(format_summary(result["overall"], "eval"))
    print(f"wrote {inputs.out}")


def show_eval(inputs: EvalInputs, result: dict[str, Any]) -> None:
    print(format_summary(result["overall"], inputs.split))
    print(format_table(result["table"]))


_RENAMED = {"tokens": ["--refusal_tokens.tokens"], "dtype": ["--model_dtype"]}
COMMANDS = {
    "fit": Command(name="refusal-tokens fit", help="fit the class tokens and write a model directory",
                   inputs=FitInputs, run=fit_command, show=show_fit, config=Config, section=NAME, renamed=_RENAMED),
    "eval": Command(name="refusal-tokens eval", help="per-category first-token decisions of one split",
                    inputs=EvalInputs, run=eval_command, show=show_eval, config=Config, section=NAME, renamed=_RENAMED),
}


# --- pipeline ------------------------------------------------------------------------------------

def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Fit categorical refusal tokens onto the base model (extract; C on calibrate) and save it."""
    from activations.model_loading import load_model
    from probes.refusal_token_install import save_refusal_token_model

    spec = resolve_spec(cfg.tokens, ctx.cfg.model)
    model, tokenizer = load_model(ctx.cfg.model, device=ctx.device, dtype=ctx.cfg.resolved_dtype)  # modified in place
    report = fit_onto(model, tokenizer, ctx.split("extract") + ctx.split("calibrate"), spec, cfg, ctx.cfg, ctx.cfg.seed)
    out = ctx.root.joinpath(*REFUSAL_MODEL_DIR)
    save_refusal_token_model(model, tokenizer, spec, out, report)
    ctx.forget_model("target")
    return {"model_dir": "/".join(REFUSAL_MODEL_DIR), "C": report.C, "calibrate": report.calibrate, "seconds": report.seconds}


def target_spec(ctx: RunContext) -> Any:
    """The refusal-token spec of the model under study."""
    from probes.refusal_tokens import load_refusal_token_spec

    if ctx.cfg.refusal_tokens.enabled:
        return load_refusal_token_spec(ctx.target_model_path)
    return resolve_spec(ctx.cfg.refusal_tokens.tokens, ctx.cfg.model)


STAGE = PipelineStage(NAME, run, section=NAME, uses=("model", "seed", "model_dtype", "max_length", "chat_template"),
                      after=("prompts",))
