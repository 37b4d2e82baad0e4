"""Capability items and loaders for local benchmark files (MMLU, TruthfulQA, GSM8K).

Two item kinds:
- `MCItem`: a question with answer options, scored by log-likelihood (`analysis.evaluation.capability`).
- `GenItem`: a question with a numeric reference answer, scored by greedy generation + exact match.

Loaders read local files only (no hub):
- MMLU: CSVs without header, columns `question, A, B, C, D, answer letter`, files named
  `<subject>_<split>.csv`; pass the MMLU root (holding `dev/ val/ test/`), a split folder or one CSV.
- TruthfulQA: `TruthfulQA.csv` (`Question`, `Best Answer`, `Incorrect Answers`). MC1-style items:
  the options are the best answer plus every incorrect answer (split on `;`, stripped, duplicates
  and empty pieces dropped); exactly one option is correct. Options are shuffled with a seed derived
  from the question text so the correct option's position varies but is reproducible. This is our
  construction from the CSV, close to but not identical to the official MC1 targets file.
- GSM8K: jsonl with `question` and `answer` ending in `#### <number>` (commas removed).
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from activations.io import iter_jsonl

LETTERS = "ABCD"


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question; `answer` is the index of the correct entry of `options`."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError(f"multiple-choice item {self.id!r} has an empty question")
        if len(self.options) < 2:
            raise ValueError(f"multiple-choice item {self.id!r} needs at least 2 options, got {len(self.options)}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"multiple-choice item {self.id!r}: answer index {self.answer} out of range")
        if any(not o.strip() for o in self.options):
            raise ValueError(f"multiple-choice item {self.id!r} has an empty option")


@dataclass(frozen=True)
class GenItem:
    """A question answered by generation; `answer` is the reference number as a string ("18", "2.5")."""

    id: str
    question: str
    answer: str

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError(f"generative item {self.id!r} has an empty question")
        if parse_number(self.answer) is None:
            raise ValueError(f"generative item {self.id!r}: reference answer {self.answer!r} is not a number")


def parse_number(text: str) -> float | None:
    """A number written as text (`"1,234"`, `"$18"`, `"-2.5"`) as a float, or None."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _mmlu_files(location: Path, split: str) -> list[Path]:
    """The subject CSVs of `split` under an MMLU root, a split folder, or one CSV."""
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise FileNotFoundError(f"MMLU path not found: {location}")
    folder = location / split if (location / split).is_dir() else location
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU files named *_{split}.csv in {folder}")
    return files


def _mmlu_subject(path: Path) -> str:
    stem = path.stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def _read_mmlu_csv(path: Path, subject: str) -> list[MCItem]:
    items = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            letter = row[5].strip().upper()
            if letter not in LETTERS or len(letter) != 1:
                raise ValueError(f"{path}:{line}: answer {row[5]!r} is not one of A, B, C, D")
            items.append(MCItem(f"mmlu/{subject}/{line}", row[0], tuple(row[1:5]), LETTERS.index(letter)))
    return items


def load_mmlu(
    dir_or_csv: str | Path, subjects: list[str] | None = None, split: str = "test", limit: int | None = None
) -> list[MCItem]:
    """MMLU questions of `split`, subjects in alphabetical order.

    `limit` takes items round-robin across subjects (first item of each subject, then the second,
    ...) so a small limit still covers every subject; without it every item is returned.
    """
    files = _mmlu_files(Path(dir_or_csv), split)
    by_subject = {_mmlu_subject(f): f for f in files}
    if subjects is not None:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise ValueError(f"unknown MMLU subject(s) {', '.join(unknown)}; found {len(by_subject)} subjects")
        by_subject = {s: by_subject[s] for s in sorted(set(subjects))}
    per_subject = [_read_mmlu_csv(path, subject) for subject, path in by_subject.items()]
    if limit is None:
        return [item for items in per_subject for item in items]
    _check_limit(limit)
    depth = max((len(items) for items in per_subject), default=0)
    interleaved = [items[i] for i in range(depth) for items in per_subject if i < len(items)]
    return interleaved[:limit]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")


def _split_answers(field: str) -> list[str]:
    pieces = [p.strip() for p in field.split(";")]
    return list(dict.fromkeys(p for p in pieces if p))


def _seeded_order(key: str, n: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n)


def load_truthfulqa_mc(csv_path: str | Path, limit: int | None = None) -> list[MCItem]:
    """TruthfulQA MC1-style items (best answer vs the incorrect answers), first `limit` rows."""
    _check_limit(limit)
    path = _require_file(Path(csv_path), "TruthfulQA")
    items: list[MCItem] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        needed = {"Question", "Best Answer", "Incorrect Answers"}
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing TruthfulQA column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            best = row["Best Answer"].strip()
            wrong = [a for a in _split_answers(row["Incorrect Answers"]) if a != best]
            if not best or not wrong:
                raise ValueError(f"{path}:{line}: TruthfulQA row needs a best answer and an incorrect answer")
            options = [best, *wrong]
            order = _seeded_order(row["Question"], len(options))
            shuffled = tuple(options[i] for i in order)
            items.append(MCItem(f"truthfulqa/{line - 1}", row["Question"].strip(), shuffled, int(np.argmin(order))))
            if limit is not None and len(items) >= limit:
                break
    return items


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def load_gsm8k(jsonl_path: str | Path, limit: int | None = None) -> list[GenItem]:
    """GSM8K problems with the number after `####` as reference, first `limit` lines."""
    _check_limit(limit)
    path = _require_file(Path(jsonl_path), "GSM8K")
    items: list[GenItem] = []
    for line, row in iter_jsonl(path, "GSM8K file"):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{line}: GSM8K row needs 'question' and 'answer'")
        match = _GSM8K_ANSWER.search(str(row["answer"]))
        if match is None:
            raise ValueError(f"{path}:{line}: GSM8K answer does not end with '#### <number>'")
        items.append(GenItem(f"gsm8k/{line}", row["question"], match.group(1).replace(",", "")))
        if limit is not None and len(items) >= limit:
            break
    return items

