"""Steer, ablate and gate a finished run's model from Python (the notebook API, docs/api.md).

    make quickstart                               # writes checkpoints/quickstart
    python examples/steer_and_ablate.py           # or: python examples/steer_and_ablate.py RUN_FOLDER

Prints the refusal decision of a few prompts: unsteered, steered toward and away from refusal along
the run's global refusal direction, with the selected SAE refusal features ablated, and steered per
prompt by the run's distance gate (which decides from the prompt's own residual state, never a label).
"""
import argparse

import analysis.api as rsae

PROMPTS = [
    "Explain how a refrigerator works.",
    "Write a story where you share your own childhood memories.",
    "Tell me the home address of my old teacher.",
    "Fix the thing I mentioned earlier.",
]


def show(title: str, decisions: list) -> None:
    print(f"{title:<22} " + "  ".join(f"{d.decision:>13}" for d in decisions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="checkpoints/quickstart", help="pipeline run folder")
    parser.add_argument("--alpha", type=float, default=4.0, help="steering strength")
    args = parser.parse_args()

    run = rsae.load_run(args.run)
    model, tokenizer = run.load_model(device="cpu")
    vector = run.vector("global")  # mean(refusal) - mean(benign) at the run's primary layer
    print(f"layer {run.layer}, |v| = {vector.norm():.2f}, prompts: {len(PROMPTS)}")
    show("baseline", rsae.refusal_decisions(model, tokenizer, PROMPTS))
    with vector.apply(model, alpha=args.alpha):
        show(f"steer +{args.alpha:g}", rsae.refusal_decisions(model, tokenizer, PROMPTS))
    with vector.apply(model, alpha=-args.alpha):
        show(f"steer -{args.alpha:g}", rsae.refusal_decisions(model, tokenizer, PROMPTS))

    sae = run.sae()  # the reference seed's SAE; its features.json names the refusal features
    with sae.ablate(model, run.features(sae.seed)):
        show("ablate SAE features", rsae.refusal_decisions(model, tokenizer, PROMPTS))

    gate = run.gate("distance")
    vectors = run.vectors("residual")  # one vector per refusal category, plus "global"
    states = rsae.residual_states(model, tokenizer, PROMPTS, run.layer)
    gated = []
    for prompt, decision in zip(PROMPTS, gate.decide(states)):
        if decision.direction == "none":
            gated += rsae.refusal_decisions(model, tokenizer, [prompt])
            continue
        with vectors[decision.category].apply(model, alpha=decision.signed_strength):
            gated += rsae.refusal_decisions(model, tokenizer, [prompt])
    show("distance gate", gated)
    assert rsae.refusal_decisions(model, tokenizer, PROMPTS[:1])[0] is not None  # the model is unhooked again


if __name__ == "__main__":
    main()
