"""Deterministic hashes: split assignment and record-set checksums (file checksums: `activations.io`)."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

from activations.records import PromptRecord


def unit_interval(seed: int, key: str) -> float:
    """Map `sha256(f"{seed}:{key}")` to a float in [0, 1) (first 8 bytes, big-endian / 2**64)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def records_sha256(records: Iterable[PromptRecord]) -> str:
    """Hex sha256 of the sorted `(id, text, category)` triples, serialised as canonical JSON.

    Independent of record order, split, source and meta: it changes exactly when an id, a text or
    a category changes, or a record is added or removed.
    """
    triples = sorted((record.id, record.text, record.category) for record in records)
    payload = json.dumps(triples, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
