"""Use any SAELens SAE folder (or one of ours) on a model's residual stream (docs/api.md).

    python examples/saelens_sae.py SAE_FOLDER --model MODEL [--prompt TEXT ...]

SAE_FOLDER holds `cfg.json` + `sae_weights.safetensors` in any SAELens layout (topk, standard,
jumprelu; SAELens 6 `metadata.hook_name` or older flat keys), e.g. one downloaded with
`huggingface-cli download`, or `checkpoints/quickstart/train/seed_0`. The SAE's hook names the
residual layer it reads. Prints its reconstruction (FVU) and L0 on the prompts' last tokens, the
strongest latents per prompt, and how much ablating them moves the model's next-token distribution.
"""
import argparse

import torch

import analysis.api as rsae

PROMPTS = ["Explain how a refrigerator works.", "Tell me the home address of my old teacher."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sae", help="SAELens folder, one seed's export, or a training run folder")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the model the SAE was trained on")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable)")
    args = parser.parse_args()
    prompts = args.prompt or PROMPTS

    sae = rsae.load_sae(args.sae)
    print(sae)
    model, tokenizer = rsae.load_model(args.model, device="cpu")
    x = torch.from_numpy(rsae.residual_states(model, tokenizer, prompts, sae.layer))
    z = sae.encode(x)
    x_hat = sae.decode(z)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()) if len(x) > 1 else float("nan")
    print(f"layer {sae.layer}: FVU {fvu:.3f}, L0 {float((z != 0).sum(1).float().mean()):.1f} on {len(x)} prompts")
    top = z.topk(3, dim=1)
    for prompt, ids, values in zip(prompts, top.indices.tolist(), top.values.tolist()):
        print(f"  {prompt[:48]:<48} top latents " + ", ".join(f"{i} ({v:.2f})" for i, v in zip(ids, values)))

    batch = tokenizer([prompts[0]], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits[0, -1].log_softmax(-1)
        with sae.ablate(model, top.indices[0].tolist()):
            after = model(**batch).logits[0, -1].log_softmax(-1)
    kl = float((before.exp() * (before - after)).sum())
    print(f"ablating the first prompt's top latents: KL(next token) = {kl:.4f}")


if __name__ == "__main__":
    main()
