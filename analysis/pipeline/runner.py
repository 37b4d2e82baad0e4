"""Resumable stages: each stage's output folder carries a stamp with the hash of its inputs.

A stage is skipped when its stamp exists and matches the hash of (its config section, the stamps of
the stages it reads). The stamp is written last and atomically, so a crash mid-stage leaves no stamp
and the rerun redoes that stage (the stage itself resumes where its own outputs allow, e.g. harvesting).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activations.io import write_json

STAMP = "stage.json"


def stable_hash(obj: Any) -> str:
    """sha256 (first 16 hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]




@dataclass
class Stage:
    """One pipeline stage: `run(out_dir) -> result dict` writes its outputs under `out_dir`."""

    name: str
    run: Callable[[Path], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)


class StageRunner:
    """Runs stages in order, skipping those whose stamp matches, with a stage progress display."""

    def __init__(self, root: Path, stages: list[Stage], stream: Any = None) -> None:
        self.root = Path(root)
        self.stages = stages
        self.stream = stream
        self.results: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def _input_hash(self, stage: Stage) -> str:
        return stable_hash({"config": stage.config, "after": {n: self.hashes[n] for n in stage.after}})

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def run(self) -> dict[str, dict[str, Any]]:
        total = len(self.stages)
        for index, stage in enumerate(self.stages, start=1):
            missing = [n for n in stage.after if n not in self.hashes]
            if missing:
                raise ValueError(f"stage '{stage.name}' needs stage '{missing[0]}', which does not run before it")
            out = self.stage_dir(stage.name)
            input_hash = self._input_hash(stage)
            stamp_path = out / STAMP
            if stamp_path.is_file():
                stamp = json.loads(stamp_path.read_text())
                if stamp.get("input_hash") == input_hash:
                    self._say(f"[{index}/{total}] {stage.name}: up to date, skipped")
                    self.results[stage.name] = stamp["result"]
                    self.hashes[stage.name] = stable_hash([input_hash, stamp["result"]])
                    self.timings[stage.name] = 0.0
                    continue
                stamp_path.unlink()
            self._say(f"[{index}/{total}] {stage.name} ...")
            start = time.perf_counter()
            out.mkdir(parents=True, exist_ok=True)
            result = stage.run(out)
            elapsed = time.perf_counter() - start
            write_json(stamp_path, {"stage": stage.name, "input_hash": input_hash, "seconds": elapsed, "result": result})
            self.results[stage.name] = result
            self.hashes[stage.name] = stable_hash([input_hash, result])
            self.timings[stage.name] = elapsed
            self._say(f"[{index}/{total}] {stage.name}: done in {elapsed:.1f} s")
        return self.results
