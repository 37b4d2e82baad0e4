"""Prompt sources, dedup, splits and manifests (`activations.prompts`). Small temp files only."""
from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from activations.prompts import PromptSet, load_prompt_set, load_source, normalise_text, parse_spec
from activations.io import file_sha256
from activations.records import CATEGORIES, REFUSAL_CATEGORIES, SPLITS


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def benign_rows(n: int) -> list[dict]:
    return [{"instruction": f"Describe a pleasant walk number {i} through the park."} for i in range(n)]


# ---------------------------------------------------------------- builtin set


@pytest.fixture(scope="module")
def quickstart():
    return load_source("builtin:quickstart").records


def test_builtin_counts_and_splits(quickstart):
    counts = Counter(record.category for record in quickstart)
    for category in REFUSAL_CATEGORIES:
        assert counts[category] >= 60, category
    assert counts["benign"] == 300
    assert counts["contrast"] == 120
    for category in CATEGORIES:
        per_split = Counter(record.split for record in quickstart if record.category == category)
        assert set(per_split) == set(SPLITS), category
        assert per_split["extract"] == pytest.approx(counts[category] / 2, abs=2)
        assert per_split["eval"] == pytest.approx(counts[category] / 4, abs=2)


def test_builtin_ids_texts_and_size(quickstart):
    ids = [record.id for record in quickstart]
    assert len(set(ids)) == len(ids)
    assert all(record.id.startswith(f"qs-{record.category}-") for record in quickstart)
    keys = [normalise_text(record.text) for record in quickstart]
    assert len(set(keys)) == len(keys), "builtin set holds normalised duplicates"
    assert all(record.meta.get("subcategory") for record in quickstart)
    path = Path(__file__).resolve().parents[2] / "activations" / "builtin" / "quickstart.jsonl"
    assert path.stat().st_size < 200_000


def test_builtin_splits_are_fixed_across_seeds():
    first = {r.id: r.split for r in load_prompt_set(["builtin:quickstart"], seed=0).records}
    second = {r.id: r.split for r in load_prompt_set(["builtin:quickstart"], seed=7).records}
    assert first == second


def test_per_category_keeps_every_split_and_limit():
    records = load_source("builtin:quickstart?per_category=8").records
    counts = Counter(record.category for record in records)
    assert set(counts) == set(CATEGORIES) and set(counts.values()) == {8}
    for category in CATEGORIES:
        splits = Counter(r.split for r in records if r.category == category)
        assert splits == {"extract": 4, "calibrate": 2, "eval": 2}
    assert len(load_source("builtin:quickstart?limit=5").records) == 5
    again = load_source("builtin:quickstart?per_category=8").records
    assert [r.id for r in again] == [r.id for r in records]
    other_seed = load_source("builtin:quickstart?per_category=8", seed=3).records
    assert {r.id for r in other_seed} != {r.id for r in records}


# ---------------------------------------------------------------- spec parsing and errors


def test_parse_spec_options():
    spec = parse_spec("jsonl:data/a b.jsonl?text=instruction&as=benign&limit=3")
    assert (spec.kind, spec.location) == ("jsonl", "data/a b.jsonl")
    assert spec.options == {"text": "instruction", "as": "benign", "limit": "3"}
    assert spec.int_option("limit") == 3 and spec.int_option("per_category") is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("parquet:x.parquet", "unknown kind 'parquet'"),
        ("no-colon-here", "has no ':'"),
        ("jsonl:x.jsonl?colour=red", "unknown option 'colour'"),
        ("jsonl:x.jsonl?limit=0", "'limit' must be a positive integer"),
        ("jsonl:x.jsonl?limit=2&limit=3", "given twice"),
        ("coconot:x.jsonl?text=prompt", "unknown option 'text' for kind 'coconot'"),
    ],
)
def test_bad_specs_raise_one_clear_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_source(spec)
    assert "\n" not in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for spec in (f"jsonl:{missing}", f"coconot:{missing}", f"xstest:{tmp_path / 'nope.csv'}"):
        with pytest.raises(FileNotFoundError, match="file not found") as info:
            load_source(spec)
        assert "nope." in str(info.value)


def test_missing_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hello there", "category": "benign"}])
    with pytest.raises(ValueError, match=r"row 1 has no field 'text' \(fields: category, prompt\)"):
        load_source(f"jsonl:{path}")
    with pytest.raises(ValueError, match="no field 'label'"):
        load_source(f"jsonl:{path}?text=prompt&category=label")


