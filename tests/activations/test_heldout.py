"""Held-out benchmark sets (`activations.prompts.heldout`): never split, fitted or tuned on; overlap counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from activations.prompts import (
    load_heldout_sets,
    load_prompt_set,
    load_source,
    normalise_text,
)
from activations.prompts.heldout import heldout_from_records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def quickstart():
    return load_prompt_set(["builtin:quickstart"], seed=0)


def test_eval_set_never_shares_a_prompt_with_extract_or_calibrate(tmp_path, quickstart):
    extract, calibrate, evaluation = (quickstart.split(s) for s in ("extract", "calibrate", "eval"))
    rows = (  # the same texts as fitting prompts, spelled differently (case, spaces, end punctuation)
        [{"id": f"x{i}", "text": "  " + r.text.upper().rstrip("?.!") + " !", "category": r.category}
         for i, r in enumerate(extract[:5])]
        + [{"id": f"c{i}", "text": r.text.lower(), "category": r.category} for i, r in enumerate(calibrate[:3])]
        + [{"id": f"e{i}", "text": r.text, "category": r.category} for i, r in enumerate(evaluation[:2])]
        + [{"id": f"n{i}", "text": f"Name {i} fruits that are yellow.", "category": "benign"} for i in range(4)]
        + [{"id": "dup", "text": "name 0 fruits that are yellow", "category": "benign"}])
    path = write_jsonl(tmp_path / "bench.jsonl", rows)
    held = load_heldout_sets({"bench": [f"jsonl:{path}"]}, quickstart)["bench"]
    fitting = {normalise_text(r.text) for r in extract + calibrate}
    assert not fitting & {normalise_text(r.text) for r in held.records}
    assert held.n_overlap_removed == {"extract": 5, "calibrate": 3}
    assert held.n_overlap_eval == 2 and held.n_duplicates_removed == 1
    assert len(held.records) == 6 and held.n_read == len(rows)  # 2 eval look-alikes + 4 new
    assert {r.split for r in held.records} == {"eval"}
    manifest = held.manifest()
    assert manifest["n"] == 6 and manifest["categories"]["benign"] >= 4 and manifest["n_overlap_removed"]["extract"] == 5
    # the builtin held-out set is written to share nothing with the quickstart set
    builtin = load_heldout_sets({"heldout": ["builtin:heldout"]}, quickstart)["heldout"]
    assert builtin.n_overlap_removed == {"extract": 0, "calibrate": 0} and builtin.n_overlap_eval == 0
    assert len(builtin.records) == len(load_source("builtin:heldout").records) >= 40


def test_heldout_set_errors(tmp_path, quickstart):
    with pytest.raises(ValueError, match="plain word"):
        load_heldout_sets({"bad name": ["builtin:heldout"]}, quickstart)
    with pytest.raises(ValueError, match="list of prompt-source specs"):
        load_heldout_sets({"x": "builtin:heldout"}, quickstart)
    only_fitting = quickstart.split("extract")[:3]
    with pytest.raises(ValueError, match="no prompts left"):
        heldout_from_records("x", only_fitting, quickstart)
