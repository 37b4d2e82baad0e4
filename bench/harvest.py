"""Benchmark: harvesting speed vs a plain full forward with `output_hidden_states=True`.

For each layer l it times, in one process on the same length-bucketed batches (median of
`--repeats` after a warm-up):
  full       plain forward of the whole model with output_hidden_states=True (logits included);
  truncated  our hooked forward that stops after block l, nothing copied or written;
  harvest    `activations.harvest.harvest` end to end: tokenisation, truncated forward,
             device→host copies, shard writes with fsync and checksums, manifest.
It reports harvest/full time against the target (l+1)/num_layers × 1.15, and harvest speed /
truncated-forward speed (goal >= 0.85 on a GPU; truncated and harvest are timed in alternation and
the ratio is the median of the pairs', so a drifting load on a shared machine hits both).

    python bench/harvest.py --smoke                         # seconds, CPU, tiny random model
    python bench/harvest.py --model embedded --device cpu   # SmolLM2-135M on the CPU
    python bench/harvest.py --model llama8b --device cuda   # Llama-3-8B-shaped random model, bf16
    python bench/harvest.py --model narrow --threads 1 --positions all --rows-per-shard 1024 --breakdown
                                                            # CPU proxy: 32 narrow blocks, a forward that is
                                                            # mostly Python launching small ops (as on a GPU)
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.adapter import ModelAdapter  # noqa: E402
from activations.harvest import _capture_batch, harvest  # noqa: E402
from activations.harvest_batches import prefetched_batches  # noqa: E402
from activations.records import PromptRecord  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harvest_diagnose import VARIANTS, breakdown, diagnose, median_time, profile_harvest  # noqa: E402

WORDS = ("river lamp orbit garden signal copper window maple thunder pencil harbor velvet canyon "
         "lantern meadow engine ribbon glacier compass orchard").split()
LLAMA8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def synthetic_records(n: int, min_words: int, max_words: int) -> list[PromptRecord]:
    """`n` made-up prompts with lengths spread evenly over [min_words, max_words]."""
    records = []
    for i in range(n):
        k = min_words + (i * 7919) % (max_words - min_words + 1)
        text = f"Request {i}: " + " ".join(WORDS[(i * 3 + j * 7) % len(WORDS)] for j in range(k))
        records.append(PromptRecord(id=f"b{i:05d}", text=text, category="benign", split="eval", source="bench"))
    return records


def build_model(kind: str, device: str, tokenizer_path: str | None) -> tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, label) for `tiny`, `narrow`, `embedded` or `llama8b` (random weights, bf16 on a GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from activations.model_loading import load_embedded_tokenizer, load_model, prepare_tokenizer

    if tokenizer_path:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path))
    if kind == "embedded":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, tokenizer = load_model("smollm2-135m-instruct", device=device, dtype=dtype)
        return model, tokenizer, f"smollm2-135m {str(dtype)[6:]}"
    tokenizer = tokenizer if tokenizer_path else load_embedded_tokenizer()
    if kind == "tiny":
        config = LlamaConfig(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=1024)
        dtype = torch.float32
    elif kind == "narrow":  # many small blocks: the forward is interpreter-bound, like the 8B one on an H200
        config = LlamaConfig(hidden_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=256, vocab_size=len(tokenizer), max_position_embeddings=1024)
        dtype = torch.float32
    else:
        config = LlamaConfig(**LLAMA8B)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    model.config.name_or_path = f"random-{kind}"
    return model, tokenizer, f"{kind} (random) {str(dtype)[6:]}"


def bench_layer(model, tokenizer, records, layer: int, args: argparse.Namespace, scratch: Path) -> dict:
    """Time full / truncated / harvest for one layer; returns one table row."""
    adapter = ModelAdapter(model)
    device = adapter.device
    batches = list(prefetched_batches(tokenizer, records, args.batch_size, True, args.max_length,  # as harvest makes them
                                      pin_memory=device.type == "cuda"))
    n_tokens = sum(b.n_tokens for b in batches)

    @torch.inference_mode()
    def full() -> None:
        for b in batches:
            model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                  position_ids=b.position_ids.to(device), output_hidden_states=True, use_cache=False)

    @torch.inference_mode()
    def truncated() -> None:
        for b in batches:
            _capture_batch(adapter, b, [layer], args.positions, args.dtype)

    def clear() -> None:
        shutil.rmtree(scratch / f"layer{layer}", ignore_errors=True)

    def harvest_run() -> None:
        out = scratch / f"layer{layer}"
        harvest(model, tokenizer, records, [layer], out, positions=args.positions, batch_size=args.batch_size,
                max_length=args.max_length, dtype=args.dtype, progress=False, rows_per_shard=args.rows_per_shard)

    @torch.inference_mode()
    def max_difference() -> float:
        """Largest |stored - hidden_states[l+1]| over the first batch (last-token mode), float32."""
        from activations.store import ActivationStore

        b = batches[0]
        states = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                       position_ids=b.position_ids.to(device), output_hidden_states=True, use_cache=False)
        want = states.hidden_states[layer + 1][:, -1].float().cpu()
        x, meta = ActivationStore(scratch / f"layer{layer}").load(layer)
        row_of = {pid: i for i, pid in enumerate(meta.prompt_id)}
        got = torch.from_numpy(x[[row_of[r.id] for r in b.records]])
        return float((got - want).abs().max())

    t_full = median_time(full, device, args.repeats)
    # paired: each harvest is timed right after a truncated forward, so a load that drifts (a shared
    # CPU) hits both; the ratio is the median of the pairs' ratios
    truncated()
    clear()
    harvest_run()  # warm-ups
    pairs: list[tuple[float, float]] = []
    variants: dict[str, list[float]] = {name: [] for name in args.compare}
    for _ in range(args.repeats):
        pairs.append((median_time(truncated, device, 1, warmup=0), median_time(harvest_run, device, 1, warmup=0, prepare=clear)))
        for name in args.compare:  # the same harvest with one setting changed, right after (A/B in one process)
            with VARIANTS[name]():
                variants[name].append(pairs[-1][0] / median_time(harvest_run, device, 1, warmup=0, prepare=clear))
    t_trunc, t_harvest = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    target = (layer + 1) / adapter.num_layers * 1.15
    if args.positions == "last":
        print(f"layer {layer}: max |stored - output_hidden_states| on the first batch = {max_difference():.3g} "
              f"(includes {args.dtype} storage rounding)")
    return {
        "layer": layer, "num_layers": adapter.num_layers, "prompts": len(records), "tokens": n_tokens,
        "full_s": t_full, "trunc_s": t_trunc, "harvest_s": t_harvest,
        "harvest_prompts_s": len(records) / t_harvest, "harvest_tok_s": n_tokens / t_harvest,
        "full_prompts_s": len(records) / t_full, "full_tok_s": n_tokens / t_full,
        "ratio_full": t_harvest / t_full, "target": target, "ratio_trunc": statistics.median(a / b for a, b in pairs),
        "ratio_trunc_all": [a / b for a, b in pairs], "ratio_trunc_variants": variants,
    }


def print_table(label: str, device: str, args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\nmodel: {label} | device: {device} | positions: {args.positions} | storage: {args.dtype} | "
          f"batch {args.batch_size} | median of {args.repeats}")
    head = (f"{'layer':>9} {'prompts':>7} {'tokens':>7} {'full s':>8} {'trunc s':>8} {'harv s':>8} "
            f"{'harv p/s':>9} {'harv tok/s':>10} {'full p/s':>9} {'harv/full':>9} {'target':>7} {'ok':>3} "
            f"{'harv/trunc':>10} {'>=0.85':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = "yes" if r["ratio_full"] <= r["target"] else "no"
        ok_trunc = "yes" if r["ratio_trunc"] >= 0.85 else "no"
        print(f"{r['layer']:>4}/{r['num_layers']:<4} {r['prompts']:>7} {r['tokens']:>7} {r['full_s']:>8.3f} "
              f"{r['trunc_s']:>8.3f} {r['harvest_s']:>8.3f} {r['harvest_prompts_s']:>9.1f} {r['harvest_tok_s']:>10.0f} "
              f"{r['full_prompts_s']:>9.1f} {r['ratio_full']:>9.3f} {r['target']:>7.3f} {ok:>3} "
              f"{r['ratio_trunc']:>10.3f} {ok_trunc:>6}")
    print("harv/full: harvest time / full-forward time (want <= target = (l+1)/num_layers*1.15); "
          "harv/trunc: harvest speed / truncated-forward-only speed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "narrow", "embedded", "llama8b"), default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: 9 18 (tiny: 1 4)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts")
    parser.add_argument("--words", type=int, nargs=2, default=(10, 120), metavar=("MIN", "MAX"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--positions", choices=("last", "all"), default="last")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help="rows per shard (default: the harvest's, about 64 MiB; a CPU proxy with a narrow model "
                             "needs fewer to write as many shards per forward as the 8B harvest does)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (a CPU proxy wants 1: more OpenMP threads than free cores stall "
                             "whenever the harvest's own threads run)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--profile", action="store_true", help="first print a cProfile of one harvest")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the first layer's harvest without fsync/sha256 and without the store")
    parser.add_argument("--diagnose", action="store_true",
                        help="also split the first layer's harvest time (forward loop parts, GPU busy vs wall)")
    parser.add_argument("--compare", nargs="*", default=[], choices=sorted(VARIANTS),
                        help="also time each repeat's harvest with one thing changed: pageable batches, transformers' own attention mask (A/B in the same process)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few prompts, 2 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.repeats = "tiny", "cpu", 2
        args.prompts = args.prompts or 16
        args.words = (5, 30)
    args.layers = args.layers or ([1, 4] if args.model == "tiny" else [9, 18])
    args.prompts = args.prompts or (512 if args.device.startswith("cuda") else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, label = build_model(args.model, args.device, args.tokenizer)
    records = synthetic_records(args.prompts, *args.words)
    scratch = Path(tempfile.mkdtemp(prefix="bench-harvest-"))
    try:
        if args.profile:
            profile_harvest(model, tokenizer, records, args, scratch)
        rows = [bench_layer(model, tokenizer, records, layer, args, scratch) for layer in args.layers]
        parts = breakdown(model, tokenizer, records, args.layers[0], args, scratch) if args.breakdown else None
        if args.diagnose:
            diagnose(model, tokenizer, records, args.layers[0], args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print_table(label, name, args, rows)
    for row in rows:
        line = f"layer {row['layer']}: harv/trunc per repeat " + " ".join(f"{r:.3f}" for r in row["ratio_trunc_all"])
        for name, ratios in row["ratio_trunc_variants"].items():
            line += f" | {name}: " + " ".join(f"{r:.3f}" for r in ratios) + f" (median {statistics.median(ratios):.3f})"
        print(line)
    if parts:
        trunc = rows[0]["trunc_s"]
        print(f"layer {args.layers[0]} breakdown (s): truncated forward {trunc:.3f} | "
              + " | ".join(f"{k} {v:.3f}" + ("" if k.startswith("phase") else f" ({trunc / v:.2f} of trunc speed)")
                           for k, v in parts.items()))
    if args.json:
        meta = {"model": label, "device": name, "positions": args.positions, "dtype": args.dtype,
                "batch_size": args.batch_size, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