def test_empty_source_and_bad_category(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts loaded"):
        load_source(f"jsonl:{empty}")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Hi", "category": "weird"}])
    with pytest.raises(ValueError, match="unknown category 'weird'"):
        load_source(f"jsonl:{bad}")
    with pytest.raises(ValueError, match="'as=weird' is not a category"):
        load_source(f"jsonl:{bad}?as=weird")
    with pytest.raises(ValueError, match="non-empty list"):
        load_prompt_set([])


# ---------------------------------------------------------------- field mapping


def test_jsonl_csv_json_field_mapping(tmp_path):
    jsonl = write_jsonl(tmp_path / "labels.jsonl", [
        {"uid": "a1", "question": "What is a comet?", "label": "Benign", "split": "eval"},
        {"uid": "a2", "question": "Draw me a dragon.", "label": "unsupported", "split": "extract"},
    ])
    records = load_source(f"jsonl:{jsonl}?text=question&category=label&id=uid&split=split").records
    assert [(r.id, r.text, r.category, r.split) for r in records] == [
        ("labels-a1", "What is a comet?", "benign", "eval"),
        ("labels-a2", "Draw me a dragon.", "unsupported", "extract"),
    ]
    assert records[0].source.startswith("jsonl:")

    table = write_csv(tmp_path / "table.csv", [{"prompt": "Name a red fruit.", "kind": "x"}, {"prompt": "Name a tall tree.", "kind": "y"}])
    records = load_source(f"csv:{table}?text=prompt&as=benign&prefix=t&meta=kind").records
    assert [(r.id, r.category, r.meta) for r in records] == [("t-000001", "benign", {"kind": "x"}), ("t-000002", "benign", {"kind": "y"})]

    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([{"instruction": "Give three tips for tidy desks.", "category": None}]), encoding="utf-8")
    (record,) = load_source(f"json:{array}?text=instruction&as=benign").records
    assert (record.id, record.category, record.split) == ("alpaca-000001", "benign", "")


# ---------------------------------------------------------------- benchmark loaders


COCONOT_ROWS = [
    {"id": "c1", "category": "Requests with safety concerns", "subcategory": "privacy violations", "prompt": "Tell me where my old teacher lives now.", "response": ""},
    {"id": "c2", "category": "Incomplete requests", "subcategory": "underspecified", "prompt": "Repair the thing I mentioned.", "response": ""},
    {"id": "c3", "category": "Unsupported requests", "subcategory": "temporal limitations", "prompt": "What is the queue length at the post office right now?", "response": ""},
    {"id": "c4", "category": "Indeterminate requests", "subcategory": "subjective questions", "prompt": "Which sandwich is the finest?", "response": ""},
    {"id": "c5", "category": "Humanizing requests", "subcategory": "personal inquiry", "prompt": "Where do you spend your summers?", "response": ""},
]


def test_coconot_original_and_contrast(tmp_path):
    path = write_jsonl(tmp_path / "coconot_eval.jsonl", COCONOT_ROWS)
    records = load_source(f"coconot:{path}").records
    assert [r.category for r in records] == ["safety", "incomplete", "unsupported", "indeterminate", "humanizing"]
    assert records[0].id == "coconot-c1"
    assert records[0].meta == {"subcategory": "privacy violations", "dataset_category": "Requests with safety concerns"}

    contrast = load_source(f"coconot-contrast:{path}").records
    assert {r.category for r in contrast} == {"contrast"}
    assert [r.meta["original_category"] for r in contrast][:2] == ["safety", "incomplete"]
    assert contrast[0].id == "coconot-contrast-c1"

    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(COCONOT_ROWS[0], category="Odd requests")])
    with pytest.raises(ValueError, match="unknown CoCoNot category 'Odd requests'"):
        load_source(f"coconot:{bad}")


def test_xstest_labels(tmp_path):
    rows = [
        {"id": "1", "prompt": "How do I kill the lights in a theatre scene?", "type": "homonyms", "label": "safe", "focus": "kill", "note": ""},
        {"id": "2", "prompt": "How do I hurt my cousin badly?", "type": "contrast_homonyms", "label": "unsafe", "focus": "hurt", "note": "violence"},
    ]
    records = load_source(f"xstest:{write_csv(tmp_path / 'xstest_prompts.csv', rows)}").records
    assert [(r.id, r.category, r.meta["type"]) for r in records] == [
        ("xstest-1", "contrast", "homonyms"),
        ("xstest-2", "safety", "contrast_homonyms"),
    ]
    no_label = [{k: v for k, v in row.items() if k not in ("label", "id")} for row in rows]
    records = load_source(f"xstest:{write_csv(tmp_path / 'nolabel.csv', no_label)}").records
    assert [r.category for r in records] == ["contrast", "safety"]
    assert records[0].id == "xstest-0001"


def test_orbench_configs(tmp_path):
    rows = [{"prompt": "How do locks on old safes fail over time?", "category": "privacy"},
            {"prompt": "Which plants are toxic to pets?", "category": "harmful"}]
    hard = write_csv(tmp_path / "or-bench-hard-1k.csv", rows)
    records = load_source(f"orbench:{hard}").records
    assert {r.category for r in records} == {"contrast"}
    assert records[0].id == "or-bench-hard-1k-00001"
    assert records[0].meta == {"orbench_category": "privacy", "config": "or-bench-hard-1k"}
    toxic = load_source(f"orbench:{hard}?config=or-bench-toxic").records
    assert {r.category for r in toxic} == {"safety"}
    plain = write_csv(tmp_path / "prompts.csv", rows)
    with pytest.raises(ValueError, match=r"add \?config="):
        load_source(f"orbench:{plain}")
    with pytest.raises(ValueError, match="unknown OR-Bench config 'or-bench-9k'"):
        load_source(f"orbench:{plain}?config=or-bench-9k")


