"""Shared fixtures: the embedded model and tokenizer are loaded once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `import tests.helpers...`


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32 on CPU."""
    from activations.model_loading import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded SmolLM2 tokenizer (chat template included), left padding."""
    from activations.model_loading import load_embedded_tokenizer

    return load_embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(embedded_tokenizer):
    """(model, tokenizer): a 4-layer random Llama with d_model 64 and the embedded tokenizer."""
    from activations.tiny_models import build_tiny_model

    return build_tiny_model("llama", tokenizer=embedded_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tmp_path_factory) -> str:
    """`tiny_llama` saved as a local model folder (model + tokenizer), read-only for the tests."""
    model, tokenizer = tiny_llama
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
