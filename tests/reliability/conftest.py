"""Fixtures of the reliability battery: a small synthetic activation store and one-line error checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.sae_fixtures import one_torch_thread, two_category_store  # noqa: F401

LAYER = 3


@pytest.fixture(scope="session")
def sae_store(tmp_path_factory) -> Path:
    """700 rows (d_model 16): 600 extract rows of two categories, 100 calibrate rows, 4 shards."""
    return two_category_store(tmp_path_factory.mktemp("reliability") / "store", LAYER)


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one non-empty line, starting with `error:`."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
