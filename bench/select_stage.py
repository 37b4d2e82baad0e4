"""Benchmark: the `select` stage (named select_stage.py: a bench/select.py would shadow the standard
library's `select` module for every script in bench/, whose folder Python puts first on sys.path)
with the torch solver (GPU) vs the scikit-learn reference.

Runs `analysis.stages.select.run_selection` twice on the same data in one process, once per
solver, and prints the time of each, the speed-up, and the agreement of what was selected: per run
(SAE seed or residual) and class the Jaccard index of the selected feature sets (goal >= 0.8), and
the eval accuracy of both multinomial heads with their Wilson 95% CIs (each inside the other's CI).

    python bench/select_stage.py --run RUN -c configs/quickstart.yaml      # a finished pipeline run (quickstart)
    python bench/select_stage.py --synthetic 8b --device cuda              # Llama-3-8B shape: d 4096, 65,536 latents, 740 prompts
    python bench/select_stage.py --synthetic tiny                          # seconds on the CPU
    python bench/select_stage.py --synthetic 8b --solvers sklearn --reference torch.json  # add a run made apart
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.records import BENIGN, CONTRAST, REFUSAL_CATEGORIES  # noqa: E402
from activations.store import ShardWriter  # noqa: E402
from analysis.stages.select import Config, run_selection  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.model import SparseAutoencoder  # noqa: E402

SHAPES = {"8b": dict(d=4096, d_sae=65536, k=64, prompts=740), "tiny": dict(d=64, d_sae=512, k=8, prompts=240)}


def synthetic_store(out: Path, d: int, prompts: int, seed: int = 0) -> Path:
    """`prompts` last-token rows: benign, contrast and the refusal categories, each with its own mean
    direction plus noise; splits 60 / 20 / 20 per category."""
    rng = np.random.default_rng(seed)
    categories = [BENIGN, CONTRAST, *REFUSAL_CATEGORIES]
    weights = np.array([0.4, 0.16] + [0.088] * len(REFUSAL_CATEGORIES))
    labels = rng.choice(len(categories), size=prompts, p=weights / weights.sum())
    means = rng.standard_normal((len(categories), d)) * 0.6
    base = rng.standard_normal(d) * 3.0  # a shared offset, as residual streams have
    writer = ShardWriter(out, layers=[0], d_model=d, dtype="float32", positions="last", model_info={"id": "synthetic"},
                         rows_per_shard=4096, chat_template=False)
    counts: dict[int, int] = {}
    with writer:
        for i, c in enumerate(labels):
            position = counts.get(int(c), 0)
            counts[int(c)] = position + 1
            split = ("extract", "extract", "extract", "calibrate", "eval")[position % 5]
            x = base + means[c] + rng.standard_normal(d)
            writer.add_prompt(f"p{i}", categories[c], split, np.array([0]), np.array([1]), {0: x[None].astype(np.float32)})
    writer.finish()
    return out


def synthetic_saes(store: Path, d: int, d_sae: int, k: int, seeds: list[int], device: str) -> dict[int, SparseAutoencoder]:
    """Random SAEs whose encoder rows are partly the data's rows (so latents fire with class structure)."""
    from activations.store import ActivationStore

    x, _ = ActivationStore(store).load(0)
    out = {}
    for seed in seeds:
        sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=d_sae, k=k), seed=seed).to(device).eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            picks = torch.randint(0, len(x), (d_sae // 4,), generator=g)
            rows = torch.from_numpy(x[picks.numpy()] - x.mean(0)).to(device)
            sae.W_enc_rows[: d_sae // 4] = rows / rows.norm(dim=1, keepdim=True)
            sae.b_dec.copy_(torch.from_numpy(x.mean(0)).to(device))
        out[seed] = sae
    return out


def agreement(ref: dict, new: dict) -> list[dict]:
    """Per run and class: Jaccard of the selected features; per run: both eval accuracies and CIs."""
    rows = []
    for name, run_ref in ref["runs"].items():
        run_new = new["runs"][name]
        acc_ref, acc_new = run_ref["probe_eval"]["accuracy"], run_new["probe_eval"]["accuracy"]
        inside = acc_ref["ci"][0] <= acc_new["rate"] <= acc_ref["ci"][1] and acc_new["ci"][0] <= acc_ref["rate"] <= acc_new["ci"][1]
        for cls, ids_ref in run_ref["selected"].items():
            a, b = set(map(int, ids_ref)), set(map(int, run_new["selected"][cls]))
            jaccard = len(a & b) / len(a | b) if a | b else 1.0
            rows.append({"run": name, "class": cls, "n_ref": len(a), "n_torch": len(b), "jaccard": jaccard,
                         "C_ref": run_ref["C"], "C_torch": run_new["C"], "acc_ref": acc_ref, "acc_torch": acc_new,
                         "acc_within_ci": inside})
    return rows


def timed_selection(store, layer, saes, out: Path, cfg: Config, device: str) -> tuple[float, dict]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = run_selection(store, layer, saes, out, cfg, seed=0, device=device)
    return time.perf_counter() - start, report


def _data(args: argparse.Namespace, scratch: Path) -> tuple:
    """(store, layer, {seed: SAE}, label) of a finished run or of synthetic data."""
    from activations.store import ActivationStore

    if args.run:
        from sae.export import load_sae_run

        layer = json.loads((args.run / "train" / "metrics.json").read_text())["layer"]
        store = ActivationStore(args.run / "harvest" / "last")
        saes = load_sae_run(args.run / "train", layer, store.d_model, args.seeds, args.device)
        return store, layer, saes, f"run {args.run} (layer {layer}, d {store.d_model}, {len(store.meta())} prompts)"
    shape = SHAPES[args.synthetic or "tiny"]
    store = ActivationStore(synthetic_store(scratch / "store", shape["d"], shape["prompts"]))
    saes = synthetic_saes(store.directory, shape["d"], shape["d_sae"], shape["k"], args.seeds, args.device)
    return store, 0, saes, f"synthetic {args.synthetic}: d {shape['d']}, {shape['d_sae']} latents, {shape['prompts']} prompts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished pipeline run folder (harvest/last, train/)")
    parser.add_argument("-c", "--config", type=Path, help="pipeline YAML whose select: section to use")
    parser.add_argument("--synthetic", choices=sorted(SHAPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--solvers", nargs="*", default=["torch", "sklearn"], choices=["torch", "sklearn"])
    parser.add_argument("--space", choices=("sae", "residual", "both"), default="both")
    parser.add_argument("--json", type=Path, help="also write the results (times and reports) here")
    parser.add_argument("--reference", type=Path, action="append", default=[],
                        help="a --json of an earlier run on the same data: its solvers' results join this run's")
    args = parser.parse_args(argv)
    cfg = Config()
    if args.config:
        import yaml

        cfg = Config(**(yaml.safe_load(args.config.read_text()).get("select") or {}))
    scratch = Path(tempfile.mkdtemp(prefix="bench-select-"))
    results: dict = {}
    spaces = {"sae": None, "residual": None}
    label = "(results of --reference runs)"
    try:
        if args.solvers:
            store, layer, spaces["sae"], label = _data(args, scratch)
        for space, space_saes in spaces.items():
            if args.space not in (space, "both"):
                continue
            for solver in args.solvers:
                seconds, report = timed_selection(store, layer, space_saes, scratch / f"{space}-{solver}",
                                                  replace(cfg, solver=solver), args.device)
                results[(space, solver)] = (seconds, report)
                print(f"{space:<8} {solver:<7} {seconds:8.2f} s", flush=True)
                _save(args.json, label, results)  # after every part: a cut-off run keeps what it finished
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _save(args.json, label, results)
    for reference in args.reference:
        earlier = json.loads(reference.read_text())
        label = earlier["label"] if label.startswith("(") else label
        for space, solver, seconds, report in earlier["results"]:
            results.setdefault((space, solver), (seconds, report))
    solvers = sorted({so for _, so in results})
    print(f"\n{label} | device {args.device} | C grid {cfg.C_grid} | bootstrap {cfg.n_bootstrap} | top_k {cfg.top_k}")
    total = {s: sum(v[0] for (sp, so), v in results.items() if so == s) for s in solvers}
    print("stage time: " + ", ".join(f"{s} {t:.2f} s" for s, t in total.items())
          + (f" | sklearn / torch = {total['sklearn'] / total['torch']:.1f}x" if len(total) == 2 else ""))
    rows = []
    if len(solvers) == 2:
        for space in spaces:
            if (space, "torch") in results and (space, "sklearn") in results:
                rows += agreement(results[(space, "sklearn")][1], results[(space, "torch")][1])
        print(f"\n{'run':<9} {'class':<14} {'n sk':>4} {'n to':>4} {'Jaccard':>7}  {'C sk':>5} {'C to':>5}  "
              f"{'acc sklearn [95% CI]':<24} {'acc torch [95% CI]':<24} in CI")
        for r in rows:
            a, b = r["acc_ref"], r["acc_torch"]
            print(f"{r['run']:<9} {r['class']:<14} {r['n_ref']:>4} {r['n_torch']:>4} {r['jaccard']:>7.2f}  "
                  f"{r['C_ref']:>5g} {r['C_torch']:>5g}  {a['rate']:.3f} [{a['ci'][0]:.3f},{a['ci'][1]:.3f}]    "
                  f"{b['rate']:.3f} [{b['ci'][0]:.3f},{b['ci'][1]:.3f}]    {'yes' if r['acc_within_ci'] else 'no'}")
        print(f"min Jaccard {min(r['jaccard'] for r in rows):.2f} (goal >= 0.8); accuracies within each other's CI: "
              f"{all(r['acc_within_ci'] for r in rows)}")
    return 0


def _save(path: Path | None, label: str, results: dict) -> None:
    if path is not None:
        rows = [[k[0], k[1], v[0], v[1]] for k, v in results.items()]
        path.write_text(json.dumps({"label": label, "results": rows}, default=_jsonable))


def _jsonable(value):
    """numpy scalars and arrays in the reports → plain JSON."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


if __name__ == "__main__":
    sys.exit(main())
