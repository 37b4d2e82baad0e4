"""File IO shared by every stage: atomic writes, JSON / JSON Lines / safetensors reads, checksums.

Writers put a temporary file beside the target, fsync it and rename it into place, so a reader (or a
rerun after `kill -9`) sees either the old file or the complete new one, never half of it. Readers
stop with one line naming the file and what it should hold. Nothing here unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK_BYTES = 1 << 22


# --- atomic writes -------------------------------------------------------------------------------

def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read from /proc where possible; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 minus the umask (0644 under the usual 022)."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Run `write(tmp_path)` on a temporary name next to `path`, then move it into place.

    The file gets `mode`, by default the mode a plain `open()` gives (0666 minus the umask): the
    temporary file `mkstemp` creates is private (0600), which colleagues on a shared file system
    could not read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Atomically write `text` (UTF-8), fsynced before the rename."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, _write, mode)


def to_jsonable(obj: Any, nonfinite: str = "error") -> Any:
    """Numpy / torch scalars and arrays (recursively) as plain JSON types.

    `nonfinite`: "error" raises ValueError on NaN / infinity (JSON cannot hold them faithfully),
    "null" writes them as null. Paths become strings.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nonfinite) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), nonfinite)
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if not math.isfinite(value):
            if nonfinite == "null":
                return None
            raise ValueError(f"cannot write a non-finite number ({value}) to JSON")
        return value
    if hasattr(obj, "tolist") and hasattr(obj, "detach"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist(), nonfinite)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise ValueError(f"cannot write an object of type {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any, nonfinite: str = "error") -> Path:
    """Atomically write `obj` as indented JSON (numpy values converted; see `to_jsonable`)."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj, nonfinite), indent=2, allow_nan=False, ensure_ascii=False) + "\n")


# --- reads ---------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing or broken file names `what` it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} at {path} is not valid JSON: {err}") from None


def iter_jsonl_text(text: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line of JSON Lines text; `where` names it in errors."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}:{line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}:{line_no}: not a JSON object")
        yield line_no, row


def iter_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line of a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    yield from iter_jsonl_text(path.read_text(encoding="utf-8"), str(path))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- safetensors ---------------------------------------------------------------------------------

def save_numpy_tensors(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write numpy arrays to a safetensors file."""
    from safetensors.numpy import save_file

    contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def load_numpy_tensors(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Read every array of a safetensors file as numpy (no pickle involved)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return load_file(str(path))


def save_torch_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> Path:
    """Atomically write torch tensors to a safetensors file."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def load_torch_tensors(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read every tensor of a safetensors file on CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return load_file(str(path), device="cpu")
