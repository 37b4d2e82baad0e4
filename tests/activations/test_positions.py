"""Position kinds: template prefix / user content / template suffix / response start, from the template itself."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

from activations.harvest import harvest
from activations.positions import (
    CONTENT, PREFIX, RESPONSE_START, SUFFIX, UNKNOWN, encode_with_kinds, kind_names, position_kinds, template_affixes,
)
from activations.records import PromptRecord
from activations.store import SCHEMA_VERSION, ActivationStore
from activations.tokenize import encode_prompts
from sae.config import DataConfig
from sae.rows import training_rows
from tests.helpers.legacy_store import downgrade

TEXTS = ["How do I bake bread?", "Tell me a story about a dragon who learns to fly over the sea.", "Hi"]


def records() -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", text=t, category="benign" if i % 2 else "safety", split="extract", source="test")
            for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def all_store(tiny_llama, tmp_path_factory) -> Path:
    model, tokenizer = tiny_llama
    out = tmp_path_factory.mktemp("kinds") / "store"
    harvest(model, tokenizer, records(), [1, 3], out, positions="all", batch_size=2, dtype="float32",
            max_length=128, progress=False)
    return out


def test_kinds_split_the_template_around_the_user_text(embedded_tokenizer) -> None:
    affixes = template_affixes(embedded_tokenizer)
    assert affixes is not None and "user" in affixes.prefix and "assistant" in affixes.suffix
    ids, kinds = encode_with_kinds(embedded_tokenizer, TEXTS, max_length=128)
    encoded = encode_prompts(embedded_tokenizer, TEXTS, max_length=128)
    for row, k, text in zip(ids, kinds, TEXTS):
        assert row == encoded["input_ids"][TEXTS.index(text)][-len(row):].tolist()  # the encoders' exact tokens
        assert k[-1] == RESPONSE_START and (k[:-1] != RESPONSE_START).all()
        runs = [int(c) for i, c in enumerate(k) if i == 0 or c != k[i - 1]]
        assert runs == [PREFIX, CONTENT, SUFFIX, RESPONSE_START]  # one span each, in order
        content = embedded_tokenizer.decode([t for t, c in zip(row, k) if c == CONTENT])
        assert content.strip() == text
    prefix_lengths = {int((k == PREFIX).sum()) for k in kinds}
    assert len(prefix_lengths) == 1  # the shared prefix is the same tokens for every prompt


def test_spans_come_from_the_template_not_from_fixed_strings(embedded_tokenizer) -> None:
    custom = copy.deepcopy(embedded_tokenizer)  # a copy keeps the session fixture intact
    custom.chat_template = ("{% for m in messages %}### Instruction ({{ m['role'] }}):\n{{ m['content'] | trim }}\n"
                            "{% endfor %}{% if add_generation_prompt %}### Answer:\n{% endif %}")
    affixes = template_affixes(custom)
    assert affixes.prefix == "### Instruction (user):\n" and affixes.suffix == "\n### Answer:\n"
    (kinds,) = position_kinds(custom, ["  Tell me more  "])
    assert kinds[0] == PREFIX and kinds[-1] == RESPONSE_START and CONTENT in kinds and SUFFIX in kinds
    without = position_kinds(custom, ["Tell me more"], chat_template=False)[0]
    assert (without[:-1] == CONTENT).all() and without[-1] == RESPONSE_START  # no template: all content
    assert list(kind_names(np.array([PREFIX, UNKNOWN]))) == ["prefix", "unknown"]


def test_harvest_records_kinds_prefix_rows_are_identical_and_excluded(all_store: Path) -> None:
    store = ActivationStore(all_store)
    assert store.schema_version == SCHEMA_VERSION == 3
    x, meta = store.load(3)
    prefix = meta.position_kind == PREFIX
    assert prefix.any()
    by_prompt = {p: np.flatnonzero(prefix & (meta.prompt_id == p)) for p in np.unique(meta.prompt_id)}
    first = next(iter(by_prompt.values()))
    for rows in by_prompt.values():  # same tokens, same positions, same activations for every prompt
        np.testing.assert_array_equal(meta.position[rows], meta.position[first])
        np.testing.assert_array_equal(meta.token_id[rows], meta.token_id[first])
        np.testing.assert_allclose(x[rows], x[first], rtol=1e-5, atol=1e-7)  # up to the batch shape's rounding
    for p in np.unique(meta.prompt_id):  # response start = the last prompt token, one per prompt
        rows = np.flatnonzero(meta.prompt_id == p)
        assert meta.position_kind[rows[-1]] == RESPONSE_START and (meta.position_kind[rows[:-1]] != RESPONSE_START).all()
    selection = training_rows(store, 3, DataConfig())
    kept = selection.mask()
    assert not (kept & prefix).any() and not (kept & (meta.position == 0)).any()
    assert kept[meta.position_kind == RESPONSE_START].all() and kept[meta.position_kind == CONTENT].all()
    assert selection.removed["position_kind"] == int(prefix.sum())


def test_schema_1_store_reads_with_unknown_kinds_and_refuses_kind_selection(all_store: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(all_store, old)
    downgrade(old, 1)  # what a schema-1 writer left: per-row strings, no position_kind
    store = ActivationStore(old)
    meta = store.meta()
    assert store.schema_version == 1
    last = np.r_[meta.prompt_id[1:] != meta.prompt_id[:-1], True]
    assert (meta.position_kind[last] == RESPONSE_START).all() and (meta.position_kind[~last] == UNKNOWN).all()
    with pytest.raises(ValueError, match="no position kinds .*schema 1.*position_kinds to null"):
        training_rows(store, 3, DataConfig())
    everything = training_rows(store, 3, DataConfig(position_kinds=None, exclude_sink=False, drop_duplicates=False))
    assert everything.n_rows == len(meta)
