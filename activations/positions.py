"""What each prompt token is: shared template prefix, user content, template suffix, response start.

With a chat template a prompt is `prefix + content + suffix`: the prefix (system prompt, role
markers) is the same tokens at the same positions for every prompt, the content is the user's text,
the suffix closes the user turn and opens the assistant's. The last prompt token is the
**response-start** position (it predicts the first response token, where the refusal decision is made).

The spans come from the template itself, never from hard-coded strings: the template is rendered
around two different sentinel contents, and the characters the two renderings share at the start
(end) are the prefix (suffix). Each token's character offsets then say on which side of the content
it lies; a token that straddles a boundary counts as content. Without a chat template (or with
`chat_template=False`) every token is content. In every case the last token is response-start.

    kinds = position_kinds(tokenizer, ["How do I ..."], chat_template=True, max_length=256)[0]
    # (n_tokens,) int8: PREFIX / CONTENT / SUFFIX / RESPONSE_START codes, see POSITION_KINDS
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.tokenize import format_prompt, has_chat_template

POSITION_KINDS: tuple[str, ...] = ("prefix", "content", "suffix", "response_start")
"""Kind names; a kind's code is its index here (stored as int8 in the shard column `position_kind`)."""
PREFIX, CONTENT, SUFFIX, RESPONSE_START = range(4)
UNKNOWN = -1
"""Code of rows whose kind was never recorded (schema-1 stores)."""

KIND_CODES: dict[str, int] = {name: code for code, name in enumerate(POSITION_KINDS)}

_SENTINELS = ("\x01Aq7Zk\x02", "\x03Wm3Jx\x04")
"""Two contents that share no first or last character, so the renderings differ exactly inside the content."""


def kind_codes(names: Sequence[str]) -> list[int]:
    """Codes of kind names; an unknown name is a ValueError listing the known ones."""
    unknown = [n for n in names if n not in KIND_CODES]
    if unknown:
        raise ValueError(f"unknown position kind {unknown[0]!r}; expected some of {', '.join(POSITION_KINDS)}")
    return [KIND_CODES[n] for n in names]


@dataclass(frozen=True)
class TemplateAffixes:
    """The rendered template around the user content: `prefix + content + suffix` (strings)."""

    prefix: str
    suffix: str


def template_affixes(tokenizer: Any, chat_template: bool = True, system_prompt: str | None = None) -> TemplateAffixes | None:
    """The template's prefix and suffix strings, or None when no chat template is applied."""
    if not (chat_template and has_chat_template(tokenizer)):
        return None
    a, b = (format_prompt(tokenizer, s, True, system_prompt) for s in _SENTINELS)
    shortest = min(len(a), len(b))
    start = 0
    while start < shortest and a[start] == b[start]:
        start += 1
    end = 0
    while end < shortest - start and a[len(a) - 1 - end] == b[len(b) - 1 - end]:
        end += 1
    if start + end >= len(a):
        raise ValueError("the chat template does not place the user content in the prompt")
    return TemplateAffixes(a[:start], a[len(a) - end:])


def _kinds_from_offsets(offsets: Sequence[tuple[int, int]], lo: int, hi: int) -> np.ndarray:
    """Kinds of tokens with character `offsets` when the content occupies characters [lo, hi)."""
    kinds = np.full(len(offsets), CONTENT, dtype=np.int8)
    for i, (start, end) in enumerate(offsets):
        if end <= lo:
            kinds[i] = PREFIX
        elif start >= hi:
            kinds[i] = SUFFIX
    return kinds


def encode_with_kinds(
    tokenizer: Any,
    texts: Sequence[str],
    chat_template: bool = True,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids of each formatted prompt (no padding, left-truncated to `max_length`, exactly as
    `activations.tokenize.encode_prompts` encodes it) and their `(n_tokens,)` int8 kind codes.

    Needs a fast tokenizer (character offsets) when a chat template is used.
    """
    affixes = template_affixes(tokenizer, chat_template, system_prompt)
    strings = [format_prompt(tokenizer, t, chat_template, system_prompt) for t in texts]
    tokenizer.truncation_side = "left"
    kwargs: dict[str, Any] = dict(add_special_tokens=affixes is None, truncation=max_length is not None,
                                  max_length=max_length)
    if affixes is None:
        ids = [list(row) for row in tokenizer(strings, **kwargs)["input_ids"]]
        kinds = [np.full(len(row), CONTENT, dtype=np.int8) for row in ids]
    else:
        try:
            encoded = tokenizer(strings, return_offsets_mapping=True, **kwargs)
        except NotImplementedError:
            raise ValueError("position kinds with a chat template need a fast tokenizer (character offsets)") from None
        ids, kinds = [list(row) for row in encoded["input_ids"]], []
        for string, offsets in zip(strings, encoded["offset_mapping"]):
            if not (string.startswith(affixes.prefix) and string.endswith(affixes.suffix)):
                raise ValueError("a formatted prompt does not start/end with the chat template's prefix/suffix")
            kinds.append(_kinds_from_offsets(offsets, len(affixes.prefix), len(string) - len(affixes.suffix)))
    for row in kinds:
        row[-1:] = RESPONSE_START
    return ids, kinds


def position_kinds(
    tokenizer: Any,
    texts: Sequence[str],
    chat_template: bool = True,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> list[np.ndarray]:
    """Per text, the `(n_tokens,)` int8 kind codes of its encoded prompt (see `encode_with_kinds`)."""
    return encode_with_kinds(tokenizer, texts, chat_template, max_length, system_prompt)[1]


def kind_names(codes: np.ndarray) -> np.ndarray:
    """Kind codes → object array of names ("unknown" for UNKNOWN)."""
    table = np.array([*POSITION_KINDS, "unknown"], dtype=object)
    return table[np.where(np.asarray(codes) < 0, len(POSITION_KINDS), codes)]
