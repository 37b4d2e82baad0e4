"""Prompt records and the category / split vocabulary shared by every stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REFUSAL_CATEGORIES: tuple[str, ...] = (
    "humanizing",
    "incomplete",
    "indeterminate",
    "safety",
    "unsupported",
)
"""The five refusal categories (CoCoNot taxonomy), in a fixed order."""

BENIGN = "benign"
CONTRAST = "contrast"
CATEGORIES: tuple[str, ...] = (BENIGN, *REFUSAL_CATEGORIES, CONTRAST)
"""Every category a prompt may carry. `contrast` = benign prompts that look like a refusal category."""

PROBE_CLASSES: tuple[str, ...] = (BENIGN, *REFUSAL_CATEGORIES)
"""Classes of the multinomial heads: index 0 is benign, then the refusal categories."""

SPLITS: tuple[str, ...] = ("extract", "calibrate", "eval")
"""Disjoint data splits: fit on `extract`, tune on `calibrate`, report on `eval`."""


@dataclass(frozen=True)
class PromptRecord:
    """One labelled prompt.

    `category` is one of CATEGORIES; `split` one of SPLITS (or "" before splitting);
    `source` names the loader spec it came from; `meta` holds free metadata
    (e.g. the original dataset category or subcategory).
    """

    id: str
    text: str
    category: str
    split: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("prompt record has an empty 'id'")
        if not self.text or not self.text.strip():
            raise ValueError(f"prompt record {self.id!r} has an empty 'text'")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"prompt record {self.id!r} has unknown category {self.category!r}; "
                f"expected one of {', '.join(CATEGORIES)}"
            )
        if self.split and self.split not in SPLITS:
            raise ValueError(
                f"prompt record {self.id!r} has unknown split {self.split!r}; expected one of {', '.join(SPLITS)}"
            )

    @property
    def is_refusal(self) -> bool:
        """True for the five refusal categories (a refusal is the expected behaviour)."""
        return self.category in REFUSAL_CATEGORIES
