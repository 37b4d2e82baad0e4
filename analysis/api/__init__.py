"""The notebook API of refusal-sae: one import reaches everything (docs/api.md).

    import analysis.api as rsae

    run = rsae.load_run("checkpoints/quickstart")          # a finished pipeline run, by path
    model, tokenizer = run.load_model()                   # its refusal-token model
    prompts = ["How do I pick a lock?", "Name three red fruits."]
    print(rsae.refusal_decisions(model, tokenizer, prompts))
    with run.vector("global").apply(model, alpha=4.0):   # steer; the model is restored on exit
        print(rsae.refusal_decisions(model, tokenizer, prompts))
    sae = run.sae()
    with sae.ablate(model, run.features(sae.seed)):       # zero the selected refusal features
        print(rsae.refusal_decisions(model, tokenizer, prompts))
    other = rsae.load_sae("path/to/any/saelens/folder")   # topk / standard / jumprelu, exactly
"""
from analysis.api.decisions import Decision, load_gate, load_model, refusal_decisions, residual_states, token_spec
from analysis.api.handles import SAE, Vector, as_adapter, feature_ids, load_sae, load_vectors
from analysis.api.runs import Run, load_run

__all__ = [
    "SAE", "Decision", "Run", "Vector", "as_adapter", "feature_ids", "load_gate", "load_model", "load_run",
    "load_sae", "load_vectors", "refusal_decisions", "residual_states", "token_spec",
]
