"""The `features` stage: a page per selected SAE feature (what makes it fire, where it points, how stable it is).

    refusal-sae features --sae runs/sae --select runs/select --acts runs/acts_all --layer 20 \
        --model runs/refusal_model --out runs/features

For every feature the selection kept for a class (`SELECT/features.json`, the reference seed's), a
card (`probes.feature_cards`): the top-activating extract/calibrate prompts with the peak token
highlighted, prompts of other categories where it fires, firing frequency and mean activation per
category, the logit lens of its decoder row, its cosine with the class's mean-difference vector, and
its Hungarian match (decoder cosine) in every other SAE seed. Writes `OUT/cards.json` (the plain
data) and `OUT/features.html`; the pipeline writes `RUN/features/` and puts the cards in the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from activations.io import read_json, write_json
from activations.records import BENIGN, REFUSAL_CATEGORIES
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext

NAME = "features"
CARDS_NAME = "cards.json"
PAGE_NAME = "features.html"


@dataclass
class Config:
    """Feature pages (pipeline section `features:`, flags `--features.*`).

    Args:
        n_top: top-activating prompts per feature.
        n_other: prompts of other categories per feature.
        lens_k: tokens listed each way by the logit lens.
        context: at most this many tokens shown per prompt (around the peak).
        match_cosine: a feature is matched in another seed when its decoder cosine reaches this.
    """

    n_top: int = 8
    n_other: int = 3
    lens_k: int = 10
    context: int = 40
    match_cosine: float = 0.7

    def __post_init__(self) -> None:
        for name in ("n_top", "lens_k", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_other < 0:
            raise ValueError(f"n_other must be >= 0, got {self.n_other}")


def card_rows(features: dict[str, Any], consensus: list[int] | dict[str, list[int]] | None,
              firing: np.ndarray | None) -> dict[str, list[dict[str, Any]]]:
    """Per class of a parsed features.json: its features with weight, selection frequency, whether
    they are consensus features and how often they fire on held-out tokens."""
    out = {}
    for category, entry in features["per_class"].items():
        freqs = entry.get("selection_frequency") or [None] * len(entry["feature_ids"])
        agreed = None if consensus is None else set(consensus.get(category, []))
        out[category] = [{"feature": int(f), "weight": float(w), "selection_frequency": sf,
                          **({} if agreed is None else {"consensus": int(f) in agreed}),
                          **({} if firing is None else {"firing_frequency": float(firing[int(f)])})}
                         for f, w, sf in zip(entry["feature_ids"], entry["weights"], freqs)]
    return out


def mean_differences(store: Any, layer: int) -> dict[str, np.ndarray]:
    """Per refusal category with extract rows: mean(last-token x | c) − mean(x | benign), float64."""
    from probes.directions import mean_difference
    from probes.rows import load_last_token_rows

    rows = load_last_token_rows(store, layer, splits=("extract",))
    present = set(rows.categories.tolist())
    if BENIGN not in present:
        return {}
    return {c: mean_difference(rows, c) for c in REFUSAL_CATEGORIES if c in present}


def build_cards(cfg: Config, saes: dict[int, Any], store: Any, layer: int, features: dict[str, Any], tokenizer: Any,
                model: Any = None, consensus: dict[str, list[int]] | None = None,
                firing: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Cards of the features of `features` (selected on the first seed of `saes`; the others give stability)."""
    from analysis.evaluation.stability import feature_matches, match_decoders
    from probes.feature_cards import build_feature_cards, unembedding

    seeds = list(saes)
    reference = seeds[0]
    rows = card_rows(features, consensus, firing)
    ids = sorted({r["feature"] for per in rows.values() for r in per})
    matchings = {(reference, t): match_decoders(saes[reference].W_dec, saes[t].W_dec) for t in seeds[1:]}
    matches = feature_matches(ids, reference, matchings, seeds) if len(seeds) > 1 else None
    return build_feature_cards(
        saes[reference], store, layer, rows, tokenizer, W_U=None if model is None else unembedding(model),
        mean_differences=mean_differences(store, layer), matches=matches, match_cosine=cfg.match_cosine,
        n_top=cfg.n_top, n_other=cfg.n_other, lens_k=cfg.lens_k, context=cfg.context)


def write_cards(out: Path, cards: list[dict[str, Any]], title: str, facts: list[tuple[str, Any]]) -> Path:
    """`OUT/cards.json` and `OUT/features.html`."""
    from analysis.reporting.feature_pages import write_feature_page
    from analysis.reporting.report import STYLE

    write_json(out / CARDS_NAME, {"schema_version": 1, "cards": cards}, nonfinite="null")
    return write_feature_page(out / PAGE_NAME, cards, title, facts, STYLE)


