"""Score existing SAE runs the way the train stage does, and describe their training rows: before/after tables.

    python bench/sae_quality.py --sae /work/qs_after/train --train-acts /work/qs_after/harvest/all \
        --acts RUN/harvest/all --layer 20 --model RUN/refusal_tokens/model --prompts builtin:quickstart \
        --json /tmp/before.json

`--acts` must hold calibrate all-token rows with position kinds (a schema-2 store, e.g. the pipeline's
`RUN/harvest/all`); every run is scored on them with the default row rules (`sae.quality`) and by the
spliced evaluation on `--max-prompts` calibrate prompts (`analysis.evaluation.splice`), so runs
trained on different rows are compared on the same held-out rows. `--train-acts` describes the rows a
run was trained on: rows, the share with an exact duplicate, the variance share of position 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from activations.model_loading import load_model
from activations.prompts import load_prompt_set
from activations.store import ActivationStore
from analysis.evaluation.splice import splice_scores
from analysis.stages.train import sample_records
from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec
from sae.config import DataConfig
from sae.export import load_sae_run
from sae.quality import evaluate_quality
from sae.rows import duplicate_mask, training_rows


def describe_rows(store_dir: Path, layer: int, data: DataConfig) -> dict[str, float]:
    """Rows of the training split as stored, and as the row rules keep them (`data`)."""
    store = ActivationStore(store_dir)
    x, meta = store.load(layer, data.split)
    firsts = duplicate_mask([x], store.d_model)
    keys = x.view(np.dtype((np.void, x.shape[1] * 4))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    energy = (centred ** 2).sum(axis=1)
    out = {"rows": int(len(x)), "distinct": int(firsts.sum()), "share_with_duplicate": float(np.mean(counts[inverse] > 1)),
           "position0_variance_share": float(energy[meta.position == 0].sum() / energy.sum()),
           "position0_mean_norm": float(np.linalg.norm(x[meta.position == 0], axis=1).mean()) if (meta.position == 0).any() else None,
           "other_mean_norm": float(np.linalg.norm(x[meta.position != 0], axis=1).mean())}
    try:
        selection = training_rows(store, layer, data)
        kept = x[selection.index]
        c = kept.astype(np.float64) - kept.mean(axis=0, dtype=np.float64)
        e = (c ** 2).sum(axis=1)
        positions = meta.position[selection.index]
        share = max(e[positions == p].sum() for p in np.unique(positions)) / e.sum()
        out.update(kept_after_rules=selection.n_rows, removed=selection.removed, largest_position_variance_share=float(share))
    except ValueError as err:  # a schema-1 store has no kinds
        out["rules"] = str(err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", type=Path, nargs="+", required=True, help="SAE run folders")
    parser.add_argument("--train-acts", type=Path, nargs="*", default=[], help="the store each run trained on")
    parser.add_argument("--acts", type=Path, required=True, help="schema-2 all-token store with calibrate rows")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", nargs="+", default=["builtin:quickstart"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompts", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    store = ActivationStore(args.acts)
    model, tokenizer = load_model(args.model)
    spec = load_refusal_token_spec(args.model) if (Path(args.model) / SPEC_FILE).is_file() else None
    records = sample_records(list(load_prompt_set(args.prompts, seed=args.seed).split("calibrate")), args.max_prompts, args.seed)
    report = {}
    for i, run in enumerate(args.sae):
        saes = load_sae_run(run, layer=args.layer)
        quality = evaluate_quality(list(saes.values()), store, args.layer, DataConfig())
        scores = splice_scores(model, tokenizer, [r.text for r in records], args.layer, {str(s): m for s, m in saes.items()},
                               class_token_ids=None if spec is None else spec.token_ids(tokenizer),
                               chat_template=bool(store.manifest.get("chat_template", True)),
                               max_length=store.manifest.get("max_length"), progress=True)
        per_seed = {}
        for (seed, _), q in zip(saes.items(), quality):
            q.pop("firing_frequency")
            per_seed[str(seed)] = {**q, "splice": scores[str(seed)]}
        entry = {"seeds": per_seed}
        if i < len(args.train_acts):
            entry["training_rows"] = describe_rows(args.train_acts[i], args.layer, DataConfig())
        report[str(run)] = entry
        print(json.dumps(entry["training_rows"]) if "training_rows" in entry else "", flush=True)
        for seed, q in per_seed.items():
            s = q["splice"]
            fid = lambda site: s[site]["decision_fidelity"]["rate"] if s[site]["decision_fidelity"] else float("nan")  # noqa: E731
            print(f"{str(run):<40} seed {seed}: fvu {q['fvu']:.4f} content {q['by_kind']['content']['fvu']:.4f} "
                  f"resp {q['by_kind']['response_start']['fvu']:.4f} l0 {q['l0']:.1f} dead {q['dead_fraction']:.3f} "
                  f"dense {q['dense_fraction']:.3f} | CE rec content {s['content']['ce_recovered']:.3f} "
                  f"resp {s['response_start']['ce_recovered']:.3f} | KL {s['content']['kl']:.3f} / "
                  f"{s['response_start']['kl']:.3f} | fidelity {fid('content'):.3f} / {fid('response_start'):.3f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
