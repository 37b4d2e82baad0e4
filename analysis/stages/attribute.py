"""`refusal-sae attribute`: attribution patching of the refusal decision onto residual units or SAE features.

Example::

    refusal-sae attribute --model runs/pipe/refusal_model/model --layer 9 --prompts builtin:quickstart \
        --split eval --sae runs/sae/seed_0 --attribute.top 20 --attribute.validate_top 16 \
        --attribute.n_pairs 16 --out attribution.json

Pairs: clean prompt i is the i-th refusal-category prompt of the split (categories taken in turn, so
every category is represented), corrupt prompt i the i-th benign prompt. Each chunk of pairs is
encoded as ONE left-padded batch, so clean and corrupt rows have the same length. Metric: refusal
log-odds log p(five refusal tokens) − log p([respond]) at the last prompt position
(`refusal_margin_metric`). A unit's score is (e_corrupt − e_clean) · ∂metric/∂e at the clean run
(`attribution_patching`), averaged over pairs; units are ranked by |mean score|. For the top
`--attribute.validate_top` units, real activation patching measures the change of the metric and the
Spearman rank correlation between predicted and measured effects is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from activations.records import BENIGN, REFUSAL_CATEGORIES, PromptRecord
from analysis.stages.command import Command
from analysis.stages.common import TargetInputs

NAME = "attribute"
METRIC_TEXT = "log p(refusal tokens) - log p([respond]) at the last prompt position"


@dataclass
class Config:
    """Attribution patching (flags `--attribute.*`).

    Args:
        top: units reported (by |mean score|).
        validate_top: top units checked by activation patching (0 = off).
        n_pairs: clean/corrupt prompt pairs.
        positions: positions whose units are patched.
        categories: refusal categories of the clean prompts.
        batch_size: pairs per forward/backward.
    """

    top: int = 20
    validate_top: int = 16
    n_pairs: int = 16
    positions: Literal["last", "all"] = "last"
    categories: list[str] = field(default_factory=lambda: list(REFUSAL_CATEGORIES))
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("top", "n_pairs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.validate_top != 0 and self.validate_top < 3:
            raise ValueError(f"validate_top must be 0 (off) or >= 3 for a rank correlation, got {self.validate_top}")
        unknown = sorted(set(self.categories) - set(REFUSAL_CATEGORIES))
        if unknown or not self.categories:
            raise ValueError(f"categories must be refusal categories among {list(REFUSAL_CATEGORIES)}, "
                             f"got {list(self.categories)}")


@dataclass(kw_only=True)
class Inputs(TargetInputs):
    """Files of `refusal-sae attribute`.

    Args:
        layer: block whose output units are scored.
        sae: SAE training run folder or one seed's folder (RUN/seed_<s>): score its latents instead
            of residual units.
        sae_seed: with a run folder, the seed to use (default: the run's first).
        out: output JSON.
    """

    layer: int
    sae: Path | None = None
    sae_seed: int | None = None
    out: Path = Path("attribution.json")


def make_pairs(records: list[PromptRecord], categories: list[str], n_pairs: int, split: str) -> list[tuple[PromptRecord, PromptRecord]]:
    """`n_pairs` (clean, corrupt) pairs: refusal prompts taken from the categories in turn, benign prompts in order."""
    by_category = {c: [r for r in records if r.category == c] for c in categories}
    clean: list[PromptRecord] = []
    for i in range(max((len(v) for v in by_category.values()), default=0)):
        clean += [rows[i] for rows in by_category.values() if i < len(rows)]
    corrupt = [r for r in records if r.category == BENIGN]
    for side, pool, what in (("clean", clean, f"refusal-category ({', '.join(categories)})"), ("corrupt", corrupt, "benign")):
        if len(pool) < n_pairs:
            raise ValueError(f"n_pairs {n_pairs} needs {n_pairs} {what} prompts for the {side} side, "
                             f"but the {split} split has {len(pool)}")
    return list(zip(clean[:n_pairs], corrupt[:n_pairs]))


def encoded_chunks(tokenizer: Any, pairs: list[tuple[PromptRecord, PromptRecord]], batch_size: int, max_length: int,
                   device: Any, chat_template: bool = True) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Per chunk of pairs: (clean inputs, corrupt inputs), both halves of one left-padded batch (same length)."""
    from activations.tokenize import encode_prompts

    chunks = []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        batch = encode_prompts(tokenizer, [c.text for c, _ in part] + [b.text for _, b in part],
                               chat_template=chat_template, max_length=max_length, device=device)
        m = len(part)
        chunks.append(({k: v[:m] for k, v in batch.items()}, {k: v[m:] for k, v in batch.items()}))
    return chunks


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    """Load model (and SAE), score every unit, validate the top ones; write and return the report."""
    from scipy.stats import spearmanr

    from activations.adapter import ModelAdapter
    from activations.io import write_json
    from activations.model_identity import model_identity
    from analysis.evaluation.logit_metrics import refusal_margin_metric
    from analysis.interventions.attribution import activation_patching, attribution_patching
    from analysis.stages.common import load_records, load_seed_sae, load_target

    records = load_records(inputs.prompts, inputs.split, inputs.seed)
    pairs = make_pairs(records, list(cfg.categories), cfg.n_pairs, inputs.split)
    model, tokenizer, spec = load_target(inputs.model, inputs.tokens, inputs.device, inputs.resolved_dtype)
    adapter = ModelAdapter(model)
    adapter.check_layer(inputs.layer)
    sae, sae_seed = (None, None) if inputs.sae is None else load_seed_sae(
        inputs.sae, inputs.layer, adapter.d_model, str(adapter.device), model_identity(model, inputs.model),
        seed=inputs.sae_seed)
    ids = spec.token_ids(tokenizer)  # class order: [respond] first, then the five refusal tokens
    metric = refusal_margin_metric(ids[1:], ids[0])
    chunks = encoded_chunks(tokenizer, pairs, cfg.batch_size, inputs.max_length, adapter.device,
                            inputs.chat_template)

    found = [attribution_patching(adapter, clean, corrupt, inputs.layer, metric, sae, cfg.positions)
             for clean, corrupt in chunks]
    scores = torch.cat([a.scores for a in found]).numpy()  # (n_pairs, n_units) float64
    clean_metric = torch.cat([a.clean_metric for a in found]).numpy()
    corrupt_metric = torch.cat([a.corrupt_metric for a in found]).numpy()
    mean = scores.mean(axis=0)
    std = scores.std(axis=0, ddof=1) if len(pairs) > 1 else np.zeros_like(mean)
    order = np.argsort(-np.abs(mean), kind="stable")
    top = [{"rank": r + 1, "unit": int(u), "mean_score": float(mean[u]), "std": float(std[u])}
           for r, u in enumerate(order[:cfg.top])]

    validation = None
    n_check = min(cfg.validate_top, mean.size)
    if n_check >= 3:
        units = [int(u) for u in order[:n_check]]
        effects = torch.cat([activation_patching(adapter, clean, corrupt, inputs.layer, metric, sae, cfg.positions,
                                                 units).effects for clean, corrupt in chunks]).numpy()
        measured = effects.mean(axis=0)
        result = spearmanr(mean[units], measured)
        validation = {"spearman": float(result.statistic), "p_value": float(result.pvalue), "n_units": len(units),
                      "units": [{"unit": u, "attribution": float(mean[u]), "patching": float(e)}
                                for u, e in zip(units, measured)]}

    payload = {
        "schema_version": 1, "command": "attribute", "model": inputs.model, "layer": inputs.layer,
        "space": "residual" if sae is None else "sae", "sae": None if inputs.sae is None else str(inputs.sae), "sae_seed": sae_seed,
        "n_units": int(mean.size), "metric": METRIC_TEXT, "positions": cfg.positions,
        "prompts": list(inputs.prompts), "split": inputs.split, "seed": inputs.seed, "n_pairs": len(pairs),
        "pairs": [{"clean": c.id, "clean_category": c.category, "corrupt": b.id} for c, b in pairs],
        "clean_metric": {"mean": float(clean_metric.mean()), "values": clean_metric.tolist()},
        "corrupt_metric": {"mean": float(corrupt_metric.mean()), "values": corrupt_metric.tolist()},
        "top": top, "validation": validation,
    }
    write_json(inputs.out, payload, nonfinite="null")
    return payload


def show(inputs: Inputs, payload: dict[str, Any]) -> None:
    unit = "feature" if payload["space"] == "sae" else "unit"
    print(f"attribution at layer {payload['layer']} ({payload['space']} space, {payload['n_units']} {unit}s), "
          f"{payload['n_pairs']} pairs; metric {payload['metric']}")
    print(f"mean metric: clean {payload['clean_metric']['mean']:.3f}, corrupt {payload['corrupt_metric']['mean']:.3f}")
    checked = {} if payload["validation"] is None else {u["unit"]: u["patching"] for u in payload["validation"]["units"]}
    print(f"{'rank':>4} {unit:>8} {'mean score':>11} {'std':>9} {'patched':>9}")
    for row in payload["top"]:
        patched = f"{checked[row['unit']]:>9.4f}" if row["unit"] in checked else f"{'':>9}"
        print(f"{row['rank']:>4} {row['unit']:>8} {row['mean_score']:>11.4f} {row['std']:>9.4f} {patched}")
    if payload["validation"] is not None:
        v = payload["validation"]
        rho = "nan" if v["spearman"] is None else f"{v['spearman']:.3f}"
        print(f"Spearman(attribution, activation patching) over the top {v['n_units']}: {rho}")
    print(f"wrote {inputs.out}")


COMMAND = Command(
    name=NAME, help="attribution patching scores per unit / SAE feature", inputs=Inputs, run=command, show=show,
    config=Config, section=NAME, renamed={"dtype": ["--model_dtype"]},
)