def _firing(seed_dir: Path) -> np.ndarray | None:
    """Held-out firing frequency of every latent (`latent_stats.safetensors` of a training run), if saved."""
    from activations.io import load_numpy_tensors

    path = seed_dir / "latent_stats.safetensors"
    return load_numpy_tensors(path, "latent statistics")["firing_frequency"] if path.is_file() else None


# --- command -------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae features`.

    Args:
        sae: SAE training run folder (RUN/seed_<s>/; the selection's seed is the reference) or one SAE folder.
        select: selection folder of `refusal-sae select --sae RUN` (or one features.json).
        acts: activation store (all-token rows of extract/calibrate prompts show what fires where).
        layer: the SAE's layer.
        model: the model (tokenizer for the tokens, unembedding for the logit lens).
        out: output folder (cards.json, features.html).
        device: device for SAE encoding: auto | cpu | cuda | cuda:N.
    """

    sae: Path
    select: Path
    acts: Path
    layer: int
    model: str
    out: Path
    device: str = "auto"


def command(cfg: Config, inputs: Inputs) -> dict[str, Any]:
    from activations.model_loading import load_model, resolve_device
    from activations.store import ActivationStore
    from analysis.stages.select import read_consensus
    from probes.selection import read_features
    from sae.export import load_sae_run, seed_folders

    store = ActivationStore(inputs.acts)
    features = read_features(inputs.select, layer=inputs.layer)
    select_dir = inputs.select if inputs.select.is_dir() else inputs.select.parent
    seed = (features.get("meta") or {}).get("sae_seed")
    folders = seed_folders(inputs.sae)
    if seed is None or int(seed) not in folders:
        raise ValueError(f"{features['path']} was selected on SAE seed {seed}, which {inputs.sae} does not hold")
    seed = int(seed)
    order = [seed] + [s for s in folders if s != seed]
    device = resolve_device(inputs.device)
    saes = load_sae_run(inputs.sae, inputs.layer, store.d_model, order, device)
    saes = {s: saes[s] for s in order}
    model, tokenizer = load_model(inputs.model, device=device)
    consensus = (read_consensus(select_dir) or {}).get(seed)
    cards = build_cards(cfg, saes, store, inputs.layer, features, tokenizer, model, consensus, _firing(folders[seed]))
    page = write_cards(inputs.out, cards, f"Features of SAE seed {seed}, layer {inputs.layer}",
                       [("SAE", str(inputs.sae)), ("selection", features["path"]), ("store", str(inputs.acts))])
    return {"n_cards": len(cards), "page": str(page)}


def show(inputs: Inputs, result: dict[str, Any]) -> None:
    print(f"wrote {result['n_cards']} feature cards to {result['page']} and {inputs.out / CARDS_NAME}")


COMMAND = Command(name=NAME, help="a page per selected SAE feature (examples, logit lens, stability)",
                  inputs=Inputs, run=command, show=show, config=Config, section=NAME)


# --- pipeline ------------------------------------------------------------------------------------

def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Cards of the reference seed's selected features, on the extract + calibrate all-token rows."""
    from activations.store import ActivationStore
    from analysis.stages.harvest import store_dir
    from analysis.stages.select import read_consensus, selection_dir
    from analysis.stages.train import NAME as TRAIN
    from analysis.stages.train import run_saes
    from probes.selection import read_features

    features = read_features(selection_dir(ctx, "sae"), layer=ctx.layer)
    saes = run_saes(ctx)
    reference = int(features["meta"]["sae_seed"])
    saes = {reference: saes[reference], **{s: m for s, m in saes.items() if s != reference}}
    model, tokenizer = ctx.model("target")
    consensus = (read_consensus(selection_dir(ctx, "sae")) or {}).get(reference)
    cards = build_cards(cfg, saes, ActivationStore(store_dir(ctx, "all")), ctx.layer, features, tokenizer, model,
                        consensus, _firing(ctx.stage_dir(TRAIN) / f"seed_{reference}"))
    write_cards(ctx.stage_dir(NAME), cards, f"Selected features, SAE seed {reference}, layer {ctx.layer}",
                [("model", ctx.target_model_path)])
    return {"n_cards": len(cards)}


def cards_path(ctx: RunContext) -> Path:
    """This run's cards.json."""
    return ctx.stage_dir(NAME) / CARDS_NAME


def read_cards(path: Path) -> list[dict[str, Any]]:
    return list(read_json(path, "feature cards")["cards"])


STAGE = PipelineStage(NAME, run, section=NAME, after=("select",))