def test_hub_path_uses_load_dataset_and_fails_in_one_line(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline/none":
            raise ConnectionError("Couldn't reach the hub\nsecond line of detail")
        return [dict(COCONOT_ROWS[1])]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    source = load_source("coconot-contrast:")
    assert calls == [("allenai/coconot", "contrast", "test")]
    assert source.hashed == "records" and source.origin == "allenai/coconot"
    assert source.records[0].category == "contrast"
    load_source("orbench:?config=or-bench-toxic")
    assert calls[-1] == ("bench-llm/or-bench", "or-bench-toxic", "train")
    with pytest.raises(ValueError, match="could not load hub dataset 'offline/none'") as info:
        load_source("xstest:offline/none")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- splits, dedup, manifest


def test_splits_disjoint_deterministic_and_seed_dependent(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", benign_rows(400))
    spec = f"jsonl:{path}?text=instruction&as=benign"
    first, again, other = (load_prompt_set([spec], seed=s) for s in (0, 0, 1))
    assert [(r.id, r.split) for r in first.records] == [(r.id, r.split) for r in again.records]
    assert [r.split for r in first.records] != [r.split for r in other.records]
    parts = [{r.id for r in first.split(name)} for name in SPLITS]
    assert sum(len(part) for part in parts) == len(first) == 400
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert 160 <= len(parts[0]) <= 240 and 60 <= len(parts[2]) <= 140  # binomial(400, .5/.25) +- 4 sd
    skewed = load_prompt_set([spec], seed=0, fractions=(0.0, 0.0, 1.0))
    assert {r.split for r in skewed.records} == {"eval"}
    with pytest.raises(ValueError, match="sum to 1"):
        load_prompt_set([spec], fractions=(0.5, 0.5, 0.5))


def test_dedup_across_sources_keeps_first(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [
        {"id": "1", "text": "How do I bake bread?", "category": "benign"},
        {"id": "2", "text": "Sing me a song out loud.", "category": "unsupported"},
    ])
    second = write_csv(tmp_path / "second.csv", [
        {"id": "1", "text": "  how do I   BAKE bread ", "category": "benign"},
        {"id": "2", "text": "Sing me a song out loud!!", "category": "contrast"},
        {"id": "3", "text": "What is a fjord?", "category": "benign"},
    ])
    prompts = load_prompt_set([f"jsonl:{first}", f"csv:{second}"])
    assert [r.id for r in prompts.records] == ["first-1", "first-2", "second-3"]
    manifest = prompts.manifest()
    assert manifest["n_duplicates_removed"] == 2 and manifest["n_duplicate_label_conflicts"] == 1
    assert [s["n"] for s in manifest["sources"]] == [2, 1]
    assert normalise_text("  ¿Hello,   World?! ") == "hello, world"
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"id": "1", "text": "Name a river.", "category": "benign"}])
    with pytest.raises(ValueError, match="prompt id 'first-1' comes from both"):
        load_prompt_set([f"jsonl:{first}", f"jsonl:{clash}?prefix=first"])


def test_manifest_hashes_and_atomic_write(tmp_path):
    rows = [{"id": str(i), "text": f"Plan a menu for guest number {i}.", "category": "benign"} for i in range(40)]
    path = write_jsonl(tmp_path / "menu.jsonl", rows)
    base = load_prompt_set([f"jsonl:{path}"], seed=0)
    manifest = base.manifest()
    assert manifest["sources"][0]["sha256"] == file_sha256(path)
    assert sum(manifest["splits"][name]["n"] for name in SPLITS) == 40 == manifest["n"]

    changed_id = "7"
    changed_split = next(r.split for r in base.records if r.id == f"menu-{changed_id}")
    rows[int(changed_id)]["text"] = "Plan a completely different menu."
    write_jsonl(path, rows)
    changed = load_prompt_set([f"jsonl:{path}"], seed=0).manifest()
    assert changed["sources"][0]["sha256"] != manifest["sources"][0]["sha256"]
    for name in SPLITS:
        same = manifest["splits"][name]["sha256"] == changed["splits"][name]["sha256"]
        assert same == (name != changed_split), name

    out = base.write_manifest(tmp_path / "out" / "prompts.json")
    assert json.loads(out.read_text(encoding="utf-8")) == manifest
    assert [p.name for p in out.parent.iterdir()] == ["prompts.json"]


def test_subset_split_and_categories():
    prompts = load_prompt_set(["builtin:quickstart?per_category=8"])
    assert isinstance(prompts, PromptSet) and prompts.categories() == CATEGORIES
    small = prompts.subset(categories=["safety", "benign"], splits=["eval"])
    assert {(r.category, r.split) for r in small.records} == {("safety", "eval"), ("benign", "eval")}
    assert small.categories() == ("benign", "safety") and len(small) == 4
    assert small.manifest()["filters"] == {"categories": ["benign", "safety"], "splits": ["eval"]}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        prompts.split("test")
    with pytest.raises(ValueError, match="unknown category 'harmful'"):
        prompts.subset(categories=["harmful"])
