"""Harvesting: stored rows equal transformers' hidden states; truncated forward; CLI errors; kill + resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from analysis.cli import main as cli_main
from activations.harvest import harvest
from activations.prompts import load_prompt_set
from activations.harvest_batches import length_bucketed_batches, prefetched_batches, tokenize_records
from activations.records import PromptRecord
from activations.store import ActivationStore
from activations.tokenize import encode_prompts

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ("benign", "safety", "unsupported", "contrast")
SPLITS = ("extract", "calibrate", "eval")


def make_records(n: int) -> list[PromptRecord]:
    """Synthetic prompts of varied length."""
    words = ["river", "lamp", "orbit", "garden", "signal", "copper", "window", "maple"]
    return [
        PromptRecord(
            id=f"q{i:04d}",
            text=f"Prompt {i}: " + " ".join(words[(i + j) % len(words)] for j in range(1 + (7 * i) % 23)),
            category=CATEGORIES[i % len(CATEGORIES)],
            split=SPLITS[i % len(SPLITS)],
            source="test",
        )
        for i in range(n)
    ]


def reference(model, tokenizer, text: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """hidden_states of a plain, unpadded, single-prompt float32 forward, and its input ids."""
    batch = encode_prompts(tokenizer, [text])
    with torch.inference_mode():
        states = model(**batch, output_hidden_states=True).hidden_states
    return states, batch["input_ids"][0]


def check_against_reference(
    model, tokenizer, records, out: Path, layers: list[int], positions: str, rtol: float = 0.0
) -> None:
    store = ActivationStore(out, verify=True)
    assert store.complete and store.layers == layers
    for layer in layers:
        x, meta = store.load(layer)
        assert set(meta.prompt_id) == {r.id for r in records}
        for record in records:
            rows = meta.prompt_id == record.id
            states, input_ids = reference(model, tokenizer, record.text)
            want = states[layer + 1][0]
            if positions == "last":
                want, want_ids, want_pos = want[-1:], input_ids[-1:], [len(input_ids) - 1]
            else:
                want_ids, want_pos = input_ids, list(range(len(input_ids)))
            np.testing.assert_allclose(x[rows], want.numpy(), rtol=rtol, atol=1e-5)
            assert meta.position[rows].tolist() == want_pos
            assert meta.token_id[rows].tolist() == want_ids.tolist()
            assert set(meta.category[rows]) == {record.category} and set(meta.split[rows]) == {record.split}


@pytest.mark.parametrize("positions", ["last", "all"])
def test_rows_equal_output_hidden_states(tiny_llama, tmp_path: Path, positions: str) -> None:
    model, tokenizer = tiny_llama
    records = make_records(7)
    out = harvest(model, tokenizer, records, [2, 0], tmp_path / "acts", positions=positions,
                  batch_size=3, dtype="float32", progress=False, rows_per_shard=40)
    check_against_reference(model, tokenizer, records, out, [0, 2], positions)
    if positions == "all":
        assert len(ActivationStore(out).manifest["shards"]) > 1


def test_batches_match_encode_prompts(tiny_llama) -> None:
    _, tokenizer = tiny_llama
    records = make_records(5)
    ids = tokenize_records(tokenizer, records, chat_template=True, max_length=30)
    (batch,) = list(length_bucketed_batches(records, ids, batch_size=5, pad_id=tokenizer.pad_token_id))
    order = [int(r.id[1:]) for r in batch.records]
    expected = encode_prompts(tokenizer, [records[i].text for i in order], max_length=30)
    assert torch.equal(batch.input_ids, expected["input_ids"])
    assert torch.equal(batch.attention_mask, expected["attention_mask"])
    assert batch.lengths == sorted(batch.lengths, reverse=True) and max(batch.lengths) == 30


def test_prefetched_batches_cover_every_prompt_once(tiny_llama) -> None:
    _, tokenizer = tiny_llama
    records = make_records(23)
    batches = list(prefetched_batches(tokenizer, records, batch_size=3, max_length=40, first_chunk=4))
    seen = [r.id for b in batches for r in b.records]
    assert sorted(seen) == sorted(r.id for r in records) and len(seen) == len(set(seen))
    assert [len(b.records) for b in batches][:2] == [3, 1]  # the first chunk holds 4 prompts
    for b in batches:
        expected = encode_prompts(tokenizer, [r.text for r in b.records], max_length=40)
        assert torch.equal(b.input_ids, expected["input_ids"]) and b.lengths == sorted(b.lengths, reverse=True)
        assert torch.equal(b.position_ids[b.attention_mask == 1], torch.cat([torch.arange(n) for n in b.lengths]))
        # the real tokens' flat positions, row-major: each row's last `length` columns
        seq = b.input_ids.shape[1]
        want = torch.cat([torch.arange(i * seq + seq - n, (i + 1) * seq) for i, n in enumerate(b.lengths)])
        assert torch.equal(b.token_index, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_hold_the_same_tensors(tiny_llama) -> None:
    _, tokenizer = tiny_llama
    records = make_records(9)
    plain = list(prefetched_batches(tokenizer, records, batch_size=3))
    pinned = list(prefetched_batches(tokenizer, records, batch_size=3, pin_memory=True))
    for a, b in zip(plain, pinned):
        assert b.input_ids.is_pinned() and b.token_index.is_pinned()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.token_index, b.token_index)


def test_forward_stops_after_deepest_layer(tiny_llama, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama
    adapter = ModelAdapter(model)
    calls: list[str] = []
    modules = {"block1": adapter.blocks[1], "block2": adapter.blocks[2], "norm": adapter.final_norm, "lm_head": adapter.unembed}
    handles = [m.register_forward_hook(lambda *_, k=k: calls.append(k)) for k, m in modules.items()]
    try:
        harvest(model, tokenizer, make_records(4), [0, 1], tmp_path / "a", batch_size=2, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["block1", "block1"]


def test_bad_inputs_are_clear_errors(tiny_llama, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=r"layer 4 out of range.*0\.\.3"):
        harvest(model, tokenizer, make_records(2), [1, 4], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="empty"):
        harvest(model, tokenizer, [], [1], tmp_path / "a", progress=False)
    duplicated = make_records(2) + make_records(1)
    with pytest.raises(ValueError, match="q0000"):
        harvest(model, tokenizer, duplicated, [1], tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    harvest(model, tokenizer, make_records(2), [1], tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="its layers is"):
        harvest(model, tokenizer, make_records(2), [2], tmp_path / "b", progress=False)


@pytest.fixture(scope="module")
def cli_inputs(tiny_llama, tmp_path_factory) -> tuple[Path, Path, list[PromptRecord]]:
    """A saved tiny model directory (loadable by path from a subprocess) and a JSONL prompt file."""
    model, tokenizer = tiny_llama
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    records = make_records(240)
    lines = [json.dumps({"id": r.id, "text": r.text, "category": r.category}) for r in records]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root / "model", root / "prompts.jsonl", records


def harvest_main(argv: list[str]) -> int:
    return cli_main(["harvest", *argv])


def cli_args(model_dir: Path, prompts: Path, out: Path, layers: list[str]) -> list[str]:
    return ["--model", str(model_dir), "--prompts", f"jsonl:{prompts}", "--layers", *layers,
            "--positions", "all", "--out", str(out), "--batch-size", "2", "--dtype", "float32",
            "--device", "cpu", "--rows-per-shard", "48", "--no-progress"]


def test_cli_errors_exit_2_and_write_nothing(cli_inputs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, prompts, _ = cli_inputs
    assert harvest_main(cli_args(model_dir, prompts, tmp_path / "a", ["1", "9"])) == 2
    assert "error: layer 9 out of range" in capsys.readouterr().err
    assert harvest_main(cli_args(model_dir, tmp_path / "nope.jsonl", tmp_path / "a", ["1"])) == 2
    err = capsys.readouterr().err.strip().splitlines()  # old flag spellings: notes, then the resolved config
    assert err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1
    assert harvest_main(cli_args(tmp_path / "no-model", prompts, tmp_path / "a", ["1"])) == 2
    assert "error: model directory not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def listed_rows(out: Path) -> int:
    """Rows the store's manifest lists so far (0 before the manifest exists)."""
    try:
        return json.loads((out / "manifest.json").read_text())["total_rows"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_cli_killed_mid_run_resumes_exactly(cli_inputs, tiny_llama, tmp_path: Path) -> None:
    model_dir, prompts, _ = cli_inputs
    records = load_prompt_set([f"jsonl:{prompts}"]).records  # as the CLI sees them (ids get a prefix)
    out = tmp_path / "acts"
    argv = cli_args(model_dir, prompts, out, ["0", "2"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "analysis.cli", "harvest", *argv], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not listed_rows(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and 0 < killed["total_rows"]

    assert harvest_main(argv) == 0
    store = ActivationStore(out, verify=True)
    meta = store.meta()
    _, tokenizer = tiny_llama
    lengths = [len(ids) for ids in tokenize_records(tokenizer, records, True, 512)]
    assert store.complete and store.n_rows == len(meta) == sum(lengths) > killed["total_rows"]
    first_rows = {pid: i for i, pid in reversed(list(enumerate(meta.prompt_id)))}
    assert len(first_rows) == len(records)
    for record, n in zip(records, lengths):  # each prompt's rows are contiguous, complete and unique
        start = first_rows[record.id]
        assert meta.prompt_id[start : start + n].tolist() == [record.id] * n
        assert meta.position[start : start + n].tolist() == list(range(n))
    assert json.loads((out / "prompts.json").read_text())["n"] == len(records)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_embedded_model_rows_equal_output_hidden_states(embedded, tmp_path: Path) -> None:
    model, tokenizer = embedded
    records = make_records(4)
    out = harvest(model, tokenizer, records, [3, 9], tmp_path / "acts", batch_size=3, dtype="float32", progress=False)
    # SmolLM2 has a few massive residual dimensions (|x| ~ 65, where one float32 ulp is 7.6e-6), so
    # the padded batch may differ from the single-prompt forward by an ulp there: allow 1e-6 relative.
    check_against_reference(model, tokenizer, records, out, [3, 9], "last", rtol=1e-6)


@pytest.mark.parametrize("staged", [False, True])
def test_a_writer_error_stops_the_harvest_without_hanging(tiny_llama, tmp_path: Path, monkeypatch, staged: bool) -> None:
    """The writer thread fails on its second batch while the forward loop has more batches than
    staging slots (`staged`: the GPU's host slots, here unpinned on the CPU): the error comes back
    (every slot is released, so the loop cannot block)."""
    import activations.harvest as harvest_module
    from activations.host_staging import HostStaging

    if staged:
        monkeypatch.setattr(harvest_module, "host_staging", lambda device: HostStaging(2, pin=False))

    model, tokenizer = tiny_llama
    calls = {"n": 0}
    store_batch = harvest_module._store_batch

    def failing(*args, **kwargs) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (planted)")
        store_batch(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "_store_batch", failing)
    with pytest.raises(OSError, match="planted"):
        harvest(model, tokenizer, make_records(24), [0], tmp_path / "acts", positions="all", batch_size=1,
                dtype="float32", progress=False)
    assert calls["n"] == 2  # the writer stopped storing after the error


def test_rows_through_host_slots_are_stored_unchanged(tiny_llama, tmp_path: Path, monkeypatch) -> None:
    """The GPU path's host slots (here unpinned on the CPU; 2 slots, reused many times) store the same rows."""
    import activations.harvest as harvest_module
    from activations.host_staging import HostStaging

    model, tokenizer = tiny_llama
    records = make_records(20)
    plain = harvest(model, tokenizer, records, [1], tmp_path / "plain", positions="all", batch_size=2,
                    dtype="float32", progress=False)
    monkeypatch.setattr(harvest_module, "host_staging", lambda device: HostStaging(2, pin=False))
    staged = harvest(model, tokenizer, records, [1], tmp_path / "staged", positions="all", batch_size=2,
                     dtype="float32", progress=False)
    (x_a, meta_a), (x_b, meta_b) = ActivationStore(plain).load(1), ActivationStore(staged).load(1)
    assert np.array_equal(x_a, x_b) and list(meta_a.prompt_id) == list(meta_b.prompt_id)
