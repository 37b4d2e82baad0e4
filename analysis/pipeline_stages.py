"""The model-side pipeline stages: prompts → refusal-token model → harvest → SAEs → select → vectors.

Each stage function takes the run and its output folder and returns a small JSON-able result that
the stage runner stamps (later stages hash it, so a changed upstream result re-runs them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from activations.harvest import harvest
from activations.model_loading import load_model, model_info
from activations.store import ActivationStore
from analysis.pipeline_run import PipelineRun
from probes.refusal_token_fit import fit_refusal_tokens
from probes.refusal_token_install import save_refusal_token_model
from probes.refusal_tokens import RefusalTokenSpec, load_refusal_token_spec, resolve_token_spec
from probes.select_stage import run_selection
from probes.vector_stage import build_vectors, load_seed_features
from sae.config import SAEConfig
from sae.export import load_sae_run
from sae.train import train_saes


def stage_prompts(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Load and split the prompt sources; write the split manifest with content hashes."""
    run.prompts.write_manifest(out / "prompts.json")
    manifest = run.prompts.manifest()
    return {"n": manifest["n"], "splits": manifest["splits"], "n_duplicates_removed": manifest["n_duplicates_removed"]}


def stage_refusal_model(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Fit categorical refusal tokens onto the base model (extract; C on calibrate) and save it."""
    cfg = run.cfg
    spec = resolve_token_spec(cfg.refusal_tokens.tokens)
    model, tokenizer = load_model(cfg.model, device=run.device, dtype=cfg.harvest.dtype)  # modified in place
    records = run.split("extract") + run.split("calibrate")
    report = fit_refusal_tokens(
        model, tokenizer, records, spec, batch_size=cfg.harvest.batch_size, seed=cfg.seed,
        max_length=cfg.harvest.max_length, progress=True,
    )
    save_refusal_token_model(model, tokenizer, spec, out / "model", report)
    run.forget_model("target")
    return {"model_dir": str(out / "model"), "C": report.C, "calibrate": report.calibrate, "seconds": report.seconds}


def target_spec(run: PipelineRun) -> RefusalTokenSpec:
    """The refusal-token spec of the model under study."""
    if run.cfg.refusal_tokens.enabled:
        return load_refusal_token_spec(run.target_model_path)
    return resolve_token_spec(run.cfg.refusal_tokens.tokens)


def _harvest(run: PipelineRun, which: str, records: list, layers: list[int], positions: str, out: Path) -> dict[str, Any]:
    cfg = run.cfg.harvest
    model, tokenizer = run.model(which)
    name = run.cfg.model if which == "base" else run.target_model_path
    harvest(
        model, tokenizer, records, layers, out, positions=positions, batch_size=cfg.batch_size,
        max_length=cfg.max_length, dtype="float32", chat_template=cfg.chat_template,
        model_info=model_info(model, name), progress=True,
    )
    store = ActivationStore(out)
    return {"rows": store.n_rows, "layers": store.layers, "manifest_sha256": _file_hash(out / "manifest.json")}


def _file_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage_harvest(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Last-token rows of every prompt at all layers; all-token rows of extract prompts for the SAEs.

    With a fitted refusal-token model, the base model's last-token extract rows are also harvested
    for model diffing (vectors are fitted on extract rows only).
    """
    layers = run.layers()
    result = {
        "last": _harvest(run, "target", list(run.prompts.records), layers, "last", out / "last"),
        "all": _harvest(run, "target", run.split("extract"), [run.layer], "all", out / "all"),
    }
    if run.cfg.refusal_tokens.enabled:
        result["base_last"] = _harvest(run, "base", run.split("extract"), layers, "last", out / "base_last")
    return result


def stage_sae(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Train one SAE per seed on the all-token extract rows of the primary layer."""
    cfg = run.cfg.sae
    store = ActivationStore(run.stage_dir("harvest") / "all")
    sae_cfg = SAEConfig(
        d_in=store.d_model, expansion_factor=cfg.expansion_factor, k=cfg.k, architecture=cfg.architecture,
        auxk_coeff=cfg.auxk_coeff, contrastive_coeff=cfg.contrastive_coeff,
    )
    train_saes(
        store.directory, run.layer, out, seeds=list(cfg.seeds), cfg=sae_cfg, max_steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, split="extract", accelerator="gpu" if run.device.startswith("cuda") else "cpu",
        logger="csv", ckpt_path="last", print_table=False, log_every_n_steps=max(1, cfg.steps // 25),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics}


def saes(run: PipelineRun) -> dict[int, Any]:
    """The trained SAEs of every seed, on the run's device."""
    return load_sae_run(run.stage_dir("sae"), device=run.device)


def stage_select(run: PipelineRun, out: Path) -> dict[str, Any]:
    """L1 heads + stability selection on SAE latents (every seed) and on residual units."""
    cfg = run.cfg.select
    store = ActivationStore(run.stage_dir("harvest") / "last")
    common = dict(top_k=cfg.top_k, n_bootstrap=cfg.n_bootstrap, threshold=cfg.stability_threshold,
                  c_grid=tuple(cfg.C_grid), seed=run.cfg.seed, max_iter=cfg.max_iter, tol=cfg.tol)
    sae_report = run_selection(store, run.layer, saes(run), out / "sae", sae_run=str(run.stage_dir("sae")), **common)
    residual_report = run_selection(store, run.layer, None, out / "residual", **common)
    return {"sae": _probe_metrics(sae_report), "residual": _probe_metrics(residual_report)}


def _probe_metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: v for k, v in entry.items() if k in ("probe_eval", "C")} for name, entry in report["runs"].items()}


def stage_vectors(run: PipelineRun, out: Path) -> dict[str, Any]:
    """Residual CAA, SAE-space (L1-restricted, per seed) and low-rank vectors at the primary layer."""
    cfg = run.cfg.vectors
    store = ActivationStore(run.stage_dir("harvest") / "last")
    models = saes(run)
    features = load_seed_features(run.stage_dir("select") / "sae", list(models))
    report = build_vectors(
        store, run.layer, models, features, out, tau=cfg.tau, top_k=cfg.top_k, rank=cfg.lowrank_rank,
        shared_frequency=cfg.shared_frequency, sae_run=str(run.stage_dir("sae")),
    )
    return {"global_norm": report["global"]["norm"], "lowrank": report["lowrank"]["cos_global"],
            "sae_seeds": sorted(report["sae"])}
