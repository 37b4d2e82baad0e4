"""Atomic file writes shared by every stage: write a temp file beside the target, fsync, rename.

A reader (or a rerun after `kill -9`) sees either the old file or the complete new one, never half.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Run `write(tmp_path)` on a temporary name next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Atomically write `text` (UTF-8), fsynced before the rename."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, _write, mode)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """Atomically write `obj` as indented JSON (extra keyword arguments go to `json.dumps`)."""
    dump_kwargs.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")
