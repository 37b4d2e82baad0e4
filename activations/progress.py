"""The one progress bar: tqdm on stderr that also shows in logs, at a rate a log can take.

    for batch in progress_bar(batches, desc="harvest", unit="batch"):
        ...

- On a terminal the bar is redrawn in place (at most every 0.1 s).
- When stderr is not a terminal (a log file, CI, `nohup`), tqdm's own default would either hide the
  bar (`disable=None`) or write carriage returns that a log shows as one endless line. Here each
  refresh is a plain ASCII line instead, written at most every `REFUSAL_SAE_PROGRESS_INTERVAL` seconds
  (default 30) plus the final line, so a log shows that work moves without being flooded.
- In a Jupyter kernel the notebook widget is used (tqdm.auto).
- `REFUSAL_SAE_PROGRESS=0` silences every bar.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

INTERVAL_ENV = "REFUSAL_SAE_PROGRESS_INTERVAL"
SWITCH_ENV = "REFUSAL_SAE_PROGRESS"
DEFAULT_LOG_INTERVAL = 30.0
LOG_WIDTH = 100


class LineWriter:
    """A file-like wrapper that turns tqdm's carriage-return redraws into one line per refresh."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def log_interval() -> float:
    """Seconds between two lines of a bar written to a log (`REFUSAL_SAE_PROGRESS_INTERVAL`)."""
    value = os.environ.get(INTERVAL_ENV)
    if value is None:
        return DEFAULT_LOG_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds >= 0:
        raise ValueError(f"{INTERVAL_ENV} must be >= 0, got {value!r}")
    return seconds


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: float | None = None,
                 unit: str = "it", disable: bool = False, leave: bool = True, initial: float = 0,
                 stream: TextIO | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (see the module docstring); `disable=True` or `REFUSAL_SAE_PROGRESS=0` hides it."""
    stream = sys.stderr if stream is None else stream
    off = disable or os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "off", "no")
    common = dict(desc=desc, total=total, unit=unit, disable=off, leave=leave, initial=initial, **kwargs)
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    if _in_notebook() and stream is sys.stderr:
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(iterable, **common)
    from tqdm import tqdm

    interval = log_interval()
    return tqdm(iterable, file=LineWriter(stream), ncols=LOG_WIDTH, ascii=True, mininterval=interval,
                maxinterval=max(interval, 10.0), miniters=1, **common)
